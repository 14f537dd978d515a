"""Grouped GEMM over variable-size expert groups (forward, input gradient, weight gradient).

Shape legend: M routed rows (sorted by expert, group e holds ``counts_E[e]`` consecutive rows starting
at ``sum(counts_E[:e])``), K reduction dim, N output dim, E groups (experts).

Data flow
---------
forward / dgrad  ``c_MN[rows of e] = act(a_MK[rows of e] @ b_EKN[e])``
    One persistent launch (one program per SM). Every program reads ``counts_E``, builds the tile
    table in registers (tiles of group e = ceil(m_e / BM) * ceil(N / BN), inclusive cumsum over e),
    then walks tiles ``pid, pid + P, pid + 2P, ...``. A tile finds its group by counting the groups
    whose cumulative tile count is <= its index (a vector compare over E, no host sync, no search
    table in memory). Inside a group tiles are swizzled GROUP_M m-tiles at a time so that programs
    running together share A and B tiles in L2. Empty groups own no tile; a group smaller than BM
    gets one masked tile. ``trans_b`` reads ``b`` stored as [E, N, K] (the dgrad ``dA = dC @ B^T``
    without a copy); on Hopper, B (and A when not gathered) arrive by bulk tensor copies (TMA) from
    device-side descriptors over 2-D views (``SEMOE_GMM_TMA=0`` switches to pointer loads);
    ``gather_MK`` reads row ``gather[r]`` of ``a`` for row r (permute fused into the
    load). fp32 accumulation; the epilogue optionally applies GELU (writing the pre-activation ``z``
    too, for the backward) or multiplies by GELU'(z) (the backward of that activation).
wgrad            ``db_EKN[e] = a_MK[rows of e]^T @ g_MN[rows of e]``
    One program per (e, K-tile, N-tile); it loops over the rows of its group (empty group: zeros).

The public, differentiable op is :func:`grouped_gemm`; :mod:`kernels.moe_ffn`
composes the raw launchers below into a fused expert MLP.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from kernels import reference as ref
from kernels._common import (
    HAS_TRITON,
    INTERPRET,
    check,
    device_index,
    dot_precision,
    next_pow2,
    num_programs_persistent,
    use_triton,
)

ACT_NONE, ACT_GELU, ACT_GELU_GRAD = 0, 1, 2

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gelu(z):
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(z):
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return cdf + z * pdf

    @triton.jit
    def _tile_table(counts_ptr, M, N, E: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """The persistent schedule's tile table, in registers: per group (E_PAD lanes, lane E a virtual group
        of the rows past ``counts.sum()``, so every row of c is written) its rows, first row, m-tiles, tiles
        and inclusive tile cumsum; the number of n-tiles and of all tiles."""
        eidx = tl.arange(0, E_PAD)
        counts = tl.load(counts_ptr + eidx, mask=eidx < E, other=0).to(tl.int32)
        counts = tl.where(eidx == E, M - tl.sum(counts, 0), counts)
        row_start = tl.cumsum(counts, 0) - counts
        n_tiles = tl.cdiv(N, BN)
        m_tiles = (counts + BM - 1) // BM
        g_tiles = m_tiles * n_tiles
        tile_end = tl.cumsum(g_tiles, 0)
        total = tl.sum(g_tiles, 0)
        return eidx, counts, row_start, n_tiles, m_tiles, g_tiles, tile_end, total

    @triton.jit
    def _tile_of(tile, eidx, counts, row_start, n_tiles, m_tiles, g_tiles, tile_end,
                 BM: tl.constexpr, GROUP_M: tl.constexpr):
        """Tile ``tile`` of `_tile_table`'s schedule -> its group ``e``, the group's first row ``m0``, the tile's
        m- and n-index in the group and its rows of c (``grow``, int64, valid where ``m_mask``). The columns
        (``pid_n * BN + arange(BN)``) are left to the caller: computed after a gathered load, as the kernels
        always did, the compiled code stays the same."""
        # group of this tile: number of groups that end at or before it
        e = tl.sum((tile_end <= tile).to(tl.int32), 0)
        sel = eidx == e
        local = tile - tl.sum(tl.where(sel, tile_end - g_tiles, 0), 0)
        m0 = tl.sum(tl.where(sel, row_start, 0), 0)
        m_cnt = tl.sum(tl.where(sel, counts, 0), 0)
        mt = tl.sum(tl.where(sel, m_tiles, 0), 0)
        # GROUP_M swizzle inside the group
        width = GROUP_M * n_tiles
        first_m = (local // width) * GROUP_M
        gsz = tl.minimum(mt - first_m, GROUP_M)
        pid_m = first_m + (local % width) % gsz
        pid_n = (local % width) // gsz
        rm = pid_m * BM + tl.arange(0, BM)
        m_mask = rm < m_cnt
        grow = (m0 + rm).to(tl.int64)
        return e, m0, pid_m, pid_n, grow, m_mask

    @triton.jit
    def _gmm_kernel(
        a_ptr, b_ptr, c_ptr, z_ptr, counts_ptr, gather_ptr,
        M, N, K, M_BUCKET,
        s_am, s_ak, s_be, s_bk, s_bn, s_cm, s_cn,
        E: tl.constexpr, E_PAD: tl.constexpr,
        HAS_GATHER: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, NUM_PROGS: tl.constexpr,
        TRANS_B: tl.constexpr, USE_TMA: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if USE_TMA:  # bulk tensor copies (Hopper TMA); needs EVEN_K and unit inner strides
            if TRANS_B:  # b is [E, N, K]: rows e*N + n of a 2-D [E*N, K] view; rows past N only feed masked columns
                b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * N, K], strides=[s_bn, 1], block_shape=[BN, BK])
            else:  # b is [E, K, N]: rows e*K + k of a 2-D [E*K, N] view (K % BK == 0: no bleed into e+1)
                b_desc = tl.make_tensor_descriptor(b_ptr, shape=[E * K, N], strides=[s_bk, 1], block_shape=[BK, BN])
            if not HAS_GATHER:  # rows past the group belong to the next group: they only feed masked rows
                a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[s_am, 1], block_shape=[BM, BK])
        eidx, counts, row_start, n_tiles, m_tiles, g_tiles, tile_end, total = _tile_table(
            counts_ptr, M, N, E, E_PAD, BM, BN)
        rk = tl.arange(0, BK)
        for tile in range(pid, total, NUM_PROGS):
            e, m0, pid_m, pid_n, grow, m_mask = _tile_of(
                tile, eidx, counts, row_start, n_tiles, m_tiles, g_tiles, tile_end, BM, GROUP_M)
            if HAS_GATHER:
                arow = tl.load(gather_ptr + grow, mask=m_mask, other=0).to(tl.int64)
            else:
                arow = grow
            rn = pid_n * BN + tl.arange(0, BN)
            n_mask = rn < N
            a_ptrs = a_ptr + arow[:, None] * s_am + rk[None, :] * s_ak
            b_ptrs = b_ptr + e.to(tl.int64) * s_be + rk[:, None] * s_bk + rn[None, :] * s_bn
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            k_end = tl.where(e < E, K, 0)  # the virtual tail group does no products
            for k0 in range(0, k_end, BK):
                if USE_TMA:
                    if HAS_GATHER:
                        a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                    else:
                        a = a_desc.load([m0 + pid_m * BM, k0])
                    if TRANS_B:
                        b = tl.trans(b_desc.load([e * N + pid_n * BN, k0]))
                    else:
                        b = b_desc.load([e * K + k0, pid_n * BN])
                elif EVEN_K:
                    a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
                    b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
                else:
                    k_mask = (k0 + rk) < K
                    a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PREC)
                a_ptrs += BK * s_ak
                b_ptrs += BK * s_bk
            c_off = grow[:, None] * s_cm + rn[None, :] * s_cn
            c_mask = m_mask[:, None] & n_mask[None, :]
            if ACT == 1:
                tl.store(z_ptr + c_off, acc.to(z_ptr.dtype.element_ty), mask=c_mask)
                acc = _gelu(acc)
            if ACT == 2:
                z = tl.load(z_ptr + c_off, mask=c_mask, other=0.0).to(tl.float32)
                acc = acc * _gelu_grad(z)
            tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _gmm_wgrad_kernel(
        a_ptr, g_ptr, c_ptr, counts_ptr, gather_ptr,
        M, KA, N, M_BUCKET,
        s_am, s_ak, s_gm, s_gn, s_ce, s_ck, s_cn,
        E: tl.constexpr, E_PAD: tl.constexpr,
        HAS_GATHER: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tiles_k = tl.cdiv(KA, BM)
        tiles_n = tl.cdiv(N, BN)
        per_e = tiles_k * tiles_n
        e = pid // per_e
        local = pid % per_e
        width = GROUP_M * tiles_n
        first_m = (local // width) * GROUP_M
        gsz = tl.minimum(tiles_k - first_m, GROUP_M)
        pid_k = first_m + (local % width) % gsz
        pid_n = (local % width) // gsz

        eidx = tl.arange(0, E_PAD)
        counts = tl.load(counts_ptr + eidx, mask=eidx < E, other=0).to(tl.int32)
        starts = tl.cumsum(counts, 0) - counts
        sel = eidx == e
        r0 = tl.sum(tl.where(sel, starts, 0), 0)
        cnt = tl.sum(tl.where(sel, counts, 0), 0)

        rk = pid_k * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        k_mask = rk < KA
        n_mask = rn < N
        rr = tl.arange(0, BR)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        r_tail = 0
        if USE_TMA:  # whole BR-row blocks by bulk copies; the partial last block below, masked
            g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, N], strides=[s_gm, 1], block_shape=[BR, BN])
            if not HAS_GATHER:
                a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, KA], strides=[s_am, 1], block_shape=[BR, BM])
            r_tail = (cnt // BR) * BR
            for r in range(0, r_tail, BR):
                g = g_desc.load([r0 + r, pid_n * BN])
                if HAS_GATHER:
                    arow = tl.load(gather_ptr + (r0 + r + rr).to(tl.int64)).to(tl.int64)
                    a = tl.load(a_ptr + arow[:, None] * s_am + rk[None, :] * s_ak, mask=k_mask[None, :], other=0.0)
                else:
                    a = a_desc.load([r0 + r, pid_k * BM])
                acc = tl.dot(tl.trans(a), g, acc, input_precision=PREC)
        for r in range(r_tail, cnt, BR):
            r_mask = (r + rr) < cnt
            grow = (r0 + r + rr).to(tl.int64)
            if HAS_GATHER:
                arow = tl.load(gather_ptr + grow, mask=r_mask, other=0).to(tl.int64)
            else:
                arow = grow
            a = tl.load(a_ptr + arow[:, None] * s_am + rk[None, :] * s_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            g = tl.load(g_ptr + grow[:, None] * s_gm + rn[None, :] * s_gn,
                        mask=r_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(tl.trans(a), g, acc, input_precision=PREC)
        c_ptrs = c_ptr + e.to(tl.int64) * s_ce + rk[:, None] * s_ck + rn[None, :] * s_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])

    def _pick(configs):
        """SEMOE_AUTOTUNE=0 keeps the first config only (fast GPU test runs; no tuning benchmarks)."""
        return configs if os.environ.get("SEMOE_AUTOTUNE", "1") != "0" else configs[:1]

    _gmm_kernel = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BK"] == 0})(_gmm_kernel)

    if INTERPRET:  # small fixed tiles: the interpreter runs every program in NumPy
        _GMM_FIXED = dict(BM=16, BN=16, BK=16, GROUP_M=2)
        _WGRAD_FIXED = dict(BM=16, BN=16, BR=16, GROUP_M=2)
        _gmm = _gmm_kernel
        _wgrad = _gmm_wgrad_kernel
    else:
        _GMM_FIXED = {}
        _WGRAD_FIXED = {}
        _gmm = triton.autotune(
            configs=_pick([
                triton.Config(dict(BM=128, BN=256, BK=64, GROUP_M=8), num_warps=8, num_stages=3),
                triton.Config(dict(BM=128, BN=256, BK=64, GROUP_M=8), num_warps=8, num_stages=4),
                triton.Config(dict(BM=128, BN=128, BK=64, GROUP_M=8), num_warps=8, num_stages=4),
                triton.Config(dict(BM=64, BN=128, BK=64, GROUP_M=8), num_warps=4, num_stages=4),
            ]),
            key=["N", "K", "M_BUCKET", "TRANS_B", "ACT", "HAS_GATHER", "USE_TMA"],
        )(_gmm_kernel)
        _wgrad = triton.autotune(
            configs=_pick([
                triton.Config(dict(BM=128, BN=256, BR=64, GROUP_M=8), num_warps=8, num_stages=3),
                triton.Config(dict(BM=128, BN=128, BR=64, GROUP_M=8), num_warps=8, num_stages=4),
            ]),
            key=["KA", "N", "M_BUCKET", "HAS_GATHER", "USE_TMA"],
        )(_gmm_wgrad_kernel)


# ----------------------------------------------------------------------------------- host wrappers
# SEMOE_GMM_TMA=0 (or setting TMA_ENABLED = False) selects pointer loads only; a TMA launch that fails
# to compile switches TMA off for the process, with a warning, and reruns with pointer loads.
TMA_ENABLED = os.environ.get("SEMOE_GMM_TMA", "1") != "0"
_TMA_BROKEN = False


def _tma_ok(*tensors: Tensor) -> bool:
    """Bulk tensor copies need a Hopper+ GPU, unit inner strides and 16-byte aligned rows and bases."""
    if INTERPRET or not TMA_ENABLED or _TMA_BROKEN or not all(t.is_cuda for t in tensors):
        return False
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9 or not hasattr(tl, "make_tensor_descriptor"):
        return False
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(-2) * t.element_size()) % 16:
            return False
        if t.dim() == 3 and t.stride(0) != t.shape[1] * t.stride(1):
            return False
    # Device-side descriptors need a little global scratch per launch. Triton keeps the allocator in a
    # ContextVar, i.e. per thread: set it on every call, because autograd runs backward on its own thread.
    triton.set_allocator(_scratch)
    return True


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _check_counts(counts_E: Tensor, E: int, like: Tensor) -> Tensor:
    check(counts_E.dim() == 1 and counts_E.shape[0] == E, f"counts_E must be [E={E}], got {tuple(counts_E.shape)}")
    check(not counts_E.is_floating_point(), f"counts_E must be integer, got {counts_E.dtype}")
    check(counts_E.device == like.device, f"counts_E on {counts_E.device}, operands on {like.device}")
    return counts_E.to(torch.int32).contiguous()


def gmm_fwd(
    a: Tensor,
    b: Tensor,
    counts_E: Tensor,
    *,
    gather: Tensor | None = None,
    trans_b: bool = False,
    act: int = ACT_NONE,
    z: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Raw launcher: ``c[rows of e] = act(a[gather or rows] @ (b[e] or b[e]^T))``; no autograd.

    a: [Ma, K]; b: [E, K, N] (or [E, N, K] with ``trans_b``); gather: int [M] rows of ``a`` (None: M = Ma);
    act: ACT_NONE, ACT_GELU (writes pre-activation into ``z`` [M, N]), ACT_GELU_GRAD (multiplies by
    GELU'(z)). Returns c: [M, N] of ``out_dtype`` (default a.dtype); rows past counts.sum() are zero.
    Needs counts_E.sum() <= M (not checked: that would synchronise with the device).
    """
    check(a.dim() == 2 and b.dim() == 3, f"a must be 2-D and b 3-D, got {a.dim()}-D and {b.dim()}-D")
    E = b.shape[0]
    K = a.shape[1]
    N = b.shape[1] if trans_b else b.shape[2]
    Kb = b.shape[2] if trans_b else b.shape[1]
    check(Kb == K, f"inner dims differ: a has K={K}, b has {Kb}")
    check(a.dtype == b.dtype, f"a and b dtypes differ: {a.dtype} vs {b.dtype}")
    M = gather.shape[0] if gather is not None else a.shape[0]
    counts = _check_counts(counts_E, E, a)
    if act != ACT_NONE:
        check(z is not None and z.shape == (M, N), f"act needs z of shape {(M, N)}")
    c = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if not use_triton(a, b):
        raise RuntimeError("gmm_fwd needs CUDA tensors or TRITON_INTERPRET=1; use kernels.reference")
    s_be, s_bk, s_bn = (b.stride(0), b.stride(2), b.stride(1)) if trans_b else b.stride()
    P = num_programs_persistent(device_index(a))
    gather_arg = gather.to(torch.int32).contiguous() if gather is not None else counts
    use_tma = K % 64 == 0 and _tma_ok(b) and (gather is not None or _tma_ok(a))

    def launch(tma: bool):
        _gmm[(P,)](
            a, b, c, z if z is not None else c, counts, gather_arg,
            M, N, K, _m_bucket(M, E),
            a.stride(0), a.stride(1), s_be, s_bk, s_bn, c.stride(0), c.stride(1),
            E=E, E_PAD=next_pow2(E + 1), HAS_GATHER=gather is not None, ACT=act,
            PREC=dot_precision(a.dtype), NUM_PROGS=P, TRANS_B=trans_b, USE_TMA=tma, **_GMM_FIXED,
        )

    _launch_with_fallback(launch, use_tma)
    return c


def _m_bucket(M: int, E: int) -> int:
    """Autotune key: mean rows per group rounded up to a power of two (16..4096), so that a config
    tuned on 16-row groups is not reused for 4096-row groups (the kernel ignores the value)."""
    return min(4096, max(16, next_pow2(max(1, M // max(E, 1)))))


def _launch_with_fallback(launch, use_tma: bool) -> None:
    global _TMA_BROKEN
    if not use_tma:
        return launch(False)
    try:
        launch(True)
    except Exception as exc:  # noqa: BLE001 - e.g. a Triton without device-side descriptors
        _TMA_BROKEN = True
        warnings.warn(f"grouped GEMM: TMA path failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                      "using pointer loads from now on", stacklevel=3)
        launch(False)


def gmm_wgrad(
    a: Tensor, g: Tensor, counts_E: Tensor, *, gather: Tensor | None = None, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Raw launcher: ``db[e] = a[gather or rows of e]^T @ g[rows of e]`` -> [E, K, N]; no autograd."""
    E = counts_E.shape[0]
    KA = a.shape[1]
    M, N = g.shape
    check(gather is None or gather.shape[0] == M, "gather must have one entry per row of g")
    check(gather is not None or a.shape[0] == M, f"a has {a.shape[0]} rows, g has {M}")
    counts = _check_counts(counts_E, E, a)
    out = torch.empty((E, KA, N), dtype=out_dtype or a.dtype, device=a.device)
    if E == 0 or KA == 0 or N == 0:
        return out
    if not use_triton(a, g):
        raise RuntimeError("gmm_wgrad needs CUDA tensors or TRITON_INTERPRET=1; use kernels.reference")
    gather_arg = gather.to(torch.int32).contiguous() if gather is not None else counts
    use_tma = _tma_ok(g) and (gather is not None or _tma_ok(a))

    def grid(meta):
        return (E * triton.cdiv(KA, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    def launch(tma: bool):
        _wgrad[grid](
            a, g, out, counts, gather_arg,
            M, KA, N, _m_bucket(M, E),
            a.stride(0), a.stride(1), g.stride(0), g.stride(1), out.stride(0), out.stride(1), out.stride(2),
            E=E, E_PAD=next_pow2(E), HAS_GATHER=gather is not None, PREC=dot_precision(a.dtype), USE_TMA=tma,
            **_WGRAD_FIXED,
        )

    _launch_with_fallback(launch, use_tma)
    return out


# ----------------------------------------------------------------------------------- autograd op
@torch.library.custom_op("semoe_kernels::grouped_gemm", mutates_args=())
def _grouped_gemm_op(a_MK: Tensor, b_EKN: Tensor, counts_E: Tensor) -> Tensor:
    if not use_triton(a_MK, b_EKN):
        return ref.grouped_gemm_ref(a_MK, b_EKN, counts_E)
    return gmm_fwd(a_MK, b_EKN, counts_E)


@_grouped_gemm_op.register_fake
def _(a_MK, b_EKN, counts_E):
    return a_MK.new_empty((a_MK.shape[0], b_EKN.shape[2]))


def _gg_setup(ctx, inputs, output):
    a, b, counts = inputs
    ctx.save_for_backward(a, b, counts)


def _gg_backward(ctx, grad_c):
    a, b, counts = ctx.saved_tensors
    grad_c = grad_c.contiguous()
    if not use_triton(a, b):
        ga = ref.grouped_gemm_ref(grad_c, b.transpose(1, 2), counts)
        gb = ref.grouped_gemm_wgrad_ref(a, grad_c, counts)
    else:
        ga = gmm_fwd(grad_c, b, counts, trans_b=True)
        gb = gmm_wgrad(a, grad_c, counts)
    return ga, gb, None


_grouped_gemm_op.register_autograd(_gg_backward, setup_context=_gg_setup)


def grouped_gemm(a_MK: Tensor, b_EKN: Tensor, counts_E: Tensor) -> Tensor:
    """Differentiable grouped GEMM: ``c[rows of e] = a[rows of e] @ b[e]`` for expert-sorted rows.

    a_MK: [M, K] with M >= counts_E.sum() (later rows of c are zero); b_EKN: [E, K, N]
    same dtype (fp32, bf16, fp16); counts_E: integer [E] on the same device. Returns c_MN.
    """
    check(a_MK.dim() == 2 and b_EKN.dim() == 3, "grouped_gemm wants a_MK [M, K] and b_EKN [E, K, N]")
    check(a_MK.shape[1] == b_EKN.shape[1], f"K differs: a {a_MK.shape[1]} vs b {b_EKN.shape[1]}")
    return _grouped_gemm_op(a_MK.contiguous(), b_EKN.contiguous(), counts_E)
