"""Multi-task MoE (UFO-style; SEMOE.md mechanism 5 "Elastic MoE training") and its elastic placement.

Shape legend: B_t samples of task t, I input features, D model dim, F expert hidden, C_t classes of t.

    x_BI (task t) -> embed -> [TaskMoELayer] x layers -> head_t -> logits_BC_t -> CE(sum) / B_t
    TaskMoELayer:  h = h + shared(norm(h)) + expert_t(norm(h))       (routed by task id, as UFO's
                   public code: every sample of task t goes to the shared expert and to expert t)

The model's loss is ``sum_t mean_{i in t} CE_i``: every task has its own batch size and head.

Elastic data parallelism (:func:`parallelize_tasks`) takes an allocation ``semoe.elastic.Plan`` (one
device per task, or the planner's: heavy tasks split over several devices, light tasks packed onto a
shared one). Device d runs the samples :func:`shards` gives it and keeps only the experts and heads of
its tasks. Its local loss is ``sum_{t on d} sum_{i in shard} CE_i / B_t``, so the gradients *summed*
over devices equal the single-process gradients exactly:

    shared params (embed, norms, shared experts)  all-reduce(sum) over all devices
    expert_t and head_t                           all-reduce(sum) over the devices of task t only
                                                  (a size-1 group: no communication)

Every rank creates every task group in the same (sorted task name) order, as torch.distributed needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FFN(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))


class TaskMoELayer(nn.Module):
    """A shared expert plus one expert per task; samples go to the expert of their task id."""

    def __init__(self, d: int, f: int, tasks: list[str]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.shared = FFN(d, f)
        self.experts = nn.ModuleDict({t: FFN(d, f) for t in tasks})

    def forward(self, h_BD: Tensor, task: str) -> Tensor:
        z = self.norm(h_BD)
        return h_BD + self.shared(z) + self.experts[task](z)


class MultiTaskMoE(nn.Module):
    def __init__(self, classes: dict[str, int], d_in: int = 16, d_model: int = 32, ffn: int = 64, layers: int = 2,
                 seed: int | None = 0) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        names = sorted(classes)
        self.embed = nn.Linear(d_in, d_model)
        self.layers = nn.ModuleList(TaskMoELayer(d_model, ffn, names) for _ in range(layers))
        self.heads = nn.ModuleDict({t: nn.Linear(d_model, classes[t]) for t in names})

    @property
    def tasks(self) -> list[str]:
        return sorted(self.heads.keys())

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        ps = [p for layer in self.layers for p in layer.experts[task].parameters()]
        return ps + list(self.heads[task].parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        task_ids = {id(p) for t in self.tasks for p in self.task_parameters(t)}
        return [p for p in self.parameters() if id(p) not in task_ids]

    def keep_tasks(self, keep: set[str]) -> None:
        """Drop the experts and heads of tasks not in ``keep`` (a device holds only its tasks)."""
        for t in self.tasks:
            if t not in keep:
                del self.heads[t]
                for layer in self.layers:
                    del layer.experts[t]

    def forward_task(self, task: str, x_BI: Tensor) -> Tensor:
        h = self.embed(x_BI)
        for layer in self.layers:
            h = layer(h, task)
        return self.heads[task](h)

    def loss(self, batches: dict[str, tuple[Tensor, Tensor]], batch_sizes: dict[str, int] | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """``sum_t sum_i CE_i / B_t`` over the given (possibly partial) task batches; ``batch_sizes``
        are the tasks' full batch sizes (default: the given batch lengths)."""
        total, per = None, {}
        for t in sorted(batches):
            x, y = batches[t]
            B = (batch_sizes or {}).get(t, len(y))
            per[t] = F.cross_entropy(self.forward_task(t, x), y, reduction="sum") / B
            total = per[t] if total is None else total + per[t]
        if total is None:
            total = sum((p.sum() * 0 for p in self.parameters()), torch.zeros(()))
        return total, per


# ------------------------------------------------------------------------------ placement
def shards(plan) -> dict[int, list[tuple[str, int, int]]]:
    """``{device: [(task, start, stop), ...]}``: contiguous sample ranges of each task, in device order."""
    out: dict[int, list[tuple[str, int, int]]] = {d: [] for d in range(plan.devices)}
    nxt: dict[str, int] = {}
    for p in sorted(plan.placements, key=lambda p: (p.device, p.task)):
        s = nxt.get(p.task, 0)
        out[p.device].append((p.task, s, s + p.samples))
        nxt[p.task] = s + p.samples
    return out


@dataclass
class TaskSync:
    """Gradient reduction of an elastically placed multi-task model (see the module docstring)."""

    rank: int
    world: int
    shared: list[nn.Parameter]
    task_params: dict[str, list[nn.Parameter]]
    task_groups: dict[str, object] = field(default_factory=dict)  # task -> ProcessGroup (None: alone)
    task_ranks: dict[str, list[int]] = field(default_factory=dict)

    def finish(self) -> None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized() and self.world > 1

        def reduce(params: list[nn.Parameter], group) -> None:
            if not params:
                return
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=group)
            off = 0
            for p in params:
                p.grad.copy_(flat[off: off + p.numel()].view_as(p))
                off += p.numel()

        if not on:
            return
        reduce(self.shared, None)
        for t, ps in self.task_params.items():
            if len(self.task_ranks[t]) > 1:
                reduce(ps, self.task_groups[t])


def parallelize_tasks(model: MultiTaskMoE, plan, rank: int, world: int) -> tuple[MultiTaskMoE, TaskSync,
                                                                                   list[tuple[str, int, int]]]:
    """Place ``model`` by the allocation ``plan`` (``semoe.elastic.Plan``, ``plan.devices == world``).
    Returns the model (only this device's tasks kept), its :class:`TaskSync` and this device's shards."""
    if plan.devices != world:
        raise ValueError(f"allocation plan has {plan.devices} devices but the world has {world} ranks")
    mine = shards(plan)[rank]
    local = {t for t, _, _ in mine}
    groups, ranks = {}, {}
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized() and world > 1
    for t in model.tasks:  # every rank, same order
        devs = plan.devices_of(t)
        ranks[t] = devs
        if on and len(devs) > 1:
            pg = dist.new_group(devs)
            if t in local:
                groups[t] = pg
    model.keep_tasks(local)
    sync = TaskSync(rank=rank, world=world, shared=model.shared_parameters(),
                    task_params={t: model.task_parameters(t) for t in sorted(local)},
                    task_groups=groups, task_ranks={t: ranks[t] for t in local})
    return model, sync, mine
