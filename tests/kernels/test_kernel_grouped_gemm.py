"""Grouped GEMM (forward, dgrad with transposed B, gather, fused GELU, wgrad) vs the torch reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ktest_util import DEVICE, TOL, gpu, needs_kernels, rel_err

from kernels import reference as ref
from kernels.grouped_gemm import ACT_GELU, ACT_GELU_GRAD, gmm_fwd, gmm_wgrad, grouped_gemm

pytestmark = needs_kernels

COUNTS = {  # the edge case each covers
    "mixed": [0, 1, 17, 33, 0],  # empty first/last group, a one-row group, groups not multiple of tiles
    "one_group": [45],  # E=1
    "all_empty": [0, 0, 0],  # no rows at all (every row of c is a zero tail row)
    "e64": None,  # E=64, random small groups, many empty
}


def _counts(name):
    if name == "e64":
        c = torch.randint(0, 4, (64,))
        c[torch.rand(64) < 0.5] = 0
        return c.to(DEVICE)
    return torch.tensor(COUNTS[name], device=DEVICE)


@pytest.mark.parametrize("name", list(COUNTS))
@pytest.mark.parametrize("K,N", [(24, 40), (17, 33)])  # odd K and N exercise the masks
def test_gmm_forward_variants(name, K, N, poison):
    counts = _counts(name)
    E = counts.numel()
    n = int(counts.sum())
    M = n + 3  # three tail rows past the groups: must come out zero
    a = torch.randn(M, K, device=DEVICE)
    b = torch.randn(E, K, N, device=DEVICE)
    exp = ref.grouped_gemm_ref(a, b, counts)
    assert rel_err(gmm_fwd(a, b, counts), exp) < TOL[torch.float32]
    assert rel_err(gmm_fwd(a, b.transpose(1, 2).contiguous(), counts, trans_b=True), exp) < TOL[torch.float32]
    gather = torch.randint(0, M, (M,), device=DEVICE)
    assert rel_err(gmm_fwd(a, b, counts, gather=gather), ref.grouped_gemm_ref(a[gather], b, counts)) < TOL[torch.float32]
    z = torch.empty(M, N, device=DEVICE)
    h = gmm_fwd(a, b, counts, act=ACT_GELU, z=z)
    assert rel_err(z, exp) < TOL[torch.float32] and rel_err(h, F.gelu(exp)) < TOL[torch.float32]
    zz = torch.randn(M, N, device=DEVICE)
    dz = gmm_fwd(a, b, counts, act=ACT_GELU_GRAD, z=zz)
    zr = zz.clone().requires_grad_(True)
    (gelu_grad,) = torch.autograd.grad(F.gelu(zr).sum(), zr)
    assert rel_err(dz, exp * gelu_grad) < TOL[torch.float32]


@pytest.mark.parametrize("name", list(COUNTS))
def test_gmm_wgrad(name, poison):
    counts = _counts(name)
    n = int(counts.sum())
    a = torch.randn(n + 2, 19, device=DEVICE)
    g = torch.randn(n + 2, 21, device=DEVICE)
    exp = ref.grouped_gemm_wgrad_ref(a[:n], g[:n], counts)
    assert rel_err(gmm_wgrad(a, g, counts), exp) < TOL[torch.float32] or exp.abs().max() == 0
    if exp.abs().max() == 0:
        assert torch.equal(gmm_wgrad(a, g, counts), exp)  # empty groups write zeros
    gather = torch.randint(0, n + 2, (n + 2,), device=DEVICE)
    exp_g = ref.grouped_gemm_wgrad_ref(a[gather][:n], g[:n], counts)
    out_g = gmm_wgrad(a, g, counts, gather=gather)
    assert torch.allclose(out_g, exp_g, rtol=1e-5, atol=1e-4)


def test_grouped_gemm_autograd(poison):
    counts = torch.tensor([3, 0, 20, 1], device=DEVICE)
    a = torch.randn(26, 16, device=DEVICE, requires_grad=True)  # 2 tail rows: zero output, zero grad
    b = torch.randn(4, 16, 24, device=DEVICE, requires_grad=True)
    c = grouped_gemm(a, b, counts)
    cr = ref.grouped_gemm_ref(a, b, counts)
    assert rel_err(c, cr) < TOL[torch.float32]
    g = torch.randn_like(c)
    for x, y in zip(torch.autograd.grad(c, (a, b), g), torch.autograd.grad(cr, (a, b), g)):
        assert rel_err(x, y) < TOL[torch.float32]


def test_gmm_bad_input():
    with pytest.raises(ValueError, match="inner dims differ"):
        gmm_fwd(torch.randn(4, 8, device=DEVICE), torch.randn(2, 9, 3, device=DEVICE), torch.tensor([2, 2], device=DEVICE))
    with pytest.raises(ValueError, match="counts_E must be"):
        gmm_fwd(torch.randn(4, 8, device=DEVICE), torch.randn(2, 8, 3, device=DEVICE), torch.tensor([4], device=DEVICE))


@gpu
@pytest.mark.parametrize("E,K,N,tokens,dtype", [
    (8, 4096, 14336, 4096, torch.bfloat16), (64, 2048, 1408, 2048, torch.bfloat16),
    (8, 2048, 2048, 4096, torch.float16), (5, 200, 72, 300, torch.bfloat16),  # K % 64 != 0: pointer path
])
@pytest.mark.parametrize("tma", [True, False])
def test_grouped_gemm_gpu(E, K, N, tokens, dtype, tma, monkeypatch):
    import kernels.grouped_gemm as gg

    monkeypatch.setattr(gg, "TMA_ENABLED", tma)
    counts = torch.randint(0, 2 * tokens // E, (E,), device="cuda")
    counts[0] = 0
    counts[1] = 1
    M = int(counts.sum())
    a = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    b = (torch.randn(E, K, N, device="cuda", dtype=dtype) / K**0.5).requires_grad_(True)
    c = grouped_gemm(a, b, counts)
    cr = ref.grouped_gemm_ref(a, b, counts)
    assert rel_err(c, cr) < TOL[dtype]
    g = torch.randn_like(c)
    for x, y in zip(torch.autograd.grad(c, (a, b), g), torch.autograd.grad(cr, (a, b), g)):
        assert rel_err(x, y) < TOL[dtype]
    gather = torch.randint(0, M, (M,), device="cuda")
    z = torch.empty(M, N, device="cuda", dtype=dtype)
    h = gg.gmm_fwd(a.detach(), b.detach(), counts, gather=gather, act=gg.ACT_GELU, z=z)
    zr = ref.grouped_gemm_ref(a.detach()[gather], b.detach(), counts)
    assert rel_err(z, zr) < TOL[dtype] and rel_err(h, torch.nn.functional.gelu(zr.float())) < TOL[dtype]
    wg = gg.gmm_wgrad(a.detach(), g, counts, gather=gather)
    assert rel_err(wg, ref.grouped_gemm_wgrad_ref(a.detach()[gather], g, counts)) < TOL[dtype]
    assert not gg._TMA_BROKEN, "the TMA path failed to compile and fell back"
