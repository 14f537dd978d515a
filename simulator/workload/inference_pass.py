"""Per pass of the simulated inference engine (`simulator.workload.inference.InferenceRun`): its mechanism (the
expert-aware fallback to the ring), its host program, its host seconds per kernel (the run's host probe, else
``host_op_s``), a block's routing and the pool's bookkeeping (the ring's loads, an expert-aware block's fetch and
the one-block-ahead prefetch: which experts the pool copies, no timing; `inference_poolcounts` runs them alone). A
mixin: the methods read the run's attributes."""

from __future__ import annotations

import numpy as np

from simulator.workload.inference_host import HostProgram
from simulator.workload.inference_pool import expected_distinct_experts, mispredict, sample_topk


class InferencePassMixin:
    """Mechanism, host program, host rate, routing and pool bookkeeping of a pass of `InferenceRun`."""

    def _mode_of(self, tokens: int) -> str:
        """The mechanism of a pass of ``tokens`` tokens: expert-aware mode falls back to the ring when they
        are expected to touch ``fallback_frac`` of the experts (the reference's rule)."""
        if self.cfg.mode != "expert":
            return "ring"
        want_ring = expected_distinct_experts(self.E, self.m.top_k, tokens) >= self.cfg.fallback_frac * self.E
        return "ring" if want_ring and self.K >= 1 else "expert"

    def _begin_pass(self, tokens: int) -> tuple[str, bool]:
        """A forward of ``tokens`` tokens: its mechanism (`_mode_of`, counted in ``passes``) and whether the ring
        restarts (``Ring.reset``: an expert-aware run falls back to the ring after an expert-aware pass)."""
        mode = self._mode_of(tokens)
        reset = self.cfg.mode == "expert" and mode != self.pass_mode and mode == "ring"
        self.pass_mode = mode
        self.passes[mode] += 1
        return mode, reset

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

    # -------------------------------------------------------------------------- the pool's bookkeeping
    def _ring_loads(self) -> list[tuple[int, int]]:
        """``Ring._issue``'s bookkeeping: every ring group up to K blocks ahead of the block being computed that does
        not hold its block loads it (`ExpertCache.load_block`); returns the ``(group, block)`` loads in issue order
        (each one copy of the block's experts)."""
        loads = []
        while self.g_load < self.g_compute + self.K:
            k, b = self.g_load % self.K, self.blocks[self.g_load % self.L]
            if not self.cache.group_holds(k, b):
                self.cache.load_block(b, k)
                loads.append((k, b))
            self.g_load += 1
        return loads

    def _fetch_block(self, block: int, T: int, q_len: int, predicted: dict) -> tuple[list[int], list, bool]:
        """An expert-aware block's fetch: its routing (the one predicted for it, else drawn now), the distinct
        experts it needs and `ExpertCache.fetch`'s missed keys and whether a prefetched key in flight is used."""
        ids = predicted.pop(block) if block in predicted else self._route(block, T, q_len)
        needed = sorted({int(e) for e in np.unique(ids)})
        miss, used = self.cache.fetch(block, needed)
        return needed, miss, used

    def _prefetch_block(self, block: int, T: int, q_len: int, predicted: dict) -> list:
        """The one-block-ahead prediction of ``block``: its routing drawn now (kept in ``predicted`` for its fetch),
        the predictor's guess of it (`mispredict`) and `ExpertCache.prefetch`'s keys to copy."""
        ids = self._route(block, T, q_len)
        predicted[block] = ids  # the routing block will use
        guess = mispredict(ids, self.popularity, self.cfg.predict_accuracy, self.rng)
        return self.cache.prefetch(block, sorted({int(e) for e in np.unique(guess)}))
