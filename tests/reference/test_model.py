"""The decoder: exact parameter count against semoe.sizing, shapes, causality, aux losses."""

from __future__ import annotations

import pytest
import torch

from reference.model import MoEDecoder
from semoe import ModelSpec, model_preset
from semoe import sizing as sz

BASE = dict(layers=3, hidden=32, heads=4, vocab=97, max_seq=16, ffn=24, experts=4, top_k=2, dtype="fp32")

SPECS = [
    ModelSpec(**BASE),
    ModelSpec(**{**BASE, "bias": True, "tied_embeddings": False}),
    ModelSpec(**{**BASE, "activation": "swiglu", "norm": "rmsnorm", "position": "rope", "kv_heads": 2}),
    ModelSpec(**{**BASE, "moe_every": 2, "dense_ffn": 40, "shared_experts": 1, "bias": True}),
    ModelSpec(**{**BASE, "gate": "noisy_topk"}),
    ModelSpec(**{**BASE, "gate": "hash", "top_k": 1}),
    ModelSpec(**{**BASE, "moe_every": 0}),
    model_preset("tiny"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.gate}-{s.activation}-{s.norm}-{s.moe_every}-{s.bias}")
def test_parameter_count_equals_sizing_exactly(spec):
    model = MoEDecoder(spec)
    n = sum(p.numel() for p in model.parameters())
    pc = sz.count_params(spec)
    assert n == pc.total
    sparse = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    assert sparse == pc.sparse


def test_forward_shapes_loss_and_causality():
    spec = SPECS[2]
    model = MoEDecoder(spec).double().eval()
    idx = torch.randint(0, spec.vocab, (2, 10))
    out = model(idx, idx)
    assert out.logits_BSV.shape == (2, 10, spec.vocab)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert len(out.aux) == spec.moe_layers
    # changing a future token does not change earlier logits (causal attention, per-token MoE in eval)
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % spec.vocab
    out2 = model(idx2)
    torch.testing.assert_close(out.logits_BSV[:, :7], out2.logits_BSV[:, :7], rtol=0, atol=1e-12)
    assert not torch.allclose(out.logits_BSV[:, 7:], out2.logits_BSV[:, 7:])


def test_aux_loss_is_scaled_sum_of_layer_losses_and_has_gradient():
    spec = ModelSpec(**{**BASE, "aux_loss_coef": 0.1, "z_loss_coef": 0.01})
    model = MoEDecoder(spec).double()
    idx = torch.randint(0, spec.vocab, (2, 8))
    out = model(idx, idx)
    expect = sum(0.1 * a["load_balance"] + 0.01 * a["z_loss"] for a in out.aux)
    torch.testing.assert_close(out.aux_loss, expect)
    out.aux_loss.backward()
    router = model.moe_layers()[0].gate.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_sequence_longer_than_max_seq_is_a_clear_error():
    spec = SPECS[0]
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_seq \(16\)"):
        MoEDecoder(spec)(torch.zeros(1, 17, dtype=torch.long))


def test_seeded_init_is_reproducible():
    a, b = MoEDecoder(SPECS[0], seed=3), MoEDecoder(SPECS[0], seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
