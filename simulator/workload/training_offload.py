"""The offload engine of the training workload (`simulator.workload.training.TrainingIteration`): which local
experts a step uses and which the LFU CPU cache holds, the H2D fetches and the reference's slot pool, the SSD I/O
and the CPU optimizer per layer (ideal and reference schedules), host contention through
`simulator.workload.host_share`. A mixin: the methods read the iteration's attributes."""

from __future__ import annotations

import numpy as np

from semoe.sizing import OPTIMIZER_BYTES, PARAM_BYTES, expert_params
from simulator.workload import offload as O
from simulator.workload import routing
from simulator.workload.training_constants import CPU_ADAM_BYTES_PER_PARAM, SSD_PHASES


class TrainingOffloadMixin:
    """Offloaded expert states of `TrainingIteration` (see "Offloaded expert states" in its module docstring)."""

    def _offload_setup(self, rng) -> None:
        """Which local experts the step uses, and (with a CPU cache) which the cache holds: the LFU cache
        is run over ``Workload.steps`` steps of routing draws (`simulator.workload.offload`)."""
        m, p, w = self.m, self.p, self.w
        self.used = {i: self.recv[i] > 0 for i in self.a2a}
        self.hit = None
        self.cache = None
        if not (self.offload_experts or self.offload_opt) or not self.a2a:
            return
        if p.cpu_cache_experts > 0:
            pop = self.pop
            history = []
            for _ in range(max(w.steps, 1) - 1):
                history.append({i: O.received(routing.token_counts(m, w, self.W, rng, pop), self.EP) for i in self.a2a})
            history.append(self.recv)
            cap = min(p.cpu_cache_experts, self.local_experts) * m.moe_layers
            self.cache = O.simulate_cache(p, history, cap)
            self.hit = self.cache.hit

    def _cached(self, r: int, i: int) -> np.ndarray:
        if self.hit is None:
            return np.zeros(self.local_experts, dtype=bool)
        return self.hit[r][i]

    def _count(self, phase: str, nbytes: float) -> None:
        self.bytes[phase] = self.bytes.get(phase, 0.0) + float(nbytes)

    def _engine(self, res, r, layer, phase, dur, nbytes, resource):
        with res.request() as req:
            yield req
            t0 = self.env.now
            if self.host_share is not None and (phase in SSD_PHASES or phase == "cpu_adam"):  # task hH
                if phase == "cpu_adam":  # (the ideal schedule's per-expert stages)
                    cls, beside = "adam", self._adam_beside(dur)
                else:
                    op = "disk_read" if phase == "ssd_read" else "disk_write"
                    cls, beside = f"io_{op[5:]}", {"adam": self._io_time(op, nbytes, contended=True)}
                yield from self.host_share[r // self.c.gpus_per_node].run(cls, dur, beside)
                dur = self.env.now - t0
            else:
                yield self.env.timeout(dur)
            self.busy[phase] = self.busy.get(phase, 0.0) + dur
            self.sim.record(r, layer, -1, phase, t0, self.env.now, nbytes, 0, resource)
        self._count(phase, nbytes)

    def _io_time(self, op: str, nbytes: float, contended: bool = False) -> float:
        """``disk_read`` / ``disk_write`` of ``nbytes``: ``io_rates``, else the profile, else the cluster spec.
        ``contended`` (task hH): beside the CPU update, each part at its rate times its ``contention_*`` factor."""
        if nbytes <= 0:
            return 0.0
        f = (lambda k: self.io_rates.get(f"contention_{k}") or 1.0) if contended else (lambda k: 1.0)
        # reference.offload serialises and checksums (crc32) a block on its I/O thread before writing it
        prep = (nbytes / (self.io_rates["ssd_write_prep"] * f("ssd_write_prep"))
                if op == "disk_write" and self.io_rates.get("ssd_write_prep") else 0.0)
        if self.io_rates.get(op):
            return prep + nbytes / (self.io_rates[op] * f(op))
        bw = self.c.ssd_read_GBps if op == "disk_read" else self.c.ssd_write_GBps
        return prep + self.sim.cost.transfer_time(op, nbytes, bw) / f(op)

    def _adam_beside(self, dur: float) -> dict[str, float]:
        """Task hH: the CPU update's duration beside the node's SSD reads / writes (``contention_cpu_adam_read`` /
        ``_write`` factors, else ``contention_cpu_adam``, else none)."""
        g = self.io_rates.get("contention_cpu_adam") or 1.0
        return {f"io_{k}": dur / (self.io_rates.get(f"contention_cpu_adam_{k}") or g) for k in ("read", "write")}

    def _ssd(self, r, kind, nbytes, layer, phase):
        """A read or write of ``nbytes`` on the rank's node SSD (one disk: reads and writes queue on it)."""
        node = r // self.c.gpus_per_node
        dur = self._io_time("disk_read" if kind == "read" else "disk_write", nbytes)
        return self._engine(self.ssd_r[node], r, layer, phase, dur, nbytes, "ssd")

    def cpu_adam_time(self, params: float) -> float:
        # with gradient accumulation reference.offload's CPU AdamW reads fp32 gradients (its accumulators)
        if self.w.micro_batches > 1 and self.io_rates.get("cpu_adam_fp32grad"):
            return params / self.io_rates["cpu_adam_fp32grad"]
        if self.io_rates.get("cpu_adam"):
            return params / self.io_rates["cpu_adam"]
        rate = self.sim.cost.profile.transfer_rate("cpu_adam", params) if self.sim.cost.profile is not None else None
        return params / (rate if rate else self.c.host_memory_GBps * 1e9 / CPU_ADAM_BYTES_PER_PARAM)

    def _fetch(self, r, key, layer, mb):
        """Pinned host mirror -> GPU of the layer's used local experts' 16-bit params (the host keeps a
        compute-dtype mirror of every offloaded expert, refreshed by the CPU optimizer; the SSD holds
        fp32 states only, as `reference.offload` does). Under the reference schedule the copy waits for
        the previous step's update of the layer."""
        P = expert_params(self.m)
        used = self.used[layer][r]
        n_used = int(used.sum())
        prev = self.adam_prev[r].get(layer)
        if prev is not None:
            yield prev
        if n_used:
            nb = PARAM_BYTES * P * n_used
            yield self.copy(r, "h2d", nb, layer, mb, "h2d_prefetch")
            self._count("h2d_prefetch", nb)

    def _h2d(self, r, state, key, layer, mb):
        if key in state or layer not in self.a2a:
            return
        if self.ref:  # reference.offload's slot pool: a layer still in its slot is a hit (no copy)
            slots, s = self.slots[r], layer % self.n_slots
            if slots[s] is not None and slots[s][0] == layer:
                state[key] = slots[s][1]
                return
        state[key] = self.env.process(self._fetch(r, key, layer, mb))
        if self.ref:
            self.slots[r][layer % self.n_slots] = (layer, state[key])

    def _expert_stage_chain(self, r, layer, stages):
        for res, phase, dur, nb, resource in stages:
            if dur > 0:
                yield from self._engine(res, r, layer, phase, dur, nb, resource)

    def _ssd_state_misses(self, r, layer) -> np.ndarray:
        """Local experts whose fp32 state is on the SSD (not in the CPU cache) this step: the optimizer
        updates every expert, used or not (as reference.offload's AdamW does)."""
        if self.p.offload.expert_optimizer != "ssd":
            return np.zeros(self.local_experts, dtype=bool)
        return ~self._cached(r, layer)

    def _read_states(self, r, layer):
        """Vertical prefetch (reference schedule, depth >= 1): the layer's missed states SSD -> host.
        reference.offload queues the staging task on its optimizer thread, behind the previous step's
        layer updates (one FIFO worker): the reads are issued once all of those are done."""
        n = int(self._ssd_state_misses(r, layer).sum())
        prev = [ev for ev in self.adam_prev[r].values() if not ev.processed]
        if n and prev:
            yield self.env.all_of(prev)
        if n:
            yield from self._ssd(r, "read", OPTIMIZER_BYTES * expert_params(self.m) * n, layer, "ssd_read")

    def _expert_optimizer(self, r, layer, d2h_ev, pre=None):
        """CPU optimizer of all of ``layer``'s local experts (AdamW updates unused experts too: their
        moments decay) once their gradients are on the host."""
        yield d2h_ev
        p, c, P = self.p, self.c, expert_params(self.m)
        node = r // c.gpus_per_node
        used = np.ones(self.local_experts, dtype=bool)
        miss = self._ssd_state_misses(r, layer)
        admitted = set(self.cache.admitted[r].get(layer, [])) if self.cache is not None else set()
        if pre is not None:  # the step's staged reads (taken by the caller: the next step stages its own)
            yield pre
        if self.ref_sched:
            # reference.offload: one task per layer on its single optimizer thread (``self.cpu``, FIFO in
            # layer order): the missed states read (on demand when not staged; through the one I/O queue,
            # behind earlier write-backs), one AdamW over all of the layer's experts, then the write-backs
            # queued on the I/O queue without waiting for them
            ex = np.flatnonzero(used)
            with self.cpu[node].request() as req:
                yield req
                rb = OPTIMIZER_BYTES * P * int(miss[ex].sum()) if pre is None else 0.0
                if rb:
                    yield from self._engine(self.ssd_r[node], r, layer, "ssd_read", self._io_time("disk_read", rb),
                                            rb, "ssd")
                if len(ex):
                    t0, dur = self.env.now, self.cpu_adam_time(P * len(ex))
                    if self.host_share is not None:  # task hH: slower while SSD I/O runs beside it
                        yield from self.host_share[node].run("adam", dur, self._adam_beside(dur))
                        dur = self.env.now - t0
                    else:
                        yield self.env.timeout(dur)
                    self.busy["cpu_adam"] = self.busy.get("cpu_adam", 0.0) + dur
                    self.sim.record(r, layer, -1, "cpu_adam", t0, self.env.now, 0, 0, "cpu")
                    self._count("cpu_adam", 0.0)
                wb = OPTIMIZER_BYTES * P * sum(1 for e in ex if miss[e] and e not in admitted)
                if wb:
                    self.env.process(self._engine(self.ssd_w[node], r, layer, "ssd_write",
                                                  self._io_time("disk_write", wb), wb, "ssd"))
        else:
            procs = []
            for e in np.flatnonzero(used):
                rb = OPTIMIZER_BYTES * P if miss[e] and pre is None else 0.0
                wb = OPTIMIZER_BYTES * P if miss[e] and e not in admitted else 0.0  # admitted: stays in the cache
                stages = [
                    (self.ssd_r[node], "ssd_read", self._io_time("disk_read", rb), rb, "ssd"),
                    (self.cpu[node], "cpu_adam", self.cpu_adam_time(P), 0.0, "cpu"),
                    (self.ssd_w[node], "ssd_write", self._io_time("disk_write", wb), wb, "ssd"),
                ]
                procs.append(self.env.process(self._expert_stage_chain(r, layer, stages)))
            if procs:
                yield self.env.all_of(procs)
        if p.offload.expert_params == "gpu" and used.any():  # ZeRO-Offload style: updated params back
            nb = PARAM_BYTES * P * int(used.sum())
            yield self.copy(r, "h2d", nb, layer, -1, "h2d_params")
            self._count("h2d_params", nb)
        if self.cache is not None and "ssd" in (p.offload.expert_params, p.offload.expert_optimizer):
            ev = self.cache.evicted[r].get(layer, [])
            if ev:
                nb = OPTIMIZER_BYTES * P * len(ev)
                wr = self._engine(self.ssd_w[node], r, layer, "ssd_writeback", self._io_time("disk_write", nb), nb, "ssd")
                if self.ref_sched:  # queued on the I/O queue like the other write-backs, not awaited
                    self.env.process(wr)
                else:
                    yield from wr
