"""The offload engine's gradients and update path (`reference.offload.engine.ExpertOffload`, mixed in): the
accumulated expert gradients (multi-rank reduction, clipping in the model's parameter order), the step (D2H of
the gradients, then one host task per layer on the optimizer thread), the CPU AdamW on the fp32 states and,
for tier ``ssd``, the reads ahead of the update and the write-backs queued on the I/O thread."""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from reference.offload.cpu_adam import adamw_layer_
from reference.offload.engine_state import _Layer


class UpdateMixin:
    """`ExpertOffload`'s gradient and update methods (its ``__init__`` builds the states, caches and executors)."""

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
