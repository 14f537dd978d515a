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
