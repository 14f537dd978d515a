"""The expert-aware mode's expert pool and the routing it sees (`simulator.workload.inference`): `ExpertCache`,
the reference's ``ExpertPool`` registry without tensors (LRU, fetch, one-block-ahead prefetch), `replay_pool_trace`
(the pool on a routing the engine traced), the fallback rule's `expected_distinct_experts`, and the sampled routing
(`sample_topk`) and predictor guesses (`mispredict`)."""

from __future__ import annotations

import numpy as np

from semoe import SpecError
from semoe.expert_slots import ExpertSlots


class ExpertCache(ExpertSlots):
    """The reference's ``ExpertPool`` registry without tensors (``semoe.expert_slots``): its ``fetch`` and
    ``prefetch`` bookkeeping statement for statement (which keys are copied into which slots, the LRU moves,
    the in-flight prefetched keys), counting hits, misses, prefetched and used prefetched experts as the
    engine's statistics do; ring slot k is slots ``[k*E, (k+1)*E)``. `replay_pool_trace` checks it against
    the engine's counts on the routing the engine saw."""

    def __init__(self, capacity: int, experts: int) -> None:
        super().__init__(capacity, experts)
        self.hits = self.misses = 0
        self.prefetched = self.prefetch_used = 0
        self.inflight: set = set()  # ExpertPool.inflight: prefetched keys whose copy may still run

    def load_block(self, block: int, k: int) -> None:
        self.assign_block(block, k)

    def fetch(self, block: int, needed: list[int]) -> tuple[list[tuple[int, int]], bool]:
        """``ExpertPool.fetch``: make ``needed`` experts of ``block`` resident; returns the missed keys (to
        copy) and whether a key still in flight from a prefetch is used (the compute stream then waits for the
        prefetch copies; ``inflight`` is cleared, as it is after a miss copy, which follows every earlier copy)."""
        keys = [(block, e) for e in needed]
        miss = [k for k in keys if k not in self.where]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        for k in keys:
            if k in self.where:
                self.lru.move_to_end(k)
        used = self.inflight.intersection(keys)
        if used:
            self.prefetch_used += len(used)
            self.inflight.clear()
        if miss:
            for key, slot in zip(miss, self.victims(len(miss), set(keys))):
                self.assign(slot, key)
            self.inflight.clear()
        return miss, bool(used)

    def prefetch(self, block: int, experts: list[int]) -> list[tuple[int, int]]:
        """``ExpertPool.prefetch``: the predicted experts of ``block`` not resident (at most ``capacity - E``)
        take the least recently used slots outside the prediction; returns those keys (to copy)."""
        predicted = {(block, e) for e in experts}
        for k in predicted & self.where.keys():  # the engine's statement: the same (set) order of LRU moves
            self.lru.move_to_end(k)
        keys = [(block, e) for e in experts if (block, e) not in self.where][: self.capacity - self.E]
        if not keys:
            return []
        for key, slot in zip(keys, self.victims(len(keys), predicted)):
            self.assign(slot, key)
        self.inflight.update(keys)
        self.prefetched += len(keys)
        return keys

    def ring_pass(self, blocks: list[int], K: int) -> None:
        """The loads of one ring pass over ``blocks`` from this state (``Ring`` after a reset: groups
        ``g % K`` load ``blocks[g % L]`` for g = 0 .. L + K - 1, the last K for the next pass)."""
        L = len(blocks)
        for g in range(L + K if K < L else L):
            k, b = g % K, blocks[g % L]
            if not self.group_holds(k, b):
                self.load_block(b, k)


def replay_pool_trace(calls, capacity: int, experts: int, blocks: list[int], ring_slots: int) -> dict:
    """The simulator's pool (`ExpertCache`) on a routing the engine saw (``reference/inference/bench.py``
    ``trace_pool_calls``: ``(step, block, "fetch" | "prefetch", experts)`` of one expert-aware ``generate``,
    after its ring prefill): hits, misses, prefetched and used prefetched experts, to compare with the
    engine's statistics of the same generate. The LRU mechanism is checked apart from the routing: the
    simulation samples routing, the replay takes the engine's."""
    cache = ExpertCache(capacity, experts)
    cache.ring_pass(list(blocks), ring_slots)  # generate's prefill: a ring pass over the same pool
    for _, block, call, ids in calls:
        if call == "fetch":
            cache.fetch(int(block), [int(e) for e in ids])
        elif call == "prefetch":
            cache.prefetch(int(block), [int(e) for e in ids])
        else:
            raise SpecError(f"replay_pool_trace: call {call!r} is not fetch or prefetch")
    return {"hits": cache.hits, "misses": cache.misses, "prefetched": cache.prefetched,
            "prefetch_used": cache.prefetch_used}


def expected_distinct_experts(E: int, k: int, tokens: int) -> float:
    """Uniform top-k routing: expected number of distinct experts ``T`` tokens touch."""
    return E * (1.0 - (1.0 - k / E) ** tokens)


def sample_topk(p: np.ndarray, tokens: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[tokens, k] distinct experts per token, drawn without replacement with probabilities ``p``
    (Gumbel top-k = successive sampling without replacement)."""
    g = np.log(np.maximum(p, 1e-300))[None, :] + rng.gumbel(size=(tokens, p.size))
    return np.argsort(-g, axis=1)[:, :k]


def mispredict(ids: np.ndarray, p: np.ndarray, accuracy: float, rng: np.random.Generator) -> np.ndarray:
    """A one-block-ahead predictor's guess of routing ``ids`` ([tokens, k]): each named expert is the true
    one with probability ``accuracy``, else another expert not among the token's true ones, drawn with
    probabilities ``p`` (the popularity)."""
    out = ids.copy()
    if accuracy >= 1.0:
        return out
    wrong = rng.random(ids.shape) >= accuracy
    for t, j in zip(*np.nonzero(wrong)):
        q = p.copy()
        q[ids[t]] = 0.0
        if q.sum() <= 0:
            continue
        out[t, j] = rng.choice(p.size, p=q / q.sum())
    return out
