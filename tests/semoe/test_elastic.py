"""Elastic multi-task allocation planner: hand-worked cases, the paper's example, invariants."""

from __future__ import annotations

import csv

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semoe import SpecError
from semoe.cli import main
from semoe.elastic import TaskSet, TaskSpec, plan_downscale, plan_naive, plan_upscale


def _tasks(*batches, costs=None):
    costs = costs or [1.0] * len(batches)
    return TaskSet(tasks=[TaskSpec(name=f"t{i}", batch_size=b, cost_per_sample_s=c) for i, (b, c) in enumerate(zip(batches, costs))])


PAPER = _tasks(512, 256, 128, 128)  # SEMOE.md, elastic MoE training example


def test_paper_example_naive_is_imbalanced_and_eight_devices_give_4_2_1_1():
    naive = plan_naive(PAPER)
    assert naive.device_loads == [512, 256, 128, 128]  # devices of light tasks wait for the heavy one
    plan = plan_upscale(PAPER, 8)
    assert [len(plan.devices_of(t.name)) for t in PAPER.tasks] == [4, 2, 1, 1]
    assert plan.device_loads == [128.0] * 8  # every GPU holds 128 samples
    assert plan.throughput() == 4 * naive.throughput()


def test_paper_example_on_four_devices_packs_light_tasks_together():
    plan = plan_upscale(PAPER, 4)
    # hand-worked: 512 -> 2 x 256, 256 alone, 128 + 128 share a device: every device 256
    assert plan.device_loads == [256.0] * 4
    assert plan.devices_of("t2") == plan.devices_of("t3")
    assert len(plan.devices_of("t0")) == 2


def test_shards_share_devices_with_light_tasks():
    plan = plan_upscale(PAPER, 3)
    # 1024 samples on 3 devices: 256 + 128 | 256 + 128 | 256 -> step 384 (one device per task: 512)
    assert plan.step_time == 384.0
    assert sorted(plan.device_loads) == [256.0, 384.0, 384.0]


def test_per_sample_cost_weights_the_load():
    ts = _tasks(100, 100, costs=[3.0, 1.0])
    plan = plan_upscale(ts, 4)
    # loads 300 and 100: 3 devices x 100 for the costly task, 1 for the cheap one
    assert len(plan.devices_of("t0")) == 3 and plan.step_time == pytest.approx(102.0)  # ceil(100/3)=34 samples x 3


def test_downscale_finds_fewest_devices_within_slowdown():
    assert plan_downscale(PAPER, 8, 0.0).step_time == 128.0
    assert len({p.device for p in plan_downscale(PAPER, 8, 0.0).placements}) == 8
    down = plan_downscale(PAPER, 8, 1.0)  # twice the 8-device step time is allowed
    assert down.devices == 4 and down.step_time == 256.0


def test_bad_inputs_name_the_field():
    with pytest.raises(SpecError, match=r"TaskSpec.batch_size: batch_size \(0\) must be > 0"):
        TaskSpec(name="a", batch_size=0)
    with pytest.raises(SpecError, match=r"TaskSet.tasks: task names must be unique, repeated: a"):
        TaskSet(tasks=[TaskSpec(name="a", batch_size=1), TaskSpec(name="a", batch_size=2)])
    with pytest.raises(SpecError, match=r"TaskSet.tasks: at least one task"):
        TaskSet(tasks=[])
    with pytest.raises(SpecError, match=r"devices \(0\) must be >= 1"):
        plan_upscale(PAPER, 0)


@settings(max_examples=120, deadline=None)
@given(
    batches=st.lists(st.integers(1, 600), min_size=1, max_size=7),
    costs=st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=7, max_size=7),
    devices=st.integers(1, 24),
)
def test_plans_conserve_samples_and_never_lose_to_the_naive_plan(batches, costs, devices):
    ts = _tasks(*batches, costs=costs[: len(batches)])
    plan = plan_upscale(ts, devices)
    for t in ts.tasks:
        assert plan.samples_of(t.name) == t.batch_size
    assert len(plan.device_loads) == devices
    total = sum(t.load for t in ts.tasks)
    assert plan.step_time >= total / devices - 1e-9  # no plan beats perfect balance
    if devices >= len(batches):
        assert plan.step_time <= plan_naive(ts).step_time + 1e-9
    if devices > 1:  # more devices never make the plan slower
        assert plan.step_time <= plan_upscale(ts, devices - 1).step_time + 1e-9


def test_cli_plan_tasks_table_and_csv(tmp_path, capsys):
    f = tmp_path / "tasks.yaml"
    PAPER.to_yaml(f)
    out = tmp_path / "plan.csv"
    assert main(["plan-tasks", "--tasks", str(f), "--gpus", "8", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 and {float(r["device_load"]) for r in rows} == {128.0}
    assert "step time 128" in capsys.readouterr().out
    assert main(["plan-tasks", "--tasks", str(tmp_path / "missing.yaml"), "--gpus", "2"]) == 2
