"""ExpertOffload: the tiered expert store (GPU pool / pinned host / SSD) with 2D prefetch and a CPU AdamW.

Shape legend: L MoE layers, E experts per layer, P parameters per expert (all of its tensors), S GPU
pool slots.

Where each piece of one expert's state lives (placement = ``ParallelPlan.offload``; the full state's
tier is the deeper of ``expert_params`` and ``expert_optimizer``)::

    GPU pool    S slots, each the stacked compute-dtype weights [E, ...] of one layer (bf16 under
                autocast, else the parameter dtype); S = prefetch_depth + 1 (>= 2, double-buffered),
                or L when expert_params == "gpu" (weights stay resident, ZeRO-Offload style).
                Gradients are autograd's tensors of the layer's leaves, copied out after backward.
    host        pinned per layer: weight mirror [E, ...] (compute dtype, what the H2D copies read) and
                gradient buffer [E, ...] (what the D2H copies write);
                tier "cpu": the full fp32 state [E, 3, P] (master, m, v) of every expert;
                tier "ssd": an LFU cache (reference.offload.policy over semoe.lfu_cache) of
                ``cpu_cache_experts`` full states [3, P] per MoE layer, and staging buffers for
                states read ahead of the optimizer.
    SSD         tier "ssd": one checksummed file per expert with its [3, P] fp32 state
                (reference.offload.ssd), written back on eviction, after each update of an uncached
                expert, and on flush().

One step (module forward wrappers + saved-tensor hooks, no change to the model's code)::

    forward layer l   acquire(l): the experts with tokens (one host read of tokens_per_expert_E) must
                      be in l's slot at the current weight version; missing ones are copied now
                      (on-demand misses, counted); the hit table records the routing counts (device);
                      then prefetch layers l+1..l+depth (experts used by that layer last step) on the
                      copy stream after an event on the compute stream; compute waits on the slot's
                      ready event. The experts run on fresh leaves that view the slot; tensors that
                      autograd saves from the slot are replaced by references (pack hook).
    backward layer l  unpack hook: re-acquire l's slot (hit if still there, else fetch) and prefetch
                      layer l-1..l-depth, then hand autograd views of the slot.
    step(lr)          after clipping: the step's routing counts go into the LFU cache (its decisions);
                      D2H of every layer's gradients (copy stream, events), then per layer a host
                      task: [ssd: read uncached states / take staged ones] -> AdamW on the fp32
                      states -> refresh the weight mirror -> [ssd: keep admitted, write back the rest
                      and the evicted ones (I/O thread)];
                      the weight version advances. The next forward's fetch of layer l waits only on
                      layer l's task, so the CPU optimizer of later layers overlaps the GPU's forward.
    vertical prefetch SSD -> host: when layer l's forward starts, its states' reads are queued behind
                      the previous step's writes, so they overlap forward and backward
                      (``prefetch_depth`` > 0; with 0 every read is on demand inside the update).
    horizontal        dense ZeRO-3 gathers belong to reference.parallel.zero3: its block pre-hook
                      issues block l+1's gather before block l computes, and this engine's forward
                      issues layer l+1's expert copies while layer l's experts run; the engine leaves
                      dense parameters alone. In a multi-rank run (reference.train with
                      parallelize) each rank builds the engine on ITS local experts after
                      parallelize(); GradSync.attach_offload makes sync.finish() call
                      :meth:`reduce_grads` (the accumulators all-reduced over the expert-data-parallel
                      group, scaled by 1 / data_parallel like the expert buckets) before clipping and
                      :meth:`step`; :meth:`span` takes ZeRO-3's gather spans into this engine's trace,
                      next to "block_forward" / "expert_compute" rows, so one timeline shows gather
                      l+1 and fetch l+1 issued while block l computes.

On CUDA, copies run on a side stream ordered by events (the host only blocks on a layer's own CPU
update, never on ``torch.cuda.synchronize``); host tasks run on two worker threads (optimizer, SSD
reads). On the CPU the same code runs synchronously (inline executors), so runs are deterministic.
Threads (task hB): the optimizer thread's intra-op team is ``adam_threads`` (default
`reference.offload.cpu_adam.adam_threads`: the cores minus one for the training thread and one for the I/O
thread, which runs single-threaded), set inside each executor thread, so that the three busy host threads
do not oversubscribe the cores; ``stats()`` reports the counts read back inside each thread.

Correctness: AdamW is elementwise, so with ``adam_impl="exact"`` (torch.optim.AdamW's CPU sequence)
the gpu / cpu / ssd placements give bit-identical losses on the CPU; gradient clipping uses the
original parameter order (:meth:`clip_grad_norm_`). Every copy and cache event becomes a
:class:`semoe.trace.TraceRow` (phases h2d_fetch / h2d_demand / d2h_grad / ssd_read / ssd_write /
cpu_adam / cache_hit / cache_miss / cache_admit / cache_evict).

This module is the engine class (its construction, tracing and lifecycle); the rest lives beside it:
`reference.offload.engine_state` (the per-layer records, pool slots and host threads: `EXPERT_TENSORS` and
`host_executors` are re-exported here), `engine_pool` (the GPU pool's copies and the forward / backward hooks) and
`engine_update` (gradients, the step and the host update with its SSD reads and write-backs), both mixed into
:class:`ExpertOffload`.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import Tensor, nn

from reference.offload.engine_pool import PoolMixin
from reference.offload.engine_state import (
    EXPERT_TENSORS,
    _Inline,
    _Layer,
    _Slot,
    host_executors,
)
from reference.offload.engine_update import UpdateMixin
from reference.offload.policy import ExpertCachePolicy
from reference.offload.ssd import SSDStore
from semoe.plan_spec import ParallelPlan
from semoe.trace import TraceRow

# the names other modules and tests import from here (EXPERT_TENSORS and host_executors live in engine_state)
__all__ = ["EXPERT_TENSORS", "ExpertOffload", "host_executors"]


class ExpertOffload(PoolMixin, UpdateMixin):
    """Offload the routed experts of ``model`` (a MoEDecoder) as ``plan.offload`` says; ``device`` is where
    the model computes. The model may still be on the CPU (move it afterwards: the experts' fp32
    weights then never occupy the GPU).

    The expert parameters are removed from the model (so a dense optimizer built afterwards does not
    see them) and updated by :meth:`step`. ``clip_grad_norm_`` clips dense and expert gradients
    together, in the model's original parameter order.

    ``adam_threads`` (CUDA, where the update runs on its own thread): the optimizer thread's intra-op threads;
    None: `reference.offload.cpu_adam.adam_threads` (cores minus the training and I/O threads); 0: torch's
    default, one per core (the engine before task hB). The I/O thread runs with one.
    """

    def __init__(self, model: nn.Module, plan: ParallelPlan, *, device: torch.device | str = "cpu",
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.01,
                 compute_dtype: torch.dtype | None = None, ssd_dir: str | Path | None = None,
                 adam_impl: str | None = None, trace: bool = False, write_hook=None, rank: int = 0,
                 compute_spans: bool = False, adam_threads: int | None = None) -> None:
        off = plan.offload
        placements = {off.expert_params, off.expert_optimizer}
        if placements == {"gpu"}:
            raise ValueError("ExpertOffload: plan.offload keeps experts on the gpu; nothing to offload")
        self.tier = "ssd" if "ssd" in placements else "cpu"
        self.resident = off.expert_params == "gpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.depth = plan.prefetch_depth
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.adam_impl = adam_impl or ("fused" if self.cuda else "exact")
        self.trace = trace
        self.compute_spans = trace and compute_spans  # block_forward / expert_compute rows (2D-prefetch timeline)
        self.rank = rank  # the trace rows' rank column
        self.rows: list[TraceRow] = []
        self._gpu_rows: list[tuple] = []
        self._rows_lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.micro_batch = 0
        self.version = 0  # weight version: advanced by each step()
        self.steps_done = 0
        self.counters = {"h2d_bytes": 0, "d2h_bytes": 0, "fetch_hits": 0, "fetch_misses": 0,
                         "prefetched_experts": 0, "host_wait_s": 0.0, "cpu_adam_s": 0.0}
        if adam_threads is not None and adam_threads < 0:
            raise ValueError(f"ExpertOffload: adam_threads must be >= 0 (0: torch's default), got {adam_threads}")
        self._scratch: dict[str, Tensor] = {}  # the optimizer thread's fp32 upcast of bf16 gradients (adamw_layer_)
        self._clock = threading.Lock()

        blocks = [b for b in getattr(model, "blocks", []) if getattr(b, "is_moe", False)]
        if not blocks:
            raise ValueError("ExpertOffload: the model has no MoE blocks")
        self._orig_order = [n for n, _ in model.named_parameters()]
        self._removed: dict[str, tuple[int, str]] = {}
        self.layers: list[_Layer] = []
        E = None
        for li, blk in enumerate(blocks):
            layer = blk.ffn
            if getattr(layer, "backend", "torch") == "triton":
                layer.backend = "torch"  # the fused Triton path reads the weights itself: use dispatch + experts
            ex = layer.experts
            E = ex.num_experts
            names = [n for n in EXPERT_TENSORS if getattr(ex, n, None) is not None]
            params = {n: getattr(ex, n) for n in names}
            shapes = {n: tuple(params[n].shape[1:]) for n in names}
            offsets, off_ = {}, 0
            for n in names:
                k = math.prod(shapes[n])
                offsets[n] = (off_, k)
                off_ += k
            L = _Layer(li, blk.index, ex, names, shapes, offsets, {n: params[n].dim() >= 2 for n in names}, off_)
            self.layers.append(L)
            prefix = next(pn for pn, p in model.named_parameters() if p is params[names[0]])[: -len(names[0])]
            for n in names:
                self._removed[prefix + n] = (li, n)
        self.E = E
        self.param_dtype = self.layers[0].module.w1_EDF.dtype  # still the model's parameter here
        self.compute_dtype = compute_dtype or self.param_dtype
        pin = self.cuda

        self.policy = ExpertCachePolicy(len(self.layers), E, plan.cpu_cache_experts if self.tier == "ssd" else 0,
                                        beta=plan.cache_decay, every=plan.cache_decay_every,
                                        threshold=plan.cache_admit_hits, device=self.device)
        self.cache: dict[tuple[int, int], Tensor] = {}
        self.dirty: set[tuple[int, int]] = set()
        self.ssd = None
        if self.tier == "ssd":
            if ssd_dir is None:
                raise ValueError("ExpertOffload: expert states on 'ssd' need ssd_dir")
            self.ssd = SSDStore(ssd_dir, write_hook=write_hook, on_io=self._host_io)

        # host buffers and initial states (from the model's initialised parameters)
        for L in self.layers:
            ex = L.module
            init = {n: getattr(ex, n).detach().to("cpu", torch.float32) for n in L.names}
            for n in L.names:
                L.mirror[n] = torch.empty((E, *L.shapes[n]), dtype=self.compute_dtype, pin_memory=pin)
                L.mirror[n].copy_(init[n])
                L.grads[n] = torch.zeros((E, *L.shapes[n]), dtype=self.compute_dtype, pin_memory=pin)
            flat = torch.zeros(E, 3, L.P, dtype=torch.float32)
            for n in L.names:
                o, k = L.offsets[n]
                flat[:, 0, o : o + k] = init[n].reshape(E, k)
            if self.tier == "cpu":
                L.state = flat.pin_memory() if pin else flat
            else:
                self.ssd.write_many(((L.index, e), flat[e]) for e in range(E))
            for n in L.names:  # the parameters leave the model
                del ex._parameters[n]
                setattr(ex, n, None)
            L.module.forward = self._wrap_forward(L, type(ex).forward.__get__(ex))
        if self.ssd is not None:
            self.ssd.flush_manifest(0)
        self.step_count = 0

        # GPU pool
        nslots = len(self.layers) if self.resident else max(2, self.depth + 1)
        self.slots = [
            _Slot(s, {n: torch.zeros((E, *L0.shapes[n]), dtype=self.compute_dtype, device=self.device)
                      for n, L0 in ((n, self.layers[0]) for n in self.layers[0].names)}, [-1] * E)
            for s in range(nslots)
        ]
        if any(L.shapes != self.layers[0].shapes for L in self.layers):
            raise ValueError("ExpertOffload: every MoE layer must have the same expert shapes")
        self._ptr = {t.untyped_storage().data_ptr(): (s.index, n) for s in self.slots for n, t in s.tensors.items()}
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self._base_event = torch.cuda.Event(enable_timing=True)
            self._base_event.record()
            self._worker, self._io, self.threads = host_executors(adam_threads)
        else:
            self.copy_stream = None
            self._worker = self._io = _Inline()
            n = torch.get_num_threads()
            self.threads = {"main": n, "adam": n, "io": n}  # inline: every task runs on the calling thread
        self._in_backward: set[int] = set()
        self._writes: list[Future] = []
        if self.compute_spans:  # compute spans of every block (forward), for the 2D-prefetch timeline
            for blk in getattr(model, "blocks", []):
                marks: list = []
                blk.register_forward_pre_hook(lambda m, a, marks=marks: marks.append(self._compute_mark()))
                blk.register_forward_hook(lambda m, a, o, marks=marks, b=blk.index: self._gpu_span_end(
                    "block_forward", b, marks.pop(), 0, "compute", self._compute_stream()))

    # ------------------------------------------------------------------------------ tracing
    def _now(self) -> float:
        return time.perf_counter() - self.t0

    def _row(self, phase: str, layer: int, start: float, end: float, nbytes: int = 0, resource: str = "cpu") -> None:
        if self.trace:
            with self._rows_lock:
                self.rows.append(TraceRow(self.rank, layer, self.micro_batch, phase, start, max(start, end),
                                          int(nbytes), 0, resource))

    def _host_io(self, kind: str, key, nbytes: int, t0: float, t1: float) -> None:
        self._row(kind, self.layers[key[0]].block, t0 - self.t0, t1 - self.t0, nbytes, "ssd")

    def _gpu_span_start(self, stream):
        if not (self.trace and self.cuda):
            return self._now()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _gpu_span_end(self, phase: str, layer: int, start, nbytes: int, resource: str, stream) -> None:
        if not self.trace:
            return
        if not self.cuda:
            self._row(phase, layer, start, self._now(), nbytes, resource)
            return
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        with self._rows_lock:
            self._gpu_rows.append((phase, layer, start, ev, nbytes, resource, self.micro_batch))

    def _compute_stream(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def _compute_mark(self):
        return self._gpu_span_start(self._compute_stream())

    def span(self, phase: str, layer: int, nbytes: int, start, end, resource: str = "network") -> None:
        """A span from outside the engine (ZeRO-3's ``on_span``: gathers and their exposed waits) in this
        engine's trace: ``start``/``end`` are ``time.perf_counter()`` floats or timing CUDA events."""
        if not self.trace:
            return
        if isinstance(start, float):
            self._row(phase, layer, start - self.t0, end - self.t0, nbytes, resource)
            return
        with self._rows_lock:
            self._gpu_rows.append((phase, layer, start, end, nbytes, resource, self.micro_batch))

    def trace_rows(self) -> list[TraceRow]:
        """All rows so far (resolves the CUDA event timings: call after a synchronising point)."""
        if self._gpu_rows:
            torch.cuda.synchronize(self.device)
            for phase, layer, e0, e1, nbytes, res, mb in self._gpu_rows:
                s = self._base_event.elapsed_time(e0) / 1e3
                e = self._base_event.elapsed_time(e1) / 1e3
                self.rows.append(TraceRow(self.rank, layer, mb, phase, s, max(s, e), int(nbytes), 0, res))
            self._gpu_rows.clear()
        return sorted(self.rows, key=lambda r: (r.start_s, r.phase))

    # ------------------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        """Wait for every queued host update and SSD write-back (raising the first failure)."""
        for L in self.layers:
            self._wait_update(L)
        self._drain_writes()

    def flush(self) -> None:
        """Write every dirty cached state to the SSD (all or none) and record the manifest."""
        self.wait()
        if self.ssd is None:
            return
        keys = sorted(self.dirty)
        self.ssd.write_many((k, self.cache[k]) for k in keys)
        self.dirty.clear()
        self.ssd.flush_manifest(self.step_count)

    def close(self) -> None:
        self.wait()
        for ex in (self._worker, self._io):
            ex.shutdown(wait=True)

    def master_weights(self, li: int) -> dict[str, Tensor]:
        """Layer ``li``'s fp32 master weights ([E, ...] per tensor), gathered from whichever tier holds them."""
        self.wait()
        L = self.layers[li]
        out = {n: torch.empty((self.E, *L.shapes[n]), dtype=torch.float32) for n in L.names}
        for e in range(self.E):
            if self.tier == "cpu":
                st = L.state[e]
            elif (li, e) in self.cache:
                st = self.cache[(li, e)]
            else:
                st = self.ssd.read((li, e), torch.empty(3, L.P, dtype=torch.float32))
            for n in L.names:
                o, k = L.offsets[n]
                out[n][e].reshape(k).copy_(st[0, o : o + k])
        return out

    def stats(self) -> dict[str, float]:
        s = dict(self.counters)
        s.update(self.policy.stats())
        total = s["fetch_hits"] + s["fetch_misses"]
        s["fetch_hit_rate"] = s["fetch_hits"] / total if total else 0.0
        if self.ssd is not None:
            s["ssd_read_bytes"], s["ssd_write_bytes"] = self.ssd.bytes_read, self.ssd.bytes_written
        s["steps"] = self.steps_done
        s.update({f"threads_{k}": v for k, v in self.threads.items()})
        return s
