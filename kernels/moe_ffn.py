"""The MoE expert FFN on Triton kernels: the entry point the reference's ``backend="triton"`` calls.

Shape legend: T tokens, D model dim, F expert FFN dim, E experts, K top-k, M = T*K routed rows.

Data flow (forward; 5 kernel launches for GELU, plus a few tiny torch index ops)
---------------------------------------------------------------------------------
  expert_ids_TK --build_permutation--> dest_TK, src_M, counts_E           (permute.py, 2 launches)
  x_TD --permute--> x_MD (token-major scatter; default on CUDA when top_k > 1: ``materialize``)
  x_MD, w1_EDF --gmm(epilogue GELU)--> z_MF, h_MF          (grouped_gemm.py; with materialize=False
                                  the permute is fused into the A-operand loads as a row gather)
  h_MF, w2_EFD --gmm--> y_MD
  y_MD, weights_TK --unpermute (weighted sum over k, fp32)--> y_TD       (permute.py)
Backward:
  dy_TD --unpermute backward--> dy_MD, dweights_TK
  dz_MF = (dy_MD @ w2^T) * GELU'(z)   (one gmm, trans_b, GELU' fused in the epilogue)
  dw2 = h^T dy_MD,  dw1 = x[gathered]^T dz   (wgrad kernels; the gather is fused again)
  dx_MD = dz @ w1^T;  dx_TD = sum over k of dx_MD rows (unpermute without weights, deterministic)
SwiGLU runs two first-layer GEMMs (w1, w3) with the gate ``silu(z1) * z3`` in torch (not fused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import reference as ref
from kernels._common import check, use_triton
from kernels.grouped_gemm import ACT_GELU, ACT_GELU_GRAD, gmm_fwd, gmm_wgrad
from kernels.permute import Permutation, build_permutation, permute, permute_fwd, unpermute, unpermute_fwd

_ACTS = {"gelu": 0, "swiglu": 1}


def _token_of_row(src_M: Tensor, K: int) -> Tensor:
    return torch.where(src_M >= 0, torch.div(src_M, K, rounding_mode="floor"), torch.zeros_like(src_M))


@torch.library.custom_op("semoe_kernels::expert_mlp", mutates_args=())
def _expert_mlp_op(
    x_TD: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, counts_E: Tensor, tok_M: Tensor, dest_TK: Tensor,
    src_M: Tensor, act: int, materialize: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y_MD, h_MF, z_MF, z3_MF or empty, x_MD or empty); only y_MD is differentiable.

    ``materialize``: permute x into x_MD once (one memory-bound pass) so that both first-layer GEMMs
    and the w1 weight gradient read A by bulk copies; otherwise the gather is fused into their loads
    (less memory: no [M, D] copy is kept for the backward).
    """
    M = tok_M.shape[0]
    Fdim = w1.shape[2]
    if dest_TK.numel() == 0:  # x is already expert-sorted rows (grouped_mlp)
        a, gather, materialize = x_TD, None, False
    elif materialize:
        a, gather = permute_fwd(x_TD, dest_TK, src_M), None
    else:
        a, gather = x_TD, tok_M
    if act == 0:
        z = torch.empty((M, Fdim), dtype=x_TD.dtype, device=x_TD.device)
        h = gmm_fwd(a, w1, counts_E, gather=gather, act=ACT_GELU, z=z)
        z3 = z.new_empty(0)
    else:
        z = gmm_fwd(a, w1, counts_E, gather=gather)
        z3 = gmm_fwd(a, w3, counts_E, gather=gather)
        h = (F.silu(z.float()) * z3.float()).to(x_TD.dtype)
    y = gmm_fwd(h, w2, counts_E)
    return y, h, z, z3, a if materialize else x_TD.new_empty(0)


@_expert_mlp_op.register_fake
def _(x_TD, w1, w2, w3, counts_E, tok_M, dest_TK, src_M, act, materialize):
    M = tok_M.shape[0]
    Fdim = w1.shape[2]
    mf = x_TD.new_empty((M, Fdim))
    return (x_TD.new_empty((M, w2.shape[2])), mf, torch.empty_like(mf),
            x_TD.new_empty(0 if act == 0 else (M, Fdim)), x_TD.new_empty((M, x_TD.shape[1]) if materialize else 0))


def _mlp_setup(ctx, inputs, output):
    x, w1, w2, w3, counts, tok, dest, src, act, materialize = inputs
    y, h, z, z3, xm = output
    ctx.act = act
    ctx.materialize = materialize and dest.numel() > 0
    ctx.presorted = dest.numel() == 0
    ctx.save_for_backward(x, w1, w2, w3 if w3 is not None else w1, counts, tok, dest, h, z, z3, xm)
    ctx.mark_non_differentiable(h, z, z3, xm)
    ctx.set_materialize_grads(False)  # no zero-filled [M, F] gradients for the saved intermediates


def _mlp_backward(ctx, gy, gh=None, gz=None, gz3=None, gxm=None):
    x, w1, w2, w3, counts, tok, dest, h, z, z3, xm = ctx.saved_tensors
    a, gather = (xm, None) if ctx.materialize else (x, None) if ctx.presorted else (x, tok)
    gy = gy.contiguous()
    dw2 = gmm_wgrad(h, gy, counts)
    dw3 = None
    if ctx.act == 0:
        dz = gmm_fwd(gy, w2, counts, trans_b=True, act=ACT_GELU_GRAD, z=z)
        dw1 = gmm_wgrad(a, dz, counts, gather=gather)
        dx_M = gmm_fwd(dz, w1, counts, trans_b=True)
    else:
        dh = gmm_fwd(gy, w2, counts, trans_b=True).float()
        z1f, z3f = z.float(), z3.float()
        sig = torch.sigmoid(z1f)
        dz1 = (dh * z3f * sig * (1 + z1f * (1 - sig))).to(x.dtype)
        dz3 = (dh * z1f * sig).to(x.dtype)
        dw1 = gmm_wgrad(a, dz1, counts, gather=gather)
        dw3 = gmm_wgrad(a, dz3, counts, gather=gather)
        dx_M = gmm_fwd(dz1, w1, counts, trans_b=True, out_dtype=torch.float32)
        dx_M = (dx_M + gmm_fwd(dz3, w3, counts, trans_b=True, out_dtype=torch.float32)).to(x.dtype)
    dx = dx_M if ctx.presorted else unpermute_fwd(dx_M, dest, None, out_dtype=x.dtype)
    return dx, dw1, dw2, dw3, None, None, None, None, None, None


_expert_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def expert_mlp(
    x_TD: Tensor, perm: Permutation, w1_EDF: Tensor, w2_EFD: Tensor, w3_EDF: Tensor | None = None,
    activation: str = "gelu", materialize: bool | None = None,
) -> Tensor:
    """Differentiable grouped expert MLP on expert-sorted rows: returns y_MD (rows in ``perm`` order).

    ``materialize`` (default: on CUDA when top_k > 1): permute x once instead of gathering inside the
    GEMMs. Measured on the H100 at mixtral size: the gathered A operand cannot use bulk tensor copies,
    and the gathered first-layer GEMM and w1 weight gradient ran at 533 and 473 TFLOP/s against 684
    and 656 for the same kernels on a contiguous A (layer fwd+bwd 0.77 -> 0.87 of dense); the permute
    pass costs ~0.15 ms. With top_k = 1 (hetu_switch_b32) the gather path measured better (0.67 vs
    0.59 of dense, one run each, cause not profiled), hence the default.
    """
    tok = _token_of_row(perm.src_M, perm.top_k)
    if materialize is None:
        materialize = x_TD.is_cuda and perm.top_k > 1
    y, _, _, _, _ = _expert_mlp_op(
        x_TD, w1_EDF, w2_EFD, w3_EDF, perm.counts_E, tok, perm.dest_TK, perm.src_M, _ACTS[activation], materialize
    )
    return y


def grouped_mlp(
    x_ND: Tensor, tokens_per_expert_E: Tensor, w1_EDF: Tensor, w2_EFD: Tensor, w3_EDF: Tensor | None = None,
    activation: str = "gelu",
) -> Tensor:
    """Differentiable expert FFNs on rows already sorted by expert (drop-in for the reference's
    ``GroupedExperts.forward(x_ND, tokens_per_expert_E)`` without biases): ``y_ND``.

    Rows past ``tokens_per_expert_E.sum()`` give zero outputs and zero gradients.
    """
    check(x_ND.dim() == 2 and w1_EDF.dim() == 3 and x_ND.shape[1] == w1_EDF.shape[1],
          f"x_ND must be [N, D={w1_EDF.shape[1]}], got {tuple(x_ND.shape)}")
    check(activation in _ACTS, f"activation must be 'gelu' or 'swiglu', got {activation!r}")
    check((activation == "swiglu") == (w3_EDF is not None), "w3_EDF is needed for swiglu and only for it")
    if not use_triton(x_ND, w1_EDF):
        counts = tokens_per_expert_E
        z = ref.grouped_gemm_ref(x_ND, w1_EDF, counts)
        z3 = ref.grouped_gemm_ref(x_ND, w3_EDF, counts) if w3_EDF is not None else None
        return ref.grouped_gemm_ref(ref.activation_ref(z, activation, z3), w2_EFD, counts)
    counts = tokens_per_expert_E.to(torch.int32)
    empty = counts.new_empty((0, 1))
    y, _, _, _, _ = _expert_mlp_op(x_ND.contiguous(), w1_EDF, w2_EFD, w3_EDF, counts, counts.new_empty(x_ND.shape[0]),
                                   empty, counts.new_empty(0), _ACTS[activation], False)
    return y


def _expert_mlp_torch_gmm(x_TD, perm, w1, w2, w3, activation):
    """Same data flow with ``torch._grouped_mm`` (CUTLASS, sm90, bf16) for the GEMMs: our permute
    kernel materialises x_MD, the activation runs in torch (not fused)."""
    offs = torch.cumsum(perm.counts_E, 0, dtype=torch.int32)
    xm = permute(x_TD, perm)
    z = torch._grouped_mm(xm, w1, offs=offs)
    h = F.gelu(z) if activation == "gelu" else F.silu(z) * torch._grouped_mm(xm, w3, offs=offs)
    return torch._grouped_mm(h, w2, offs=offs)


def moe_ffn(
    x_TD: Tensor,
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    w1_EDF: Tensor,
    w2_EFD: Tensor,
    w3_EDF: Tensor | None = None,
    *,
    activation: str = "gelu",
    kept_TK: Tensor | None = None,
    gemm: str = "triton",
    materialize: bool | None = None,
) -> Tensor:
    """MoE expert FFN: ``y_T = sum_k w[t,k] * FFN_{e(t,k)}(x_t)``, ``FFN_e(x) = act(x W1_e [, x W3_e]) W2_e``.

    x_TD: [T, D] fp32/bf16/fp16; expert_ids_TK: int [T, K] in 0..E-1; weights_TK: float [T, K]
    (combine weights, differentiable); w1_EDF: [E, D, F]; w2_EFD: [E, F, D]; w3_EDF: [E, D, F] for
    ``activation="swiglu"``; kept_TK: bool [T, K] or None (slots with False are dropped: they add
    nothing and get zero weight gradient). Differentiable in x, weights and all expert weights.
    Uses the Triton kernels on CUDA (or under TRITON_INTERPRET=1), the torch reference otherwise.
    ``materialize``: see :func:`expert_mlp` (default True on CUDA).
    ``gemm="torch"`` keeps our gating-side kernels (index maps, permute, unpermute) but runs the
    expert GEMMs through ``torch._grouped_mm`` (CUDA bf16 only; GELU/SwiGLU then unfused).
    """
    check(x_TD.dim() == 2, f"x_TD must be [T, D], got {tuple(x_TD.shape)}")
    check(expert_ids_TK.dim() == 2 and expert_ids_TK.shape[0] == x_TD.shape[0],
          f"expert_ids_TK must be [T={x_TD.shape[0]}, K], got {tuple(expert_ids_TK.shape)}")
    check(weights_TK.shape == expert_ids_TK.shape, f"weights_TK must be {tuple(expert_ids_TK.shape)}")
    check(activation in _ACTS, f"activation must be 'gelu' or 'swiglu', got {activation!r}")
    E, D, Fdim = w1_EDF.shape
    check(D == x_TD.shape[1], f"w1_EDF is [E, D={D}, F] but x_TD has D={x_TD.shape[1]}")
    check(w2_EFD.shape == (E, Fdim, D), f"w2_EFD must be {(E, Fdim, D)}, got {tuple(w2_EFD.shape)}")
    check((activation == "swiglu") == (w3_EDF is not None), "w3_EDF is needed for swiglu and only for it")
    check(w3_EDF is None or w3_EDF.shape == w1_EDF.shape, "w3_EDF must have the shape of w1_EDF")
    check(x_TD.dtype == w1_EDF.dtype == w2_EFD.dtype, "x_TD, w1_EDF and w2_EFD must share a dtype")
    if not use_triton(x_TD, w1_EDF):
        w = weights_TK if kept_TK is None else weights_TK * kept_TK.to(weights_TK.dtype)
        return ref.moe_ffn_ref(x_TD, expert_ids_TK, w, w1_EDF, w2_EFD, w3_EDF, activation)
    check(gemm in ("triton", "torch"), f"gemm must be 'triton' or 'torch', got {gemm!r}")
    perm = build_permutation(expert_ids_TK, E, kept_TK)
    if gemm == "torch":
        check(x_TD.is_cuda and hasattr(torch, "_grouped_mm"), "gemm='torch' needs CUDA and torch._grouped_mm")
        y_MD = _expert_mlp_torch_gmm(x_TD.contiguous(), perm, w1_EDF, w2_EFD, w3_EDF, activation)
    else:
        y_MD = expert_mlp(x_TD.contiguous(), perm, w1_EDF, w2_EFD, w3_EDF, activation, materialize)
    return unpermute(y_MD, perm, weights_TK)
