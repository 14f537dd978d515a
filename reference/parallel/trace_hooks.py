"""Wall-clock phase traces of a training step as :class:`semoe.trace.TraceRow` rows, attached from outside.

Phases (``resource``): ``route`` (gate forward, compute), ``dispatch`` / ``combine`` (the dispatcher,
network, bytes = rows x D x element size moved), ``expert_compute`` (experts forward, compute),
``forward``, ``backward``, ``grad_bucket_dense`` / ``grad_bucket_experts`` (start to wait of one bucket,
network), ``gather_fwd`` / ``gather_bwd`` (ZeRO-3 parameter gathers, issue to ready), ``optimizer``. Time is seconds since the tracer's creation on this rank; on CUDA every
boundary synchronises the device (tracing perturbs the run; it is off by default).
The simulator emits the same phases, so measured and predicted timelines share one schema.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn

from semoe.trace import TraceRow


class Tracer:
    def __init__(self, rank: int, cuda: bool = False) -> None:
        self.rank, self.cuda = rank, cuda
        self.rows: list[TraceRow] = []
        self.t0 = time.perf_counter()
        self.micro_batch = -1  # the training loop sets the step here

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0

    def add(self, phase: str, start_s: float, end_s: float, *, layer: int = -1, resource: str = "compute",
            nbytes: int = 0, flops: int = 0) -> None:
        self.rows.append(TraceRow(self.rank, layer, self.micro_batch, phase, start_s, max(end_s, start_s),
                                  int(nbytes), int(flops), resource))

    @contextmanager
    def span(self, phase: str, **kw):
        t = self.now()
        yield
        self.add(phase, t, self.now(), **kw)

    def bucket_hook(self, kind: str, index: int, nbytes: int, start_s: float, end_s: float) -> None:
        """``on_bucket`` callback of :func:`reference.parallel.parallelize.parallelize` (perf_counter times)."""
        self.add(f"grad_bucket_{kind}", start_s - self.t0, end_s - self.t0, layer=index, resource="network",
                 nbytes=nbytes)

    def gather_hook(self, phase: str, unit: int, nbytes: int, start_s: float, end_s: float) -> None:
        """``on_gather`` callback: a ZeRO-3 parameter gather (issue to ready) of block ``unit`` (-1: root)."""
        self.add(phase, start_s - self.t0, end_s - self.t0, layer=unit, resource="network", nbytes=nbytes)


def instrument_moe(model: nn.Module, tracer: Tracer) -> None:
    """Time the gate, dispatch, experts and combine of every MoE block of ``model`` (forward)."""
    blocks = getattr(model, "blocks", None)
    layers = [(b.index, b.ffn) for b in blocks if getattr(b, "is_moe", False)] if blocks is not None else []
    for index, layer in layers:
        _time_module(layer.gate, "route", index, tracer)
        _time_module(layer.experts, "expert_compute", index, tracer)
        d = layer.dispatcher
        d.dispatch = _timed(d.dispatch, "dispatch", index, tracer, lambda out: out[0])
        d.combine = _timed(d.combine, "combine", index, tracer, lambda out: out)


def _time_module(m: nn.Module, phase: str, layer: int, tracer: Tracer) -> None:
    start: list[float] = []
    m.register_forward_pre_hook(lambda *_: start.append(tracer.now()))
    m.register_forward_hook(lambda *_: tracer.add(phase, start.pop(), tracer.now(), layer=layer))


def _timed(fn, phase: str, layer: int, tracer: Tracer, tensor_of):
    def wrapper(*args, **kwargs):
        t = tracer.now()
        out = fn(*args, **kwargs)
        x = tensor_of(out)
        tracer.add(phase, t, tracer.now(), layer=layer, resource="network", nbytes=x.numel() * x.element_size())
        return out

    return wrapper
