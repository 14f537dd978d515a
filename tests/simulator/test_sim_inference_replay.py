"""The simulator's expert pool (`ExpertCache`) against the reference engine's ``ExpertPool`` on the routing
the engine saw: the engine's expert-aware ``generate`` on a tiny CPU model with a small LRU pool, its pool
calls recorded by the bench's ``trace_pool_calls``, replayed through `replay_pool_trace`; hits, misses,
prefetched and used prefetched experts must be equal (the LRU, the prefetch and the in-flight bookkeeping,
apart from the routing, which the simulation samples)."""

from __future__ import annotations

import pytest
import torch

from reference.inference.bench import trace_pool_calls
from reference.inference.build import build_random_store
from reference.inference.engine import Engine, InferConfig, plan_memory, random_prompts
from reference.inference.store import ModelStore
from semoe import SpecError
from semoe.presets import model_preset
from simulator.workload.inference import ExpertCache, replay_pool_trace

P, G = 12, 12  # a prompt of >= 11 tokens runs the ring (expected distinct experts >= 0.95 E), decode the pool


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    spec = model_preset("tiny").replace(layers=4, experts=8, top_k=2, dtype="fp32", name="tiny-replay")
    root = tmp_path_factory.mktemp("replay") / "store"
    build_random_store(root, spec, torch.float32, seed=3, gen_device="cpu")
    return ModelStore.load(root)


def _budget_gb(store: ModelStore, B: int, slots: int) -> float:
    p = plan_memory(store, "expert", 1 << 50, B, P + G, B * P)
    return (p.dense_bytes + p.kv_bytes + p.act_bytes + slots * p.expert_bytes + p.expert_bytes // 2) / 1e9


@pytest.mark.parametrize("B,predict,slots", [(1, False, 11), (3, True, 9), (4, True, 12), (3, False, 20)])
def test_replay_matches_engine_pool(store, B, predict, slots):
    eng = Engine(store, InferConfig(mode="expert", device="cpu", trace=False, predict=predict,
                                    gpu_budget_gb=_budget_gb(store, B, slots)), batch=B, max_len=P + G,
                 prefill_tokens=B * P)
    assert eng.plan.pool_slots == slots
    calls = trace_pool_calls(eng)
    eng.generate(random_prompts(B, P, store.spec.vocab, seed=B), G)
    got = replay_pool_trace(calls, eng.plan.pool_slots, store.spec.experts, eng.blocks, eng.plan.ring_slots)
    want = {"hits": eng.pool.hits, "misses": eng.pool.misses, "prefetched": eng.pool.prefetched,
            "prefetch_used": eng.pool.prefetch_used}
    assert got == want
    # not a trivial case: the pool both hits and misses, and the predictor prefetched
    assert want["hits"] > 0 and want["misses"] > 0
    assert (want["prefetched"] > 0) == predict
    assert {c[2] for c in calls} == ({"fetch", "prefetch"} if predict else {"fetch"})


def test_replay_starts_from_the_ring_prefill():
    """generate's prefill is a ring pass over the pool: the first K blocks stay loaded (all hits), the rest miss."""
    calls = [(1, b, "fetch", (0, 1)) for b in range(4)]
    got = replay_pool_trace(calls, capacity=8 * 2 + 3, experts=8, blocks=[0, 1, 2, 3], ring_slots=2)
    assert got == {"hits": 4, "misses": 4, "prefetched": 0, "prefetch_used": 0}


def test_prefetch_inflight_counts_once_then_clears():
    c = ExpertCache(capacity=10, experts=4)
    assert c.prefetch(1, [0, 2]) == [(1, 0), (1, 2)]
    assert c.prefetch(1, [0, 2]) == []  # resident now: nothing copied again
    miss, used = c.fetch(1, [2, 3])  # uses one prefetched key, misses one
    assert (miss, used) == ([(1, 3)], True)
    assert (c.prefetched, c.prefetch_used, c.hits, c.misses) == (2, 1, 1, 1)
    assert c.inflight == set()  # a used prefetch (and a miss copy) clears the in-flight set, as ExpertPool.fetch
    assert c.fetch(1, [0]) == ([], False)  # still resident, but no longer counted as a used prefetch
    assert c.prefetch_used == 1


def test_replay_rejects_unknown_calls():
    with pytest.raises(SpecError, match="is not fetch or prefetch"):
        replay_pool_trace([(1, 0, "evict", (0,))], capacity=4, experts=2, blocks=[0], ring_slots=1)
