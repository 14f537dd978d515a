"""Expert parallelism for the MoE layer: EP = 1, 2, 4 (and DP x EP = 2 x 2) with flat / hetu / rail give
the single-process outputs and gradients in fp64 (gloo ranks; every rank also computes the oracle)."""

from __future__ import annotations

import pytest
import torch

from semoe.model_spec import ModelSpec
from semoe.plan_spec import ParallelPlan

pytestmark = pytest.mark.distributed

SPEC = ModelSpec(name="ep-test", layers=2, hidden=8, heads=2, vocab=32, ffn=12, experts=4, top_k=2,
                 gate="topk", dtype="fp64", bias=True, activation="swiglu")


def _shard(r: int, T: int = 7):
    g = torch.Generator().manual_seed(100 + r)
    x = torch.randn(T, SPEC.hidden, generator=g, dtype=torch.float64)
    w = torch.randn(T, SPEC.hidden, generator=g, dtype=torch.float64)
    if r == 1:
        x[:3] *= 4.0  # skewed routing on one rank
    return x, w


def _loss(layer, x, w):
    y, aux = layer(x)
    return (y * w).sum() + 0.01 * aux["load_balance"], y


def _layer(spec: ModelSpec = SPEC):
    from reference.moe.layer import MoELayer

    return MoELayer(spec, seed=3, dtype=torch.float64)


def _ep_layer_worker(ep: int, gpus_per_node: int, algorithm: str) -> str:
    import torch.distributed as dist

    from reference.parallel.ep_dispatcher import parallelize_moe, split_parameters
    from reference.parallel.groups import build_groups

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    # oracle: one process, all shards, mean of the per-shard losses
    ref = _layer()
    ys = []
    total = 0.0
    xs = []
    for r in range(world):
        x, w = _shard(r)
        x.requires_grad_(True)
        loss, y = _loss(ref, x, w)
        total = total + loss / world
        ys.append(y.detach())
        xs.append(x)
    total.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    plan = ParallelPlan(data_parallel=world, expert_parallel=ep, gpus_per_node=gpus_per_node, alltoall=algorithm)
    groups = build_groups(plan)
    torch.manual_seed(0)
    layer = parallelize_moe(_layer(), groups)
    x, w = _shard(rank)
    x.requires_grad_(True)
    loss, y = _loss(layer, x, w)
    (loss / world).backward()
    dense, experts = split_parameters(layer)
    for p in dense:
        dist.all_reduce(p.grad, group=groups.dp.pg)
    for p in experts:
        if groups.edp.size > 1:
            dist.all_reduce(p.grad, group=groups.edp.pg)
    torch.testing.assert_close(y, ys[rank], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(x.grad, xs[rank].grad, rtol=1e-12, atol=1e-13)
    local = groups.local_experts(SPEC.experts)
    for n, p in layer.named_parameters():
        expected = ref_grads[n]
        if n.startswith("experts."):
            expected = expected[local.start : local.stop]
        torch.testing.assert_close(p.grad, expected, rtol=1e-11, atol=1e-13, msg=lambda m: f"{n}: {m}")
    return repr(layer.dispatcher)


@pytest.mark.parametrize(
    "ep,gpus_per_node,algorithm",
    [(1, 4, "flat"), (2, 2, "flat"), (2, 2, "rail"), (4, 2, "flat"), (4, 2, "hetu"), (4, 2, "rail"), (4, 4, "flat")],
)
def test_ep_layer_equals_single_process_4_ranks(pool4, ep, gpus_per_node, algorithm):
    out = pool4.run(_ep_layer_worker, ep, gpus_per_node, algorithm)
    if ep > 1:
        assert f"local={4 // ep}" in out[0] and algorithm in out[0]


@pytest.mark.parametrize("ep,algorithm", [(1, "flat"), (2, "flat"), (2, "hetu")])
def test_ep_layer_equals_single_process_2_ranks(pool2, ep, algorithm):
    pool2.run(_ep_layer_worker, ep, 2, algorithm)


def test_ep_dispatcher_rejects_bad_sizes():
    from reference.comm.alltoall import AllToAll
    from reference.parallel.ep_dispatcher import EPDispatcher
    from reference.parallel.groups import Group

    with pytest.raises(ValueError, match=r"num_experts \(3\) must be divisible by expert_parallel \(2\)"):
        EPDispatcher(3, AllToAll("flat", Group("ep", (0, 1), 0)))
