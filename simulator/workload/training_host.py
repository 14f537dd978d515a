"""The host program of the training workload (`simulator.workload.training.TrainingIteration` with
``host_program``): per-rank host clocks issuing the step's segments, the waits at syncs, the segments' activation
casts and counted memory passes at their measured bandwidths (see "Host program" and "Memory passes" in
`simulator.workload.training`). A mixin: the methods read the iteration's attributes."""

from __future__ import annotations

import numpy as np


class TrainingHostMixin:
    """Host-program side of `TrainingIteration`."""

    def _host_setup(self, prog, rates: dict | None, act_casts: bool | None, mem_passes: bool | None = None) -> None:
        """The host side (``host_program``): one `HostClock` per rank, the host seconds per kernel of the
        forward and of the backward / optimizer segments, the activation-cast time of each segment and its
        counted memory passes (``mem_passes``)."""
        from simulator.workload.host import HostClock

        if prog is not None and not self.ref:
            raise ValueError("TrainingIteration: host_program models the reference trainer: it needs impl='reference'")
        if act_casts and prog is None:
            raise ValueError("TrainingIteration: act_casts needs a host_program (the casts are counted there)")
        has_mem = prog is not None and any(sg.mem for sg in prog.segments)
        if mem_passes and not has_mem:
            raise ValueError("TrainingIteration: mem_passes needs a host_program with counted memory passes "
                             "(results/profiles/train_mem_bytes.csv)")
        self.prog = prog
        self.act_casts = bool(prog is not None and (True if act_casts is None else act_casts))
        self.mem_passes = bool(has_mem and (True if mem_passes is None else mem_passes) and self.act_casts)
        cm, m = self.sim.cost, self.m
        fwd = cm.host_op_impl("reference_triton" if self.expert_kernels == "triton" else "reference") or cm.host_op_s
        bwd = cm.host_op_impl("torch") or fwd
        if rates is None and prog is not None:  # measured beside the CUDA table, when it has been
            from simulator.train_host import host_rates

            rates = host_rates("triton" if self.expert_kernels == "triton" else "torch", self.ref_optimizer)
        rates = dict(rates or {})
        unknown = set(rates) - {"fwd", "bwd", "opt"}
        if unknown:
            raise ValueError(f"TrainingIteration: host_rates keys are fwd, bwd and opt, got {sorted(unknown)}")
        self.host_rate = {"fwd": float(rates.get("fwd", fwd)), "bwd": float(rates.get("bwd", bwd)),
                          "opt": float(rates.get("opt", bwd))}
        self.hc = [HostClock() for _ in range(self.W)]
        self.h_cur: list = [None] * self.W
        self.cast_s = np.zeros(self.W)
        self.h_mark = [(0.0, 0, 0.0) for _ in range(self.W)]  # host busy, syncs, sync wait at the last step's start
        self.segs = {sg.name: sg for sg in prog.segments} if prog is not None else {}
        widths = (m.hidden, m.ffn, m.vocab, m.experts)
        from simulator.train_host import mem_rates

        # the memory-pass classes' and the casts' measured bandwidths (with a host program and its counted casts:
        # the reference trainer; act_casts=False keeps the constants' pricing, as without a program)
        self._mem_rate_tab = mem_rates() if prog is not None and self.act_casts else None
        self.t_seg_cast = {n: self._cast_time(sg.cast_bytes(self.T, widths)) for n, sg in self.segs.items()
                           if self.act_casts and any(sg.casts)}
        self.t_seg_mem: dict[str, dict[str, float]] = {}
        if self.mem_passes:
            for n, sg in self.segs.items():
                t = {c: self._mem_time(c, k, b) for c, (k, b) in sg.mem_bytes(self.T, widths).items() if b > 0}
                if t:
                    self.t_seg_mem[n] = t

    def _cast_time(self, nbytes: float) -> float:
        """An fp32 <-> bf16 copy of ``nbytes`` (read + write): at the measured ``cast`` bandwidth
        (`simulator.train_host.mem_rates`, with a host program) when there is one, else the HBM roofline."""
        if nbytes > 0 and (getattr(self, "_mem_rate_tab", None) or {}).get("cast"):
            return self._mem_time("cast", 1.0, nbytes)
        return self.sim.cost.memory(nbytes)

    def _mem_time(self, cls: str, kernels: float, nbytes: float) -> float:
        """Seconds of ``kernels`` memory-pass kernels of class ``cls`` moving ``nbytes`` in all: at the class's
        measured bandwidth (`simulator.train_host.mem_rates`, interpolated in log bytes per kernel, the nearest
        end's rate outside the measured sizes), else the kernel profile's row-wise op for the class
        (`simulator.train_host.MEM_RATE_OPS`, the same way), else the HBM roofline."""
        from simulator.train_host import MEM_RATE_OPS

        per = nbytes / max(kernels, 1.0)
        curve = (self._mem_rate_tab or {}).get(cls)
        if curve is None and self.sim.cost.profile is not None:
            c = self.sim.cost.profile.mem_curves.get(MEM_RATE_OPS.get(cls, ("add", "bf16")))
            curve = list(zip(*c)) if c is not None else None
        if not curve:
            return self.sim.cost.memory(nbytes)
        xs, bs = np.log([x for x, _ in curve]), np.array([b for _, b in curve])
        return nbytes / float(np.interp(np.log(max(per, 1.0)), xs, bs))

    def _hgroup(self, base: str) -> list[str]:
        """Names of segment ``base`` and its pieces (split at syncs) in the host program; [] without one."""
        return [sg.name for sg in self.prog.group(base)] if self.prog is not None else []

    def _hseg(self, r, name, layer, mb):
        """The host issues segment ``name`` after everything before it; the device starts it no earlier than
        its first kernel is issued, beginning with the segment's activation casts (``act_cast``)."""
        if self.prog is None or name not in self.segs:
            return
        from simulator.train_host import TrainProgram

        sg = self.segs[name]
        op = self.host_rate[TrainProgram.part(name)]
        start, end = self.hc[r].issue(sg.kernels, op)
        self.h_cur[r] = (sg, end)
        # the segment's work starts once its first GEMM-class kernel is issued (its first kernel without one)
        yield from self._host_wait(r, layer, mb, start + min(sg.lead + 1, sg.kernels) * op)
        if name in self.t_seg_cast:
            self.cast_s[r] += self.t_seg_cast[name]
            yield from self.compute(r, layer, mb, "act_cast", self.t_seg_cast[name])
        sfx = "_bwd" if TrainProgram.part(name) == "bwd" else ""
        for cls, t in self.t_seg_mem.get(name, {}).items():
            yield from self.compute(r, layer, mb, f"mem_{cls}{sfx}", t)

    def _hend(self, r, layer, mb):
        """End of the current segment: the device cannot finish before its last kernel is issued; a sync
        makes the host wait until the device has drained."""
        if self.prog is None or self.h_cur[r] is None:
            return
        sg, end = self.h_cur[r]
        self.h_cur[r] = None
        yield from self._host_wait(r, layer, mb, end)
        if sg.sync:
            self.hc[r].sync(self.env.now)

    def _hrun(self, r, names, layer, mb):
        """Segments with no device work of their own (issued and, at syncs, waited for)."""
        for n in names:
            yield from self._hseg(r, n, layer, mb)
            yield from self._hend(r, layer, mb)

    def _host_wait(self, r, layer, mb, t):
        now = self.env.now
        if t > now:
            yield self.env.timeout(t - now)
            self.sim.record(r, layer, mb, "host_wait", now, t, 0, 0, "host")
