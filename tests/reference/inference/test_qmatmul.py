"""Fused quantized expert GEMMs (reference/inference/qmatmul.py) and the fused quantized ring.

CPU: int8 runs the Triton kernel under TRITON_INTERPRET=1 (tests/conftest.py) and must equal the
dequantize-then-GEMM reference; fp8's ``torch._scaled_*mm`` paths are GPU-only, so the CPU checks the
fallback and the error bound of the fp8 formula (:func:`fp8_emulated`); the GPU test compares the real
``_scaled_*mm`` output with that formula.
"""

from __future__ import annotations

import pytest
import torch

from kernels.dequant_gemm import dequant_gemm_ref
from reference.inference import qmatmul
from reference.inference.engine import Engine, InferConfig, random_prompts
from reference.inference.qmatmul import (
    fp8_emulated,
    quant_grouped_ffn,
    quant_mm,
    quantize_rows_fp8,
)
from reference.inference.quantize import FP8_REL_ERR, quantize, scale_key
from reference.inference.store import ModelStore, save_model
from reference.model import MoEDecoder
from semoe.presets import model_preset

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(E=3, I=32, O=48, dtype=torch.float32, device=DEV):
    return torch.randn(E, I, O, device=device, dtype=dtype)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quant_mm_equals_dequant_reference(fmt):
    torch.manual_seed(0)
    w = _weights()
    q = quantize(w, fmt)
    assert q.data.mT.is_contiguous()  # k-major storage (the _scaled_mm weight layout)
    counts = torch.tensor([5, 0, 11], device=DEV)
    x = torch.randn(16, 32, device=DEV)
    out = quant_mm(x, q.data, q.scale, counts, fmt)
    if fmt == "fp8" and x.is_cuda:
        ref = fp8_emulated(x, q.data, q.scale, counts)
    else:
        ref = dequant_gemm_ref(x, q.data, q.scale, counts)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert qmatmul.IMPL_USED[fmt] in ("triton_dequant_gemm", "dequant_ref", "scaled_grouped_mm", "scaled_mm_loop")


def test_fp8_formula_error_bound():
    """fp8 activations (per row) x fp8 weights (per column): |err| <= (2 e + e^2) sum_i |x_i||w_io|,
    e = 2^-4 (normal range; random normal data keeps subnormals negligible), plus fp32 slack."""
    torch.manual_seed(1)
    w = _weights(E=2, I=64, O=40, device="cpu")
    q = quantize(w, "fp8")
    counts = torch.tensor([9, 7])
    x = torch.randn(16, 64)
    out = fp8_emulated(x, q.data, q.scale, counts)
    exact = torch.cat([x[:9] @ w[0], x[9:] @ w[1]])
    mag = torch.cat([x[:9].abs() @ w[0].abs(), x[9:].abs() @ w[1].abs()])
    e = FP8_REL_ERR
    assert bool(((out - exact).abs() <= (2 * e + e * e) * mag * 1.01 + 1e-4).all())
    qa, sa = quantize_rows_fp8(x)
    assert qa.dtype == torch.float8_e4m3fn and sa.shape == (16,)


def test_failing_impl_falls_back(monkeypatch):
    """An implementation that raises (or disagrees with its reference on its first call) is dropped."""
    monkeypatch.setattr(qmatmul, "_BROKEN", set())
    monkeypatch.setattr(qmatmul, "_CHECKED", set())
    import kernels.dequant_gemm as dg

    monkeypatch.setattr(dg, "dequant_gemm", lambda *a, **k: torch.full((16, 48), 1e3))
    monkeypatch.setattr("kernels._common.use_triton", lambda *t: True)
    q = quantize(_weights(device="cpu"), "int8")
    counts = torch.tensor([5, 0, 11])
    x = torch.randn(16, 32)
    with pytest.warns(UserWarning, match="relative error"):
        out = quant_mm(x, q.data, q.scale, counts, "int8")
    assert torch.allclose(out, dequant_gemm_ref(x, q.data, q.scale, counts))
    assert qmatmul.IMPL_USED["int8"] == "dequant_ref" and "triton_dequant_gemm_int8" in qmatmul._BROKEN


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fused_ring_equals_dequant_ring(tmp_path, fmt):
    spec = model_preset("tiny").replace(layers=2, experts=8, dtype="fp32", activation="swiglu", bias=True)
    save_model(MoEDecoder(spec, seed=0).eval(), tmp_path / "store")
    store = ModelStore.load(tmp_path / "store")
    prompts = random_prompts(2, 6, spec.vocab)

    def run(kern):
        eng = Engine(store, InferConfig(mode="ring", slots=1, quant=fmt, quant_kernel=kern), batch=2, max_len=9,
                     prefill_tokens=12)
        return eng.generate(prompts, 3, keep_logits=True), eng

    ref, _ = run("dequant")
    out, eng = run("fused")
    assert eng.pool.fused and eng.pool.tensors["w1_EDF"].mT.is_contiguous()
    assert out.stats["bytes_copied"] == ref.stats["bytes_copied"]
    assert torch.equal(out.tokens_BG, ref.tokens_BG)
    assert torch.allclose(out.logits_BGV, ref.logits_BGV, atol=1e-4, rtol=1e-4)


def test_grouped_ffn_gelu_no_bias():
    torch.manual_seed(2)
    E, D, F = 2, 16, 32
    w = {"w1_EDF": torch.randn(E, D, F), "w2_EFD": torch.randn(E, F, D)}
    qw = {}
    for n, t in w.items():
        q = quantize(t, "int8")
        qw[n], qw[scale_key(n)] = q.data, q.scale
    counts = torch.tensor([3, 4])
    x = torch.randn(7, D)
    out = quant_grouped_ffn(x, counts, qw, "int8")
    deq = {n: qw[n].float() * qw[scale_key(n)] for n in w}
    ref = torch.cat([torch.nn.functional.gelu(x[:3] @ deq["w1_EDF"][0]) @ deq["w2_EFD"][0],
                     torch.nn.functional.gelu(x[3:] @ deq["w1_EDF"][1]) @ deq["w2_EFD"][1]])
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp8_scaled_mm_matches_formula():
    torch.manual_seed(3)
    w = _weights(E=4, I=256, O=512, dtype=torch.bfloat16)
    q = quantize(w, "fp8")
    counts = torch.tensor([64, 0, 48, 16], device="cuda")
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    out = quant_mm(x, q.data, q.scale, counts, "fp8")
    ref = fp8_emulated(x.float(), q.data, q.scale, counts)
    assert qmatmul.IMPL_USED["fp8"] in ("scaled_grouped_mm", "scaled_mm_loop"), qmatmul._BROKEN
    assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
