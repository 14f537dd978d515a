"""``parallelize()``: apply a ParallelPlan to a built model from the outside (DESIGN.md: no parallel code
inside the model).

Data flow::

    model (full, same seed on every rank)
      -> parallelize_moe: MoE layers get an EPDispatcher (plan.alltoall) and their local expert slice
      -> zero_stage 3: dense params sharded over the node (reference.parallel.zero3.Zero3), else
      -> GradSync: dense params -> GradBuckets over dp_grads, expert params -> GradBuckets over
         edp_grads, both scaled by 1 / data_parallel, bucket size plan.fusion_bucket_bytes
    per step: loss.backward()  (buckets launch as they fill)  ->  sync.finish()  ->  sync.clip(max)
    expert offload (reference.offload.ExpertOffload built afterwards on this rank's local experts):
      sync.attach_offload(engine): the expert buckets go; finish() reduces the engine's gradient
      accumulators over edp_grads (same 1 / data_parallel scale) before its D2H copy, clip() takes them
      into the same global norm, then the caller runs engine.step(lr)

With world size 1 every group is a no-op and the model behaves exactly as unparallelized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from reference.comm.buckets import GradBuckets, clip_grad_norm_moe
from reference.parallel.ep_dispatcher import parallelize_moe, split_parameters
from reference.parallel.groups import ParallelGroups, build_groups
from semoe.plan_spec import ParallelPlan


@dataclass(frozen=True)
class _GradOf:
    """A gradient tensor where clipping expects a parameter (it reads and scales ``.grad`` in place)."""

    grad: Tensor


@dataclass
class GradSync:
    """Gradient reduction of one parallelized model (dense over DP, experts over EDP) and clipping."""

    groups: ParallelGroups
    dense: list[nn.Parameter]
    experts: list[nn.Parameter]
    dense_buckets: GradBuckets
    expert_buckets: GradBuckets
    zero3: object | None = None  # reference.parallel.zero3.Zero3 when plan.zero_stage == 3
    offload: object | None = None  # reference.offload.ExpertOffload holding this rank's experts (attach_offload)

    def attach_offload(self, engine) -> None:
        """The experts moved into ``engine`` (an ExpertOffload built after :func:`parallelize`): their grads
        are the engine's accumulators, reduced over EDP in :meth:`finish` (scaled by 1 / data_parallel
        first, as the expert buckets do) and clipped by :meth:`clip` with the same global norm."""
        b = self.expert_buckets
        b.remove_hooks()
        self.expert_buckets = GradBuckets([], b.group, b.bucket_bytes, scale=b.scale, name=b.name, on_bucket=b.on_bucket)
        self.experts = []
        self.offload = engine

    def finish(self) -> None:
        self.dense_buckets.finish()
        self.expert_buckets.finish()
        if self.zero3 is not None:
            self.zero3.finish()
        if self.offload is not None:
            self.offload.reduce_grads(self.groups.edp_grads, 1.0 / self.groups.world_size)

    def _expert_grads(self) -> list:
        if self.offload is None:
            return self.experts
        return [_GradOf(g) for g in self.offload.expert_grads()]  # clip_grad_norm_moe reads (and scales) .grad

    def clip(self, max_norm: float) -> Tensor:
        if self.zero3 is not None:
            return clip_grad_norm_moe(self.zero3.shards(), self._expert_grads(), max_norm, self.groups.ep,
                                      dense_sq=self.zero3.dense_sq_norm())
        return clip_grad_norm_moe(self.dense, self._expert_grads(), max_norm, self.groups.ep)

    def set_sync(self, on: bool) -> None:
        """``False`` for gradient-accumulation micro-batches (hooks do nothing), ``True`` for the last."""
        self.dense_buckets.sync = self.expert_buckets.sync = on


def parallelize(
    model: nn.Module,
    plan: ParallelPlan | ParallelGroups,
    *,
    bucket_bytes: int | None = None,
    on_bucket: Callable[[str, int, int, float, float], None] | None = None,
    on_gather: Callable[[str, int, int, float, float], None] | None = None,
    on_span: Callable | None = None,
) -> tuple[nn.Module, GradSync]:
    """Shard ``model``'s experts over EP and attach gradient buckets; returns ``(model, sync)``.

    ``bucket_bytes`` overrides ``plan.fusion_bucket_bytes`` (0: one all-reduce per tensor).
    ``on_bucket(kind, index, nbytes, start_s, end_s)`` receives each finished bucket and
    ``on_gather(phase, unit, nbytes, start_s, end_s)`` each ZeRO-3 gather (traces; perf_counter times);
    ``on_span`` each gather and its exposed wait for a shared timeline (``reference.parallel.zero3``).
    """
    groups = plan if isinstance(plan, ParallelGroups) else build_groups(plan)
    if groups.plan.zero_stage in (1, 2):
        raise ValueError(f"ParallelPlan.zero_stage: {groups.plan.zero_stage} is not implemented (use 0 or 3)")
    parallelize_moe(model, groups)
    zero3 = None
    if groups.plan.zero_stage == 3:
        from reference.parallel.ep_dispatcher import expert_parameter_ids
        from reference.parallel.zero3 import Zero3

        zero3 = Zero3(model, groups, expert_parameter_ids(model), prefetch=max(1, groups.plan.prefetch_depth),
                      on_gather=on_gather, on_span=on_span)
    dense, experts = split_parameters(model)
    if zero3 is not None:
        shard_ids = {id(p) for p in zero3.shards()}
        dense = [p for p in dense if id(p) not in shard_ids]  # nothing else should remain
    nbytes = groups.plan.fusion_bucket_bytes if bucket_bytes is None else bucket_bytes
    scale = 1.0 / groups.world_size

    def hook(kind: str):
        return None if on_bucket is None else (lambda i, n, s, e: on_bucket(kind, i, n, s, e))

    sync = GradSync(
        groups=groups,
        dense=dense,
        experts=experts,
        dense_buckets=GradBuckets(dense, groups.dp_grads, nbytes, scale=scale, name="dense", on_bucket=hook("dense")),
        expert_buckets=GradBuckets(experts, groups.edp_grads, nbytes, scale=scale, name="experts",
                                   on_bucket=hook("experts")),
        zero3=zero3,
    )
    return model, sync
