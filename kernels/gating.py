"""Fused MoE gating: router logits -> scores, top-k ids and weights, counts and loss statistics.

Shape legend: T tokens, E experts, K top-k, B token blocks (programs).

Data flow (forward, one launch)
-------------------------------
Each program loads a block of BT rows of ``logits_TE`` (any float dtype) into registers, in fp32:
  scores   softmax over E (or elementwise sigmoid), plus logsumexp for the z-loss;
  top-k    K rounds of row-max + lowest-index argmax, masking each winner; ids and weights kept in a
           [BT, K] register tile and renormalised to sum 1 when asked;
  writes   weights_TK (fp32), expert_ids_TK (int64), probs_TE (fp32, optional);
  partials per block: expert counts (int32), sum of probs per expert and sum of lse^2 (fp32),
           to scratch rows [B, E].
Then it takes a ticket (one integer atomic on a per-device counter); the program that takes the last
ticket sums the partials in block order (a fixed order, so results are bit-reproducible) into
counts_E (int64), probs_sum_E and lse_sq_sum, and resets the counter to 0 for the next launch. So the
whole gating is one kernel launch, and no float atomics are used.
(Consequence: two gating launches must not run concurrently on different streams of one device.)

Backward (one launch)
---------------------
Given dL/dweights_TK, dL/dprobs_TE (optional), dL/dprobs_sum_E and dL/dlse_sq_sum, each program
recomputes the scores of its rows and forms dL/dp (top-k renormalisation: dw_k/dp_{i_m} =
(delta_km - w_k)/S with S the sum of the kept scores), then the score backward
(softmax: p * (dp - <p, dp>); sigmoid: dp * p * (1 - p)) plus the z-loss term 2 * lse * softmax(l).

Ties in top-k go to the lowest expert index (torch.topk leaves their order unspecified).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels import reference as ref
from kernels._common import HAS_TRITON, INTERPRET, check, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scores(logits_ptr, rows, cols, T, E, s_t, SIGMOID: tl.constexpr):
        rmask = rows < T
        cmask = cols < E
        m2 = rmask[:, None] & cmask[None, :]
        lg = tl.load(logits_ptr + rows[:, None].to(tl.int64) * s_t + cols[None, :], mask=m2,
                     other=float("-inf")).to(tl.float32)
        lg = tl.where(rmask[:, None], lg, tl.where(cmask[None, :], 0.0, float("-inf")))
        mx = tl.max(lg, 1)
        ex = tl.exp(lg - mx[:, None])
        s = tl.sum(ex, 1)
        soft = ex / s[:, None]
        lse = mx + tl.log(s)
        if SIGMOID:
            p = tl.where(cmask[None, :], 1.0 / (1.0 + tl.exp(-lg)), 0.0)
        else:
            p = soft
        return p, soft, lse, rmask, cmask

    @triton.jit
    def _gating_fwd_kernel(
        logits_ptr, w_ptr, ids_ptr, probs_ptr, part_f_ptr, part_c_ptr, ticket_ptr,
        counts_ptr, psum_ptr, zsum_ptr,
        T, E, s_t, NB,
        K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr,
        SIGMOID: tl.constexpr, RENORM: tl.constexpr, WRITE_PROBS: tl.constexpr, RB: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, E_PAD)
        p, soft, lse, rmask, cmask = _scores(logits_ptr, rows, cols, T, E, s_t, SIGMOID)
        p = tl.where(rmask[:, None], p, 0.0)
        if WRITE_PROBS:
            tl.store(probs_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], p,
                     mask=rmask[:, None] & cmask[None, :])
        # top-k by K rounds of argmax (scores are >= 0: -1 marks padding, -2 taken experts)
        kcols = tl.arange(0, K_PAD)
        work = tl.where(cmask[None, :], p, -1.0)
        top_w = tl.zeros((BT, K_PAD), dtype=tl.float32)
        top_i = tl.zeros((BT, K_PAD), dtype=tl.int32)
        for j in tl.static_range(K):
            mx = tl.max(work, 1)
            idx = tl.min(tl.where(work == mx[:, None], cols[None, :], E_PAD), 1)
            hit = cols[None, :] == idx[:, None]
            work = tl.where(hit, -2.0, work)
            top_w = tl.where(kcols[None, :] == j, mx[:, None], top_w)
            top_i = tl.where(kcols[None, :] == j, idx[:, None], top_i)
        # taken experts are exactly the entries set to -2 (one column reduction, not K of them)
        cnt = tl.sum(((work == -2.0) & rmask[:, None]).to(tl.int32), 0)
        if RENORM:
            tot = tl.sum(top_w, 1)
            top_w = top_w / tl.where(tot > 0, tot, 1.0)[:, None]
        kmask = rmask[:, None] & (kcols[None, :] < K)
        koff = rows[:, None].to(tl.int64) * K + kcols[None, :]
        tl.store(w_ptr + koff, top_w, mask=kmask)
        tl.store(ids_ptr + koff, top_i.to(tl.int64), mask=kmask)
        # per-block partials: [probs_sum (E_PAD) | lse^2 (1)] and counts
        psum = tl.sum(p, 0)
        zs = tl.sum(tl.where(rmask, lse * lse, 0.0), 0)
        tl.store(part_f_ptr + pid * (E_PAD + 1) + cols, psum)
        tl.store(part_f_ptr + pid * (E_PAD + 1) + E_PAD, zs)
        tl.store(part_c_ptr + pid * E_PAD + cols, cnt)
        # the last program to finish reduces the partials in block order (deterministic)
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == NB - 1:
            acc_p = tl.zeros((E_PAD,), dtype=tl.float32)
            acc_c = tl.zeros((E_PAD,), dtype=tl.int64)
            acc_z = tl.zeros((RB,), dtype=tl.float32)
            rb = tl.arange(0, RB)
            for b0 in range(0, NB, RB):
                bm = (b0 + rb) < NB
                fp = tl.load(part_f_ptr + (b0 + rb)[:, None] * (E_PAD + 1) + cols[None, :],
                             mask=bm[:, None], other=0.0, cache_modifier=".cg")
                cp = tl.load(part_c_ptr + (b0 + rb)[:, None] * E_PAD + cols[None, :],
                             mask=bm[:, None], other=0, cache_modifier=".cg")
                zp = tl.load(part_f_ptr + (b0 + rb) * (E_PAD + 1) + E_PAD, mask=bm, other=0.0,
                             cache_modifier=".cg")
                acc_p += tl.sum(fp, 0)
                acc_c += tl.sum(cp.to(tl.int64), 0)
                acc_z += zp
            tl.store(psum_ptr + cols, acc_p, mask=cmask)
            tl.store(counts_ptr + cols, acc_c, mask=cmask)
            tl.store(zsum_ptr, tl.sum(acc_z, 0))
            tl.atomic_xchg(ticket_ptr, 0)

    @triton.jit
    def _gating_bwd_kernel(
        logits_ptr, ids_ptr, gw_ptr, gprobs_ptr, gpsum_ptr, gz_ptr, glogits_ptr,
        T, E, s_t,
        K: tl.constexpr, E_PAD: tl.constexpr, BT: tl.constexpr,
        SIGMOID: tl.constexpr, RENORM: tl.constexpr, HAS_GPROBS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BT + tl.arange(0, BT)
        cols = tl.arange(0, E_PAD)
        p, soft, lse, rmask, cmask = _scores(logits_ptr, rows, cols, T, E, s_t, SIGMOID)
        m2 = rmask[:, None] & cmask[None, :]
        dp = tl.load(gpsum_ptr + cols, mask=cmask, other=0.0)[None, :] + tl.zeros((BT, E_PAD), tl.float32)
        if HAS_GPROBS:
            dp += tl.load(gprobs_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], mask=m2, other=0.0)
        # sum of kept scores S and <g, w> over the K slots
        S = tl.zeros((BT,), dtype=tl.float32)
        gdotp = tl.zeros((BT,), dtype=tl.float32)
        for j in tl.static_range(K):
            idx = tl.load(ids_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0).to(tl.int32)
            g = tl.load(gw_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0.0)
            pj = tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), 1)
            S += pj
            gdotp += g * pj
        S = tl.where(S > 0, S, 1.0)
        for j in tl.static_range(K):
            idx = tl.load(ids_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0).to(tl.int32)
            g = tl.load(gw_ptr + rows.to(tl.int64) * K + j, mask=rmask, other=0.0)
            if RENORM:
                d = (g - gdotp / S) / S
            else:
                d = g
            dp += tl.where(cols[None, :] == idx[:, None], d[:, None], 0.0)
        if SIGMOID:
            dl = dp * p * (1.0 - p)
        else:
            dl = p * (dp - tl.sum(p * dp, 1)[:, None])
        gz = tl.load(gz_ptr)
        dl += (2.0 * gz) * lse[:, None] * soft
        tl.store(glogits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], dl, mask=m2)


_TICKETS: dict[torch.device, Tensor] = {}


def _ticket(device: torch.device) -> Tensor:
    t = _TICKETS.get(device)
    if t is None:
        t = _TICKETS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return t


def _block_t(E_PAD: int) -> int:
    # keep a [BT, E_PAD] fp32 tile around 4K elements per program (registers), at least 16 rows
    return max(16, min(128, 4096 // E_PAD)) if not INTERPRET else 16


def _gating_fwd_launch(logits_TE: Tensor, k: int, sigmoid: bool, renormalize: bool, write_probs: bool):
    T, E = logits_TE.shape
    dev = logits_TE.device
    E_PAD = next_pow2(max(E, 2))
    BT = _block_t(E_PAD)
    NB = triton.cdiv(T, BT)
    w = torch.empty((T, k), dtype=torch.float32, device=dev)
    ids = torch.empty((T, k), dtype=torch.int64, device=dev)
    probs = torch.empty((T, E) if write_probs else (0, E), dtype=torch.float32, device=dev)
    part_f = torch.empty((NB, E_PAD + 1), dtype=torch.float32, device=dev)
    part_c = torch.empty((NB, E_PAD), dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int64, device=dev)
    psum = torch.empty(E, dtype=torch.float32, device=dev)
    zsum = torch.empty((), dtype=torch.float32, device=dev)
    _gating_fwd_kernel[(NB,)](
        logits_TE, w, ids, probs, part_f, part_c, _ticket(dev), counts, psum, zsum,
        T, E, logits_TE.stride(0), NB,
        K=k, K_PAD=next_pow2(k), E_PAD=E_PAD, BT=BT,
        SIGMOID=sigmoid, RENORM=renormalize, WRITE_PROBS=write_probs, RB=min(128, next_pow2(NB)),
        num_warps=4,
    )
    return w, ids, probs, counts, psum, zsum


# ----------------------------------------------------------------------------------- custom op
@torch.library.custom_op("semoe_kernels::gating", mutates_args=())
def _gating_op(
    logits_TE: Tensor, k: int, sigmoid: bool, renormalize: bool, write_probs: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if not use_triton(logits_TE):
        w, i, p, c, ps, z = ref.gating_ref(
            logits_TE, k, score="sigmoid" if sigmoid else "softmax", renormalize=renormalize
        )
        if not write_probs:
            p = p.new_empty((0, p.shape[1]))
        return w, i, p, c, ps, z
    return _gating_fwd_launch(logits_TE, k, sigmoid, renormalize, write_probs)


@_gating_op.register_fake
def _(logits_TE, k, sigmoid, renormalize, write_probs):
    T, E = logits_TE.shape
    f = dict(dtype=torch.float32, device=logits_TE.device)
    return (
        torch.empty((T, k), **f),
        torch.empty((T, k), dtype=torch.int64, device=logits_TE.device),
        torch.empty((T, E) if write_probs else (0, E), **f),
        torch.empty(E, dtype=torch.int64, device=logits_TE.device),
        torch.empty(E, **f),
        torch.empty((), **f),
    )


@torch.library.custom_op("semoe_kernels::gating_backward", mutates_args=())
def _gating_bwd_op(
    logits_TE: Tensor, ids_TK: Tensor, g_w: Tensor, g_probs: Tensor | None, g_psum: Tensor, g_z: Tensor,
    sigmoid: bool, renormalize: bool,
) -> Tensor:
    T, E = logits_TE.shape
    K = ids_TK.shape[1]
    if not use_triton(logits_TE):
        with torch.enable_grad():
            lg = logits_TE.detach().float().requires_grad_(True)
            p = torch.sigmoid(lg) if sigmoid else torch.softmax(lg, -1)
            w = p.gather(1, ids_TK)
            if renormalize:
                w = w / w.sum(-1, keepdim=True)
            lse = torch.logsumexp(lg, -1)
            loss = (w * g_w).sum() + (p.sum(0) * g_psum).sum() + (lse * lse).sum() * g_z
            if g_probs is not None:
                loss = loss + (p * g_probs).sum()
            (g,) = torch.autograd.grad(loss, lg)
        return g.to(logits_TE.dtype)
    return _gating_bwd_launch(logits_TE, ids_TK, g_w, g_probs, g_psum, g_z, sigmoid, renormalize)


def _gating_bwd_launch(logits_TE, ids_TK, g_w, g_probs, g_psum, g_z, sigmoid, renormalize):
    T, E = logits_TE.shape
    K = ids_TK.shape[1]
    E_PAD = next_pow2(max(E, 2))
    BT = _block_t(E_PAD)
    out = torch.empty((T, E), dtype=torch.float32, device=logits_TE.device)
    _gating_bwd_kernel[(triton.cdiv(T, BT),)](
        logits_TE, ids_TK, g_w.contiguous(), g_probs.contiguous() if g_probs is not None else g_w,
        g_psum.contiguous(), g_z.reshape(1), out,
        T, E, logits_TE.stride(0),
        K=K, E_PAD=E_PAD, BT=BT, SIGMOID=sigmoid, RENORM=renormalize, HAS_GPROBS=g_probs is not None,
        num_warps=4,
    )
    return out.to(logits_TE.dtype)


@_gating_bwd_op.register_fake
def _(logits_TE, ids_TK, g_w, g_probs, g_psum, g_z, sigmoid, renormalize):
    return torch.empty_like(logits_TE)


def _gating_setup(ctx, inputs, output):
    logits, k, sigmoid, renormalize, write_probs = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.flags = (sigmoid, renormalize, write_probs)
    ctx.mark_non_differentiable(output[1], output[3])
    ctx.set_materialize_grads(False)  # unused outputs get no zero-filled gradients (handled as None)


def _gating_backward(ctx, g_w, g_ids, g_probs, g_counts, g_psum, g_z):
    logits, ids = ctx.saved_tensors
    sigmoid, renormalize, write_probs = ctx.flags
    T, E = logits.shape
    if g_w is None:
        g_w = logits.new_zeros(ids.shape, dtype=torch.float32)
    if g_psum is None:
        g_psum = logits.new_zeros(E, dtype=torch.float32)
    if g_z is None:
        g_z = logits.new_zeros((), dtype=torch.float32)
    if not write_probs:
        g_probs = None
    g = _gating_bwd_op(logits, ids, g_w.float(), g_probs.float() if g_probs is not None else None,
                       g_psum.float(), g_z.float(), sigmoid, renormalize)
    return g, None, None, None, None


_gating_op.register_autograd(_gating_backward, setup_context=_gating_setup)


class _GatingFn(torch.autograd.Function):
    """Eager path: the same kernels without the custom-op dispatch (a few tens of microseconds less
    host time per call, which is most of the cost at small T). torch.compile goes through the op."""

    @staticmethod
    def forward(ctx, logits, k, sigmoid, renormalize, write_probs):
        out = _gating_fwd_launch(logits, k, sigmoid, renormalize, write_probs)
        _gating_setup(ctx, (logits, k, sigmoid, renormalize, write_probs), out)
        return out

    @staticmethod
    def backward(ctx, g_w, g_ids, g_probs, g_counts, g_psum, g_z):
        logits, ids = ctx.saved_tensors
        sigmoid, renormalize, write_probs = ctx.flags
        E = logits.shape[1]
        g_w = g_w if g_w is not None else logits.new_zeros(ids.shape, dtype=torch.float32)
        g_psum = g_psum if g_psum is not None else logits.new_zeros(E, dtype=torch.float32)
        g_z = g_z if g_z is not None else logits.new_zeros((), dtype=torch.float32)
        g = _gating_bwd_launch(logits, ids, g_w.float(), g_probs.float() if (write_probs and g_probs is not None)
                               else None, g_psum.float(), g_z.float(), sigmoid, renormalize)
        return g, None, None, None, None


def gating(
    logits_TE: Tensor, k: int, *, score: str = "softmax", renormalize: bool = True, write_probs: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused top-k gating. Returns (weights_TK fp32, expert_ids_TK int64, probs_TE fp32 ([0, E] when
    ``write_probs`` is False), counts_E int64, probs_sum_E fp32, lse_sq_sum fp32 scalar).

    Differentiable in weights_TK, probs_TE, probs_sum_E and lse_sq_sum (w.r.t. ``logits_TE``).
    Load-balance loss (Switch/GShard): ``E * sum_e counts_E[e] / (T*k) * probs_sum_E[e] / T``;
    z-loss (ST-MoE): ``lse_sq_sum / T``.
    """
    check(logits_TE.dim() == 2, f"logits_TE must be [T, E], got shape {tuple(logits_TE.shape)}")
    check(logits_TE.is_floating_point(), f"logits_TE must be floating point, got {logits_TE.dtype}")
    T, E = logits_TE.shape
    check(1 <= k <= E, f"k must be in 1..E={E}, got {k}")
    check(score in ("softmax", "sigmoid"), f"score must be 'softmax' or 'sigmoid', got {score!r}")
    check(E <= 1024, f"E must be <= 1024 for the fused gating kernel, got {E}")
    args = (logits_TE.contiguous(), k, score == "sigmoid", renormalize, write_probs)
    if use_triton(logits_TE) and not torch.compiler.is_compiling():
        return _GatingFn.apply(*args)
    return _gating_op(*args)
