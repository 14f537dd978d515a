"""Fused gating vs the torch reference (kernels.reference.gating_ref)."""

from __future__ import annotations

import pytest
import torch

from kernels import reference as ref
from kernels.gating import gating
from ktest_util import DEVICE, TOL, gpu, needs_kernels, rel_err

pytestmark = needs_kernels

CASES = [  # (T, E, k, score, renormalize): the edge case each covers
    (1, 1, 1, "softmax", True),  # one token, one expert
    (37, 8, 2, "softmax", True),  # odd T, Mixtral-like top-2
    (16, 64, 8, "sigmoid", False),  # E=64, k=8, sigmoid scores, no renormalisation
    (21, 64, 1, "softmax", False),  # top-1 (switch)
    (9, 5, 5, "softmax", True),  # k = E, E not a power of two
    (40, 12, 3, "sigmoid", True),  # k=3, sigmoid renormalised
    (17, 33, 7, "softmax", True),  # k=7, E=33
    (33, 16, 4, "softmax", True),  # k=4, more rows than one block
]


def _loss(out, gw, gp, gs, gz):
    w, _, p, _, ps, z = out
    return (w * gw).sum() + (p * gp).sum() + (ps * gs).sum() + z * gz


@pytest.mark.parametrize("T,E,k,score,renorm", CASES)
def test_gating_matches_reference(T, E, k, score, renorm, poison):
    logits = torch.randn(T, E, device=DEVICE, requires_grad=True)
    out = gating(logits, k, score=score, renormalize=renorm)
    exp = ref.gating_ref(logits, k, score=score, renormalize=renorm)
    w, ids, p, counts, ps, z = out
    assert ids.dtype == torch.int64 and counts.dtype == torch.int64
    assert torch.equal(ids, exp[1]), "top-k ids differ"
    assert torch.equal(counts, exp[3]) and int(counts.sum()) == T * k
    for a, b in ((w, exp[0]), (p, exp[2]), (ps, exp[4]), (z, exp[5])):
        assert rel_err(a, b) < TOL[torch.float32]
    grads = [torch.randn(T, k, device=DEVICE), torch.randn(T, E, device=DEVICE), torch.randn(E, device=DEVICE),
             torch.randn((), device=DEVICE)]
    (g1,) = torch.autograd.grad(_loss(out, *grads), logits)
    (g2,) = torch.autograd.grad(_loss(exp, *grads), logits)
    assert rel_err(g1, g2) < 1e-5


def test_gating_weights_only_grad_and_no_probs():
    logits = torch.randn(19, 8, device=DEVICE, requires_grad=True)
    w, ids, p, counts, ps, z = gating(logits, 2, write_probs=False)
    assert p.shape == (0, 8)
    (g1,) = torch.autograd.grad(w.sum() * 0 + (w * w).sum(), logits)
    we = ref.gating_ref(logits, 2)[0]
    (g2,) = torch.autograd.grad((we * we).sum(), logits)
    assert rel_err(g1, g2) < 1e-5


def test_gating_deterministic_and_reusable():
    logits = torch.randn(70, 16, device=DEVICE)
    a = gating(logits, 4)
    b = gating(logits, 4)  # the ticket counter must have been reset
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_gating_bad_input():
    with pytest.raises(ValueError, match="k must be in 1..E"):
        gating(torch.randn(4, 3, device=DEVICE), 4)
    with pytest.raises(ValueError, match="score must be"):
        gating(torch.randn(4, 3, device=DEVICE), 1, score="relu")


@gpu
@pytest.mark.parametrize("T,E,k", [(16384, 64, 8), (32768, 8, 2), (4097, 128, 6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gating_gpu(T, E, k, dtype):
    logits = (torch.randn(T, E, device="cuda") * 2).to(dtype).requires_grad_(True)
    out = gating(logits, k)
    exp = ref.gating_ref(logits, k)
    w, ids, p, counts, ps, z = out
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=E)), "counts_E != bincount(ids)"
    assert rel_err(p, exp[2]) < 1e-6 and rel_err(ps, exp[4]) < 1e-5 and rel_err(z, exp[5]) < 1e-5
    # bf16 logits tie often (8-bit mantissa); ties go to the lowest index here, anywhere in torch.topk
    same_rows = (torch.sort(ids, 1).values == torch.sort(exp[1], 1).values).all(1)
    assert same_rows.float().mean() > (0.999 if dtype == torch.float32 else 0.95)
    top_w_sorted = torch.sort(w, 1).values[same_rows]
    assert rel_err(top_w_sorted, torch.sort(exp[0], 1).values[same_rows]) < 1e-5
    again = gating(logits, k)  # deterministic, and the ticket counter was reset
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    g = torch.randn(T, k, device="cuda")
    (g1,) = torch.autograd.grad((w * g).sum() + z + (ps * ps).sum(), logits)
    # oracle for the backward: autograd through torch with the kernel's own top-k choice
    lg = logits.detach().float().requires_grad_(True)
    pr = torch.softmax(lg, -1)
    wr = pr.gather(1, ids)
    wr = wr / wr.sum(-1, keepdim=True)
    lse = torch.logsumexp(lg, -1)
    (g2,) = torch.autograd.grad((wr * g).sum() + (lse * lse).sum() + (pr.sum(0) ** 2).sum(), lg)
    assert rel_err(g1, g2) < (1e-4 if dtype == torch.float32 else TOL[dtype])  # fp32 sums over 32K tokens
