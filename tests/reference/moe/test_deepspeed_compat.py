"""Our ``topk`` gate reproduces DeepSpeed-MoE gating (``deepspeed.moe.sharded_moe``) exactly.

Compared on the same logits: kept tokens, capacity slots and combine weights (the dense ``[T, E, C]``
combine tensor rebuilt from our Routing by ``routing_to_combine_tensor``), ``l_aux`` and the pre-drop
expert counts. Noise and random token selection are off on both sides (``use_rts=False``,
``top2_2nd_expert_sampling=False``).

Why k = 1 needs ``drop_policy="deepspeed"``: ``top1gating`` picks each expert's kept tokens with
``torch.topk`` over a 0/1 mask, whose tie order is implementation-defined (on CPU it does not keep the
first tokens), so the GShard ``"position"`` policy agrees with it only when no expert overflows.
For k = 2, ``top2gating`` *is* the position policy; for k > 2 ``topkgating``'s default is ``"probs"``.
"""

from __future__ import annotations


import pytest
import torch
from deepspeed.moe.sharded_moe import TopKGate as DeepSpeedTopKGate
from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

from reference.moe.router import TopKGate, routing_to_combine_tensor
from semoe.model_spec import ModelSpec

# (T, E): T in 8..256, E in 2..16, odd T, E > T/2, few and many tokens per expert
SHAPES = [(8, 2), (8, 8), (12, 16), (17, 4), (17, 16), (64, 2), (64, 8), (100, 3), (256, 4), (256, 16)]
FACTORS = [0.5, 1.0, 1.25, 2.0]


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny tensors: one intra-op thread avoids spin-waiting on a shared 2-core machine (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def our_gate(E: int, k: int, cf: float, min_cap: int, policy: str, hidden: int = 8) -> TopKGate:
    spec = ModelSpec(
        layers=1, hidden=hidden, heads=1, vocab=16, ffn=4, experts=E, top_k=k, gate="topk",
        capacity_factor=cf, min_capacity=min_cap, renormalize=k > 1,
    )
    return TopKGate(spec, drop_policy=policy)


def deepspeed_gating(logits, k, cf, min_cap):
    if k == 1:
        return top1gating(logits.clone(), cf, min_cap, use_rts=False)
    if k == 2:
        return top2gating(logits.clone(), cf, min_cap, top2_2nd_expert_sampling=False)
    return topkgating(logits.clone(), k, cf, min_cap)  # default drop_policy="probs"


def assert_same_as_deepspeed(routing, logits, k, cf, min_cap):
    l_aux, combine, dispatch, exp_counts = deepspeed_gating(logits, k, cf, min_cap)
    ours = routing_to_combine_tensor(routing)
    assert ours.shape == combine.shape, "capacity differs"
    assert torch.equal(ours != 0, dispatch), "kept tokens or slots differ"
    torch.testing.assert_close(ours, combine, rtol=0, atol=1e-6)
    torch.testing.assert_close(routing.aux_losses["load_balance"], l_aux, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.bincount(routing.expert_ids_TK.flatten(), minlength=logits.shape[1]), exp_counts)


@pytest.mark.parametrize("k,policy", [(1, "deepspeed"), (2, "position"), (2, "deepspeed")])
@pytest.mark.parametrize("cf", FACTORS)
@pytest.mark.parametrize("min_cap", [1, 4])
def test_top1_top2_equal_deepspeed(k, policy, cf, min_cap):
    dropped = 0
    for T, E in SHAPES:
        torch.manual_seed(1000 * T + E)
        gate = our_gate(E, k, cf, min_cap, policy)
        x = torch.randn(T, 8)
        r = gate(x)
        r.check()
        dropped += r.dropped
        assert_same_as_deepspeed(r, gate.logits(x).detach(), k, cf, min_cap)
    if cf <= 1.0:
        assert dropped > 0, "the grid must include overflowing experts"


@pytest.mark.parametrize("k", [3, 4])
@pytest.mark.parametrize("cf", FACTORS)
def test_topk_k_above_2_equals_deepspeed_topkgating(k, cf):
    for T, E in SHAPES:
        if E < k:
            continue
        torch.manual_seed(T + E + k)
        gate = our_gate(E, k, cf, 1, "deepspeed")
        x = torch.randn(T, 8)
        r = gate(x)
        r.check()
        assert_same_as_deepspeed(r, gate.logits(x).detach(), k, cf, 1)


def test_position_policy_equals_top1gating_without_overflow():
    # min_capacity = T: no expert can overflow, the tie order of torch.topk does not matter
    for T, E in SHAPES:
        torch.manual_seed(T * E)
        gate = our_gate(E, 1, 1.0, T, "position")
        x = torch.randn(T, 8)
        r = gate(x)
        assert r.dropped == 0
        assert_same_as_deepspeed(r, gate.logits(x).detach(), 1, 1.0, T)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_gate_module_equals_deepspeed_topkgate(k, dtype):
    # DeepSpeed's TopKGate computes fp32 logits from the (possibly bf16) input and weight, as ours does
    T, E, D, cf, min_cap = 64, 8, 16, 1.0, 2
    torch.manual_seed(k)
    ours = our_gate(E, k, cf, min_cap, "deepspeed", hidden=D).to(dtype).train()
    theirs = DeepSpeedTopKGate(
        D, E, k=k, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=min_cap,
        noisy_gate_policy=None, use_rts=False, top2_2nd_expert_sampling=False,
    ).to(dtype).train()
    with torch.no_grad():
        theirs.wg.weight.copy_(ours.router.weight)
    x = torch.randn(T, D).to(dtype)
    r = ours(x)
    l_aux, combine, dispatch, _ = theirs(x)
    torch.testing.assert_close(routing_to_combine_tensor(r), combine, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.aux_losses["load_balance"], l_aux, rtol=1e-6, atol=1e-7)
    # gradients of l_aux into the router agree too
    (g_ours,) = torch.autograd.grad(r.aux_losses["load_balance"], ours.router.weight)
    (g_theirs,) = torch.autograd.grad(l_aux, theirs.wg.weight)
    torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=1e-2, atol=1e-6)
