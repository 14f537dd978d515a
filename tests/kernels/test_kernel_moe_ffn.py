"""The composed MoE FFN (permute maps + grouped MLP + unpermute) vs the expert-loop reference."""

from __future__ import annotations

import pytest
import torch
from ktest_util import DEVICE, TOL, gpu, needs_kernels, rel_err

from kernels import reference as ref
from kernels.moe_ffn import moe_ffn

pytestmark = needs_kernels


def _problem(T, D, Fd, E, K, act, dtype=torch.float32, device=DEVICE):
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)]) if T <= 4096 else \
        torch.randint(0, E, (T, K), device=device)
    w = torch.rand(T, K, device=device, requires_grad=True)
    w1 = (torch.randn(E, D, Fd, device=device, dtype=dtype) / D**0.5).requires_grad_(True)
    w2 = (torch.randn(E, Fd, D, device=device, dtype=dtype) / Fd**0.5).requires_grad_(True)
    w3 = (torch.randn(E, D, Fd, device=device, dtype=dtype) / D**0.5).requires_grad_(True) if act == "swiglu" else None
    return x, ids, w, w1, w2, w3


@pytest.mark.parametrize("T,D,Fd,E,K,act,drop", [
    (19, 16, 24, 4, 2, "gelu", False),  # odd T, dropless
    (13, 32, 16, 8, 3, "swiglu", True),  # swiglu with capacity drops
    (9, 16, 16, 64, 8, "gelu", False),  # E=64, k=8: most experts empty, many one-token experts
    (1, 16, 32, 2, 1, "gelu", False),  # a single token
])
def test_moe_ffn_matches_reference(T, D, Fd, E, K, act, drop, poison):
    x, ids, w, w1, w2, w3 = _problem(T, D, Fd, E, K, act)
    kept = (torch.rand(T, K, device=DEVICE) > 0.3) if drop else None
    y = moe_ffn(x, ids, w, w1, w2, w3, activation=act, kept_TK=kept)
    yr = ref.moe_ffn_ref(x, ids, w * kept if kept is not None else w, w1, w2, w3, act)
    assert rel_err(y, yr) < TOL[torch.float32]
    g = torch.randn_like(y)
    params = [p for p in (x, w, w1, w2, w3) if p is not None]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(yr, params, g)):
        assert rel_err(a, b) < 1e-5 or b.abs().max() == 0



@pytest.mark.parametrize("materialize", [True, False])
def test_expert_mlp_materialize_or_gather(materialize, poison):
    from kernels.moe_ffn import expert_mlp
    from kernels.permute import build_permutation

    T, D, Fd, E, K = 21, 16, 32, 4, 2
    x, ids, w, w1, w2, _ = _problem(T, D, Fd, E, K, "gelu")
    p = build_permutation(ids, E)
    y = expert_mlp(x, p, w1, w2, materialize=materialize)
    xm = ref.permute_ref(x, p.src_M, K)
    yr = ref.grouped_gemm_ref(torch.nn.functional.gelu(ref.grouped_gemm_ref(xm, w1, p.counts_E)), w2, p.counts_E)
    assert rel_err(y, yr) < TOL[torch.float32]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w1, w2), g), torch.autograd.grad(yr, (x, w1, w2), g)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_grouped_mlp_presorted(act, poison):
    from kernels.moe_ffn import grouped_mlp

    D, Fd = 16, 24
    counts = torch.tensor([5, 0, 1, 9], device=DEVICE)
    x = torch.randn(17, D, device=DEVICE, requires_grad=True)  # 2 rows past the groups
    w1 = (torch.randn(4, D, Fd, device=DEVICE) / 4).requires_grad_(True)
    w2 = (torch.randn(4, Fd, D, device=DEVICE) / 5).requires_grad_(True)
    w3 = (torch.randn(4, D, Fd, device=DEVICE) / 4).requires_grad_(True) if act == "swiglu" else None
    y = grouped_mlp(x, counts, w1, w2, w3, act)
    z = ref.grouped_gemm_ref(x, w1, counts)
    z3 = ref.grouped_gemm_ref(x, w3, counts) if w3 is not None else None
    yr = ref.grouped_gemm_ref(ref.activation_ref(z, act, z3), w2, counts)
    assert rel_err(y, yr) < TOL[torch.float32]
    params = [p for p in (x, w1, w2, w3) if p is not None]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(yr, params, g)):
        assert rel_err(a, b) < 1e-5


def test_moe_ffn_bad_input():
    x, ids, w, w1, w2, _ = _problem(4, 16, 8, 2, 1, "gelu")
    with pytest.raises(ValueError, match="w3_EDF is needed for swiglu"):
        moe_ffn(x, ids, w, w1, w2, activation="swiglu")
    with pytest.raises(ValueError, match="w2_EFD must be"):
        moe_ffn(x, ids, w, w1, w1)


@gpu
@pytest.mark.parametrize("T,D,Fd,E,K,act,gemm", [
    (4096, 1024, 2048, 8, 2, "gelu", "triton"),
    (2048, 512, 352, 64, 8, "swiglu", "triton"),
    (1000, 256, 512, 16, 1, "gelu", "triton"),
    (4096, 1024, 2048, 8, 2, "gelu", "torch"),
])
def test_moe_ffn_gpu_bf16(T, D, Fd, E, K, act, gemm):
    x, ids, w, w1, w2, w3 = _problem(T, D, Fd, E, K, act, dtype=torch.bfloat16, device="cuda")
    y = moe_ffn(x, ids, w, w1, w2, w3, activation=act, gemm=gemm)
    # oracle: the same math in fp32
    params = [p for p in (x, w, w1, w2, w3) if p is not None]
    p32 = [p.detach().float().requires_grad_(True) for p in params]
    args = dict(zip(["x", "w", "w1", "w2", "w3"], p32))
    yr = ref.moe_ffn_ref(args["x"], ids, args["w"], args["w1"], args["w2"], args.get("w3"), act)
    assert rel_err(y, yr) < TOL[torch.bfloat16]
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, params, g)
    gb = torch.autograd.grad(yr, p32, g.float())
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < 2 * TOL[torch.bfloat16]
    # deterministic: no float atomics anywhere in forward or backward
    if gemm == "triton":
        y2 = moe_ffn(x, ids, w, w1, w2, w3, activation=act)
        assert torch.equal(y, y2)
        assert all(torch.equal(a, b) for a, b in zip(ga, torch.autograd.grad(y2, params, g)))
