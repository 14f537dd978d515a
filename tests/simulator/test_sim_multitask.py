"""Multi-task MoE workload with elastic allocations (simulator/workload/multitask.py): a hand-computed
3-task / 3-device step (compute, all-reduce groups and bytes, step time, memory), micro-batching, the
naive equal allocation, the planner never slower than naive, and the UFO setup."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semoe.elastic import Placement, Plan, TaskSet, TaskSpec, plan_upscale
from simulator.engine import Sim
from simulator.hardware import PROTOCOLS
from simulator.workload.multitask import (
    MultiTaskIteration, MultiTaskModel, micro_batches, plan_equal, simulate_multitask, trim, ufo_model, ufo_plans,
)

from sim_helpers import NVL, make_cluster

FLOPS = 1e9  # the fake GPU: 1 GFLOP/s for every GEMM, free memory-bound kernels


class LinearCost:
    """Every GEMM at a flat FLOP rate: times become FLOPs / 1e9, so expected times are hand arithmetic."""

    backward_gemm_factor = 1.0  # backward = 2 x forward
    overlap_slowdown = 1.0

    def matmul(self, m, n, k, dtype="bf16", groups=1, op=None):
        return 2.0 * m * n * k * groups / FLOPS

    def attention_core(self, tokens, seq, hidden, dtype="bf16"):
        return 4.0 * seq * hidden * tokens / FLOPS

    def memory(self, nbytes):
        return 0.0


# hidden 64, 2 layers, FFN 256, 8x8 images in 4x4 patches: N = 4 patches, T = 5 tokens, 10 classes
TINY = MultiTaskModel(hidden=64, layers=2, heads=4, ffn=256, image=8, patch=4, classes=10, tasks=("a", "b", "c"))
# forward FLOPs per sample: embed 2*4*48*64 = 24576; per layer attention proj 2*5*4*64^2 = 163840,
# scores 4*5^2*64 = 6400, two FFNs 2 * 2*5*2*64*256 = 655360 -> 825600 x 2 layers; head 2*64*10 = 1280
FWD_PER_SAMPLE = 24576 + 2 * (163840 + 6400 + 655360) + 1280  # 1677056
TRAIN_PER_SAMPLE = 3 * FWD_PER_SAMPLE  # backward = 2 x forward
# shared: patch conv 48*64 + bias 64 + cls 64 + pos 5*64 + final LN 128, per layer attention 4*64^2 + 4*64,
# 2 LNs 256, shared FFN 2*64*256 + 256 + 64
SHARED = 3072 + 64 + 64 + 320 + 128 + 2 * (16384 + 256 + 256 + 32768 + 320)  # 103616
TASK = 2 * (32768 + 256 + 64) + 640 + 10  # experts of 2 layers + head: 66826
# activations per block per sample: 15 T h + 2 FFNs x T (3h + 4f) = 4800 + 12160
ACT_PER_SAMPLE_BLOCK = 15 * 5 * 64 + 2 * 5 * (3 * 64 + 4 * 256)


def ring_allreduce_s(n: int, nbytes: float) -> float:
    """NCCL-tuned ring all-reduce inside one node of the test cluster (1 us per hop, 380 GB/s)."""
    return min(p.base_latency_s + 2 * (n - 1) * (1e-6 * p.hop_latency_scale + nbytes / n / NVL / p.efficiency)
               for p in PROTOCOLS)


def run(plan: Plan, model=TINY, cap=None, gpn=4):
    sim = Sim(make_cluster(gpn=gpn), profile=None, trace=True)
    sim.cost = LinearCost()
    it = MultiTaskIteration(model, plan, sim, micro_batch_cap=cap)
    return sim, it, it.run()


def test_model_counts_match_hand_arithmetic():
    assert TINY.tokens == 5 and TINY.patches == 4
    assert TINY.forward_flops_per_sample() == FWD_PER_SAMPLE
    assert TINY.shared_params() == SHARED
    assert TINY.task_params() == TASK
    assert TINY.total_params() == SHARED + 3 * TASK
    assert TINY.act_bytes_per_block(1) == ACT_PER_SAMPLE_BLOCK == 16960


def test_three_tasks_three_devices_hand_computed():
    # a (6 samples) split over devices 0, 1; b (2) and c (2) packed on device 2
    plan = Plan(devices=3, placements=(Placement(0, "a", 3, 3.0), Placement(1, "a", 3, 3.0),
                                       Placement(2, "b", 2, 2.0), Placement(2, "c", 2, 2.0)))
    sim, it, s = run(plan)
    per_sample = TRAIN_PER_SAMPLE / FLOPS
    assert it.compute_s == pytest.approx([3 * per_sample, 3 * per_sample, 4 * per_sample], rel=1e-12)
    assert s["imbalance"] == pytest.approx(4 / (10 / 3), rel=1e-12)
    # all-reduce groups: shared over every device, a's experts + head over a's devices, none for b, c
    got = [(c.phase, c.group, c.nbytes) for c in it.collectives]
    assert got == [("shared_grad_allreduce", (0, 1, 2), 2.0 * SHARED), ("task_grad_allreduce", (0, 1), 2.0 * TASK)]
    # step: device 2 is the slowest (4 samples); everyone then reduces the shared grads; devices 0, 1
    # reduce a's grads after it (the optimizer costs 0 with free memory traffic)
    t_shared = ring_allreduce_s(3, 2.0 * SHARED)
    t_task = ring_allreduce_s(2, 2.0 * TASK)
    assert it.end[2] == pytest.approx(4 * per_sample + t_shared, rel=1e-9)
    assert s["step_time_s"] == pytest.approx(4 * per_sample + t_shared + t_task, rel=1e-9)
    assert s["samples_per_s"] == pytest.approx(10 / s["step_time_s"], rel=1e-12)
    # memory: 16 B per held param + activations of all 2 blocks of the device's samples at the peak
    peak = sim.memory.peak[:3, 0]
    assert peak[0] == pytest.approx(16 * (SHARED + TASK) + 2 * 3 * ACT_PER_SAMPLE_BLOCK)
    assert peak[2] == pytest.approx(16 * (SHARED + 2 * TASK) + 2 * 4 * ACT_PER_SAMPLE_BLOCK)
    assert s["peak_hbm_bytes"] == pytest.approx(peak[2])
    assert s["mean_hbm_bytes"] == pytest.approx(peak.mean())
    assert sim.memory.current[:3, 0] == pytest.approx([16 * (SHARED + TASK)] * 2 + [16 * (SHARED + 2 * TASK)])


def test_micro_batch_cap_splits_samples_and_bounds_activations():
    assert micro_batches({"b": 3, "a": 4}, None) == [{"a": 4, "b": 3}]
    assert micro_batches({"b": 3, "a": 4}, 3) == [{"a": 3}, {"a": 1, "b": 2}, {"b": 1}]
    assert micro_batches({}, 2) == []
    plan = Plan(devices=2, placements=(Placement(0, "a", 4, 4.0), Placement(1, "b", 4, 4.0)))
    sim, it, s = run(plan, cap=2)
    per_sample = TRAIN_PER_SAMPLE / FLOPS
    assert it.compute_s == pytest.approx([4 * per_sample] * 2, rel=1e-12)  # linear cost: same compute
    assert s["peak_hbm_bytes"] == pytest.approx(16 * (SHARED + TASK) + 2 * 2 * ACT_PER_SAMPLE_BLOCK)
    assert [c.phase for c in it.collectives] == ["shared_grad_allreduce"]  # a, b alone: no task all-reduce


def test_plan_equal_gives_every_task_the_same_devices():
    ts = TaskSet(tasks=(TaskSpec(name="a", batch_size=8), TaskSpec(name="b", batch_size=3),
                        TaskSpec(name="c", batch_size=1)))
    p = plan_equal(ts, 6)
    assert [p.devices_of(t) for t in "abc"] == [[0, 1], [2, 3], [4]]  # c's 1 sample leaves device 5 idle
    assert [p.samples_of(t) for t in "abc"] == [8, 3, 1]
    assert p.device_loads == [4, 4, 2, 1, 1, 0]
    p7 = plan_equal(ts, 7)  # the remainder goes to the first task
    assert p7.devices_of("a") == [0, 1, 2] and p7.devices_of("b") == [3, 4] and p7.device_loads[:3] == [3, 3, 2]


@settings(max_examples=25, deadline=None)
@given(batches=st.lists(st.integers(1, 40), min_size=2, max_size=3), per_task=st.integers(1, 2))
def test_planner_never_slower_than_naive(batches, per_task):
    names = ("a", "b", "c")[: len(batches)]
    ts = TaskSet(tasks=tuple(TaskSpec(name=n, batch_size=b) for n, b in zip(names, batches)))
    devices = per_task * len(batches)  # 2..6 devices (4 per node)
    model = TINY.replace(tasks=names)
    _, _, naive = run(plan_equal(ts, devices), model, gpn=8)
    _, it, planned = run(trim(plan_upscale(ts, devices)), model, gpn=8)
    assert planned["devices"] <= devices
    assert planned["max_compute_s"] <= naive["max_compute_s"] * (1 + 1e-9)
    # where the compute ties, the two may differ by their all-reduces (tens of us against >= 5 ms per
    # sample): never slower beyond that
    assert planned["step_time_s"] <= naive["step_time_s"] * 1.01


def test_ufo_planned_balances_and_beats_naive():
    model = ufo_model()
    assert 11e9 < model.total_params() < 13e9  # "12B UFO"
    from semoe.presets import cluster_preset
    from simulator.cost import CostModel

    cluster = cluster_preset("dgx-a100-80g", 6)
    plans = ufo_plans(model, CostModel(cluster.gpu, None))
    assert sum(p.samples for p in plans["planned"].placements) == 48 * 144
    # the planner recovers the paper's allocation: 8, 4, 4, 4, 8, 2, 1 and 17 x 1 GPUs, 144 samples each
    assert [len(plans["planned"].devices_of(t)) for t in model.tasks] == [8, 4, 4, 4, 8, 2, 1] + [1] * 17
    assert [len(plans["naive"].devices_of(t)) for t in model.tasks] == [2] * 24
    _, naive = simulate_multitask(model, trim(plans["naive"]), cluster)
    _, planned = simulate_multitask(model, trim(plans["planned"]), cluster)
    assert planned["imbalance"] == pytest.approx(1.0, abs=1e-9)
    assert naive["imbalance"] == pytest.approx(4.0, rel=0.01)  # 576 / 144 samples
    assert planned["samples_per_s"] > 3 * naive["samples_per_s"]
    assert planned["oom"] == "" and "HBM" in naive["oom"]  # 576 samples' activations exceed 80 GB
    _, naive_acc = simulate_multitask(model, trim(plans["naive"]), cluster, micro_batch_cap=144)
    assert naive_acc["oom"] == "" and naive_acc["peak_hbm_bytes"] == pytest.approx(planned["peak_hbm_bytes"])


def test_task_params_match_the_reference_layout():
    torch = pytest.importorskip("torch")  # noqa: F841
    from reference.multitask import MultiTaskMoE

    ref = MultiTaskMoE({"a": 10, "b": 10}, d_in=8, d_model=64, ffn=256, layers=2)
    per_task = sum(p.numel() for p in ref.task_parameters("a"))
    assert per_task == TINY.task_params()  # experts (w1, w2 with biases) of every layer + the head


def test_bad_allocation_is_rejected():
    from semoe.spec_base import SpecError

    with pytest.raises(SpecError, match="tasks the model lacks: z"):
        run(Plan(devices=1, placements=(Placement(0, "z", 1, 1.0),)))
    with pytest.raises(SpecError, match="needs 5 devices, the cluster has 4"):
        run(Plan(devices=5, placements=(Placement(0, "a", 1, 1.0),)))
    with pytest.raises(SpecError, match="must be >= the number of tasks"):
        plan_equal(TaskSet(tasks=(TaskSpec(name="a", batch_size=1), TaskSpec(name="b", batch_size=1))), 1)


def test_paper_repro_quick_mode_writes_csv_and_png(tmp_path):
    import pandas as pd

    from paper_repro import elastic

    path = elastic.collect(tmp_path, quick=True)
    df = pd.read_csv(path)
    assert list(df.allocation) == ["naive", "planned", "downscaled"]
    assert {"date", "commit", "devices", "step_time_s", "samples_per_s", "peak_hbm_bytes", "mean_hbm_bytes",
            "imbalance"} <= set(df.columns)
    assert (df.samples_per_step == 6912).all()
    assert elastic.plot(path).stat().st_size > 0
