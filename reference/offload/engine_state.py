"""The offload engine's per-layer records and host threads (`reference.offload.engine.ExpertOffload`): the tensors
of one routed expert (`EXPERT_TENSORS`), one MoE layer's host buffers and bookkeeping (`_Layer`: the tiers of
its state, see the engine's docstring), a GPU pool slot (`_Slot`) and the reference a pack hook leaves in
autograd's graph instead of a slot's tensor (`_SlotRef`); the optimizer and SSD I/O threads on CUDA
(`host_executors`) and their inline stand-in on the CPU (`_Inline`)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reference.offload.cpu_adam import adam_threads as default_adam_threads

EXPERT_TENSORS = ("w1_EDF", "w3_EDF", "w2_EFD", "b1_EF", "b3_EF", "b2_ED")


def host_executors(adam_threads: int | None = None) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor, dict[str, int]]:
    """The engine's two host threads on CUDA: the optimizer worker with ``adam_threads`` intra-op threads (None:
    `reference.offload.cpu_adam.adam_threads`; 0: torch's default) and the SSD I/O worker with one, each set inside
    its thread (``torch.set_num_threads`` sizes the calling thread's OpenMP team and becomes the default of threads
    started later, so the caller's count is set again afterwards). Returns ``(worker, io, threads)``, ``threads``
    the counts read back inside each thread (``main``: the caller's)."""
    main = torch.get_num_threads()
    n_adam = default_adam_threads() if adam_threads is None else adam_threads
    init = {} if not n_adam else {"initializer": torch.set_num_threads, "initargs": (n_adam,)}
    worker = ThreadPoolExecutor(1, thread_name_prefix="offload-adam", **init)
    io = ThreadPoolExecutor(1, thread_name_prefix="offload-ssd", initializer=torch.set_num_threads, initargs=(1,))
    threads = {"main": main, "adam": worker.submit(torch.get_num_threads).result(),
               "io": io.submit(torch.get_num_threads).result()}
    torch.set_num_threads(main)
    return worker, io, threads


class _Inline:
    """An executor that runs each task at submit (the CPU path: synchronous and deterministic)."""

    def submit(self, fn, *args, **kwargs) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered by result()
            f.set_exception(e)
        return f

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass
class _Layer:
    index: int  # MoE layer index (0..L-1)
    block: int  # decoder block index (trace rows use it)
    module: nn.Module
    names: list[str]
    shapes: dict[str, tuple[int, ...]]  # per expert
    offsets: dict[str, tuple[int, int]]  # name -> (offset, numel) in the flat per-expert vector
    decay: dict[str, bool]
    P: int
    mirror: dict[str, Tensor] = field(default_factory=dict)  # pinned [E, ...] compute dtype
    grads: dict[str, Tensor] = field(default_factory=dict)  # pinned [E, ...] compute dtype
    state: Tensor | None = None  # tier cpu: [E, 3, P] fp32
    leaves: dict[str, Tensor] = field(default_factory=dict)
    acc: dict[str, Tensor] = field(default_factory=dict)  # gradients accumulated since the last step
    used: list[int] | None = None  # experts with tokens in the last forward
    pending: Future | None = None  # the host update of the last step
    h2d_event: object = None  # last copy reading the mirror
    staged: dict[int, Future] = field(default_factory=dict)  # expert -> read of its state (ssd tier)


@dataclass
class _Slot:
    index: int
    tensors: dict[str, Tensor]
    version: list[int]
    layer: int = -1
    ready: object = None


@dataclass(frozen=True)
class _SlotRef:
    layer: int
    name: str
    size: tuple
    stride: tuple
    offset: int
