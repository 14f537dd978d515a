"""Expert FFNs: the grouped fast path against the sequential oracle, weight layout, init, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reference.moe.experts import (
    GroupedExperts,
    SequentialExperts,
    ffn,
    grouped_mm_supported,
)
from semoe.model_spec import ModelSpec
from semoe.sizing import ffn_params

E, D, FF = 4, 8, 16
COUNTS = [3, 0, 5, 1]  # an empty expert in the middle, one with a single row


def _pair(activation="gelu", bias=True, impl="loop", dtype=torch.float64, **kw):
    g = GroupedExperts(E, D, FF, activation=activation, bias=bias, impl=impl, seed=1, **kw).to(dtype)
    s = SequentialExperts(E, D, FF, activation=activation, bias=bias, seed=2, **kw).to(dtype)
    with torch.no_grad():  # nonzero biases so they are exercised
        for p in g.parameters():
            p.add_(0.1 * torch.randn_like(p))
    s.load_state_dict(g.state_dict())
    return g, s


def _fwd_bwd(module, x, counts):
    x = x.detach().clone().requires_grad_(True)
    y = module(x, counts)
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    grads = torch.autograd.grad((y * g).sum(), [x, *module.parameters()])
    return y, grads


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("impl", ["loop", "bmm", "auto"])
def test_grouped_matches_sequential_fp64(activation, bias, impl):
    g, s = _pair(activation, bias, impl)
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), D, dtype=torch.float64)
    yg, gg = _fwd_bwd(g, x, counts)
    ys, gs = _fwd_bwd(s, x, counts)
    torch.testing.assert_close(yg, ys, rtol=0, atol=1e-10)
    for a, b in zip(gg, gs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_matches_sequential_fp32(activation, bias):
    """torch._grouped_mm runs on the CPU in fp32 (16-byte aligned D and F)."""
    g, s = _pair(activation, bias, "grouped_mm", dtype=torch.float32)
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), D)
    assert grouped_mm_supported(x, FF)
    yg, gg = _fwd_bwd(g, x, counts)
    ys, gs = _fwd_bwd(s, x, counts)
    torch.testing.assert_close(yg, ys, rtol=1e-5, atol=1e-6)
    for a, b in zip(gg, gs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_padded_input_runs_bmm_and_matches_oracle():
    g, s = _pair("swiglu", True, "loop")
    x_ECD = torch.randn(E, 3, D, dtype=torch.float64)
    torch.testing.assert_close(g(x_ECD), s(x_ECD), rtol=0, atol=1e-12)
    assert g(x_ECD).shape == (E, 3, D)


def test_bf16_forward_on_cpu():
    g, s = _pair("gelu", True, "auto", dtype=torch.bfloat16)
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), D, dtype=torch.bfloat16)
    assert grouped_mm_supported(x, FF)
    y = g(x, counts)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y.float(), s(x, counts).float(), rtol=2e-2, atol=2e-2)


def test_no_rows():
    g, s = _pair()
    x = torch.zeros(0, D, dtype=torch.float64)
    counts = torch.zeros(E, dtype=torch.long)
    for impl in ("auto", "bmm", "loop"):
        g.impl = impl
        assert g(x, counts).shape == (0, D)
    assert s(x, counts).shape == (0, D)


def test_grouped_mm_supported_rules():
    assert not grouped_mm_supported(torch.zeros(4, 8, dtype=torch.float64), 16)  # fp64
    assert not grouped_mm_supported(torch.zeros(4, 6), 16)  # 24-byte rows
    assert not grouped_mm_supported(torch.zeros(4, 8), 6)  # F not aligned
    assert not grouped_mm_supported(torch.zeros(0, 8), 16)  # no rows
    assert grouped_mm_supported(torch.zeros(4, 8), 16)


def test_ffn_formulas():
    torch.manual_seed(0)
    x, w1, w3 = torch.randn(3, D, dtype=torch.float64), torch.randn(D, FF, dtype=torch.float64), torch.randn(D, FF, dtype=torch.float64)
    w2 = torch.randn(FF, D, dtype=torch.float64)
    h = x @ w1
    gelu_exact = h * 0.5 * (1 + torch.erf(h / math.sqrt(2)))  # x * Phi(x), not the tanh approximation
    torch.testing.assert_close(ffn(x, w1, w2), gelu_exact @ w2)
    torch.testing.assert_close(ffn(x, w1, w2, w3), (F.silu(h) * (x @ w3)) @ w2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_param_count_matches_sizing(activation, bias):
    spec = ModelSpec(layers=2, hidden=D, heads=2, vocab=32, ffn=FF, experts=E, activation=activation, bias=bias)
    for cls in (GroupedExperts, SequentialExperts):
        m = cls(E, D, FF, activation=activation, bias=bias)
        assert sum(p.numel() for p in m.parameters()) == E * ffn_params(spec, FF)


def test_shared_layout_and_names():
    g, s = _pair("swiglu", True)
    assert list(g.state_dict()) == list(s.state_dict())
    assert set(g.state_dict()) == {"w1_EDF", "w2_EFD", "w3_EDF", "b1_EF", "b2_ED", "b3_EF"}
    assert g.w1_EDF.shape == (E, D, FF) and g.w2_EFD.shape == (E, FF, D)
    g2 = GroupedExperts(E, D, FF, activation="gelu")
    assert set(g2.state_dict()) == {"w1_EDF", "w2_EFD"}


def test_init_is_seeded_and_scaled():
    a = GroupedExperts(8, 64, 128, seed=3, num_layers=8)
    b = SequentialExperts(8, 64, 128, seed=3, num_layers=8)
    c = GroupedExperts(8, 64, 128, seed=4, num_layers=8)
    assert torch.equal(a.w1_EDF, b.w1_EDF) and torch.equal(a.w2_EFD, b.w2_EFD)
    assert not torch.equal(a.w1_EDF, c.w1_EDF)
    assert abs(a.w1_EDF.std().item() - 0.02) < 1e-3
    assert abs(a.w2_EFD.std().item() - 0.02 / 4) < 2e-4  # 0.02 / sqrt(2 * 8)
    before = a.w1_EDF.detach().clone()
    torch.manual_seed(123)  # the global RNG plays no part
    a.reset_parameters()
    assert torch.equal(a.w1_EDF, before)


def test_bad_input_messages():
    g, s = _pair(impl="auto")
    counts = torch.tensor(COUNTS)
    for m in (g, s):
        with pytest.raises(ValueError, match="expected x_ND"):
            m(torch.zeros(9, D + 1, dtype=torch.float64), counts)
        with pytest.raises(ValueError, match="tokens_per_expert_E must have shape"):
            m(torch.zeros(9, D, dtype=torch.float64), torch.tensor([9]))
        with pytest.raises(ValueError, match="needs tokens_per_expert_E"):
            m(torch.zeros(9, D, dtype=torch.float64))
        with pytest.raises(ValueError, match="dtype"):
            m(torch.zeros(9, D, dtype=torch.float32), counts)
        with pytest.raises(ValueError, match="padded input has"):
            m(torch.zeros(E + 1, 2, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="sums to 8"):
        s(torch.zeros(9, D, dtype=torch.float64), torch.tensor([3, 0, 4, 1]))
    g.impl = "grouped_mm"
    with pytest.raises(ValueError, match="does not support"):
        g(torch.zeros(9, D, dtype=torch.float64), counts)
    with pytest.raises(ValueError, match="impl must be one of"):
        GroupedExperts(E, D, FF, impl="cutlass")
    with pytest.raises(ValueError, match="activation"):
        SequentialExperts(E, D, FF, activation="relu")
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        SequentialExperts(0, D, FF)


def test_grouped_experts_under_autocast_run_in_the_autocast_dtype():
    import torch

    from reference.moe.experts import GroupedExperts

    torch.manual_seed(0)
    e = GroupedExperts(4, 16, 32, activation="gelu", bias=False, num_layers=1, seed=0)
    x = torch.randn(10, 16)
    counts = torch.tensor([3, 0, 5, 2])
    ref = e(x, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = e(x, counts)
    assert y.dtype == torch.bfloat16  # the grouped GEMMs ran in bf16, not fp32
    assert torch.allclose(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert e.w1_EDF.grad is not None and e.w1_EDF.grad.dtype == torch.float32  # fp32 master weights keep fp32 grads
