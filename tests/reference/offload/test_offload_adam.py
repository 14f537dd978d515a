"""The CPU AdamW reproduces torch.optim.AdamW (exact: bit-equal on slices; fused: within 1e-6)."""

from __future__ import annotations

import pytest
import torch

from reference.offload.cpu_adam import adamw_


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_exact_on_expert_slices_is_bit_equal_to_torch_adamw(wd):
    g = torch.Generator().manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(4, 6, 10, generator=g))
    opt = torch.optim.AdamW([stacked], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    master = stacked.detach().clone()
    m, v = torch.zeros_like(master), torch.zeros_like(master)
    for step in range(1, 6):
        grad = torch.randn(stacked.shape, generator=g)
        stacked.grad = grad.clone()
        lr = 1e-2 * step / 5
        opt.param_groups[0]["lr"] = lr
        opt.step()
        views = [(master[e].view(-1), grad[e].view(-1), m[e].view(-1), v[e].view(-1)) for e in range(4)]
        adamw_(*map(list, zip(*views)), step=step, lr=lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd)
        assert torch.equal(master, stacked.detach()), step


def test_fused_close_to_exact_and_bf16_grads_upcast():
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(3, 100, generator=g)
    grads = [torch.randn(3, 100, generator=g) for _ in range(5)]
    out = {}
    for impl in ("exact", "fused"):
        p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        for step, gr in enumerate(grads, 1):
            adamw_([p], [gr.to(torch.bfloat16)], [m], [v], step=step, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                   weight_decay=0.01, impl=impl)
        out[impl] = p
    assert torch.allclose(out["exact"], out["fused"], atol=1e-6, rtol=0)
    assert not torch.equal(out["exact"], p0)


def test_bad_arguments():
    t = [torch.zeros(2)]
    with pytest.raises(ValueError, match="impl"):
        adamw_(t, t, t, t, step=1, lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0.0, impl="foo")
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw_(t, t, t, t, step=0, lr=1.0, beta1=0.9, beta2=0.9, eps=1e-8, weight_decay=0.0)


@pytest.mark.parametrize("impl,spec_over,compute", [("exact", {}, None), ("fused", {}, torch.bfloat16),
                                                    ("exact", {"activation": "swiglu", "bias": True}, None)])
def test_layer_update_is_the_engines_per_layer_task_bit_for_bit(impl, spec_over, compute):
    """`adamw_layer_` (what the bench times as the engine's AdamW) does what ``ExpertOffload._adam`` does: the same
    states, mirror and upcast gradients, bit for bit; `expert_layout` and `bench.expert_shapes` lay the expert
    out as the engine does."""
    from reference.model import MoEDecoder
    from reference.offload import ExpertOffload
    from reference.offload.bench import expert_shapes
    from reference.offload.cpu_adam import adamw_layer_, expert_layout
    from semoe.plan_spec import OffloadPlacement, ParallelPlan
    from semoe.presets import load_model

    spec = load_model("tiny").replace(**spec_over)
    plan = ParallelPlan(offload=OffloadPlacement(expert_params="cpu", expert_optimizer="cpu"), prefetch_depth=1)
    eng = ExpertOffload(MoEDecoder(spec, seed=0), plan, compute_dtype=compute, adam_impl=impl)
    L = eng.layers[0]
    assert expert_shapes(spec) == L.shapes  # names, order and per-expert shapes
    offsets, decay, P = expert_layout(L.shapes)
    assert (offsets, decay, P) == (L.offsets, L.decay, L.P)
    g = torch.Generator().manual_seed(3)
    for n in L.names:
        L.grads[n].copy_(torch.randn(L.grads[n].shape, generator=g))
    L.state[:, 1:].copy_(torch.rand(L.state[:, 1:].shape, generator=g))
    init, state, mirror = L.state.clone(), L.state.clone(), {n: t.clone() for n, t in L.mirror.items()}
    for step in (1, 2):
        eng._adam(L, [(e, L.state[e]) for e in range(eng.E)], 1e-2, step)
        adamw_layer_([(e, state[e]) for e in range(eng.E)], L.grads, mirror, offsets, decay, step=step, lr=1e-2,
                     beta1=eng.beta1, beta2=eng.beta2, eps=eng.eps, weight_decay=eng.weight_decay, impl=impl)
    assert torch.equal(state, L.state) and not torch.equal(state[:, 0], init[:, 0])
    for n in L.names:
        assert torch.equal(mirror[n], L.mirror[n]), n
        assert torch.equal(mirror[n].float(), state[:, 0, offsets[n][0] : sum(offsets[n])].reshape(
            mirror[n].shape).to(mirror[n].dtype).float())  # the mirror holds the updated master weights
