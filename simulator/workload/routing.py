"""Routing skew -> per-rank expert token counts -> all-to-all byte matrices.

Expert popularity ``p_e``: ``uniform`` (1/E), ``zipf`` (``p ~ 1/rank^s`` with ``s =
Workload.routing_skew``, expert ranks shuffled by the seed so hot experts land on random GPUs),
``lognormal`` (``p_e ~ exp(sigma z_e)``, ``z_e ~ N(0, 1)`` i.i.d. from the seeded generator, ``sigma =
Workload.routing_skew``: sigma 0 is uniform; the ratio of two experts' loads is log-normal with
log-std ``sigma * sqrt(2)``, the heavy-tailed imbalance measured in trained MoEs) or ``histogram`` (a measured per-expert histogram, normalised). Each rank's ``T * top_k`` assignments
are drawn as a multinomial over experts (seeded, so runs are deterministic); with a capacity factor,
each rank keeps at most ``C = max(min_capacity, ceil(cf * T * top_k / E))`` tokens per expert (GShard
/ DeepSpeed: capacity per expert per local batch) and drops the rest. Dropped tokens are not sent
(no padding to capacity: the dispatcher sends kept tokens only).
"""

from __future__ import annotations

import math

import numpy as np

from semoe import ModelSpec, Workload


def expert_popularity(model: ModelSpec, workload: Workload, rng: np.random.Generator) -> np.ndarray:
    E = model.experts
    if workload.routing == "histogram":
        p = np.asarray(workload.expert_histogram, dtype=float)
    elif workload.routing == "zipf":
        p = 1.0 / np.arange(1, E + 1) ** workload.routing_skew
        p = p[rng.permutation(E)]
    elif workload.routing == "lognormal":
        p = np.exp(workload.routing_skew * rng.standard_normal(E))
    else:
        p = np.ones(E)
    return p / p.sum()


def capacity(model: ModelSpec, tokens: int) -> int | None:
    if model.capacity_factor is None:
        return None
    return max(model.min_capacity, math.ceil(model.capacity_factor * tokens * model.top_k / model.experts))


def token_counts(model: ModelSpec, workload: Workload, world: int, rng: np.random.Generator,
                 popularity: np.ndarray | None = None) -> np.ndarray:
    """[world, E] tokens each rank sends to each expert in one MoE layer of one micro-batch."""
    T = workload.micro_batch * workload.seq_len
    p = expert_popularity(model, workload, rng) if popularity is None else popularity
    counts = rng.multinomial(T * model.top_k, p, size=world)
    cap = capacity(model, T)
    if cap is not None:
        counts = np.minimum(counts, cap)
    return counts


def alltoall_matrices(counts: np.ndarray, expert_parallel: int, bytes_per_token: int) -> np.ndarray:
    """[groups, EP, EP] dispatch bytes: entry [g, i, j] is what rank i of EP group g sends to rank j
    (which owns experts ``j*E/EP .. (j+1)*E/EP - 1``). The combine is the transpose."""
    W, E = counts.shape
    G = W // expert_parallel
    local = E // expert_parallel
    per_rank = counts.reshape(G, expert_parallel, expert_parallel, local).sum(axis=3)
    return per_rank.astype(float) * bytes_per_token
