"""Fused gradient buckets: bucketed == unbucketed == the single-process gradient, launched during backward;
MoE-aware clipping equals torch.nn.utils.clip_grad_norm_ on the unsharded model (gloo ranks, fp64)."""

from __future__ import annotations

import pytest
import torch

from reference.comm.buckets import GradBuckets, clip_grad_norm_moe
from reference.parallel.groups import Group
from semoe.model_spec import ModelSpec
from semoe.plan_spec import ParallelPlan

SPEC = ModelSpec(name="bucket-test", layers=2, hidden=16, heads=2, vocab=32, max_seq=16, ffn=16, experts=4,
                 top_k=2, gate="topk", dtype="fp64")


def _batch(r: int):
    g = torch.Generator().manual_seed(7 + r)
    x = torch.randint(0, SPEC.vocab, (2, 8), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _model():
    from reference.model import MoEDecoder

    return MoEDecoder(SPEC, seed=0).to(torch.float64)


def _grads_worker(ep: int, bucket_sizes: list[int], max_norm: float):
    import torch.distributed as dist

    from reference.parallel.parallelize import parallelize

    world, rank = dist.get_world_size(), dist.get_rank()
    ref = _model()
    loss = sum(ref(*_batch(r)).loss for r in range(world)) / world
    loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ref_grads = dict(ref.named_parameters())

    results = {}
    for nbytes in bucket_sizes:
        plan = ParallelPlan(data_parallel=world, expert_parallel=ep, gpus_per_node=2, fusion_bucket_bytes=nbytes)
        model, sync = parallelize(_model(), plan)
        model(*_batch(rank)).loss.backward()
        launched_in_backward = len(sync.dense_buckets._launched) + len(sync.expert_buckets._launched)
        sync.finish()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = sync.clip(max_norm)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-12, atol=0)
        local = sync.groups.local_experts(SPEC.experts)
        for n, p in model.named_parameters():
            exp = ref_grads[n].grad
            if ".ffn.experts." in n:
                exp = exp[local.start : local.stop]
            torch.testing.assert_close(p.grad, exp, rtol=1e-10, atol=1e-14, msg=lambda m: f"{nbytes} B {n}: {m}")
        results[nbytes] = (grads, len(sync.dense_buckets.buckets), launched_in_backward)
    base = results[bucket_sizes[0]][0]
    for nbytes, (grads, _, _) in results.items():
        for n in base:
            torch.testing.assert_close(grads[n], base[n], rtol=1e-13, atol=1e-16, msg=lambda m: f"{nbytes} B {n}: {m}")
    return {k: v[1:] for k, v in results.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("world,ep", [(4, 2), (2, 1)])
def test_bucketed_equals_unbucketed_and_single_process(request, world, ep):
    pool = request.getfixturevalue(f"pool{world}")
    out = pool.run(_grads_worker, ep, [0, 4096, 1 << 30], 0.05)
    n_unfused, launched = out[0][0]
    assert n_unfused > 10 and launched > 0  # one bucket per tensor, most sent during backward
    assert out[0][4096][0] < n_unfused and out[0][1 << 30][0] == 1


def test_bucket_packing_and_single_process_noop():
    ps = [torch.nn.Parameter(torch.ones(n, dtype=torch.float64)) for n in (100, 100, 100, 10)]
    b = GradBuckets(ps, Group("dp", (0,), 0), bucket_bytes=1600)
    # reverse order: [10, 100, 100] reaches >= 1600 B after 3 tensors -> [p3, p2, p1], [p0]
    assert [len(x.params) for x in b.buckets] == [3, 1]
    (sum(p.sum() * (i + 1) for i, p in enumerate(ps))).backward()
    assert len(b._launched) == 2
    b.finish()
    assert [float(p.grad[0]) for p in ps] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="bucket_bytes must be an int >= 0"):
        GradBuckets(ps, Group("dp", (0,), 0), bucket_bytes=-1)
    norm = clip_grad_norm_moe(ps[:2], ps[2:], 1.0, Group("ep", (0,), 0))
    assert abs(float(norm) - (100 * 1 + 100 * 4 + 100 * 9 + 10 * 16) ** 0.5) < 1e-12
