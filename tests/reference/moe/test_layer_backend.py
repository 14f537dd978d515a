"""The MoE layer's backend switch: the Triton kernels (run by Triton's interpreter on the CPU, see
tests/conftest.py) give the torch backend's outputs and gradients."""

from __future__ import annotations

import os

import pytest
import torch

from reference.moe.layer import MoELayer, resolve_backend
from semoe import ModelSpec

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1",
)


def _spec(**kw):
    base = dict(layers=2, hidden=16, heads=2, vocab=32, ffn=32, experts=4, top_k=2, dtype="fp32")
    return ModelSpec(**{**base, **kw})


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # dropless top-2, GELU
        dict(activation="swiglu", top_k=1),
        dict(capacity_factor=0.5),  # tokens dropped: kept_TK reaches the kernels
        dict(experts=8, top_k=3, shared_experts=1),
    ],
    ids=["gelu-k2", "swiglu-k1", "capacity-drop", "e8-k3-shared"],
)
def test_triton_backend_equals_torch_backend(kw):
    spec = _spec(**kw)
    torch_layer = MoELayer(spec, backend="torch", seed=1)
    triton_layer = MoELayer(spec, backend="triton", seed=1)
    triton_layer.load_state_dict(torch_layer.state_dict())
    assert triton_layer._fused_triton_path() and not torch_layer._fused_triton_path()
    x = torch.randn(2, 11, spec.hidden)  # 22 tokens: not a multiple of any tile
    outs, grads = [], []
    for layer in (torch_layer, triton_layer):
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), aux["tokens_per_expert"]))
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    assert torch.equal(outs[1][1], outs[0][1])
    for g_triton, g_torch in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_triton, g_torch, rtol=1e-4, atol=1e-5)


def test_backend_auto_and_errors():
    assert resolve_backend("auto") == ("triton" if torch.cuda.is_available() else "torch")
    assert MoELayer(_spec()).backend == resolve_backend("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        MoELayer(_spec(), backend="cuda")
    biased = MoELayer(_spec(bias=True), backend="triton")
    assert not biased._fused_triton_path()  # the kernels take no bias: the torch path runs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("activation,top_k", [("gelu", 2), ("swiglu", 2), ("gelu", 1)])
def test_triton_backend_equals_torch_backend_bf16_on_gpu(activation, top_k):
    spec = _spec(hidden=1024, ffn=2048, experts=8, top_k=top_k, activation=activation, heads=8, dtype="bf16")
    layers = [MoELayer(spec, backend=b, seed=3, dtype=torch.bfloat16, device="cuda") for b in ("torch", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(4093, spec.hidden, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    results = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        y, _ = layer(xi)
        y.backward(dy)
        results.append([y.float(), xi.grad.float()] + [p.grad.float() for p in layer.parameters()])
    for a, b in zip(results[1], results[0]):
        rel = (a - b).norm() / b.norm().clamp_min(1e-12)
        assert rel < 2e-2, float(rel)
