"""Offloaded expert states in a training step: which experts a step uses, the LFU CPU cache over steps.

The training iteration (`simulator.workload.training`) moves expert states between tiers as the plan
places them (``ParallelPlan.offload.expert_params`` / ``expert_optimizer`` in gpu / cpu / ssd,
``prefetch_depth``, ``cpu_cache_experts`` and the cache policy fields); this module decides, per rank,
which local experts a step touches and which of them the pinned CPU cache holds.

Routing: rank ``r`` owns local experts ``(r % EP) * E/EP + e``; the tokens its expert ``e`` receives in an
MoE layer are the sum over the ranks of its expert-parallel group of their token counts for that expert
(`routing.token_counts`, the run's skew). A local expert is *used* in a step when it receives >= 1 token:
only used experts are fetched to the GPU and counted by the cache; the gradients of every local expert
go back and the CPU optimizer updates every expert (as `reference.offload` does: AdamW moves an unused
expert too, and its state is read from the cache or the SSD without being counted).

Cache: one `semoe.lfu_cache.LFUCache` per rank over keys ``(layer, local expert)``, capacity
``cpu_cache_experts x MoE layers`` (what `semoe.sizing.state_bytes_per_tier` reserves in DRAM). Hit counts
grow by the tokens each expert receives, so the routing skew drives the policy. The cache is simulated
over ``Workload.steps`` steps: ``steps - 1`` warm-up steps with fresh routing draws of the same expert
popularity, then the simulated step; hits of the last step skip the SSD, its admissions cost nothing extra
(the missed state is read anyway), its evictions write the evicted expert's state back to the SSD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from semoe.lfu_cache import LFUCache


def received(counts: np.ndarray, expert_parallel: int) -> np.ndarray:
    """[W, E] tokens each rank sends to each expert -> [W, E/EP] tokens each rank's local experts receive."""
    W, E = counts.shape
    EP = expert_parallel
    local = E // EP
    G = W // EP
    # [G, src, owner, local] summed over src -> [G, owner, local]
    per = counts.reshape(G, EP, EP, local).sum(axis=1)
    return per.reshape(W, local).astype(float)


@dataclass
class CachePlan:
    """Per rank: experts cached during the simulated step (hits), evictions, hit rates over the steps."""

    hit: list[dict[int, np.ndarray]]  # [rank] -> layer -> bool [local experts] (cached and used)
    evicted: list[dict[int, list[int]]]  # [rank] -> layer -> local experts evicted at the step's end
    admitted: list[dict[int, list[int]]]  # [rank] -> layer -> missed experts admitted (kept, not written back)
    hit_rate_per_step: np.ndarray  # [steps] over all ranks
    hits_per_step: np.ndarray = None  # [steps]
    misses_per_step: np.ndarray = None
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    caches: list = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def hit_rate_since(self, first: int) -> float:
        """hits / (hits + misses) over steps ``first ..`` (e.g. after a bench's warm-up)."""
        h, m = self.hits_per_step[first:].sum(), self.misses_per_step[first:].sum()
        return float(h / (h + m)) if h + m else 0.0

    @property
    def last_hit_rate(self) -> float:
        return float(self.hit_rate_per_step[-1]) if len(self.hit_rate_per_step) else 0.0


def simulate_cache(plan, history: list[dict[int, np.ndarray]], capacity: int) -> CachePlan:
    """Run the LFU cache of every rank over ``history`` (per step: layer -> [W, local] tokens received);
    the last entry is the simulated step."""
    layers = sorted(history[-1])
    W, local = history[-1][layers[0]].shape if layers else (0, 0)
    caches = [LFUCache.from_plan(plan, capacity=capacity) for _ in range(W)]
    rates = np.zeros(len(history))
    hs, ms = np.zeros(len(history)), np.zeros(len(history))
    hit: list[dict[int, np.ndarray]] = [{} for _ in range(W)]
    evicted: list[dict[int, list[int]]] = [{} for _ in range(W)]
    admitted: list[dict[int, list[int]]] = [{} for _ in range(W)]
    tot_h = tot_m = tot_e = 0
    for s, step in enumerate(history):
        h = m = 0
        last = s == len(history) - 1
        for r, cache in enumerate(caches):
            used = {(i, e): float(step[i][r, e]) for i in layers for e in range(local) if step[i][r, e] > 0}
            res = cache.touch(used)
            h += len(res.hits)
            m += len(res.misses)
            if last:
                hit[r] = {i: np.zeros(local, dtype=bool) for i in layers}
                for i, e in res.hits:
                    hit[r][i][e] = True
                for i, e in res.evicted:
                    evicted[r].setdefault(i, []).append(e)
                for i, e in res.admitted:
                    admitted[r].setdefault(i, []).append(e)
                tot_e += len(res.evicted)
            cache.step()
        rates[s] = h / (h + m) if h + m else 0.0
        hs[s], ms[s] = h, m
        tot_h += h
        tot_m += m
    return CachePlan(hit=hit, evicted=evicted, admitted=admitted, hit_rate_per_step=rates, hits_per_step=hs, misses_per_step=ms, hits=tot_h, misses=tot_m, evictions=tot_e,
                     caches=caches)
