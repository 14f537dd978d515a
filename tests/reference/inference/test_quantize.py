"""Quantized expert weights (reference/inference/quantize.py): error bounds, bytes, store layers and the
quality of a trained tiny model with quantized experts."""

from __future__ import annotations

import pytest
import torch

from reference.inference.quantize import (
    FORMATS,
    FP8_DTYPE,
    FP8_MIN_NORMAL,
    QuantizedTensor,
    channel_scale,
    dequantize,
    dequantize_into,
    error_bound,
    expert_weight_params,
    quantize,
    quantize_layer,
    quantize_model_experts_,
    quantize_store,
    quantize_store_layer,
)
from reference.inference.store import ModelStore, save_model
from reference.model import MoEDecoder
from semoe.presets import model_preset


def _within_bound(w, q) -> bool:
    """``|w - q.data * q.scale|`` (exact, in fp64) within the format's bound, with the slack of the fp32
    division ``w / scale`` (relative 2^-24 of at most 448, i.e. < 3e-5 of the bound)."""
    deq = q.data.double() * q.scale.double()
    return bool(((w.double() - deq).abs() <= error_bound(w, q).double() * (1 + 3e-5) + 1e-30).all())


def _weights(seed=0, shape=(4, 64, 128)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64) * 0.02
    w[0, :, 3] = 0.0  # an all-zero column (scale 1, exact)
    w[1, 5, 7] = 0.5  # an outlier dominating its column
    w[2, :, 9] *= 1e-4  # a tiny column: its own scale keeps it accurate
    return w.float()


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_within_bound(fmt):
    w = _weights()
    q = quantize(w, fmt)
    assert q.data.dtype == (torch.int8 if fmt == "int8" else FP8_DTYPE)
    assert q.scale.shape == (4, 1, 128) and q.scale.dtype == torch.float32
    assert _within_bound(w, q)
    assert dequantize(q)[0, :, 3].abs().max() == 0


def test_int8_bound_is_half_scale_and_uses_full_range():
    w = _weights(1)
    q = quantize(w, "int8")
    assert ((w.double() - q.data.double() * q.scale.double()).abs() <= q.scale.double() / 2 * (1 + 3e-5)).all()
    assert int(q.data.abs().amax()) == 127 and int(q.data.min()) >= -127  # symmetric, no -128
    # the column max is reproduced exactly (it maps to +-127)
    col_max = w.abs().amax(dim=-2)
    deq_max = dequantize(q).abs().amax(dim=-2)
    torch.testing.assert_close(deq_max, col_max, rtol=1e-6, atol=0)


def test_fp8_relative_error_for_normal_values():
    w = _weights(2)
    q = quantize(w, "fp8")
    rel = ((w - dequantize(q)).abs() / w.abs())
    normal = (w / q.scale).abs() >= FP8_MIN_NORMAL
    assert normal.float().mean() > 0.95
    assert float(rel[normal].max()) <= 2.0**-4 + 1e-7
    assert float(rel[normal].max()) > 2.0**-6  # the bound is not vacuous: some values do round
    # no overflow: every column max maps to 448
    assert float(q.data.float().abs().amax()) == 448.0


def test_scale_is_per_output_channel():
    w = _weights(3)
    for fmt, qmax in (("int8", 127.0), ("fp8", 448.0)):
        s = channel_scale(w, fmt)
        torch.testing.assert_close(s[1, 0, 9], w[1, :, 9].abs().max() / qmax)
    # x @ deq == (x @ q) * scale: the scale can be applied after the GEMM (fused-kernel form)
    q = quantize(w, "int8")
    x = torch.randn(5, 64, dtype=torch.float64)
    ref = x @ dequantize(q, torch.float64)[1]
    torch.testing.assert_close((x @ q.data[1].double()) * q.scale[1].double(), ref)


def test_bad_format_and_shape():
    with pytest.raises(ValueError, match="format must be one of"):
        quantize(torch.ones(2, 2), "int4")
    with pytest.raises(ValueError, match=">= 2 dims"):
        quantize(torch.ones(3), "int8")


@pytest.fixture(scope="module")
def trained_tiny():
    """tiny trained 120 steps on the byte corpus (1 thread: ~1.5 s)."""
    from reference.data import ByteCorpus
    from reference.distill import DistillConfig, split_corpus, train_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = DistillConfig(experts=4, steps=120, eval_batches=4)
        train, held = split_corpus(ByteCorpus(), cfg.heldout_frac)
        model = MoEDecoder(model_preset("tiny"), seed=0)
        train_model(model, train, cfg.steps, cfg)
        yield model.eval(), held, cfg
    finally:
        torch.set_num_threads(threads)


def test_store_layer_bytes_and_dequantize_path(tmp_path, trained_tiny):
    model, _, _ = trained_tiny
    save_model(model, tmp_path / "store", dtype=torch.bfloat16)
    store = ModelStore.load(tmp_path / "store", pin=False)
    spec = store.spec
    D, F = spec.hidden, spec.ffn
    bf16_weights = sum(t["nbytes"] for t in store.expert_table.values())
    for fmt in FORMATS:
        layers = quantize_store(store, fmt)
        assert sorted(layers) == store.moe_blocks
        ql = quantize_store_layer(store, store.moe_blocks[0], fmt)
        assert ql.data_nbytes * 2 == bf16_weights  # exactly half of bf16
        scale_bytes = 4 * spec.experts * (F + D)  # fp32 scale per output column of w1 (F) and w2 (D)
        assert ql.nbytes == ql.data_nbytes + scale_bytes
        assert bf16_weights / ql.nbytes >= 2 * D / (D + 4) - 1e-9  # 1.88x for tiny, -> 2x for large I
        # the ring's path: dequantize into preallocated buffers, equal to the direct dequantize
        views = store.layer_views(store.moe_blocks[0])
        for name, q in ql.weights.items():
            buf = torch.empty(q.data.shape, dtype=torch.bfloat16)
            dequantize_into(buf, q)
            assert torch.equal(buf, dequantize(q, torch.bfloat16))
            w = views[name].float()
            assert _within_bound(w, q)
        deq = ql.dequantize(torch.bfloat16)
        assert set(deq) == set(store.expert_table) and all(t.dtype == torch.bfloat16 for t in deq.values())
    with pytest.raises(ValueError, match="not an MoE block"):
        quantize_store_layer(store, 99, "int8")
    with pytest.raises(ValueError, match="no expert weights"):
        quantize_layer({"b1_EF": torch.zeros(2, 3)}, "int8")


def test_quantized_experts_quality_on_trained_tiny(trained_tiny):
    """Logit error and held-out loss change of a trained tiny model with int8 / fp8 experts."""
    import copy

    from reference.distill import heldout_loss, logit_error

    model, held, cfg = trained_tiny
    base = heldout_loss(model, held, cfg)
    assert base < 3.6  # trained (ln 256 = 5.55)
    names = [n for n, _ in expert_weight_params(model)]
    assert len(names) == 2 * model.spec.layers and all(".experts." in n for n in names)
    out = {}
    for fmt in FORMATS:
        qm = copy.deepcopy(model)
        errs = quantize_model_experts_(qm, fmt)
        assert set(errs) == set(names)
        out[fmt] = (logit_error(qm, model, held, cfg), heldout_loss(qm, held, cfg) - base)
    (i8_max, i8_rms), i8_dl = out["int8"]
    (f8_max, f8_rms), f8_dl = out["fp8"]
    assert 0 < i8_rms < f8_rms  # int8 (7 bits per channel range) is finer than e4m3 (3 mantissa bits)
    assert i8_max < 0.01 and f8_max < 0.15
    assert abs(i8_dl) < 2e-3 and abs(f8_dl) < 5e-3


def test_quantized_tensor_to_and_nbytes():
    q = quantize(_weights(), "fp8")
    assert isinstance(q.to("cpu"), QuantizedTensor)
    assert q.nbytes == 4 * 64 * 128 + 4 * 4 * 128
