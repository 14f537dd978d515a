"""Simulation primitives of the training workload (`simulator.workload.training.TrainingIteration`): a compute
phase, waits, blocking and background collectives, PCIe copies, ZeRO-3 gathers and the expert all-to-alls, each
recorded as a trace row. A mixin: the methods read the iteration's attributes."""

from __future__ import annotations

import numpy as np

from simulator import collectives as C


class TrainingPrimitivesMixin:
    """Per-rank SimPy building blocks of `TrainingIteration`."""

    def compute(self, r, layer, mb, phase, dur, flops=0.0):
        if self.comm[r].count or self.h2d[r].count:
            dur *= self.sim.cost.overlap_slowdown
        t0 = self.env.now
        yield self.env.timeout(dur)
        self.acc[r, 0] += dur
        self.sim.record(r, layer, mb, phase, t0, t0 + dur, 0, flops, "compute")

    def wait(self, r, ev, cat: int):
        t0 = self.env.now
        yield ev
        self.acc[r, cat] += self.env.now - t0

    def blocking(self, r, key, group, factory, layer, mb, phase, nbytes):
        t0 = self.env.now
        yield self.sim.collective(key, r, len(group), factory)
        self.acc[r, 1] += self.env.now - t0
        self.sim.record(r, layer, mb, phase, t0, self.env.now, nbytes, 0, "a2a")

    def background(self, r, key, group, factory, layer, mb, phase, nbytes):
        return self.env.process(self._bg(r, key, group, factory, layer, mb, phase, nbytes))

    def _bg(self, r, key, group, factory, layer, mb, phase, nbytes):
        with self.comm[r].request() as req:
            yield req
            t0 = self.env.now
            yield self.sim.collective(key, r, len(group), factory)
            self.sim.record(r, layer, mb, phase, t0, self.env.now, nbytes, 0, "comm")

    def copy(self, r, kind, nbytes, layer, mb, phase):
        return self.env.process(self._copy(r, kind, nbytes, layer, mb, phase))

    def _copy(self, r, kind, nbytes, layer, mb, phase):
        res = self.h2d[r] if kind == "h2d" else self.d2h[r]
        with res.request() as req:
            yield req
            t0 = self.env.now
            yield self.sim.net.transfer_routes(self.sim.topo.device_route(kind, r), np.array([float(nbytes)]))
            self.sim.record(r, layer, mb, phase, t0, self.env.now, nbytes, 0, f"pcie_{kind}")

    # ------------------------------------------------------------------ collectives
    def _gather(self, r, state, key, layer, mb):
        """ZeRO-3: all-gather the fp16 params of block ``layer`` (-1: embedding/head) from W shards."""
        if key in state:
            return
        topo, W = self.sim.topo, self.W
        nbytes = 2.0 * (self.dense_layer[layer] if layer >= 0 else self.embed)
        group = self.ranks
        state[key] = self.background(r, ("ag",) + key, group, lambda: C.all_gather(topo, group, nbytes),
                                     layer, mb, "param_allgather", nbytes)
        if self.mem_model is None:  # (impl="reference": simulator.train_memory's zero3_root instead)
            self.sim.memory.alloc(self.env.now, r, "hbm", "gathered_params", nbytes * (W - 1) / W)

    def _a2a(self, r, i, mb, phase, transpose: bool):
        EP, g = self.EP, r // self.EP
        group = np.arange(g * EP, (g + 1) * EP)
        M = self.a2a[i][g]
        M = M.T if transpose else M
        topo, algo = self.sim.topo, self.p.alltoall
        nbytes = float(M[r - g * EP].sum())
        return self.blocking(r, (phase, mb, i, g), group, lambda: C.all_to_all(topo, group, M, algo), i, mb, phase, nbytes)
