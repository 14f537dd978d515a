"""Permutation maps, permute and unpermute vs the torch reference; invariants of the index maps."""

from __future__ import annotations

import pytest
import torch
from ktest_util import DEVICE, TOL, gpu, needs_kernels, rel_err

from kernels import reference as ref
from kernels.permute import build_permutation, permute, unpermute

pytestmark = needs_kernels

CASES = [  # (T, K, E, drop, pattern): the edge case each covers
    (1, 1, 1, False, "random"),  # one token, one expert
    (37, 2, 8, False, "random"),  # odd T
    (29, 3, 64, True, "random"),  # E=64 (most experts empty), capacity drops
    (50, 8, 16, False, "skewed"),  # k=8, skewed: some experts empty, one expert gets one token
    (23, 5, 7, True, "skewed"),  # k=5, E not a power of two, drops
    (40, 1, 4, False, "one_expert"),  # every token to one expert
]


def _ids(T, K, E, pattern):
    if pattern == "one_expert":
        return torch.full((T, K), E - 1, dtype=torch.int64, device=DEVICE)
    ids = torch.stack([torch.randperm(E, device=DEVICE)[:K] if K <= E else torch.randint(0, E, (K,), device=DEVICE)
                       for _ in range(T)])
    if pattern == "skewed":
        ids = torch.where(ids % 4 == 1, torch.zeros_like(ids), ids)  # experts 1, 5, 9, .. empty
        ids[0, 0] = 1  # expert 1 gets exactly one token
    return ids


@pytest.mark.parametrize("T,K,E,drop,pattern", CASES)
def test_permutation_maps(T, K, E, drop, pattern, poison):
    ids = _ids(T, K, E, pattern)
    kept = (torch.rand(T, K, device=DEVICE) > 0.3) if drop else None
    p = build_permutation(ids, E, kept)
    dest, src, counts = ref.permutation_ref(ids, E, kept)
    assert torch.equal(p.dest_TK, dest) and torch.equal(p.src_M, src) and torch.equal(p.counts_E, counts)
    n = int(p.counts_E.sum())
    assert n == (T * K if kept is None else int(kept.sum()))
    d = p.dest_TK.flatten().long()
    live = d >= 0
    assert torch.equal(torch.sort(d[live]).values, torch.arange(n, device=DEVICE))  # a bijection onto 0..n-1
    assert torch.equal(p.src_M[d[live]].long(), torch.arange(T * K, device=DEVICE)[live])  # inverse maps
    if not drop:  # dropless order == stable argsort
        assert torch.equal(p.src_M.long(), torch.argsort(ids.flatten(), stable=True))


@pytest.mark.parametrize("T,K,E,drop,pattern", CASES)
def test_permute_unpermute_fwd_bwd(T, K, E, drop, pattern, poison):
    D = 24
    ids = _ids(T, K, E, pattern)
    kept = (torch.rand(T, K, device=DEVICE) > 0.3) if drop else None
    p = build_permutation(ids, E, kept)
    x = torch.randn(T, D, device=DEVICE, requires_grad=True)
    xm = permute(x, p)
    xr = ref.permute_ref(x, p.src_M, K)
    assert torch.equal(xm, xr)
    gm = torch.randn_like(xm)
    assert rel_err(torch.autograd.grad(xm, x, gm)[0], torch.autograd.grad(xr, x, gm)[0]) < TOL[torch.float32]

    w = torch.rand(T, K, device=DEVICE, requires_grad=True)
    ym = torch.randn(T * K, D, device=DEVICE, requires_grad=True)
    y = unpermute(ym, p, w)
    yr = ref.unpermute_ref(ym, p.dest_TK, w)
    assert rel_err(y, yr) < TOL[torch.float32]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (ym, w), g), torch.autograd.grad(yr, (ym, w), g)):
        assert rel_err(a, b) < TOL[torch.float32]


def test_unpermute_deterministic():
    T, K, E, D = 64, 4, 8, 40
    p = build_permutation(_ids(T, K, E, "random"), E)
    ym = torch.randn(T * K, D, device=DEVICE)
    w = torch.rand(T, K, device=DEVICE)
    assert torch.equal(unpermute(ym, p, w), unpermute(ym, p, w))


def test_permutation_bad_input():
    with pytest.raises(ValueError, match="expert_ids_TK must be integer"):
        build_permutation(torch.zeros(3, 2, device=DEVICE), 4)
    with pytest.raises(ValueError, match="kept_TK must have the shape"):
        build_permutation(torch.zeros(3, 2, dtype=torch.long, device=DEVICE), 4, torch.ones(3, 1, dtype=torch.bool))


@gpu
@pytest.mark.parametrize("T,K,E,D", [(16384, 8, 64, 2048), (16384, 2, 8, 4096), (777, 3, 33, 1000)])
def test_permute_gpu(T, K, E, D):
    ids = torch.randint(0, E, (T, K), device="cuda")
    p = build_permutation(ids, E)
    dest, src, counts = ref.permutation_ref(ids, E)
    assert torch.equal(p.dest_TK, dest) and torch.equal(p.src_M, src) and torch.equal(p.counts_E, counts)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    xm = permute(x, p)
    assert torch.equal(xm, ref.permute_ref(x, p.src_M, K))
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    y = unpermute(xm, p, w)
    yr = ref.unpermute_ref(xm, p.dest_TK, w)
    assert rel_err(y, yr) < TOL[torch.bfloat16]
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x, w), g, retain_graph=True)
    for a, b in zip(ga, torch.autograd.grad(yr, (x, w), g)):
        assert rel_err(a, b) < TOL[torch.bfloat16]
