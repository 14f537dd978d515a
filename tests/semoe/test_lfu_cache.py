"""LFU with decayed hit counts (semoe.lfu_cache, the paper's Algorithm 2): hand-worked sequences."""

import pytest

from semoe.lfu_cache import LFUCache
from semoe.plan_spec import OffloadPlacement, ParallelPlan


def test_hand_worked_sequence_with_admission_eviction_and_decay():
    c = LFUCache(capacity=2, decay=0.5, decay_every=2, admit_hits=2.0)
    r = c.touch({"a": 3, "b": 1})  # a: 3 (admitted, >= 2), b: 1 (below threshold)
    assert (r.hits, r.misses, r.admitted, r.evicted) == ([], ["a", "b"], ["a"], [])
    assert c.step() is False  # step 1: no decay yet
    r = c.touch(["a", "b", "c"])  # a hit (4); b miss -> 2, admitted (free slot); c miss -> 1
    assert (r.hits, r.misses, r.admitted, r.evicted) == (["a"], ["b", "c"], ["b"], [])
    assert c.step() is True  # step 2: counts halve: a 2, b 1, c 0.5
    assert c.counts == {"a": 2.0, "b": 1.0, "c": 0.25 * 2}
    r = c.touch({"c": 2})  # c: 2.5 >= 2, full cache: lowest resident is b (1) < 2.5 -> b evicted
    assert (r.misses, r.admitted, r.evicted) == (["c"], ["c"], ["b"])
    assert set(c.cached) == {"a", "c"}
    r = c.touch({"d": 2.5})  # d: 2.5 vs lowest resident a (2.0): a evicted
    assert r.evicted == ["a"] and "d" in c
    r = c.touch({"b": 1.5})  # b: 2.5 ties with the lowest resident (c 2.5, d 2.5): refused, no thrashing
    assert r.admitted == [] and r.evicted == [] and r.misses == ["b"]
    assert (c.hits, c.misses, c.admissions, c.evictions) == (1, 7, 4, 2)  # misses: a b | b c | c | d | b
    assert c.hit_rate == pytest.approx(1 / 8)


def test_skewed_use_converges_to_the_hot_keys():
    c = LFUCache(capacity=2, decay=0.5, decay_every=3, admit_hits=1.0)
    for _ in range(30):
        c.touch({0: 100, 1: 80, 2: 5, 3: 1})
        c.step()
    assert set(c.cached) == {0, 1}
    before = c.hits
    c.touch({0: 100, 1: 80, 2: 5, 3: 1})
    assert c.hits - before == 2  # the two hot experts hit, the cold ones miss


def test_zero_capacity_never_caches_and_zero_counts_are_not_uses():
    c = LFUCache(capacity=0)
    r = c.touch({1: 5, 2: 0})
    assert r.misses == [1] and r.admitted == [] and len(c) == 0 and c.misses == 1


def test_from_plan_and_bad_arguments():
    plan = ParallelPlan(offload=OffloadPlacement(expert_params="cpu"), cpu_cache_experts=3, cache_decay=0.25,
                        cache_decay_every=4, cache_admit_hits=2.0)
    c = LFUCache.from_plan(plan)
    assert (c.capacity, c.decay, c.decay_every, c.admit_hits) == (3, 0.25, 4, 2.0)
    for kw in ({"capacity": -1}, {"capacity": 1, "decay": 0.0}, {"capacity": 1, "decay_every": 0},
               {"capacity": 1, "admit_hits": -1}):
        with pytest.raises(ValueError, match="LFUCache"):
            LFUCache(**kw)
    with pytest.raises(ValueError, match="negative"):
        LFUCache(1).touch({1: -1})
