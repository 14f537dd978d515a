"""Distributed training: 10 steps of `tiny` (fp64) give the same losses at EP = 1, 2, 4 with flat / hetu /
rail and with fused buckets; per-rank traces are written. Runs inside the shared gloo pools."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from semoe.plan_spec import ParallelPlan
from semoe.trace import read_csv

pytestmark = pytest.mark.distributed


def _spec(**over):
    from semoe.presets import model_preset

    return model_preset("tiny").replace(dtype="fp64", **over)


def _train_worker(out: str, ep: int, a2a: str, bucket_bytes: int, steps: int = 10, trace: bool = False,
                  zero_stage: int = 0, **spec_over):
    import torch.distributed as dist

    from reference.train import TrainConfig, train

    spec = _spec(**spec_over)
    plan = ParallelPlan(data_parallel=dist.get_world_size(), expert_parallel=ep, alltoall=a2a, gpus_per_node=2,
                        fusion_bucket_bytes=bucket_bytes, zero_stage=zero_stage)
    cfg = TrainConfig(steps=steps, batch_size=4, seq_len=16, progress=False, out=Path(out), plan=plan, trace=trace)
    return train(spec, cfg).losses


def test_ten_steps_tiny_equal_losses_ep_1_2_4(pool4, tmp_path):
    runs = {
        (1, "flat", 0): None,
        (2, "rail", 0): None,
        (4, "flat", 4096): None,
        (4, "hetu", 0): None,
        (4, "rail", 1 << 20): None,
    }
    for i, key in enumerate(runs):
        out = pool4.run(_train_worker, str(tmp_path / str(i)), *key, trace=(i == 4))
        assert all(o == out[0] for o in out)  # every rank reports the global mean
        runs[key] = out[0]
    base = runs[(1, "flat", 0)]
    assert len(base) == 10 and base[-1] < base[0]
    for key, losses in runs.items():
        for a, b in zip(losses, base):
            assert abs(a - b) <= 1e-10 * abs(b), (key, losses, base)
    rows = list(csv.DictReader(open(tmp_path / "0" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(10))
    for r in range(4):
        trace = read_csv(tmp_path / "4" / f"trace_rank{r}.csv")
        phases = {t.phase for t in trace}
        assert {"route", "dispatch", "expert_compute", "combine", "forward", "backward", "optimizer",
                "grad_bucket_dense", "grad_bucket_experts"} <= phases, phases
        assert {t.rank for t in trace} == {r}
        assert (tmp_path / "4" / f"trace_rank{r}.json").is_file()


def _zero3_shapes_worker() -> tuple[int, int]:
    import torch
    import torch.distributed as dist

    from reference.model import MoEDecoder
    from reference.parallel.parallelize import parallelize
    from semoe.presets import model_preset

    spec = model_preset("tiny").replace(dtype="fp64")
    full = MoEDecoder(spec, seed=0).to(torch.float64)
    ref = {n: p.detach().clone() for n, p in full.named_parameters()}
    plan = ParallelPlan(data_parallel=dist.get_world_size(), expert_parallel=2, gpus_per_node=2, zero_stage=3)
    model, sync = parallelize(full, plan)
    gathered = sync.zero3.full_state()
    for n, t in gathered.items():
        assert torch.equal(t, ref[n]), n
    shard = sum(p.numel() for p in sync.zero3.shards())
    dense = sum(t.numel() for t in gathered.values())
    # prefetch: block i+1's gather is issued before block i computes (white-box event order)
    z, events = sync.zero3, []
    start, mat = z._start, z._materialise
    z._start = lambda u: (events.append(("start", u.name)) if all(f.pending is None for f in u.flats) else None, start(u))
    z._materialise = lambda u: (events.append(("use", u.name)), mat(u))
    model(torch.zeros(1, 8, dtype=torch.long))
    assert events == [("use", "root"), ("start", "root"), ("start", "blocks.0"), ("use", "blocks.0"),
                      ("start", "blocks.1"), ("use", "blocks.1")], events
    assert all(getattr(b.attn.qkv, "weight") is None for b in model.blocks)  # released after use
    # reshard after forward: no gathered buffer survives the forward; backward gathers each unit again
    import gc
    import weakref

    import reference.parallel.zero3 as z3

    z._start, z._materialise = start, mat
    refs, regathers = [], []
    wait_apply, regather = z3._GatherWait.apply, z._regather
    z3._GatherWait.apply = lambda full, box: refs.append(weakref.ref(out := wait_apply(full, box))) or out
    z._regather = lambda u, k, wait=True: (regathers.append((u.name, k)), regather(u, k, wait))[1]
    try:
        loss = model(torch.zeros(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)).loss
        gc.collect()
        assert refs and all(r() is None for r in refs), "a gathered buffer outlived the forward"
        loss.backward()
    finally:
        z3._GatherWait.apply = wait_apply
    n_flats = sum(len(u.flats) for u in [*z.units, z.root])
    assert len({r for r in regathers}) == n_flats, regathers
    assert all(f.regathered is None for u in [*z.units, z.root] for f in u.flats)  # dropped after use
    return shard, dense


def test_zero3_sharded_equals_unsharded_for_10_steps(pool4, tmp_path):
    shapes = pool4.run(_zero3_shapes_worker)
    for shard, dense in shapes:
        assert dense / 2 <= shard <= dense / 2 + 16  # half of the dense state per rank (2 per node), padded
    base = pool4.run(_train_worker, str(tmp_path / "base"), 1, "flat", 0)[0]
    for ep in (1, 2):
        z = pool4.run(_train_worker, str(tmp_path / f"z{ep}"), ep, "rail", 0, zero_stage=3, trace=True)
        assert all(o == z[0] for o in z)
        for a, b in zip(z[0], base):
            assert abs(a - b) <= 1e-10 * abs(b), (ep, z[0], base)
    phases = {t.phase: t for t in read_csv(tmp_path / "z2" / "trace_rank3.csv")}
    assert {"gather_fwd", "gather_bwd"} <= set(phases) and phases["gather_fwd"].bytes > 0


def test_dp_x_ep_training_equals_one_process_on_the_global_batch(pool4, tmp_path):
    """Without per-shard auxiliary losses, 4 ranks (EP = 4, rail, ZeRO-3 off) train exactly like one
    process on the whole batch: the losses are the same global means, the gradients the same."""
    from reference.train import TrainConfig, train

    single = train(_spec(aux_loss_coef=0.0), TrainConfig(steps=10, batch_size=4, seq_len=16, progress=False)).losses
    dist_losses = pool4.run(_train_worker, str(tmp_path / "ep4"), 4, "rail", 4096, aux_loss_coef=0.0)[0]
    for a, b in zip(dist_losses, single):
        assert abs(a - b) <= 1e-10 * abs(b), (dist_losses, single)


def _bias_worker():
    import torch
    import torch.distributed as dist

    from reference.model import MoEDecoder
    from reference.parallel.groups import build_groups
    from reference.train import TrainConfig, after_step

    spec = _spec(gate="sigmoid_bias")
    model = MoEDecoder(spec, seed=0).to(torch.float64)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randint(0, 256, (1, 16), generator=g)
    out = model(x, x)
    groups = build_groups(ParallelPlan(data_parallel=dist.get_world_size()))
    after_step(model, out, TrainConfig(), groups.dp)
    return [layer.gate.expert_bias.clone() for layer in model.moe_layers()]


def test_sigmoid_bias_gate_stays_replicated(pool4):
    """The aux-loss-free gate updates its bias from counts summed over DP: every replica agrees."""
    out = pool4.run(_bias_worker)
    for r in range(1, 4):
        for a, b in zip(out[r], out[0]):
            assert torch.equal(a, b)
    assert any(bool(b.abs().sum() > 0) for b in out[0])
