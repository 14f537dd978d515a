"""MoELayer: grouped fast path == sequential oracle (outputs and all gradients, fp64) for every gate and
capacity setting, a per-token oracle, dropped tokens, parameter count, bf16, bad input.

Stochastic gates (switch jitter, noisy top-k) run in *train* mode with the global RNG reseeded before
each of the two forwards: the gate is the only consumer of random numbers, so both runs draw the same
noise and the comparison covers the noisy code path too.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference.moe.experts import ffn
from reference.moe.layer import STAT_KEYS, MoELayer
from reference.moe.routing import Routing
from semoe.model_spec import GATE_NAMES, ModelSpec
from semoe.sizing import expert_params, router_params

TOL = {"rtol": 0, "atol": 1e-10}


def make_spec(gate="topk", capacity_factor=None, **kw) -> ModelSpec:
    base = dict(
        layers=2, hidden=8, heads=2, vocab=64, ffn=16, experts=8, top_k=2, shared_experts=1,
        activation="swiglu", bias=True, gate=gate, capacity_factor=capacity_factor,
    )
    if gate == "switch":
        base["top_k"] = 1
    if gate == "sam":
        base["expert_groups"] = 2
    base.update(kw)
    return ModelSpec(**base)


class TopKCapacityGate(nn.Module):
    """A small self-contained softmax top-k gate with GShard position-policy drops, used so that the
    layer is tested independently of reference/moe/router.py."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.router = nn.Linear(spec.hidden, spec.experts, bias=False)

    def forward(self, x_TD, token_ids_T=None) -> Routing:
        s, T = self.spec, x_TD.shape[0]
        E, K = s.experts, s.top_k
        probs_TE = F.softmax(self.router(x_TD), dim=-1)
        w_TK, ids_TK = probs_TE.topk(K, dim=-1)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        kept_TK = torch.ones(T, K, dtype=torch.bool)
        slots_TK, capacity = None, None
        if s.capacity_factor is not None:
            capacity = max(math.ceil(s.capacity_factor * T * K / E), s.min_capacity)
            slots_TK = torch.full((T, K), -1)
            fill = [0] * E
            for k in range(K):  # first choices of all tokens before any second choice
                for t in range(T):
                    e = int(ids_TK[t, k])
                    if fill[e] < capacity:
                        slots_TK[t, k], fill[e] = fill[e], fill[e] + 1
                    else:
                        kept_TK[t, k] = False
        w_TK = w_TK * kept_TK
        frac_E = torch.bincount(ids_TK[:, 0], minlength=E).to(probs_TE.dtype) / T
        return Routing(
            expert_ids_TK=ids_TK, weights_TK=w_TK, kept_TK=kept_TK,
            counts_E=torch.bincount(ids_TK[kept_TK], minlength=E), probs_TE=probs_TE,
            capacity=capacity, slots_TK=slots_TK,
            aux_losses={"load_balance": E * (frac_E * probs_TE.mean(0)).sum()},
        )


def _layers(spec, gate_factory=None, layout="contiguous", grouped_impl="auto"):
    """A grouped layer and a sequential layer with identical weights, fp64."""
    torch.manual_seed(0)
    kw = {} if gate_factory is None else {"gate": gate_factory(spec)}
    fast = MoELayer(spec, experts_impl="grouped", grouped_impl=grouped_impl, layout=layout, dtype=torch.float64, **kw)
    kw = {} if gate_factory is None else {"gate": gate_factory(spec)}
    oracle = MoELayer(spec, experts_impl="sequential", layout=layout, dtype=torch.float64, seed=99, **kw)
    with torch.no_grad():  # nonzero biases so that their gradients and outputs are exercised
        for p in fast.parameters():
            p.add_(0.05 * torch.randn_like(p))
    oracle.load_state_dict(fast.state_dict())
    return fast, oracle


def _run(layer, x, token_ids, seed=1234):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # identical gate noise in both runs
    y, aux = layer(x, token_ids)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    loss = (y * g).sum()
    for k, v in aux.items():
        if k not in STAT_KEYS and v.requires_grad:
            loss = loss + v
    loss.backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return y, aux, grads


def _assert_same(fast, oracle, x, token_ids):
    y1, aux1, g1 = _run(fast, x, token_ids)
    y2, aux2, g2 = _run(oracle, x, token_ids)
    torch.testing.assert_close(y1, y2, **TOL)
    assert aux1.keys() == aux2.keys()
    for k in aux1:
        torch.testing.assert_close(aux1[k], aux2[k], **TOL)
    assert g1.keys() == g2.keys()
    for n in g1:
        assert (g1[n] is None) == (g2[n] is None), n
        if g1[n] is not None:
            torch.testing.assert_close(g1[n], g2[n], **TOL, msg=lambda m, n=n: f"grad of {n}: {m}")
    return y1, aux1, g1


def _inputs(spec, B=3, S=8):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, S, spec.hidden, generator=gen, dtype=torch.float64)
    token_ids = torch.randint(0, spec.vocab, (B, S), generator=gen)
    return x, token_ids


def _router_module():
    return pytest.importorskip("reference.moe.router", reason="reference/moe/router.py has not landed yet")


# ------------------------------------------------------------------------ with the test gate
@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("layout", ["contiguous", "padded"])
def test_grouped_equals_sequential_test_gate(cf, layout):
    spec = make_spec(capacity_factor=cf)
    fast, oracle = _layers(spec, TopKCapacityGate, layout=layout)
    x, tok = _inputs(spec)
    y, aux, grads = _assert_same(fast, oracle, x, tok)
    assert grads["gate.router.weight"] is not None and grads["shared_experts.w1_EDF"] is not None
    if cf is None:
        assert float(aux["dropped_fraction"]) == 0.0
    if cf == 0.5:
        assert float(aux["dropped_fraction"]) > 0.0


@pytest.mark.parametrize("grouped_impl", ["bmm", "loop"])
@pytest.mark.parametrize("activation,bias,shared", [("gelu", False, 0), ("gelu", True, 2), ("swiglu", False, 1)])
def test_grouped_impls_and_variants(grouped_impl, activation, bias, shared):
    spec = make_spec(capacity_factor=1.0, activation=activation, bias=bias, shared_experts=shared)
    fast, oracle = _layers(spec, TopKCapacityGate, grouped_impl=grouped_impl)
    x, tok = _inputs(spec)
    _, _, grads = _assert_same(fast, oracle, x, tok)
    assert ("shared_experts.w1_EDF" in grads) == bool(shared)


@pytest.mark.parametrize("cf", [None, 0.5])
def test_matches_per_token_oracle(cf):
    """y_t = sum_k w_tk FFN_{e_tk}(x_t) + sum_s shared_s(x_t), written as a loop over tokens."""
    spec = make_spec(capacity_factor=cf, shared_experts=2)
    layer, _ = _layers(spec, TopKCapacityGate)
    x, _ = _inputs(spec)
    x_TD = x.reshape(-1, spec.hidden)
    with torch.no_grad():
        y, _ = layer(x)
        r = layer.gate(x_TD)
        ref = torch.zeros_like(x_TD)
        for t in range(x_TD.shape[0]):
            for k in range(spec.top_k):
                if r.kept_TK[t, k]:
                    e = int(r.expert_ids_TK[t, k])
                    ref[t] += r.weights_TK[t, k] * ffn(x_TD[t : t + 1], **layer.experts.expert_weights(e))[0]
            for s in range(spec.shared_experts):
                ref[t] += ffn(x_TD[t : t + 1], **layer.shared_experts.expert_weights(s))[0]
    torch.testing.assert_close(y.reshape(-1, spec.hidden), ref, rtol=0, atol=1e-12)


def test_fully_dropped_tokens_get_only_shared_output():
    spec = make_spec(capacity_factor=0.25)
    layer, _ = _layers(spec, TopKCapacityGate)
    x, _ = _inputs(spec, B=4, S=16)
    x_TD = x.reshape(-1, spec.hidden)
    with torch.no_grad():
        y, _ = layer(x_TD)
        dropped = ~layer.gate(x_TD).kept_TK.any(1)
        assert int(dropped.sum()) > 0
        shared = layer.shared_experts(x_TD[None]).sum(0)
    assert torch.equal(y[dropped], shared[dropped])


def test_shapes_aux_keys_and_stats():
    spec = make_spec(capacity_factor=1.0)
    layer, _ = _layers(spec, TopKCapacityGate)
    x, tok = _inputs(spec)
    y, aux = layer(x, tok)
    assert y.shape == x.shape
    y2, _ = layer(x.reshape(-1, spec.hidden))
    torch.testing.assert_close(y2.view_as(y), y)
    assert set(STAT_KEYS) <= set(aux) and "load_balance" in aux
    assert not aux["dropped_fraction"].requires_grad and aux["dropped_fraction"].dim() == 0
    assert aux["tokens_per_expert"].shape == (spec.experts,) and int(aux["tokens_per_expert"].max()) <= 6


def test_bf16_forward_on_cpu():
    spec = make_spec(capacity_factor=None, activation="gelu")  # D=8, F=16: grouped_mm runs in bf16
    layer = MoELayer(spec, gate=TopKCapacityGate(spec), dtype=torch.bfloat16)
    ref = MoELayer(spec, gate=TopKCapacityGate(spec), dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x, _ = _inputs(spec)
    y, _ = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y.float(), ref(x.float())[0], rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
def test_param_count_with_test_gate(activation, bias):
    spec = make_spec(activation=activation, bias=bias, shared_experts=2)
    layer = MoELayer(spec, gate=TopKCapacityGate(spec))
    expected = router_params(spec) + (spec.experts + spec.shared_experts) * expert_params(spec)
    assert sum(p.numel() for p in layer.parameters()) == expected


def test_bad_input_messages():
    spec = make_spec()
    layer = MoELayer(spec, gate=TopKCapacityGate(spec), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected x of shape \[B, S, 8\] or \[T, 8\], got \(4, 9\)"):
        layer(torch.zeros(4, 9, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected x of shape"):
        layer(torch.zeros(1, 2, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="token_ids shape"):
        layer(torch.zeros(2, 4, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="experts_impl must be one of"):
        MoELayer(spec, gate=TopKCapacityGate(spec), experts_impl="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        MoELayer(spec, gate=TopKCapacityGate(spec), backend="cuda")
    with pytest.raises(ValueError, match="layout must be one of"):
        MoELayer(spec, gate=TopKCapacityGate(spec), layout="ragged")
    with pytest.raises(ValueError, match="spec must be a ModelSpec"):
        MoELayer({"hidden": 8})


# -------------------------------------------------------------- every gate of reference/moe/router.py
@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("gate", GATE_NAMES)
def test_every_gate_grouped_equals_sequential(gate, cf):
    router = _router_module()
    assert gate in router.GATES, f"gate {gate!r} missing from GATES"
    spec = make_spec(gate, capacity_factor=cf)
    fast, oracle = _layers(spec)
    fast.train(), oracle.train()
    x, tok = _inputs(spec)
    _, aux, grads = _assert_same(fast, oracle, x, tok)
    assert grads["shared_experts.w1_EDF"] is not None and grads["experts.w2_EFD"] is not None
    assert gate == "hash" or grads["gate.router.weight"] is not None
    if cf is None and gate != "expert_choice":
        assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_every_gate_padded_layout_and_dropped_tokens(gate):
    _router_module()
    spec = make_spec(gate, capacity_factor=0.5)
    fast, oracle = _layers(spec, layout="padded")
    x, tok = _inputs(spec)
    _assert_same(fast, oracle, x, tok)
    x_TD, tok_T = x.reshape(-1, spec.hidden), tok.reshape(-1)
    with torch.no_grad():
        fast.eval()
        torch.manual_seed(0)
        y, _ = fast(x_TD, tok_T)
        torch.manual_seed(0)
        routing = fast.gate(x_TD, tok_T)
        routing.check()
        dropped = ~routing.kept_TK.any(1)
        shared = fast.shared_experts(x_TD[None]).sum(0)
        _, tokens_per_expert_E, meta = fast.dispatcher.dispatch(x_TD, routing)
    T, K = routing.expert_ids_TK.shape
    assert int(tokens_per_expert_E.sum()) == T * K - routing.dropped
    assert torch.equal(tokens_per_expert_E, routing.counts_E)
    if routing.capacity is not None:  # no token beyond capacity
        assert int(tokens_per_expert_E.max()) <= routing.capacity == meta.capacity
    assert torch.equal(y[dropped], shared[dropped])


@pytest.mark.parametrize("gate", GATE_NAMES)
@pytest.mark.parametrize("activation,bias", [("gelu", False), ("gelu", True), ("swiglu", False), ("swiglu", True)])
def test_every_gate_param_count_matches_sizing(gate, activation, bias):
    _router_module()
    spec = make_spec(gate, activation=activation, bias=bias, shared_experts=2)
    layer = MoELayer(spec)
    expected = router_params(spec) + (spec.experts + spec.shared_experts) * expert_params(spec)
    assert sum(p.numel() for p in layer.parameters()) == expected


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_every_gate_bf16_forward(gate):
    _router_module()
    spec = make_spec(gate, capacity_factor=1.0, activation="gelu")
    layer = MoELayer(spec, dtype=torch.bfloat16)
    x, tok = _inputs(spec)
    y, aux = layer(x.bfloat16(), tok)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and bool(torch.isfinite(y).all())
