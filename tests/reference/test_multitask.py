"""Multi-task MoE (reference.multitask): 4 tasks with batches 8/4/2/2 (the paper's 512/256/128/128 scaled
by 1/64) train to the same 10-step losses on 4 gloo ranks with the naive 1/1/1/1 allocation and with the
planner's (task 0 split over 2 devices, tasks 2 and 3 packed on one) as in one process; task expert
gradients are reduced only inside the task's group."""

from __future__ import annotations

import pytest
import torch

from semoe.elastic import TaskSet, TaskSpec, plan_naive, plan_upscale

BATCHES = {"t0": 8, "t1": 4, "t2": 2, "t3": 2}
CLASSES = {"t0": 3, "t1": 5, "t2": 2, "t3": 4}
TASKS = TaskSet(tasks=[TaskSpec(name=t, batch_size=b) for t, b in BATCHES.items()])


def _data():
    g = torch.Generator().manual_seed(7)
    return {t: (torch.randn(b, 16, generator=g, dtype=torch.float64),
                torch.randint(0, CLASSES[t], (b,), generator=g)) for t, b in BATCHES.items()}


def _train(model, sync, shard, steps=10, rank=0, world=1):
    data = _data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        batches = {t: (data[t][0][a:b], data[t][1][a:b]) for t, a, b in shard}
        loss, _ = model.loss(batches, BATCHES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            sync.finish()
        opt.step()
        tot = loss.detach().clone()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(tot)
        losses.append(float(tot))
    return losses


def _single():
    from reference.multitask import MultiTaskMoE

    model = MultiTaskMoE(CLASSES).to(torch.float64)
    return _train(model, None, [(t, 0, b) for t, b in BATCHES.items()])


def _worker(which: str):
    import torch.distributed as dist

    from reference.multitask import MultiTaskMoE, parallelize_tasks

    r, W = dist.get_rank(), dist.get_world_size()
    plan = plan_naive(TASKS) if which == "naive" else plan_upscale(TASKS, W)
    model = MultiTaskMoE(CLASSES).to(torch.float64)
    model, sync, shard = parallelize_tasks(model, plan, r, W)
    losses = _train(model, sync, shard, rank=r, world=W)
    return {"losses": losses, "tasks": sorted(model.tasks), "groups": {t: sync.task_ranks[t] for t in model.tasks},
            "shard": shard}


def test_model_loss_is_sum_of_task_means_and_routing_by_task():
    from reference.multitask import MultiTaskMoE

    model = MultiTaskMoE(CLASSES).to(torch.float64)
    data = _data()
    loss, per = model.loss(data)
    assert torch.allclose(loss, sum(torch.nn.functional.cross_entropy(model.forward_task(t, *data[t][:1]), data[t][1])
                                    for t in BATCHES))
    loss.backward()
    # every task expert got a gradient only from its own samples: drop t3's samples -> its expert has none
    model.zero_grad(set_to_none=True)
    model.loss({t: data[t] for t in ("t0", "t1")})[0].backward()
    assert all(p.grad is None for p in model.task_parameters("t3"))
    assert all(p.grad is not None for p in model.task_parameters("t0") + model.shared_parameters())


def test_planner_allocation_is_split_and_packed():
    from reference.multitask import shards

    plan = plan_upscale(TASKS, 4)
    sh = shards(plan)
    assert plan.devices_of("t0") == [0, 1] and sorted(sum(b - a for t, a, b in s) for s in sh.values()) == [4, 4, 4, 4]
    assert len({plan.devices_of("t2")[0], plan.devices_of("t3")[0]}) == 1  # packed together
    assert plan.step_time == 4 and plan_naive(TASKS).step_time == 8


@pytest.mark.distributed
def test_naive_and_planned_allocations_equal_single_process(pool4):
    base = _single()
    assert base[-1] < base[0]
    for which in ("naive", "planned"):
        out = pool4.run(_worker, which)
        for o in out:
            assert all(abs(a - b) <= 1e-10 * abs(b) for a, b in zip(o["losses"], base)), (which, o["losses"], base)
        if which == "planned":
            assert out[0]["groups"] == {"t0": [0, 1]} and out[1]["groups"] == {"t0": [0, 1]}
            assert [o["shard"] for o in out[:2]] == [[("t0", 0, 4)], [("t0", 4, 8)]]
            assert {len(o["tasks"]) for o in out} == {1, 2}  # light tasks packed on one device
        else:
            assert [o["tasks"] for o in out] == [["t0"], ["t1"], ["t2"], ["t3"]]
