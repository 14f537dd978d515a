"""Routing persistence of decode steps: does a token route to the experts it routed to one step earlier?

The expert-aware simulation samples each decode step's routing independently (`inference_pool.sample_topk`). A
real greedy decode may not: consecutive tokens of one sequence could share experts (issue 7: the pooled hit
rates of expert_nopred B4 / B8 were ~11% above the simulation in every run). This module measures that from
an engine trace and gives the simulator a one-number input for it.

Model (`persist_topk`): at decode step t > first, each of a token's top-k experts at a block is, with
probability ``q``, its expert of the same slot at step t - 1 (same block); the others are drawn fresh without
replacement from the popularity, excluding the kept ones. ``q = 0`` is the independent draws (and then the
simulation consumes the random stream exactly as before), ``q = 1`` repeats the step.

Estimate (`routing_persistence`): from the engine's traced pool calls (``reference/inference/bench.py``
``trace_pool_calls``) of ONE run at batch 1, where a ``fetch`` call's experts are the one token's top-k of that
block (at B > 1 only their union is traced): the mean overlap |S_t ∩ S_{t-1}| of consecutive decode steps of
the same block (and pass), matched to the model's expectation under uniform routing,
``f(q) = sum_n Binom(n; k, q) [n + (k - n)^2 / (E - n)]`` (n kept, k - n fresh among the E - n others, which
hold the k - n not kept), clipped to [0, 1]: ``f(0) = k^2 / E`` is the independent draws. It returns the
standard error of the mean overlap too, so a ``q`` within noise of 0 is seen as such.
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semoe import SpecError


def expected_overlap(q: float, E: int, k: int) -> float:
    """The model's expected |S_t ∩ S_{t-1}| of one token's top-k (uniform routing over ``E`` experts)."""
    if not 0 <= q <= 1:
        raise SpecError(f"routing persistence: q must be in [0, 1], got {q}")
    if not 0 < k <= E:
        raise SpecError(f"routing persistence: need 0 < k <= E, got k={k}, E={E}")
    return sum(math.comb(k, n) * q**n * (1 - q) ** (k - n) * (n + ((k - n) ** 2 / (E - n) if E > n else 0.0))
               for n in range(k + 1))


def solve_q(overlap: float, E: int, k: int) -> float:
    """``q`` whose `expected_overlap` is ``overlap`` (bisection; 0 below the independent draws' k^2 / E, 1 above
    k)."""
    lo, hi = 0.0, 1.0
    if overlap <= expected_overlap(0.0, E, k):
        return 0.0
    if overlap >= expected_overlap(1.0, E, k):
        return 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected_overlap(mid, E, k) < overlap else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Persistence:
    """A routing-persistence estimate: ``q`` (`solve_q`), the mean overlap it matches and its standard error,
    the independent draws' overlap, the consecutive step pairs used, and where they came from."""

    q: float
    overlap: float
    overlap_se: float
    independent: float
    pairs: int
    source: str

    def note(self) -> str:
        z = (self.overlap - self.independent) / self.overlap_se if self.overlap_se > 0 else float("nan")
        return (f"routing persistence q = {self.q:.3f} from {self.source} ({self.pairs} consecutive decode-step pairs "
                f"at B = 1: mean overlap {self.overlap:.3f} +- {self.overlap_se:.3f} experts vs {self.independent:.3f} "
                f"for independent draws, {z:+.1f} se)")


def step_sets(trace: Path, mode: str = "expert_nopred", batch: int = 1) -> dict:
    """(repeat, block) -> [(step, experts set)] of the ``fetch`` calls of ``mode`` at ``batch`` in an engine trace
    (``*_expert_trace.csv``), in step order."""
    out: dict = defaultdict(list)
    with Path(trace).open() as f:
        for r in csv.DictReader(f):
            if r["mode"] == mode and int(r["batch"]) == batch and r["call"] == "fetch":
                out[(int(r.get("repeat") or 0), int(r["block"]))].append(
                    (int(r["step"]), frozenset(int(e) for e in r["experts"].split())))
    return {key: sorted(v) for key, v in out.items()}


def routing_persistence(trace: Path, experts: int, top_k: int, mode: str = "expert_nopred") -> Persistence:
    """The persistence ``q`` of one run's B = 1 decode routing (module doc), from its trace ``trace``."""
    trace = Path(trace)
    if not trace.is_file():
        raise FileNotFoundError(f"routing persistence: trace not found: {trace}")
    ov = []
    for seq in step_sets(trace, mode, 1).values():
        for (s0, a), (s1, b) in itertools.pairwise(seq):
            if s1 == s0 + 1:
                if len(a) != top_k or len(b) != top_k:
                    raise SpecError(f"routing persistence: a B = 1 fetch of {trace.name} names {len(b)} experts, "
                                    f"not top-k {top_k}")
                ov.append(len(a & b))
    if len(ov) < 2:
        raise SpecError(f"routing persistence: fewer than 2 consecutive decode steps of {mode} B = 1 in {trace.name}")
    mean = float(np.mean(ov))
    se = float(np.std(ov, ddof=1) / math.sqrt(len(ov)))
    return Persistence(solve_q(mean, experts, top_k), mean, se, expected_overlap(0.0, experts, top_k), len(ov),
                       trace.name)


def persist_topk(p: np.ndarray, prev: np.ndarray, q: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """[tokens, k] routing of a decode step given the previous step's ``prev`` ([tokens, k], same block): each
    slot keeps its ``prev`` expert with probability ``q``; the rest are drawn without replacement with
    probabilities ``p`` among the experts not kept (Gumbel top-k)."""
    from simulator.workload.inference_pool import sample_topk

    keep = rng.random(prev.shape) < q
    fresh = sample_topk(p, prev.shape[0], p.size, rng)  # every token's full order of the experts
    out = np.empty_like(prev)
    for t in range(prev.shape[0]):
        kept = [int(e) for e in prev[t][keep[t]]]
        rest = [int(e) for e in fresh[t] if int(e) not in kept][: k - len(kept)]
        out[t] = kept + rest
    return out
