"""Per pass of the simulated inference engine (`simulator.workload.inference.InferenceRun`): its mechanism (the
expert-aware fallback to the ring), its host program, its host seconds per kernel (the run's host probe, else
``host_op_s``) and a block's routing. A mixin: the methods read the run's attributes."""

from __future__ import annotations

import numpy as np

from simulator.workload.inference_host import HostProgram
from simulator.workload.inference_pool import expected_distinct_experts, sample_topk


class InferencePassMixin:
    """Mechanism, host program, host rate and routing of a pass of `InferenceRun`."""

    def _mode_of(self, tokens: int) -> str:
        """The mechanism of a pass of ``tokens`` tokens: expert-aware mode falls back to the ring when they
        are expected to touch ``fallback_frac`` of the experts (the reference's rule)."""
        if self.cfg.mode != "expert":
            return "ring"
        want_ring = expected_distinct_experts(self.E, self.m.top_k, tokens) >= self.cfg.fallback_frac * self.E
        return "ring" if want_ring and self.K >= 1 else "expert"

    def _program(self, mode: str, phase: str) -> HostProgram:
        return self.programs[(self.cfg.mode if mode == "ring" and self.cfg.mode == "resident" else mode, phase)]

    def probe_pass_kernels(self, phase: str, batch: int, copies: float) -> float:
        """Counted kernels of one pass of the host probe (`HostProbe`): its blocks, its copy calls (ring
        blocks or experts) and, expert-aware with prediction, the one-block-ahead gates."""
        L = self.cfg.host_probe.blocks
        mode = self._mode_of(batch * (self.cfg.prompt_len if phase == "prefill" else 1))
        prog = self._program(mode, phase)
        n = prog.kernels(L) + prog.unit("copy_block" if mode == "ring" else "copy_expert") * copies
        if mode == "expert" and self.cfg.predict:
            n += prog.unit("predict") * (L - 1)
        return n

    def _host_rate(self, phase: str, batch: int) -> float:
        """Host seconds per kernel of a pass: the run's probe of this code path, else ``host_op_s``."""
        key = (phase, batch)
        if key not in self.rates:
            probe, r = self.cfg.host_probe, None
            if self.probe_key is not None and probe.has(self.probe_key, phase):
                q = self.cfg.prompt_len if phase == "prefill" else 1
                mode = self._mode_of(batch * q)
                r = probe.rate(self.probe_key, phase, batch, lambda b, c: self.probe_pass_kernels(phase, b, c),
                               keep=lambda b: self._mode_of(b * q) == mode)
            self.rates[key] = self.base_host_op_s if r is None else r
        return self.rates[key]

    def _route(self, block: int, T: int, q_len: int) -> np.ndarray:
        """The routing [T, top_k] of ``block`` in this forward: independent draws (`sample_topk`), or in a decode
        step after another with ``route_persist`` > 0 each expert kept from the previous step's with that
        probability (`inference_persist.persist_topk`)."""
        q, k = self.cfg.route_persist, self.m.top_k
        prev = self.prev_route.get(block) if q_len == 1 else None
        if q > 0 and prev is not None and prev.shape[0] == T:
            from simulator.workload.inference_persist import persist_topk

            ids = persist_topk(self.popularity, prev, q, k, self.rng)
        else:
            ids = sample_topk(self.popularity, T, k, self.rng)
        if q > 0:
            self.prev_route[block] = ids if q_len == 1 else None
        return ids
