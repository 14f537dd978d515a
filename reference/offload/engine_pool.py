"""The offload engine's GPU pool and its module hooks (`reference.offload.engine.ExpertOffload`, mixed in): which
layer a slot holds and at which weight version, the H2D copies into it (on demand and prefetched, on the copy
stream after events on CUDA), and the forward wrapper, gradient hook and saved-tensor hooks that make the
experts compute on slot views without changing the model's code (the engine's docstring: "One step")."""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from reference.offload.engine_state import _Layer, _Slot, _SlotRef


class PoolMixin:
    """`ExpertOffload`'s pool methods (its ``__init__`` builds the slots, the streams and the counters they use)."""

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
