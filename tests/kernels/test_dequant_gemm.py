"""Fused-dequantization grouped GEMM (kernels/dequant_gemm.py) vs dequantize-then-GEMM."""

from __future__ import annotations

import pytest
import torch
from ktest_util import DEVICE, gpu, needs_kernels, rel_err

from kernels.dequant_gemm import dequant_gemm, dequant_gemm_ref
from reference.inference.quantize import quantize

pytestmark = needs_kernels


def _case(counts, K, N, fmt, dtype=torch.float32, transposed=True):
    counts = torch.tensor(counts, device=DEVICE)
    E, M = counts.numel(), int(counts.sum()) + 3  # 3 tail rows: must come out zero
    w = torch.randn(E, K, N, device=DEVICE)
    q = quantize(w, fmt)
    data = q.data if transposed else q.data.contiguous()
    a = torch.randn(M, K, device=DEVICE, dtype=dtype)
    return a, data, q.scale, counts, w


@pytest.mark.parametrize("counts", [[0, 5, 17, 0], [33], [0, 0, 0]], ids=["mixed", "one", "empty"])
@pytest.mark.parametrize("K,N", [(32, 48), (19, 33)])
@pytest.mark.parametrize("transposed", [True, False], ids=["k_major", "n_major"])
def test_int8_matches_dequant_reference(counts, K, N, transposed, monkeypatch):
    a, data, scale, counts_E, _ = _case(counts, K, N, "int8", transposed=transposed)
    empty = torch.empty  # outputs start as NaN: an element the kernel does not write fails the test

    def nan_empty(*s, **k):  # floating tensors only: Triton's autotuner allocates an int L2-flush buffer on a GPU
        t = empty(*s, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    out = dequant_gemm(a, data, scale, counts_E)
    monkeypatch.undo()
    ref = dequant_gemm_ref(a, data, scale, counts_E)
    n = int(counts_E.sum())
    assert torch.equal(out[n:], torch.zeros_like(out[n:]))
    if n:  # fp32 inputs: exact in the interpreter; tl.dot rounds them to TF32 on a GPU (10-bit mantissa)
        assert rel_err(out[:n], ref[:n]) < (1e-5 if DEVICE == "cpu" else 2e-3)


def test_int8_error_vs_unquantized_within_bound():
    """|x @ (w - deq)| <= sum_i |x_i| * scale/2 per column: the int8 bound carried through the GEMM."""
    a, data, scale, counts_E, w = _case([7, 9], 64, 40, "int8")
    out = dequant_gemm(a, data, scale, counts_E)[:16]
    exact = torch.cat([a[:7] @ w[0], a[7:16] @ w[1]])
    bound = torch.cat([a[:7].abs() @ (scale[0] / 2).expand(64, 40), a[7:16].abs() @ (scale[1] / 2).expand(64, 40)])
    assert bool(((out - exact).abs() <= bound * (1 + 1e-4) + 1e-5).all())


def test_bad_inputs_raise():
    a, data, scale, counts_E, _ = _case([4], 16, 16, "int8")
    with pytest.raises(ValueError, match="inner dims"):
        dequant_gemm(a[:, :8], data, scale, counts_E)
    with pytest.raises(ValueError, match="int8 or float8"):
        dequant_gemm(a, data.float(), scale, counts_E)


@gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_gpu_bf16(fmt):
    a, data, scale, counts_E, _ = _case([0, 100, 300, 7], 256, 512, fmt, dtype=torch.bfloat16)
    out = dequant_gemm(a, data, scale, counts_E)
    ref = dequant_gemm_ref(a, data, scale, counts_E)
    assert rel_err(out, ref) < 1e-2
