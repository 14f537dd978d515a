"""Grouped GEMM with int8 (or fp8) weights dequantized inside the kernel (weight-only quantization).

Shape legend: M routed rows (expert-sorted, group e holds ``counts_E[e]`` consecutive rows), K
reduction dim (expert input I), N output dim (expert output O), E groups (experts).

Data flow
---------
``c_MN[rows of e] = (a_MK[rows of e] @ q_EKN[e]) * scale_E1N[e]``

``q`` holds 1-byte weights (int8, or float8_e4m3fn), any strides (the quantized expert pool stores
them input-contiguous, i.e. physically ``[E, N, K]``); ``scale`` the fp32 per-output-channel scales
of :mod:`reference.inference.quantize`. A B tile is loaded as bytes, converted to a's dtype in
registers (exact: int8 and e4m3 values are bf16 / fp32 numbers) and fed to ``tl.dot`` with fp32
accumulation; the scale multiplies the fp32 accumulator in the epilogue (per column, so it commutes
with the sum over K). No dequantized weight is ever written to memory: the GEMM reads 1 byte per
weight instead of 2, and the bf16 workspace of the dequantize-then-GEMM path disappears.

Scheduling is :mod:`kernels.grouped_gemm`'s persistent one, its own ``@triton.jit`` helpers (one program per
SM, tile table over groups built from ``counts_E`` in registers: ``_tile_table``; a tile's group, rows and
GROUP_M swizzle: ``_tile_of``), with pointer loads only (no TMA: the
B operand changes dtype on the way in).

Reference: :func:`dequant_gemm_ref` (dequantize with the scale, then the grouped GEMM in fp32);
tests in tests/kernels/test_dequant_gemm.py (TRITON_INTERPRET=1 on the CPU);
``python -m kernels.dequant_gemm`` benchmarks it on a GPU against dequantize-then-``torch._grouped_mm``.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from kernels._common import (
    HAS_TRITON,
    INTERPRET,
    check,
    device_index,
    next_pow2,
    num_programs_persistent,
    use_triton,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.grouped_gemm import _tile_of, _tile_table

    @triton.jit
    def _dq_gmm_kernel(
        a_ptr, q_ptr, s_ptr, c_ptr, counts_ptr,
        M, N, K, M_BUCKET,
        s_am, s_ak, s_qe, s_qk, s_qn, s_se, s_sn, s_cm, s_cn,
        E: tl.constexpr, E_PAD: tl.constexpr, NUM_PROGS: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        pid = tl.program_id(0)
        eidx, counts, row_start, n_tiles, m_tiles, g_tiles, tile_end, total = _tile_table(
            counts_ptr, M, N, E, E_PAD, BM, BN)  # lane E: the virtual tail group (zero rows)
        rk = tl.arange(0, BK)
        for tile in range(pid, total, NUM_PROGS):
            e, _, _, pid_n, grow, m_mask = _tile_of(
                tile, eidx, counts, row_start, n_tiles, m_tiles, g_tiles, tile_end, BM, GROUP_M)
            rn = pid_n * BN + tl.arange(0, BN)
            n_mask = rn < N
            e_safe = tl.minimum(e, E - 1).to(tl.int64)
            a_ptrs = a_ptr + grow[:, None] * s_am + rk[None, :] * s_ak
            q_ptrs = q_ptr + e_safe * s_qe + rk[:, None] * s_qk + rn[None, :] * s_qn
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            k_end = tl.where(e < E, K, 0)
            for k0 in range(0, k_end, BK):
                k_mask = (k0 + rk) < K
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                q_mask = k_mask[:, None] & n_mask[None, :]
                # no `other=`: an integer fill cannot be cast to fp8 (Triton 3.6 on sm90); zero after the convert
                q = tl.load(q_ptrs, mask=q_mask)
                qf = tl.where(q_mask, q.to(tl.float32), 0.0)
                acc = tl.dot(a, qf.to(a.dtype), acc)  # via fp32: exact, and the interpreter casts right
                a_ptrs += BK * s_ak
                q_ptrs += BK * s_qk
            scale = tl.load(s_ptr + e_safe * s_se + rn * s_sn, mask=n_mask, other=0.0)
            acc = acc * scale[None, :]
            c_off = grow[:, None] * s_cm + rn[None, :] * s_cn
            tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])

    if INTERPRET:
        _FIXED = dict(BM=16, BN=16, BK=16, GROUP_M=2)
        _dq = _dq_gmm_kernel
    else:
        _FIXED = {}
        _cfgs = [
            triton.Config(dict(BM=128, BN=128, BK=64, GROUP_M=8), num_warps=8, num_stages=4),
            triton.Config(dict(BM=64, BN=128, BK=64, GROUP_M=8), num_warps=4, num_stages=4),
            triton.Config(dict(BM=16, BN=128, BK=128, GROUP_M=8), num_warps=4, num_stages=4),
        ]
        _dq = triton.autotune(configs=_cfgs if os.environ.get("SEMOE_AUTOTUNE", "1") != "0" else _cfgs[:1],
                              key=["N", "K", "M_BUCKET"])(_dq_gmm_kernel)


def _m_bucket(M: int, E: int) -> int:
    return min(4096, max(16, next_pow2(max(1, M // max(E, 1)))))


def dequant_gemm(a_MK: Tensor, q_EKN: Tensor, scale_E1N: Tensor, counts_E: Tensor,
                 out_dtype: torch.dtype | None = None) -> Tensor:
    """``c[rows of e] = (a[rows of e] @ q[e]) * scale[e]`` -> [M, N] (``out_dtype``, default a's);
    rows past ``counts_E.sum()`` are zero. a: fp32 / bf16 / fp16 [M, K]; q: int8 or float8_e4m3fn
    [E, K, N] of any strides; scale: fp32 [E, 1, N] (or [E, N]); counts_E: integer [E] (device).
    Triton on CUDA (or TRITON_INTERPRET=1), else :func:`dequant_gemm_ref`."""
    check(a_MK.dim() == 2 and q_EKN.dim() == 3, f"dequant_gemm: a must be 2-D and q 3-D, got {a_MK.dim()}-D, {q_EKN.dim()}-D")
    E, K, N = q_EKN.shape
    check(a_MK.shape[1] == K, f"dequant_gemm: inner dims differ: a has K={a_MK.shape[1]}, q has {K}")
    check(q_EKN.dtype in (torch.int8, torch.float8_e4m3fn), f"dequant_gemm: q must be int8 or float8_e4m3fn, got {q_EKN.dtype}")
    s = scale_E1N.reshape(E, N) if scale_E1N.dim() == 3 else scale_E1N
    check(tuple(s.shape) == (E, N), f"dequant_gemm: scale must be [E, 1, N] = [{E}, 1, {N}], got {tuple(scale_E1N.shape)}")
    check(counts_E.dim() == 1 and counts_E.shape[0] == E, f"dequant_gemm: counts_E must be [E={E}]")
    if not use_triton(a_MK, q_EKN):
        return dequant_gemm_ref(a_MK, q_EKN, scale_E1N, counts_E, out_dtype)
    M = a_MK.shape[0]
    c = torch.empty((M, N), dtype=out_dtype or a_MK.dtype, device=a_MK.device)
    if M == 0 or N == 0:
        return c
    s = s.float()
    counts = counts_E.to(torch.int32).contiguous()
    P = num_programs_persistent(device_index(a_MK))
    _dq[(P,)](
        a_MK, q_EKN, s, c, counts, M, N, K, _m_bucket(M, E),
        a_MK.stride(0), a_MK.stride(1), q_EKN.stride(0), q_EKN.stride(1), q_EKN.stride(2), s.stride(0), s.stride(1),
        c.stride(0), c.stride(1), E=E, E_PAD=next_pow2(E + 1), NUM_PROGS=P, **_FIXED,
    )
    return c


def dequant_gemm_ref(a_MK: Tensor, q_EKN: Tensor, scale_E1N: Tensor, counts_E: Tensor,
                     out_dtype: torch.dtype | None = None) -> Tensor:
    """Dequantize (``q.float() * scale``) then the grouped GEMM in fp32; one host sync (counts)."""
    E, _, N = q_EKN.shape
    w = q_EKN.float() * scale_E1N.reshape(E, 1, N).float()
    out = torch.zeros(a_MK.shape[0], N, dtype=torch.float32, device=a_MK.device)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            out[start : start + n] = a_MK[start : start + n].float() @ w[e]
        start += n
    return out.to(out_dtype or a_MK.dtype)


def bench(argv: list[str] | None = None) -> int:
    """GPU: the fused int8 GEMM vs dequantize-into-bf16 + ``torch._grouped_mm`` (Mixtral expert shapes)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=14336)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("dequant_gemm bench: needs a GPU")
        return 0
    from triton.testing import do_bench

    E, K, N, M = a.experts, a.k, a.n, a.rows
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    q = torch.randint(-127, 128, (E, N, K), device="cuda", dtype=torch.int8).mT
    s = torch.rand(E, 1, N, device="cuda") / 127
    counts = torch.full((E,), M // E, device="cuda")
    counts[0] += M - int(counts.sum())
    ws = torch.empty(E, K, N, device="cuda", dtype=torch.bfloat16)
    offs = torch.cumsum(counts, 0).to(torch.int32)

    def deq():
        ws.copy_(q)
        ws.mul_(s)
        return torch._grouped_mm(x, ws, offs=offs)

    t_f = do_bench(lambda: dequant_gemm(x, q, s, counts))
    t_d = do_bench(deq)
    fl = 2 * M * K * N
    print(f"M={M} E={E} K={K} N={N}: fused int8 {t_f:.3f} ms ({fl / t_f / 1e9:.0f} TFLOP/s), "
          f"dequant+grouped_mm {t_d:.3f} ms ({fl / t_d / 1e9:.0f} TFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(bench())
