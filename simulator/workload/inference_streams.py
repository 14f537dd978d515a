"""The streams of the simulated inference engine (`simulator.workload.inference.InferenceRun`): a CUDA stream
as a SimPy process (`Stream`: items in order, each after its wait events, no earlier than its last kernel was
issued), and a mixin with the host's kernel issue, the compute phases, the H2D copies on the copy engine, the
ring's loads (``Ring._issue``, ``Ring.acquire`` / ``release`` in the reference), the workspace dequantisation and
the expert-aware misses' copies. The mixin's methods read the run's attributes."""

from __future__ import annotations

from dataclasses import dataclass

import simpy

from simulator.workload.inference_host import HostProgram


@dataclass
class _Item:
    dur: float
    waits: tuple
    min_end: float
    done: simpy.Event
    phase: str
    layer: int
    nbytes: float = 0.0


class Stream:
    """A CUDA stream: runs submitted items in order, each after its wait events."""

    def __init__(self, env: simpy.Environment, name: str, record) -> None:
        self.env, self.name, self.record = env, name, record
        self.queue = simpy.Store(env)
        self.last: simpy.Event | None = None
        self.busy = 0.0
        env.process(self._run())

    def submit(self, dur: float, phase: str, layer: int, waits=(), min_end: float = 0.0, nbytes: float = 0.0) -> simpy.Event:
        ev = self.env.event()
        self.queue.put(_Item(dur, tuple(w for w in waits if w is not None), min_end, ev, phase, layer, nbytes))
        self.last = ev
        return ev

    def _run(self):
        env = self.env
        while True:
            it = yield self.queue.get()
            for w in it.waits:
                if not w.processed:
                    yield w
            t0 = env.now
            end = max(t0 + it.dur, it.min_end)
            if end > t0:
                yield env.timeout(end - t0)
            self.busy += end - t0
            self.record(it.layer, it.phase, t0, end, it.nbytes, self.name)
            it.done.succeed()


class InferenceStreamsMixin:
    """Host issue, streams, copies and the ring of `InferenceRun`."""

    def _record(self, layer, phase, t0, t1, nbytes, resource):
        self.sim.record(0, layer, self.step, phase, t0, t1, nbytes, 0, resource)

    def _issue(self, n_ops: int):
        """Host issues ``n_ops`` kernels (``host_op_s`` each)."""
        self.host_ops += n_ops
        d = n_ops * self.host_op_s
        if d > 0:
            yield self.env.timeout(d)

    def _phase(self, n_ops: int, work: float, phase: str, layer: int, waits=()):
        """Issue a phase of ``n_ops`` kernels with ``work`` seconds of GPU time on the compute stream."""
        ev = self.compute.submit(work, phase, layer, waits, min_end=self.env.now + n_ops * self.host_op_s)
        yield from self._issue(n_ops)
        return ev

    def _copy(self, nbytes: float, calls: int, layer: int, phase: str, waits=()):
        dur = nbytes / self.bw + calls * self.pcie_lat
        self.bytes_copied += nbytes
        return self.copy.submit(dur, phase, layer, waits, nbytes=nbytes)

    def _sync_all(self):
        """torch.cuda.synchronize(): both streams drained."""
        for s in (self.compute, self.copy):
            if s.last is not None and not s.last.processed:
                yield s.last

    # -------------------------------------------------------------------------- ring
    def _ring_issue(self, prog: HostProgram):
        """Issue loads up to K blocks ahead of the block being computed (Ring._issue)."""
        eb = self.plan.expert_bytes
        calls = max(1, prog.unit("copy_block"))
        for k, b in self._ring_loads():  # the pool's bookkeeping first (no time passes), then the copies
            self.load_done[k] = self._copy(self.E * eb, calls, b, "h2d_experts", waits=(self.compute_done[k],))
            yield from self._issue(prog.unit("copy_block"))

    def _ring_reset(self):
        self.g_load = self.g_compute
        self.load_done = [self.compute.last] * self.K  # cross_wait: after the other mechanism's work
        self.compute_done = [self.compute.last] * self.K

    def _dequant(self, prog: HostProgram, experts: int, layer: int, waits=()):
        """Quantised, workspace path: dequantise ``experts`` experts on the compute stream."""
        unit = "dequant_block" if experts == self.E and prog.unit("dequant_block") else "dequant_expert"
        n = prog.unit(unit) * (1 if unit == "dequant_block" else experts)
        return (yield from self._phase(n, self.costs.dequant(experts, max(1, n)), "dequant", layer, waits))

    def _copy_misses(self, prog: HostProgram, b: int, miss: list, phase: str):
        calls = max(1, prog.unit("copy_expert")) * len(miss)
        self.fetch_bytes += len(miss) * self.plan.expert_bytes
        ev = self._copy(len(miss) * self.plan.expert_bytes, calls, b, phase, waits=(self.compute.last,))
        yield from self._issue(prog.unit("copy_expert") * len(miss))
        return ev
