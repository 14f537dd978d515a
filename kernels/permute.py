"""Dropless (and capacity-dropping) permute / unpermute of tokens into expert-contiguous order.

Shape legend: T tokens, D model dim, E experts, K slots per token, M = T*K rows, B slot blocks.

Data flow
---------
:func:`build_permutation` (ids -> index maps; two launches plus a small torch scan, no host sync):
  1. ``_hist_kernel``: each program takes BS consecutive slots (slot s = t*K + k) and writes its
     per-expert histogram to ``hist_BE`` (dropped slots, ``kept`` False, go to a virtual expert E).
  2. torch: ``base[e, b] = sum_{e' < e} count[e'] + sum_{b' < b} hist[b', e]``, an exclusive cumsum
     over ``hist`` laid out expert-major (a few small kernels).
  3. ``_rank_kernel``: each program recomputes its one-hot [BS, E] matrix, a cumsum down the slots
     gives every slot its rank among same-expert slots of the block; ``dest = base[e, b] + rank``.
     It writes ``dest_TK`` (-1 for dropped slots) and the inverse ``src_M[dest] = s``.
  The order is the stable sort of slots by expert, so it is deterministic and equals
  ``torch.argsort(ids.flatten(), stable=True)``. ``src_M`` is -1 past the kept count.
:func:`permute` ``x_MD[r] = x_TD[src_M[r] // K]`` (zeros where src is -1): token-major, each
  program reads a [BT, BD] block of tokens once and writes it to the K destination rows (reads T*D,
  writes M*D). Backward: ``dx_TD = unpermute(dx_MD, dest_TK, None)``.
:func:`unpermute` ``y_TD[t] = sum_k w[t, k] * y_MD[dest[t, k]]`` summed in fp32 in k order (no
  atomics: each output row is owned by one program, so results are bit-reproducible).
  Backward (one launch): ``dy_MD[dest[t, k]] = w[t, k] * dy_TD[t]`` and
  ``dw[t, k] = <dy_TD[t], y_MD[dest[t, k]]>``; rows of dy_MD that no kept slot maps to are zeroed.

In the MoE FFN (:mod:`kernels.moe_ffn`) the permute is fused into the first grouped GEMM's loads
(``gather``), so only the index maps and the unpermute run as separate kernels there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import reference as ref
from kernels._common import HAS_TRITON, INTERPRET, check, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_ids(ids_ptr, kept_ptr, slots, S, E, HAS_KEPT: tl.constexpr):
        smask = slots < S
        ids = tl.load(ids_ptr + slots, mask=smask, other=0).to(tl.int32)
        if HAS_KEPT:
            kp = tl.load(kept_ptr + slots, mask=smask, other=0)
            ids = tl.where(kp != 0, ids, E)
        ids = tl.where(smask, ids, E + 1)  # out-of-range slots match no column of interest
        return ids, smask

    @triton.jit
    def _hist_kernel(ids_ptr, kept_ptr, hist_ptr, S, E, HAS_KEPT: tl.constexpr,
                     E1_PAD: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)
        slots = pid * BS + tl.arange(0, BS)
        ids, smask = _load_ids(ids_ptr, kept_ptr, slots, S, E, HAS_KEPT)
        cols = tl.arange(0, E1_PAD)
        onehot = (ids[:, None] == cols[None, :]).to(tl.int32)
        tl.store(hist_ptr + pid * (E + 1) + cols, tl.sum(onehot, 0), mask=cols < E + 1)

    @triton.jit
    def _rank_kernel(ids_ptr, kept_ptr, base_ptr, dest_ptr, src_ptr, S, E, NB,
                     HAS_KEPT: tl.constexpr, E1_PAD: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)
        slots = pid * BS + tl.arange(0, BS)
        ids, smask = _load_ids(ids_ptr, kept_ptr, slots, S, E, HAS_KEPT)
        cols = tl.arange(0, E1_PAD)
        onehot = (ids[:, None] == cols[None, :]).to(tl.int32)
        rank = tl.sum(tl.where(onehot != 0, tl.cumsum(onehot, 0), 0), 1) - 1
        base = tl.load(base_ptr + ids.to(tl.int64) * NB + pid, mask=smask, other=0)
        dest = base + rank
        keep = smask & (ids < E)
        tl.store(dest_ptr + slots, tl.where(keep, dest, -1), mask=smask)
        tl.store(src_ptr + dest, slots, mask=keep)

    @triton.jit
    def _permute_kernel(x_ptr, dest_ptr, src_ptr, out_ptr, T, M, D, s_x, s_o,
                        K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BTK_PAD: tl.constexpr):
        # token-major: read each token row once, write it to its K destinations
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        toks = pid_t * BT + tl.arange(0, BT)
        tmask = toks < T
        cols = pid_d * BD + tl.arange(0, BD)
        cmask = cols < D
        v = tl.load(x_ptr + toks[:, None].to(tl.int64) * s_x + cols[None, :], mask=tmask[:, None] & cmask[None, :])
        for k in tl.static_range(K):
            dst = tl.load(dest_ptr + toks.to(tl.int64) * K + k, mask=tmask, other=-1)
            ok = tmask & (dst >= 0)
            tl.store(out_ptr + tl.where(ok, dst, 0).to(tl.int64)[:, None] * s_o + cols[None, :], v,
                     mask=ok[:, None] & cmask[None, :])
        # rows no kept slot maps to (past the kept count) in this program's row range: zeros
        rows = pid_t * BT * K + tl.arange(0, BTK_PAD)
        rmask = (rows < M) & (rows < (pid_t + 1) * BT * K)
        src = tl.load(src_ptr + rows, mask=rmask, other=0)
        dead = rmask & (src < 0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * s_o + cols[None, :],
                 tl.zeros((BTK_PAD, BD), dtype=out_ptr.dtype.element_ty), mask=dead[:, None] & cmask[None, :])

    @triton.jit
    def _unpermute_kernel(y_ptr, dest_ptr, w_ptr, out_ptr, T, D, s_y, s_o,
                          K: tl.constexpr, HAS_W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_d = tl.program_id(1)
        toks = pid_t * BT + tl.arange(0, BT)
        tmask = toks < T
        cols = pid_d * BD + tl.arange(0, BD)
        cmask = cols < D
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for k in tl.static_range(K):
            dst = tl.load(dest_ptr + toks.to(tl.int64) * K + k, mask=tmask, other=-1)
            ok = tmask & (dst >= 0)
            v = tl.load(y_ptr + tl.where(ok, dst, 0).to(tl.int64)[:, None] * s_y + cols[None, :],
                        mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            if HAS_W:
                w = tl.load(w_ptr + toks.to(tl.int64) * K + k, mask=ok, other=0.0).to(tl.float32)
                v = v * w[:, None]
            acc += v
        tl.store(out_ptr + toks[:, None].to(tl.int64) * s_o + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])

    @triton.jit
    def _unpermute_bwd_kernel(gy_ptr, y_ptr, dest_ptr, src_ptr, w_ptr, gym_ptr, gw_ptr, T, M, D,
                              s_gy, s_y, s_gym,
                              K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BTK_PAD: tl.constexpr):
        pid = tl.program_id(0)
        toks = pid * BT + tl.arange(0, BT)
        tmask = toks < T
        for k in tl.static_range(K):
            dst = tl.load(dest_ptr + toks.to(tl.int64) * K + k, mask=tmask, other=-1)
            ok = tmask & (dst >= 0)
            dstl = tl.where(ok, dst, 0).to(tl.int64)
            w = tl.load(w_ptr + toks.to(tl.int64) * K + k, mask=ok, other=0.0).to(tl.float32)
            dot = tl.zeros((BT,), dtype=tl.float32)
            for d0 in range(0, D, BD):
                cols = d0 + tl.arange(0, BD)
                m2 = ok[:, None] & (cols < D)[None, :]
                g = tl.load(gy_ptr + toks[:, None].to(tl.int64) * s_gy + cols[None, :], mask=m2,
                            other=0.0).to(tl.float32)
                yv = tl.load(y_ptr + dstl[:, None] * s_y + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                dot += tl.sum(g * yv, 1)
                tl.store(gym_ptr + dstl[:, None] * s_gym + cols[None, :],
                         (g * w[:, None]).to(gym_ptr.dtype.element_ty), mask=m2)
            tl.store(gw_ptr + toks.to(tl.int64) * K + k, dot, mask=tmask)
        # rows of gy_MD that no kept slot owns (past the kept count) are zero
        rows = pid * BT * K + tl.arange(0, BTK_PAD)
        rmask = (rows < M) & (rows < (pid + 1) * BT * K)
        src = tl.load(src_ptr + rows, mask=rmask, other=0)
        dead = rmask & (src < 0)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            tl.store(gym_ptr + rows[:, None].to(tl.int64) * s_gym + cols[None, :],
                     tl.zeros((BTK_PAD, BD), dtype=gym_ptr.dtype.element_ty),
                     mask=dead[:, None] & (cols < D)[None, :])


def _bs(e1_pad: int) -> int:
    # slots per program: keep the [BS, E+2] one-hot tile near 8K elements
    return 16 if INTERPRET else max(16, min(256, 8192 // e1_pad))


# ----------------------------------------------------------------------------------- index maps
@dataclass(frozen=True)
class Permutation:
    """Index maps of one routing decision (no autograd; see the module doc for the convention)."""

    dest_TK: Tensor  # int32 [T, K]: row of each slot in expert-sorted order, -1 if dropped
    src_M: Tensor  # int32 [T*K]: slot of each row, -1 past the kept count
    counts_E: Tensor  # int32 [E]: kept rows per expert

    @property
    def top_k(self) -> int:
        return self.dest_TK.shape[1]


def build_permutation(expert_ids_TK: Tensor, num_experts: int, kept_TK: Tensor | None = None) -> Permutation:
    """Stable expert sort of the T*K slots; ``kept_TK`` (bool [T, K]) drops slots (capacity)."""
    check(expert_ids_TK.dim() == 2, f"expert_ids_TK must be [T, K], got {tuple(expert_ids_TK.shape)}")
    check(not expert_ids_TK.is_floating_point(), f"expert_ids_TK must be integer, got {expert_ids_TK.dtype}")
    check(num_experts >= 1, f"num_experts must be >= 1, got {num_experts}")
    check(kept_TK is None or kept_TK.shape == expert_ids_TK.shape, "kept_TK must have the shape of expert_ids_TK")
    T, K = expert_ids_TK.shape
    E = num_experts
    if not use_triton(expert_ids_TK) or T * K == 0:
        return Permutation(*ref.permutation_ref(expert_ids_TK, E, kept_TK))
    dev = expert_ids_TK.device
    S = T * K
    E1_PAD = next_pow2(E + 2)
    BS = _bs(E1_PAD)
    NB = triton.cdiv(S, BS)
    ids = expert_ids_TK.contiguous()
    kept = kept_TK.contiguous().view(torch.uint8) if kept_TK is not None else ids
    hist = torch.empty((NB, E + 1), dtype=torch.int32, device=dev)
    _hist_kernel[(NB,)](ids, kept, hist, S, E, HAS_KEPT=kept_TK is not None, E1_PAD=E1_PAD, BS=BS)
    flat = hist.t().reshape(-1)  # expert-major [(E+1) * NB]
    base = (torch.cumsum(flat, 0, dtype=torch.int32) - flat).view(E + 1, NB)
    dest = torch.empty((T, K), dtype=torch.int32, device=dev)
    src = torch.full((S,), -1, dtype=torch.int32, device=dev)
    _rank_kernel[(NB,)](ids, kept, base, dest, src, S, E, NB, HAS_KEPT=kept_TK is not None, E1_PAD=E1_PAD, BS=BS)
    counts = hist[:, :E].sum(0, dtype=torch.int32)
    return Permutation(dest, src, counts)


# ----------------------------------------------------------------------------------- raw launchers
def permute_fwd(x_TD: Tensor, dest_TK: Tensor, src_M: Tensor) -> Tensor:
    M = src_M.shape[0]
    T, D = x_TD.shape
    K = dest_TK.shape[1]
    out = torch.empty((M, D), dtype=x_TD.dtype, device=x_TD.device)
    if M == 0 or D == 0:
        return out
    BT, BD = (4, 16) if INTERPRET else (16, min(512, next_pow2(D)))
    grid = (triton.cdiv(T, BT), triton.cdiv(D, BD))
    _permute_kernel[grid](x_TD, dest_TK, src_M, out, T, M, D, x_TD.stride(0), out.stride(0),
                          K=K, BT=BT, BD=BD, BTK_PAD=next_pow2(BT * K))
    return out


def unpermute_fwd(y_MD: Tensor, dest_TK: Tensor, weights_TK: Tensor | None, out_dtype=None) -> Tensor:
    T, K = dest_TK.shape
    D = y_MD.shape[1]
    out = torch.empty((T, D), dtype=out_dtype or y_MD.dtype, device=y_MD.device)
    if T == 0 or D == 0:
        return out
    BT, BD = (16, 16) if INTERPRET else (16, min(256, next_pow2(D)))
    grid = (triton.cdiv(T, BT), triton.cdiv(D, BD))
    _unpermute_kernel[grid](
        y_MD, dest_TK, weights_TK if weights_TK is not None else y_MD, out, T, D, y_MD.stride(0), out.stride(0),
        K=K, HAS_W=weights_TK is not None, BT=BT, BD=BD,
    )
    return out


def unpermute_bwd(gy_TD: Tensor, y_MD: Tensor, dest_TK: Tensor, src_M: Tensor, weights_TK: Tensor):
    T, K = dest_TK.shape
    M, D = y_MD.shape
    gym = torch.empty_like(y_MD)
    gw = torch.empty((T, K), dtype=torch.float32, device=y_MD.device)
    if T == 0:
        return gym.zero_(), gw
    BT, BD = (4, 16) if INTERPRET else (16, min(256, next_pow2(D)))
    _unpermute_bwd_kernel[(triton.cdiv(T, BT),)](
        gy_TD, y_MD, dest_TK, src_M, weights_TK, gym, gw, T, M, D,
        gy_TD.stride(0), y_MD.stride(0), gym.stride(0), K=K, BT=BT, BD=BD, BTK_PAD=next_pow2(BT * K),
    )
    return gym, gw


# ----------------------------------------------------------------------------------- autograd ops
@torch.library.custom_op("semoe_kernels::permute", mutates_args=())
def _permute_op(x_TD: Tensor, src_M: Tensor, dest_TK: Tensor) -> Tensor:
    K = dest_TK.shape[1]
    if not use_triton(x_TD):
        return ref.permute_ref(x_TD, src_M, K)
    return permute_fwd(x_TD, dest_TK, src_M)


@_permute_op.register_fake
def _(x_TD, src_M, dest_TK):
    return x_TD.new_empty((src_M.shape[0], x_TD.shape[1]))


def _perm_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _perm_backward(ctx, g):
    (dest,) = ctx.saved_tensors
    g = g.contiguous()
    gx = unpermute_fwd(g, dest, None) if use_triton(g) else ref.unpermute_ref(g, dest, None)
    return gx, None, None


_permute_op.register_autograd(_perm_backward, setup_context=_perm_setup)


@torch.library.custom_op("semoe_kernels::unpermute", mutates_args=())
def _unpermute_op(y_MD: Tensor, dest_TK: Tensor, src_M: Tensor, weights_TK: Tensor) -> Tensor:
    if not use_triton(y_MD):
        return ref.unpermute_ref(y_MD, dest_TK, weights_TK)
    return unpermute_fwd(y_MD, dest_TK, weights_TK)


@_unpermute_op.register_fake
def _(y_MD, dest_TK, src_M, weights_TK):
    return y_MD.new_empty((dest_TK.shape[0], y_MD.shape[1]))


def _unperm_setup(ctx, inputs, output):
    y, dest, src, w = inputs
    ctx.save_for_backward(y, dest, src, w)


def _unperm_backward(ctx, g):
    y, dest, src, w = ctx.saved_tensors
    g = g.contiguous()
    if use_triton(y):
        gy, gw = unpermute_bwd(g, y, dest, src, w)
    else:
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(True)
            w_ = w.detach().requires_grad_(True)
            out = ref.unpermute_ref(y_, dest, w_)
            gy, gw = torch.autograd.grad(out, (y_, w_), g)
    return gy, None, None, gw.to(w.dtype)


_unpermute_op.register_autograd(_unperm_backward, setup_context=_unperm_setup)


def permute(x_TD: Tensor, perm: Permutation) -> Tensor:
    """Differentiable gather into expert order: ``x_MD[r] = x_TD[src_M[r] // K]`` (0 where src is -1)."""
    check(x_TD.dim() == 2, f"x_TD must be [T, D], got {tuple(x_TD.shape)}")
    check(x_TD.shape[0] == perm.dest_TK.shape[0], f"x_TD has {x_TD.shape[0]} rows, routing has {perm.dest_TK.shape[0]}")
    return _permute_op(x_TD.contiguous(), perm.src_M, perm.dest_TK)


def unpermute(y_MD: Tensor, perm: Permutation, weights_TK: Tensor) -> Tensor:
    """Differentiable weighted combine: ``y_TD[t] = sum_k w[t, k] * y_MD[dest[t, k]]`` (fp32 sum)."""
    check(y_MD.dim() == 2 and y_MD.shape[0] == perm.src_M.shape[0], f"y_MD must be [T*K, D], got {tuple(y_MD.shape)}")
    check(weights_TK.shape == perm.dest_TK.shape, f"weights_TK must be {tuple(perm.dest_TK.shape)}")
    return _unpermute_op(y_MD.contiguous(), perm.dest_TK, perm.src_M, weights_TK.contiguous())
