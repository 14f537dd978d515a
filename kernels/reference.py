"""Torch references for every kernel: the oracle the tests compare against and the CPU fallback.

Shape legend: T tokens, D model dim, F expert FFN dim, E experts, K top-k slots per token,
M = T*K routed rows (expert-sorted), N/K generic GEMM dims.

Conventions shared with the kernels
-----------------------------------
- Slot s = t*K + k. The dropless permutation sorts slots by expert, stably (ties in slot order), so
  it equals ``torch.argsort(expert_ids_TK.flatten(), stable=True)``; dropped slots (``kept`` False)
  sort after every expert and get ``dest = -1``.
- ``dest_TK[t, k]`` is the row of slot (t, k) in the sorted order; ``src_M[r]`` the slot of row r
  (-1 for rows past the kept count). Token of row r: ``src_M[r] // K``.
- Gating statistics: ``probs_sum_E = sum_t probs_TE[t]`` and ``lse_sq_sum = sum_t logsumexp(logits_t)^2``
  (the load-balancing loss uses probs_sum_E / T and counts_E; the z-loss is lse_sq_sum / T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


# ----------------------------------------------------------------------------------- gating
def gating_ref(
    logits_TE: Tensor, k: int, *, score: str = "softmax", renormalize: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (weights_TK fp32, expert_ids_TK int64, probs_TE fp32, counts_E int64, probs_sum_E, lse_sq_sum)."""
    E = logits_TE.shape[1]
    l32 = logits_TE.float()
    probs = torch.softmax(l32, dim=-1) if score == "softmax" else torch.sigmoid(l32)
    top_w, top_i = torch.topk(probs, k, dim=-1)
    if renormalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    counts = torch.bincount(top_i.flatten(), minlength=E)
    lse = torch.logsumexp(l32, dim=-1)
    return top_w, top_i, probs, counts, probs.sum(0), (lse * lse).sum()


# ----------------------------------------------------------------------------------- permutation
def permutation_ref(expert_ids_TK: Tensor, E: int, kept_TK: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dest_TK int32, src_M int32, counts_E int32) of the stable expert sort (see module doc)."""
    T, K = expert_ids_TK.shape
    ids = expert_ids_TK.flatten().long()
    if kept_TK is not None:
        ids = torch.where(kept_TK.flatten(), ids, torch.full_like(ids, E))
    order = torch.argsort(ids, stable=True)  # row r holds slot order[r]
    counts = torch.bincount(ids, minlength=E + 1)[:E]
    n_kept = int(counts.sum())
    dest = torch.empty(T * K, dtype=torch.long, device=ids.device)
    dest[order] = torch.arange(T * K, device=ids.device)
    dest = torch.where(ids < E, dest, torch.full_like(dest, -1))
    src = torch.where(torch.arange(T * K, device=ids.device) < n_kept, order, torch.full_like(order, -1))
    return dest.view(T, K).int(), src.int(), counts.int()


def permute_ref(x_TD: Tensor, src_M: Tensor, K: int) -> Tensor:
    """x_MD[r] = x_TD[src_M[r] // K]; rows with src -1 are zero."""
    src = src_M.long()
    valid = src >= 0
    out = x_TD[torch.where(valid, src // K, torch.zeros_like(src))]
    return out * valid[:, None].to(out.dtype)


def unpermute_ref(y_MD: Tensor, dest_TK: Tensor, weights_TK: Tensor | None = None) -> Tensor:
    """y_TD[t] = sum_k w[t, k] * y_MD[dest[t, k]] (fp32 sum over k; dest -1 contributes nothing)."""
    dest = dest_TK.long()
    valid = dest >= 0
    rows = y_MD[torch.where(valid, dest, torch.zeros_like(dest))].float()  # [T, K, D]
    w = valid.float() if weights_TK is None else weights_TK.float() * valid.float()
    return (rows * w[..., None]).sum(1).to(y_MD.dtype)


# ----------------------------------------------------------------------------------- grouped GEMM
def _splits(counts_E: Tensor) -> list[tuple[int, int]]:
    c = [int(v) for v in counts_E.tolist()]
    out, s = [], 0
    for n in c:
        out.append((s, s + n))
        s += n
    return out


def grouped_gemm_ref(a_MK: Tensor, b_EKN: Tensor, counts_E: Tensor) -> Tensor:
    """c[rows of e] = a[rows of e] @ b[e]; rows past counts.sum() are zero. fp32 accumulation."""
    out = a_MK.new_zeros((a_MK.shape[0], b_EKN.shape[2]))
    for e, (s, t) in enumerate(_splits(counts_E)):
        if t > s:
            out[s:t] = (a_MK[s:t].float() @ b_EKN[e].float()).to(out.dtype)
    return out


def grouped_gemm_wgrad_ref(a_MK: Tensor, g_MN: Tensor, counts_E: Tensor) -> Tensor:
    """db[e] = a[rows of e]^T @ g[rows of e] -> [E, K, N]."""
    E = counts_E.shape[0]
    out = a_MK.new_zeros((E, a_MK.shape[1], g_MN.shape[1]))
    for e, (s, t) in enumerate(_splits(counts_E)):
        if t > s:
            out[e] = (a_MK[s:t].float().T @ g_MN[s:t].float()).to(out.dtype)
    return out


# ----------------------------------------------------------------------------------- MoE FFN
def activation_ref(z: Tensor, activation: str, z3: Tensor | None = None) -> Tensor:
    if activation == "gelu":
        return F.gelu(z)
    if activation == "swiglu":
        return F.silu(z) * z3
    raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")


def moe_ffn_ref(
    x_TD: Tensor,
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    w1_EDF: Tensor,
    w2_EFD: Tensor,
    w3_EDF: Tensor | None = None,
    activation: str = "gelu",
) -> Tensor:
    """y_T = sum_k w[t,k] * FFN_{e(t,k)}(x_t), FFN_e(x) = act(x W1_e [, x W3_e]) W2_e. Differentiable.

    Computed expert by expert in the input dtype (the Hugging Face style loop), summed in fp32.
    Slots with weight exactly 0 still run (dropped slots are the caller's business).
    """
    T, K = expert_ids_TK.shape
    y = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(w1_EDF.shape[0]):
        tok, slot = torch.where(expert_ids_TK == e)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        z = xe @ w1_EDF[e]
        h = activation_ref(z, activation, xe @ w3_EDF[e] if w3_EDF is not None else None)
        ye = (h @ w2_EFD[e]).float() * weights_TK[tok, slot].float()[:, None]
        y = y.index_add(0, tok, ye)
    return y.to(x_TD.dtype)
