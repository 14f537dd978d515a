"""Elastic device allocation for multi-task MoE training (SE-MoE "Elastic MoE training", UFO).

Tasks have different batch sizes, so giving every task one device makes the devices of light tasks
wait for the heaviest one. The planner balances the per-device load
``load(device) = sum over tasks on it of samples_on_device * cost_per_sample_s``:

* a *heavy* task is split over ``k`` devices, data parallel inside the task (``ceil(b / k)`` samples
  on the busiest of them);
* *light* tasks are packed whole onto shared devices (first-fit decreasing bin packing).

For a target step time ``M`` the devices needed are found greedily: every task with ``b * c > M``
is split into the fewest even shards that fit ``M``, then shards and whole light tasks are packed
first-fit decreasing into devices of capacity ``M`` (a shard may share a device with light tasks).
``plan_upscale`` bisects on ``M`` for the smallest target whose packing fits the given devices. ``plan_downscale`` returns the fewest devices whose planned step time stays within
``(1 + slowdown)`` of the step time on all given devices.

Paper example (SEMOE.md): batches 512/256/128/128 on 4 devices as 1/1/1/1 have step load 512; on 8
devices as 4/2/1/1 every device holds 128 samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from semoe.spec_base import Spec, SpecError


@dataclass(frozen=True, kw_only=True)
class TaskSpec(Spec):
    name: str
    batch_size: int  # samples per step
    cost_per_sample_s: float = 1.0  # seconds (or any consistent unit) per sample on one device

    def validate(self) -> None:
        self.require_positive("batch_size", "cost_per_sample_s")
        if not self.name:
            self.fail("name", "a task needs a non-empty name")

    @property
    def load(self) -> float:
        return self.batch_size * self.cost_per_sample_s


@dataclass(frozen=True, kw_only=True)
class TaskSet(Spec):
    tasks: tuple[TaskSpec, ...]

    def validate(self) -> None:
        if not self.tasks:
            self.fail("tasks", "at least one task is needed")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            self.fail("tasks", f"task names must be unique, repeated: {', '.join(dup)}")


@dataclass(frozen=True)
class Placement:
    """One device's share: ``samples`` of task ``task``."""

    device: int
    task: str
    samples: int
    load: float


@dataclass(frozen=True)
class Plan:
    devices: int
    placements: tuple[Placement, ...]

    @property
    def device_loads(self) -> list[float]:
        loads = [0.0] * self.devices
        for p in self.placements:
            loads[p.device] += p.load
        return loads

    @property
    def step_time(self) -> float:
        return max(self.device_loads)

    def devices_of(self, task: str) -> list[int]:
        return sorted({p.device for p in self.placements if p.task == task})

    def samples_of(self, task: str) -> int:
        return sum(p.samples for p in self.placements if p.task == task)

    def throughput(self) -> float:
        """Samples per unit of time over all tasks."""
        return sum(p.samples for p in self.placements) / self.step_time

    def rows(self) -> list[dict]:
        """The readable table: one row per (device, task)."""
        loads = self.device_loads
        return [
            {"device": p.device, "task": p.task, "samples": p.samples, "task_load": p.load, "device_load": loads[p.device]}
            for p in sorted(self.placements, key=lambda p: (p.device, p.task))
        ]


def _split(task: TaskSpec, k: int) -> list[int]:
    """Samples per device when ``task`` runs data parallel on ``k`` devices (as even as possible)."""
    q, r = divmod(task.batch_size, k)
    return [q + 1] * r + [q] * (k - r)


def _pack(tasks: tuple[TaskSpec, ...], target: float) -> list[list[tuple[TaskSpec, int]]] | None:
    """Bins (devices) of (task, samples) for step time ``target``: every task whose load exceeds the
    target is split into the fewest even shards that fit, then shards and whole light tasks are packed
    first-fit decreasing. None if a single sample exceeds the target."""
    items: list[tuple[TaskSpec, int]] = []
    for t in tasks:
        per_device = math.floor(target / t.cost_per_sample_s * (1 + 1e-12))
        if per_device == 0:
            return None
        k = math.ceil(t.batch_size / per_device)
        items += [(t, n) for n in _split(t, k)]
    bins: list[list[tuple[TaskSpec, int]]] = []
    fill: list[float] = []
    for t, n in sorted(items, key=lambda it: (-it[1] * it[0].cost_per_sample_s, it[0].name)):
        load = n * t.cost_per_sample_s
        for i, f in enumerate(fill):
            if f + load <= target * (1 + 1e-12):
                bins[i].append((t, n))
                fill[i] += load
                break
        else:
            bins.append([(t, n)])
            fill.append(load)
    return bins


def _materialise(devices: int, bins: list[list[tuple[TaskSpec, int]]]) -> Plan:
    placements = [
        Placement(d, t.name, n, n * t.cost_per_sample_s) for d, b in enumerate(bins) for t, n in b
    ]
    return Plan(devices=devices, placements=tuple(placements))


def plan_naive(taskset: TaskSet) -> Plan:
    """One device per task (the imbalanced baseline)."""
    return _materialise(len(taskset.tasks), [[(t, t.batch_size)] for t in taskset.tasks])


def plan_upscale(taskset: TaskSet, devices: int) -> Plan:
    """Balance ``taskset`` over at most ``devices`` devices: bisection on the target step time for the
    smallest target whose packing fits. Devices that cannot lower the step time stay idle and show
    as unused in the plan."""
    if devices < 1:
        raise SpecError(f"devices ({devices}) must be >= 1")
    tasks = taskset.tasks
    total = sum(t.load for t in tasks)
    lo = max(total / devices, max(t.cost_per_sample_s for t in tasks))
    hi = total  # everything on one device always fits
    best = _pack(tasks, hi)
    assert best is not None and len(best) == 1
    for _ in range(60):
        mid = (lo + hi) / 2
        bins = _pack(tasks, mid)
        if bins is not None and len(bins) <= devices:
            hi, best = mid, bins
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return _materialise(devices, best)


def plan_downscale(taskset: TaskSet, devices: int, slowdown: float) -> Plan:
    """Fewest devices (<= ``devices``) whose plan's step time is within ``(1 + slowdown)`` of the
    best plan on ``devices`` devices."""
    if slowdown < 0:
        raise SpecError(f"slowdown ({slowdown}) must be >= 0")
    bound = plan_upscale(taskset, devices).step_time * (1 + slowdown)
    for n in range(1, devices + 1):
        plan = plan_upscale(taskset, n)
        if plan.step_time <= bound * (1 + 1e-12):
            return plan
    raise AssertionError("unreachable: n == devices satisfies the bound")  # pragma: no cover
