"""Fusion communication for gradients: flat buckets reduced asynchronously as they fill during backward,
and MoE-aware gradient clipping.

Data flow (PyTorch DDP's reducer, Li et al. 2020, VLDB "PyTorch Distributed", sec. 3.2; SE-MoE
"fusion communication", SEMOE.md mechanism 3)::

    GradBuckets(params, group, bucket_bytes, scale)
        params in reverse registration order (roughly the order backward produces their grads),
        packed greedily into buckets of >= bucket_bytes (0: one bucket per tensor, unfused),
        one bucket never mixes dtypes or devices
    backward: post-accumulate-grad hook on each parameter -> when every parameter of a bucket has
        its grad: flat = cat(grads) * scale; work = all_reduce(flat, SUM, async)   (start)
    finish(): launch buckets still open (parameters without a grad contribute zeros), wait every
        handle in launch order, copy the reduced slices back into p.grad                (wait)

Cost: a bucket of b bytes costs alpha + 2 (P-1)/P b / B in a ring all-reduce; fusing k tensors into
one bucket saves (k - 1) alpha and launches while backward still runs (overlap). Dense parameters
use the data-parallel group; routed-expert parameters use their expert-data-parallel group (their
replicas), both with ``scale = 1 / data_parallel`` (the loss is the mean over all ranks' tokens; an
expert's owner already summed its EP group's contributions through the all-to-all backward).

Clipping (SEMOE.md mechanism 7, Megatron-Core ``clip_grad_norm_fp32``): the global norm is
``sqrt(sum_dense g^2 + sum_over_EP(sum_local_experts g^2))``; dense gradients are identical on all
ranks after the reduction, expert shards differ across the EP group, so only the expert squares are
all-reduced (over EP). Identical to ``torch.nn.utils.clip_grad_norm_`` on the unsharded model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reference.parallel.groups import Group


@dataclass
class _Bucket:
    index: int
    params: list[nn.Parameter]
    numel: int
    dtype: torch.dtype
    device: torch.device
    ready: int = 0
    flat: Tensor | None = None
    work: object = None
    started_s: float = 0.0
    offsets: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


class GradBuckets:
    """All-reduce the gradients of ``params`` over ``group`` in fused buckets with start/wait handles.

    Use: construct once after the model is built (and sharded); per step run backward, then
    :meth:`finish`. Set ``sync = False`` for micro-batches that only accumulate. ``on_bucket`` (if
    given) is called as ``on_bucket(index, nbytes, start_s, end_s)`` when a bucket completes (traces).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        group: Group,
        bucket_bytes: int = 25 * 2**20,
        *,
        scale: float = 1.0,
        name: str = "grads",
        on_bucket: Callable[[int, int, float, float], None] | None = None,
    ) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 0:
            raise ValueError(f"GradBuckets: bucket_bytes must be an int >= 0, got {bucket_bytes!r}")
        self.group, self.bucket_bytes, self.scale, self.name = group, bucket_bytes, float(scale), name
        self.on_bucket = on_bucket
        self.sync = True
        params = [p for p in params if p.requires_grad]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("GradBuckets: a parameter is listed twice")
        self.buckets: list[_Bucket] = []
        self._where: dict[int, _Bucket] = {}
        current: list[nn.Parameter] = []
        for p in reversed(params):
            if current and (
                p.dtype != current[0].dtype
                or p.device != current[0].device
                or sum(q.numel() for q in current) * current[0].element_size() >= bucket_bytes
            ):
                self._add_bucket(current)
                current = []
            current.append(p)
        if current:
            self._add_bucket(current)
        self._launched: list[_Bucket] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _add_bucket(self, ps: list[nn.Parameter]) -> None:
        b = _Bucket(len(self.buckets), list(ps), sum(p.numel() for p in ps), ps[0].dtype, ps[0].device)
        off = 0
        for p in ps:
            b.offsets.append(off)
            off += p.numel()
            self._where[id(p)] = b
        self.buckets.append(b)

    def __repr__(self) -> str:
        return (f"GradBuckets({self.name}, {len(self.buckets)} buckets of <= {self.bucket_bytes} B, "
                f"{self.group})")

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------- start
    def _on_grad(self, p: Tensor) -> None:
        if not self.sync:
            return
        b = self._where[id(p)]
        b.ready += 1
        if b.ready == len(b.params):
            self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        if b.work is not None or b in self._launched:
            return
        grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in b.params]
        b.flat = torch.cat(grads) if len(grads) > 1 else grads[0].clone()
        if self.scale != 1.0:
            b.flat.mul_(self.scale)
        b.started_s = time.perf_counter()
        if self.group.size > 1:
            import torch.distributed as dist

            b.work = dist.all_reduce(b.flat, group=self.group.pg, async_op=True)
        self._launched.append(b)

    # -------------------------------------------------------------------------------- wait
    def finish(self) -> None:
        """Launch open buckets, wait for all, write the reduced gradients back into ``p.grad``."""
        for b in self.buckets:
            if b not in self._launched:
                self._launch(b)
        for b in self._launched:
            if b.work is not None:
                b.work.wait()
            end = time.perf_counter()
            for p, off in zip(b.params, b.offsets):
                g = b.flat[off : off + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            if self.on_bucket is not None:
                self.on_bucket(b.index, b.nbytes, b.started_s, end)
            b.work, b.flat, b.ready = None, None, 0
        self._launched = []


def clip_grad_norm_moe(
    dense: Sequence[nn.Parameter],
    experts: Sequence[nn.Parameter],
    max_norm: float,
    ep: Group,
    *,
    dense_sq: Tensor | None = None,
) -> Tensor:
    """Clip in place to the global 2-norm over the dense grads and all experts' grads; return the norm.

    Call after the gradient reduction. ``max_norm <= 0`` or ``inf`` only computes the norm.
    ``dense_sq`` overrides the dense squared norm (ZeRO-3: the shards' squares summed over the node).
    """
    grads_d = [p.grad for p in dense if p.grad is not None]
    grads_e = [p.grad for p in experts if p.grad is not None]
    ref = (grads_d or grads_e or [torch.zeros(())])[0]
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    if dense_sq is None:
        dense_sq = sum((g.to(acc).pow(2).sum() for g in grads_d), torch.zeros((), dtype=acc, device=ref.device))
    dense_sq = dense_sq.to(dtype=acc, device=ref.device)
    expert_sq = sum((g.to(acc).pow(2).sum() for g in grads_e), torch.zeros((), dtype=acc, device=ref.device))
    if ep.size > 1:
        import torch.distributed as dist

        dist.all_reduce(expert_sq, group=ep.pg)
    total = (dense_sq + expert_sq).sqrt()
    if max_norm and max_norm > 0 and max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        for g in grads_d + grads_e:
            g.mul_(coef.to(g.dtype))
    return total
