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
"""

from __future__ import annotations

import functools
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from reference.offload.cpu_adam import adam_threads as default_adam_threads
from reference.offload.cpu_adam import adamw_layer_
from reference.offload.policy import ExpertCachePolicy
from reference.offload.ssd import SSDStore
from semoe.plan_spec import ParallelPlan
from semoe.trace import TraceRow

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


class ExpertOffload:
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

    # ------------------------------------------------------------------------------ pool
    def _slot_of(self, li: int) -> _Slot:
        return self.slots[li % len(self.slots)]

    def _wait_update(self, L: _Layer) -> None:
        if L.pending is not None:
            t = time.perf_counter()
            L.pending.result()
            L.pending = None
            self.counters["host_wait_s"] += time.perf_counter() - t

    def _copy_in(self, slot: _Slot, L: _Layer, experts: list[int], phase: str) -> None:
        """Copy ``experts`` of layer ``L`` from the host mirror into ``slot`` (copy stream on CUDA)."""
        self._wait_update(L)
        free = None
        if self.cuda and experts:
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))  # the previous occupant's kernels are queued
        self._fill(slot, L, experts, phase, self.version, free)

    def _fill(self, slot: _Slot, L: _Layer, experts: list[int], phase: str, version: int, free) -> None:
        """The copies themselves; ``free``: a compute-stream event after which ``slot`` may be overwritten."""
        if slot.layer != L.index:
            slot.layer, slot.version = L.index, [-1] * self.E
        if not experts:
            return
        nbytes = sum(L.mirror[n][0].numel() * L.mirror[n].element_size() for n in L.names) * len(experts)
        whole = len(experts) == self.E

        def copies(non_blocking: bool) -> None:
            for n in L.names:
                if whole:
                    slot.tensors[n].copy_(L.mirror[n], non_blocking=non_blocking)
                else:
                    for e in experts:
                        slot.tensors[n][e].copy_(L.mirror[n][e], non_blocking=non_blocking)

        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(free)
                t = self._gpu_span_start(self.copy_stream)
                copies(True)
                self._gpu_span_end(phase, L.block, t, nbytes, "pcie_h2d", self.copy_stream)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
            slot.ready = L.h2d_event = ready
        else:
            t = self._now()
            copies(False)
            self._row(phase, L.block, t, self._now(), nbytes, "pcie_h2d")
        for e in experts:
            slot.version[e] = version
        with self._clock:
            self.counters["h2d_bytes"] += nbytes

    def _missing(self, slot: _Slot, L: _Layer, experts: list[int]) -> list[int]:
        if slot.layer != L.index:
            return list(experts)
        return [e for e in experts if slot.version[e] != self.version]

    def _prefetch(self, li: int, free=None) -> None:
        """Copy layer ``li``'s experts (those it used last step) into its slot ahead of use. ``free``: a
        compute-stream event after which the slot's previous occupant is no longer read (default: now)."""
        if not 0 <= li < len(self.layers):
            return
        L = self.layers[li]
        self._wait_update(L)
        slot = self._slot_of(li)
        want = L.used if L.used is not None else list(range(self.E))
        if self.resident:
            want = list(range(self.E))
        missing = self._missing(slot, L, want)
        if free is None:
            self._copy_in(slot, L, missing, "h2d_fetch")
        else:
            self._fill(slot, L, missing, "h2d_fetch", self.version, free)
        self.counters["prefetched_experts"] += len(missing)

    def _acquire(self, L: _Layer, needed: list[int], backward: bool):
        """Make ``needed`` experts of L resident in its slot (on-demand copies of misses); the compute
        stream waits for them. Returns (slot, prefetch): calling ``prefetch()`` issues the copies of the
        next ``depth`` layers (the forward calls it after launching L's experts, so that waiting for a
        later layer's CPU update never delays L's kernels; their copies still only wait for an event
        recorded here, before L's kernels)."""
        self._wait_update(L)
        slot = self._slot_of(L.index)
        missing = self._missing(slot, L, needed)
        if missing:
            self._copy_in(slot, L, missing, "h2d_demand")
        self.counters["fetch_misses"] += len(missing)
        self.counters["fetch_hits"] += len(needed) - len(missing)
        if self.cuda and slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        targets = []
        if self.depth or self.resident:
            targets = [L.index - k if backward else L.index + k for k in range(1, max(self.depth, 1) + 1)]
        free = None
        if self.cuda and targets:
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))

        def prefetch() -> None:
            for li in targets:
                self._prefetch(li, free)

        return slot, prefetch

    # ------------------------------------------------------------------------------ forward / backward hooks
    def _wrap_forward(self, L: _Layer, orig):
        def forward(x: Tensor, tokens_per_expert_E: Tensor | None = None) -> Tensor:
            if L.index == 0:
                self._in_backward.clear()
            if tokens_per_expert_E is not None and x.dim() == 2:
                needed = [e for e, c in enumerate(tokens_per_expert_E.tolist()) if c > 0]
                self.policy.record(L.index, tokens_per_expert_E)
            else:
                needed = list(range(self.E))
                self.policy.record(L.index, torch.full((self.E,), float(x.shape[1]), device=self.device))
            if self.tier == "ssd" and self.depth:
                self._worker.submit(self._stage_reads, L)  # SSD -> host, behind last step's writes
            slot, prefetch = self._acquire(L, needed, backward=False)
            L.used = needed
            grad = torch.is_grad_enabled()
            for n in L.names:
                leaf = slot.tensors[n].detach().requires_grad_(grad)
                if grad:
                    leaf.register_post_accumulate_grad_hook(functools.partial(self._on_grad, L, n))
                setattr(L.module, n, leaf)
                L.leaves[n] = leaf
            if x.dtype != self.compute_dtype and torch.is_autocast_enabled(x.device.type):
                x = x.to(self.compute_dtype)
            t = self._compute_mark() if self.compute_spans else None
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                y = orig(x, tokens_per_expert_E)
            if self.compute_spans:
                self._gpu_span_end("expert_compute", L.block, t, 0, "compute", self._compute_stream())
            prefetch()  # after L's kernels are queued (see _acquire)
            return y

        return forward

    def _on_grad(self, L: _Layer, name: str, leaf: Tensor) -> None:
        """A micro-batch's gradient of one expert tensor: folded into L.acc (fp32 from the second one
        on, as AccumulateGrad would for an fp32 master parameter); the leaf lets go of it."""
        g, leaf.grad = leaf.grad, None
        prev = L.acc.get(name)
        if prev is None:
            L.acc[name] = g
        else:
            L.acc[name] = (prev if prev.dtype == torch.float32 else prev.float()).add_(g)

    def _pack(self, t: Tensor):
        if t.device.type != self.device.type or t.layout != torch.strided:
            return t
        hit = self._ptr.get(t.untyped_storage().data_ptr())
        if hit is None:
            return t
        slot = self.slots[hit[0]]
        return _SlotRef(slot.layer, hit[1], tuple(t.size()), tuple(t.stride()), t.storage_offset())

    def _unpack(self, obj):
        if not isinstance(obj, _SlotRef):
            return obj
        L = self.layers[obj.layer]
        first = obj.layer not in self._in_backward
        self._in_backward.add(obj.layer)
        if first or self._missing(self._slot_of(L.index), L, L.used or []):
            slot, prefetch = self._acquire(L, L.used if L.used is not None else list(range(self.E)), backward=True)
            prefetch()
        else:
            slot = self._slot_of(L.index)
        return slot.tensors[obj.name].as_strided(obj.size, obj.stride, obj.offset)

    # ------------------------------------------------------------------------------ gradients and the step
    def expert_grads(self) -> list[Tensor]:
        """This step's expert gradients (the accumulators) in the model's original parameter order."""
        out = []
        for name in self._orig_order:
            if name in self._removed:
                li, n = self._removed[name]
                g = self.layers[li].acc.get(n)
                if g is not None:
                    out.append(g)
        return out

    def reduce_grads(self, group, scale: float) -> None:
        """Multi-rank: scale every accumulator by ``scale`` (1 / data_parallel) and all-reduce it (sum) over
        ``group`` (a reference.parallel.groups.Group: the ranks holding replicas of these experts), in place,
        before clipping and the D2H copy of :meth:`step`: what the trainer's expert GradBuckets do for
        experts on the GPU tier. Low-precision accumulators are reduced in fp32 when the group has more
        than one rank (the host update then reads fp32 gradients)."""
        for L in self.layers:
            if len(L.acc) != len(L.names):
                raise RuntimeError(f"ExpertOffload.reduce_grads: MoE layer {L.index} has no gradients (no backward)")
            for n in L.names:
                g = L.acc[n]
                if group.size > 1 and g.dtype in (torch.bfloat16, torch.float16):
                    g = L.acc[n] = g.float()
                if scale != 1.0:
                    g.mul_(scale)
                if group.size > 1:
                    import torch.distributed as dist

                    dist.all_reduce(g, group=group.pg)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over dense and expert gradients, in the original parameter
        order (the same total norm, clip factor and in-place scaling, so the same bits)."""
        live = dict(model.named_parameters())
        grads = []
        for name in self._orig_order:
            if name in self._removed:
                li, n = self._removed[name]
                g = self.layers[li].acc.get(n)
            else:
                p = live.get(name)
                g = None if p is None else p.grad
            if g is not None:
                grads.append(g)
        total = torch.nn.utils.get_total_norm(grads)
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        groups: dict[tuple, list[Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), gs in groups.items():
            torch._foreach_mul_(gs, coef.to(device))
        return total

    def step(self, lr: float) -> None:
        """Queue the expert update of this step (after backward and clipping); returns at once on CUDA."""
        self.step_count += 1
        res, _ = self.policy.end_step()  # the step's routing counts -> LFU decisions (one small host read)
        now, nbytes = self._now(), [12 * L.P for L in self.layers]
        for phase, keys in (("cache_hit", res.hits), ("cache_miss", res.misses), ("cache_admit", res.admitted),
                            ("cache_evict", res.evicted)):
            for li, _e in keys:
                self._row(phase, self.layers[li].block, now, now, nbytes[li], "cpu_cache")
        decisions = (set(res.admitted), set(res.evicted))
        ahead = len(self.layers) if self.resident else min(self.depth, len(self.layers))
        for L in self.layers:
            self._wait_update(L)
            grads = dict(L.acc)
            if len(grads) != len(L.names):
                raise RuntimeError(f"ExpertOffload.step: MoE layer {L.index} has no gradients (no backward this step)")
            for n, g in grads.items():
                if L.grads[n].dtype != g.dtype:  # accumulated micro-batches: fp32 host buffer from now on
                    L.grads[n] = torch.empty(L.grads[n].shape, dtype=g.dtype, pin_memory=self.cuda)
            nbytes = sum(g.numel() * g.element_size() for g in grads.values())
            event = None
            if self.cuda:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.copy_stream):
                    self.copy_stream.wait_event(done)
                    t = self._gpu_span_start(self.copy_stream)
                    for n, g in grads.items():
                        g.record_stream(self.copy_stream)
                        L.grads[n].copy_(g, non_blocking=True)
                    self._gpu_span_end("d2h_grad", L.block, t, nbytes, "pcie_d2h", self.copy_stream)
                    event = torch.cuda.Event()
                    event.record(self.copy_stream)
            else:
                t = self._now()
                for n, g in grads.items():
                    L.grads[n].copy_(g)
                self._row("d2h_grad", L.block, t, self._now(), nbytes, "pcie_d2h")
            self.counters["d2h_bytes"] += nbytes
            for n in L.names:
                setattr(L.module, n, None)
            L.leaves, L.acc = {}, {}
            fetch = None
            if self._writes:  # surface failed write-backs of earlier steps (full disk) at the next step
                with self._clock:
                    failed = [f for f in self._writes if f.done() and f.exception() is not None]
                    self._writes = [f for f in self._writes if not f.done()]
                if failed:
                    failed[0].result()
            if L.index < ahead:  # the next forward's first layers: copied as soon as they are updated
                free = None
                if self.cuda:
                    free = torch.cuda.Event()
                    free.record(torch.cuda.current_stream(self.device))
                want = list(range(self.E)) if self.resident or L.used is None else L.used
                fetch = (self._slot_of(L.index), want, free, self.version + 1)
            L.pending = self._worker.submit(self._update, L, lr, self.step_count, event, decisions, fetch)
            if not self.cuda:
                L.pending.result()  # inline: raise a failed update (corrupt block, full disk) here
        self.version += 1
        self.steps_done += 1
        self.micro_batch += 1

    def _adam(self, L: _Layer, flats: list[tuple[int, Tensor]], lr: float, step: int) -> None:
        """AdamW on the [3, P] states ``flats`` (expert, state) of layer L; refreshes the mirror
        (`reference.offload.cpu_adam.adamw_layer_`, which the benchmark also times as the engine's CPU rate)."""
        adamw_layer_(flats, L.grads, L.mirror, L.offsets, L.decay, step=step, lr=lr, beta1=self.beta1,
                     beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay, impl=self.adam_impl,
                     scratch=self._scratch)

    def _stage_reads(self, L: _Layer) -> None:
        """Queue reads of L's uncached states (runs on the optimizer thread, after last step's writes)."""
        for e in range(self.E):
            key = (L.index, e)
            if key not in self.cache and e not in L.staged:
                L.staged[e] = self._io.submit(self.ssd.read, key, torch.empty(3, L.P, dtype=torch.float32))

    def _update(self, L: _Layer, lr: float, step: int, d2h_event, decisions, fetch=None) -> None:
        self._update_states(L, lr, step, d2h_event, decisions)
        if fetch is not None:
            slot, want, free, version = fetch
            self._fill(slot, L, want, "h2d_fetch", version, free)
            with self._clock:
                self.counters["prefetched_experts"] += len(want)

    def _update_states(self, L: _Layer, lr: float, step: int, d2h_event, decisions) -> None:
        if d2h_event is not None:
            d2h_event.synchronize()
        if L.h2d_event is not None:  # the last H2D copy out of the mirror must be done before we rewrite it
            L.h2d_event.synchronize()
        t = time.perf_counter()
        if self.tier == "cpu":
            self._adam(L, [(e, L.state[e]) for e in range(self.E)], lr, step)
            self._row("cpu_adam", L.block, t - self.t0, self._now(), 16 * L.P * self.E, "cpu")
            with self._clock:
                self.counters["cpu_adam_s"] += time.perf_counter() - t
            return
        admitted, evicted = decisions
        states = []
        for e in range(self.E):  # every expert is updated (AdamW on stacked parameters does that too)
            key = (L.index, e)
            if key in self.cache:
                states.append((e, self.cache[key]))
                continue
            fut = L.staged.pop(e, None)
            if fut is None:  # on demand, through the I/O queue (behind pending write-backs of this key)
                fut = self._io.submit(self.ssd.read, key, torch.empty(3, L.P, dtype=torch.float32))
            states.append((e, fut.result()))
        L.staged.clear()
        ta = time.perf_counter()
        self._adam(L, states, lr, step)
        self._row("cpu_adam", L.block, ta - self.t0, self._now(), 16 * L.P * self.E, "cpu")
        with self._clock:
            self.counters["cpu_adam_s"] += time.perf_counter() - ta
        for e, st in states:
            key = (L.index, e)
            if key in evicted and key in self.cache:  # the LFU cache let it go: back to the SSD
                del self.cache[key]
                self.dirty.discard(key)
                self._write_back(key, st)
            elif key in self.cache or key in admitted:
                self.cache[key] = st
                self.dirty.add(key)
            else:
                self._write_back(key, st)

    def _write_back(self, key, state: Tensor) -> None:
        """Queue a block write on the I/O thread (FIFO: later reads of the key come after it)."""
        f = self._io.submit(self.ssd.write, key, state)
        with self._clock:
            self._writes.append(f)
        if f.done():
            f.result()  # inline executor (CPU): raise a failed write now

    def _drain_writes(self) -> None:
        with self._clock:
            writes, self._writes = self._writes, []
        for f in writes:
            f.result()

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
