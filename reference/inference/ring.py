"""Ring memory and the expert cache: where one MoE block's experts live on the device when they run.

Shape legend: E experts per block, C expert slots on the device, K ring slots (one block's E experts
each), L MoE blocks, D model dim, F expert hidden width.

One device pool (:class:`ExpertPool`) holds C expert slots, one ``[C, ...]`` tensor per expert
tensor name (``w1_EDF`` -> ``[C, D, F]`` ...). Ring slot ``k`` is the E consecutive expert slots
``[k*E, (k+1)*E)``; expert-aware mode uses the C slots one expert at a time. A registry maps each slot
to the ``(block, expert)`` it holds, so the two mechanisms can share the pool.

Ring memory (SE-MoE, arXiv 2205.10034, "ring memory"; ../shared/SEMOE.md "Inference mechanisms")::

    prologue: load blocks 0..K-1 into slots 0..K-1                          (copy stream)
    for g = 0, 1, 2, ... (MoE block b = blocks[g % L], over layers and over forward passes):
        compute stream waits load_done[g % K]; block b computes from slot g % K   "compute"
        compute_done[g % K] = event on the compute stream                          "release"
        copy stream waits compute_done[g % K]; copies block blocks[(g+K) % L]      "load"
            into slot g % K; load_done[g % K] = event on the copy stream

Only CUDA events order the two streams: no device-wide synchronisation in the loop. With K = L every
block keeps its slot forever and nothing is copied after the first pass (that is resident mode). On
the CPU the same code runs with no-op streams and events: copies are synchronous ``copy_``.

Expert-aware mode (:meth:`ExpertPool.fetch`): after a block's router, only the experts it picked are
needed; the ones not cached are copied into the least-recently-used slots not needed by this block
(GPU-side LRU over ``(block, expert)``), then the block computes with routing remapped to slot ids.

Quantized experts (``ExpertPool(quant="int8" | "fp8")``, :mod:`reference.inference.quantize`): the
host copy is ``ModelStore.quantized_layers(fmt)`` (pinned), and the slots hold what is copied: 1-byte
data ``w1_EDF`` ``[C, I, O]``, fp32 scales ``w1_EDF:scale`` ``[C, 1, O]`` and biases as stored, so a
copy moves about half the bf16 bytes (``expert_nbytes`` counts data + scales + biases). Before a
block computes, its experts are dequantized on the compute stream (:func:`dequantize_into`, after the
wait for their copy) into one ``[E, ...]`` workspace per tensor in the store dtype: ring group ``k``
row by expert, or in expert-aware mode the fetched slots in the order of ``needed`` (the engine
remaps routing to those rows). The workspace is only read by the grouped FFN on the same stream, so
reusing it per block needs no event; the copy into a slot still waits for ``compute_done`` as before.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor

from reference.inference.quantize import (
    FORMATS,
    WEIGHT_TENSORS,
    QuantizedTensor,
    dequantize_into,
    raw,
    scale_key,
)
from reference.inference.store import ModelStore
from semoe.expert_slots import ExpertSlots
from semoe.trace import TraceRow


class DeviceSync:
    """The compute stream, a copy stream and events between them; no-ops on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if self.cuda else None
        self.copy = torch.cuda.Stream(device) if self.cuda else None

    def record(self, stream) -> torch.cuda.Event | None:
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    @staticmethod
    def wait(stream, event) -> None:
        if event is not None and stream is not None:
            stream.wait_event(event)

    def on_copy(self):
        return torch.cuda.stream(self.copy) if self.cuda else contextlib.nullcontext()

    def cross_wait(self) -> None:
        """Each stream waits for all work already queued on the other (used when switching mechanisms)."""
        if self.cuda:
            c, k = self.record(self.compute), self.record(self.copy)
            self.copy.wait_event(c)
            self.compute.wait_event(k)


class Timeline:
    """Intervals on the compute and copy streams as trace rows: CUDA events (resolved once at the
    end, one synchronisation) or wall clock on the CPU."""

    def __init__(self, sync: DeviceSync, enabled: bool = True) -> None:
        self.sync, self.enabled = sync, enabled
        self.spans: list[tuple] = []
        self.micro_batch = -1
        self.t0 = time.perf_counter()
        self.base = None
        if enabled and sync.cuda:
            self.base = torch.cuda.Event(enable_timing=True)
            self.base.record(sync.compute)

    def mark(self, stream):
        if not self.enabled:
            return None
        if self.sync.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(stream)
            return ev
        return time.perf_counter()

    def add(self, start, end, phase: str, layer: int, resource: str, nbytes: int = 0, flops: int = 0) -> None:
        if self.enabled:
            self.spans.append((start, end, phase, layer, self.micro_batch, resource, int(nbytes), int(flops)))

    def rows(self, rank: int = 0) -> list[TraceRow]:
        if self.sync.cuda and self.spans:
            torch.cuda.synchronize(self.sync.device)  # once, after the run
        out = []
        for start, end, phase, layer, mb, resource, nbytes, flops in self.spans:
            if self.sync.cuda:
                s, e = self.base.elapsed_time(start) / 1e3, self.base.elapsed_time(end) / 1e3
            else:
                s, e = start - self.t0, end - self.t0
            out.append(TraceRow(rank, layer, mb, phase, s, max(e, s), nbytes, flops, resource))
        return out


def _empty_like_layout(t: Tensor, capacity: int, device) -> Tensor:
    """``[capacity, *t.shape[1:]]`` on ``device`` with ``t``'s layout (k-major quantized weights stay
    k-major, so slot <- host copies are plain memcpys of the physical tensors)."""
    shape = (capacity, *t.shape[1:])
    if t.dim() >= 3 and not t.is_contiguous() and t.mT.is_contiguous():
        return torch.empty((*shape[:-2], shape[-1], shape[-2]), dtype=t.dtype, device=device).mT
    return torch.empty(shape, dtype=t.dtype, device=device)


class ExpertPool:
    """C device expert slots shared by the ring and the expert cache, filled from a :class:`ModelStore`."""

    def __init__(self, store: ModelStore, capacity: int, device: torch.device, sync: DeviceSync,
                 timeline: Timeline | None = None, quant: str | None = None, fused: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"ExpertPool: capacity must be >= 1 expert slot, got {capacity}")
        if quant is not None and quant not in FORMATS:
            raise ValueError(f"ExpertPool: quant must be None or one of {FORMATS}, got {quant!r}")
        self.store, self.capacity, self.device, self.sync = store, capacity, device, sync
        self.timeline = timeline
        self.E = store.spec.experts
        self.quant = quant
        self.fused = fused and quant is not None  # ring groups computed from quantized bytes directly
        if quant is None:
            self.tensors: dict[str, Tensor] = {
                name: torch.empty((capacity, *t["shape"][1:]), dtype=store.dtype, device=device)
                for name, t in store.expert_table.items()
            }
            self.src = {b: store.layer_views(b) for b in store.moe_blocks}  # host (pinned) views
            self.expert_nbytes = sum(t["nbytes"] for t in store.expert_table.values()) // self.E
        else:  # slots hold the quantized data + scales (+ biases); computed from a dequantized workspace
            self.src = {b: ql.host_tensors() for b, ql in store.quantized_layers(quant).items()}
            first = self.src[store.moe_blocks[0]]
            self.tensors = {name: _empty_like_layout(t, capacity, device) for name, t in first.items()}
            self.expert_nbytes = sum(t.numel() * t.element_size() for t in first.values()) // self.E
            # one block's experts in the compute dtype: what the grouped FFN reads (E rows)
            self.workspace: dict[str, Tensor] = {
                name: torch.empty(t["shape"], dtype=store.dtype, device=device)
                for name, t in store.expert_table.items()
            }
        if sync.cuda:  # written on the copy stream: not reused by the allocator before those copies finish
            for t in self.tensors.values():
                t.record_stream(sync.copy)
        self.slots = ExpertSlots(capacity, self.E)  # owner / where / LRU bookkeeping (semoe)
        self.owner, self.where, self.lru = self.slots.owner, self.slots.where, self.slots.lru
        self.bytes_copied = 0
        self.copies = 0
        self.hits = self.misses = 0
        self.inflight: set[tuple[int, int]] = set()  # prefetched keys whose copy may still run
        self.inflight_event = None
        self.prefetched = self.prefetch_used = 0

    @property
    def nbytes(self) -> int:
        ws = self.workspace.values() if self.quant else ()
        return sum(t.numel() * t.element_size() for t in (*self.tensors.values(), *ws))

    # ------------------------------------------------------------------------ compute views
    def _dequantize_rows(self, rows: list[tuple[int, int]] | None, k: int | None = None) -> dict[str, Tensor]:
        """Quantized mode: dequantize into the workspace (on the current, i.e. compute, stream) either
        ring group ``k`` (workspace row e = slot k*E + e) or ``rows`` ``[(workspace row, slot)]``."""
        ws = self.workspace
        for name, out in ws.items():
            src = self.tensors[name]
            if name in WEIGHT_TENSORS:
                scale = self.tensors[scale_key(name)]
                if k is not None:
                    sl = slice(k * self.E, (k + 1) * self.E)
                    dequantize_into(out, QuantizedTensor(src[sl], scale[sl], self.quant, out.dtype))
                else:
                    for r, slot in rows:
                        dequantize_into(out[r], QuantizedTensor(src[slot], scale[slot], self.quant, out.dtype))
            elif k is not None:
                out.copy_(src[k * self.E : (k + 1) * self.E])
            else:
                for r, slot in rows:
                    out[r].copy_(src[slot])
        return ws

    def group_weights(self, k: int) -> dict[str, Tensor]:
        """Ring slot ``k``'s experts ready for the grouped FFN (``[E, ...]``): the slot's views, or
        (quantized) the workspace after dequantizing the slot into it, or (quantized, ``fused``) the
        slot's quantized views (data ``w1_EDF``, scales ``w1_EDF:scale``) for a fused-dequant GEMM."""
        if self.quant is None or self.fused:
            return self.group_views(k)
        return self._dequantize_rows(None, k)

    def slot_weights(self, slots: list[int]) -> dict[str, Tensor]:
        """Quantized expert-aware mode: workspace row ``i`` = slot ``slots[i]`` dequantized."""
        if len(slots) > self.E:
            raise ValueError(f"ExpertPool: {len(slots)} experts exceed the {self.E}-row workspace")
        return self._dequantize_rows(list(enumerate(slots)))

    # ---------------------------------------------------------------------------- registry
    def _assign(self, slot: int, key: tuple[int, int]) -> None:
        self.slots.assign(slot, key)

    def group_holds(self, k: int, block: int) -> bool:
        return self.slots.group_holds(k, block)

    def group_views(self, k: int) -> dict[str, Tensor]:
        return {n: t[k * self.E : (k + 1) * self.E] for n, t in self.tensors.items()}

    # ------------------------------------------------------------------------------- copies
    def copy_block(self, block: int, k: int) -> None:
        """Copy all E experts of ``block`` into ring slot ``k`` (caller is on the copy stream)."""
        start = self.timeline.mark(self.sync.copy) if self.timeline else None
        for name, dst in self.group_views(k).items():
            raw(dst).copy_(raw(self.src[block][name]), non_blocking=True)
        self.slots.assign_block(block, k)
        nbytes = self.expert_nbytes * self.E
        self.bytes_copied += nbytes
        self.copies += 1
        if self.timeline:
            self.timeline.add(start, self.timeline.mark(self.sync.copy), "h2d_experts", block, "pcie_h2d", nbytes)

    def _victims(self, n: int, keep: set) -> list[int]:
        return self.slots.victims(n, keep)

    def prefetch(self, block: int, experts: list[int]) -> None:
        """Expert-aware, one block ahead: start copying predicted experts of ``block`` (not waited for
        here; :meth:`fetch` makes the compute stream wait if it uses one of them)."""
        predicted = {(block, e) for e in experts}
        for k in predicted & self.where.keys():
            self.lru.move_to_end(k)  # cached and predicted: keep
        keys = [(block, e) for e in experts if (block, e) not in self.where][: self.capacity - self.E]
        if not keys:
            return
        victims = self._victims(len(keys), predicted)
        self.sync.wait(self.sync.copy, self.sync.record(self.sync.compute))
        with self.sync.on_copy():
            start = self.timeline.mark(self.sync.copy) if self.timeline else None
            for (b, e), slot in zip(keys, victims):
                for name, dst in self.tensors.items():
                    raw(dst[slot]).copy_(raw(self.src[b][name][e]), non_blocking=True)
                self._assign(slot, (b, e))
            self.inflight_event = self.sync.record(self.sync.copy)
            if self.timeline:
                self.timeline.add(start, self.timeline.mark(self.sync.copy), "h2d_prefetch", block, "pcie_h2d",
                                  self.expert_nbytes * len(keys))
        self.inflight.update(keys)
        self.bytes_copied += self.expert_nbytes * len(keys)
        self.copies += len(keys)
        self.prefetched += len(keys)

    def fetch(self, block: int, needed: list[int]) -> list[int]:
        """Expert-aware: make experts ``needed`` of ``block`` resident; returns their slots.

        Misses are copied on the copy stream after all compute queued so far (the slots they reuse may
        still be read by it); the compute stream then waits for the copies.
        """
        if len(needed) > self.capacity:
            raise ValueError(f"ExpertPool: {len(needed)} experts needed but only {self.capacity} slots")
        keys = [(block, e) for e in needed]
        miss = [k for k in keys if k not in self.where]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        for k in keys:
            if k in self.where:
                self.lru.move_to_end(k)
        used = self.inflight.intersection(keys)
        if used:  # prefetched: wait for the copies (one event covers all earlier copies on the stream)
            self.prefetch_used += len(used)
            self.sync.wait(self.sync.compute, self.inflight_event)
            self.inflight.clear()
        if miss:
            victims = self._victims(len(miss), set(keys))
            self.sync.wait(self.sync.copy, self.sync.record(self.sync.compute))
            with self.sync.on_copy():
                start = self.timeline.mark(self.sync.copy) if self.timeline else None
                for (b, e), slot in zip(miss, victims):
                    for name, dst in self.tensors.items():
                        raw(dst[slot]).copy_(raw(self.src[b][name][e]), non_blocking=True)
                    self._assign(slot, (b, e))
                done = self.sync.record(self.sync.copy)
                if self.timeline:
                    self.timeline.add(start, self.timeline.mark(self.sync.copy), "h2d_experts", block, "pcie_h2d",
                                      self.expert_nbytes * len(miss))
            self.sync.wait(self.sync.compute, done)
            self.inflight.clear()  # done follows every earlier copy
            self.bytes_copied += self.expert_nbytes * len(miss)
            self.copies += len(miss)
        return [self.where[k] for k in keys]


class Ring:
    """K ring slots over the MoE blocks ``blocks`` (in forward order): compute, release, load."""

    def __init__(self, pool: ExpertPool, blocks: list[int], K: int) -> None:
        L = len(blocks)
        if K < 1:
            raise ValueError(f"Ring: K must be >= 1, got {K}")
        if K * pool.E > pool.capacity:
            raise ValueError(f"Ring: K={K} slots of {pool.E} experts exceed the pool's {pool.capacity} expert slots")
        self.pool, self.blocks, self.K = pool, list(blocks), min(K, L)
        self.sync = pool.sync
        self.load_done: list = [None] * self.K
        self.compute_done: list = [None] * self.K
        self.g_load = self.g_compute = 0
        self.active: int | None = None

    def reset(self) -> None:
        """Re-arm at a pass boundary after the pool was used otherwise (expert-aware passes)."""
        if self.g_compute % len(self.blocks):
            raise RuntimeError("Ring.reset: only at a forward-pass boundary")
        self.sync.cross_wait()
        self.g_load = self.g_compute
        self.load_done = [None] * self.K
        self.compute_done = [None] * self.K

    def _issue(self) -> None:
        L = len(self.blocks)
        while self.g_load < self.g_compute + self.K:
            k, block = self.g_load % self.K, self.blocks[self.g_load % L]
            if not self.pool.group_holds(k, block):  # K = L: already resident, nothing to copy
                self.sync.wait(self.sync.copy, self.compute_done[k])
                with self.sync.on_copy():
                    self.pool.copy_block(block, k)
                    self.load_done[k] = self.sync.record(self.sync.copy)
            self.g_load += 1

    def acquire(self, block: int) -> dict[str, Tensor]:
        """Wait (on the compute stream) for ``block``'s experts; returns their ``[E, ...]`` views."""
        expect = self.blocks[self.g_compute % len(self.blocks)]
        if block != expect:
            raise RuntimeError(f"Ring: block {block} requested out of order (expected {expect})")
        self._issue()
        k = self.g_compute % self.K
        self.sync.wait(self.sync.compute, self.load_done[k])
        self.active = k
        return self.pool.group_weights(k)

    def release(self) -> None:
        """The block computed: release its slot and load the block K ahead into it."""
        k = self.active
        self.compute_done[k] = self.sync.record(self.sync.compute)
        self.active = None
        self.g_compute += 1
        self._issue()
