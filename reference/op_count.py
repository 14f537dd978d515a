"""Count the PyTorch operators a piece of reference code issues: the host side of its cost.

Eager PyTorch pays a host cost for every operator it dispatches (Python, dispatcher, CUDA launch): a
decode step of a small batch is bound by that cost, not by the GPU. The simulator models it as
``ops x host_op_s`` (`simulator.cost.CostModel.host_time`), with ``host_op_s`` measured by
``kernels/profile.py`` (sweep ``host``) and the operator count measured here, on the CPU, by running the
reference code itself under a `TorchDispatchMode` that counts every aten call that reaches a kernel.

``syncs`` counts the calls that make the host wait for the device (``.item()``, ``.tolist()``,
``nonzero``, boolean masking, data-dependent shapes): each drains the GPU's queue, so the host cost of
the ops before it cannot hide behind device work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose output shape or value the host must read back from the device
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique_consecutive",
    "aten._unique2", "aten.unique_dim", "aten.repeat_interleave", "aten.equal", "aten.is_nonzero",
})
# metadata-only ops: no kernel is launched for them on a GPU
VIEW_OPS = frozenset({
    "aten.view", "aten._unsafe_view", "aten.reshape", "aten.t", "aten.transpose", "aten.permute", "aten.expand",
    "aten.unsqueeze", "aten.squeeze", "aten.slice", "aten.select", "aten.as_strided", "aten.alias",
    "aten.detach", "aten.split", "aten.split_with_sizes", "aten.unbind", "aten.chunk", "aten.narrow",
    "aten.lift_fresh", "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.sym_size", "aten.sym_stride",
    "aten.sym_numel", "aten.dim", "aten.size", "aten.stride", "aten.numel", "aten.is_contiguous",
    "aten.view_as_real", "aten.view_as_complex", "aten._reshape_alias", "aten.movedim", "aten.flatten",
    "aten.unflatten",
})


@dataclass
class OpCount:
    """Operators issued by one call: ``kernels`` launch device work, ``views`` are metadata only."""

    kernels: int = 0
    views: int = 0
    syncs: int = 0
    by_name: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.kernels + self.views

    def __add__(self, other: "OpCount") -> "OpCount":
        return OpCount(self.kernels + other.kernels, self.views + other.views, self.syncs + other.syncs,
                       self.by_name + other.by_name)


def _name(func) -> str:
    # 'aten.add.Tensor' -> 'aten.add'
    parts = str(func).split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else str(func)


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _name(func)
        c = self.count
        c.by_name[name] += 1
        if name in VIEW_OPS:
            c.views += 1
        else:
            c.kernels += 1
        if name in SYNC_OPS:
            c.syncs += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, OpCount]:
    """Run ``fn(*args, **kwargs)`` and count the aten operators it dispatches (forward only unless
    ``fn`` itself calls backward). Returns ``(fn's result, OpCount)``."""
    with _Counter() as mode:
        out = fn(*args, **kwargs)
    return out, mode.count
