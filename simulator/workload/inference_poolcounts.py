"""The expert pool's counters of a simulated inference run without its timing: `count_pool` gives the hits, misses,
prefetched and used prefetched experts and the copied bytes that `simulator.workload.inference.simulate_inference`
reports for the same model, cluster, `InferConfig` and routing seed, bit for bit, in a fraction of its time (no
SimPy, no kernel costs).

Why the counters do not depend on the timing: the pool (`inference_pool.ExpertCache`), the ring's counters, the
routing draws and the predictor's guesses (the run's one seeded generator) are touched only by the host program,
one SimPy process that runs its forwards in program order; the streams only wait and record. So the run's
bookkeeping replayed in the same order gives the same state. `count_pool` builds the same `InferenceRun` (its memory
plan, pool, popularity and generator) and runs the program's bookkeeping alone, calling the run's own methods
(`InferencePassMixin._begin_pass`, ``_ring_loads``, ``_fetch_block``, ``_prefetch_block``: the mechanism of a pass,
the ring's loads, an expert-aware block's fetch and the one-block-ahead prefetch) at the markers of the same host
program (`inference_host`: ``acquire`` / ``release`` of the ring, ``fetch`` of the expert-aware mode), so the two
paths cannot drift apart; tests/simulator/test_sim_inference_poolcounts.py checks them equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from semoe import ModelSpec, Workload
from simulator.workload.inference_config import InferConfig
from simulator.workload.inference_memory import MemoryPlan


@dataclass(frozen=True)
class PoolCounts:
    """The counters of `InferenceResult` that the pool's bookkeeping determines (same names and meaning):
    ``hits`` / ``misses`` / ``bytes_copied_decode`` / ``fetch_bytes_decode`` over the decode steps,
    ``prefetched`` / ``prefetch_used`` over the whole run, ``passes`` per mechanism."""

    hits: int
    misses: int
    prefetched: int
    prefetch_used: int
    fetch_bytes_decode: float
    bytes_copied_decode: float
    passes: dict = field(default_factory=dict)
    plan: MemoryPlan | None = None

    @property
    def hit_rate(self) -> float:  # as `InferenceResult.hit_rate`
        return self.hits / max(1, self.hits + self.misses)


def _count_forward(run, batch: int, q_len: int) -> None:
    """The bookkeeping of `InferenceRun.forward` (batch, q_len): the same calls in the same order, no timing."""
    cfg = run.cfg
    T = batch * q_len
    mode, reset = run._begin_pass(T)
    if reset:
        run.g_load = run.g_compute  # `_ring_reset`'s counter (its events are the streams')
    prog = run._program(mode, "prefill" if q_len > 1 else "decode")
    resident = cfg.mode == "resident"
    eb = run.plan.expert_bytes
    predicted: dict = {}
    for idx, b in enumerate(run.blocks):
        k = None
        for seg in prog.block:
            if seg.marker == "acquire" and mode == "ring":
                if not resident:
                    _ring_copied(run, run._ring_loads())
                k = run.g_compute % run.K
            elif seg.marker == "release" and k is not None:
                run.g_compute += 1
                if not resident:
                    _ring_copied(run, run._ring_loads())
            elif seg.marker == "fetch" and mode == "expert":
                _, miss, _ = run._fetch_block(b, T, q_len, predicted)
                if miss:
                    _copied(run, len(miss) * eb)
        if mode == "expert" and cfg.predict and idx + 1 < run.L:
            miss_n = run._prefetch_block(run.blocks[idx + 1], T, q_len, predicted)
            if miss_n:
                _copied(run, len(miss_n) * eb)


def _ring_copied(run, loads: list) -> None:
    """The ring loads' bytes, one block's experts each, added one by one as `InferenceStreamsMixin._copy` does."""
    for _ in loads:
        run.bytes_copied += run.E * run.plan.expert_bytes


def _copied(run, nbytes: float) -> None:
    """An expert-aware copy's bytes, as `InferenceStreamsMixin._copy_misses` counts them."""
    run.fetch_bytes += nbytes
    run.bytes_copied += nbytes


def count_pool(model: ModelSpec, cluster, cfg: InferConfig, workload: Workload | None = None) -> PoolCounts:
    """`PoolCounts` of the run `simulate_inference(model, cluster, cfg, workload)` simulates (the routing seed is
    ``workload.seed``; None: the default workload's), from its bookkeeping alone (module doc)."""
    from simulator.engine import Sim
    from simulator.workload.inference import InferenceRun
    from simulator.workload.inference_costs import FixedCosts

    sim = Sim(cluster, seed=(workload.seed if workload else 0), profile=None, trace=False)
    run = InferenceRun(model, cfg, sim, workload, costs=FixedCosts(0.0))  # costs unused: nothing is timed
    B, P, G = cfg.batch, cfg.prompt_len, cfg.gen_len
    # InferenceRun.program: warm-up and timed prefill passes, then generate's prefill and its decode steps
    for _ in range(cfg.warmup_passes + 2):
        _count_forward(run, B, P)
    h0, m0, c0, f0 = run.cache.hits, run.cache.misses, run.bytes_copied, run.fetch_bytes
    for _ in range(1, G):
        _count_forward(run, B, 1)
    return PoolCounts(hits=run.cache.hits - h0, misses=run.cache.misses - m0, prefetched=run.cache.prefetched,
                      prefetch_used=run.cache.prefetch_used, fetch_bytes_decode=run.fetch_bytes - f0,
                      bytes_copied_decode=run.bytes_copied - c0, passes=dict(run.passes), plan=run.plan)
