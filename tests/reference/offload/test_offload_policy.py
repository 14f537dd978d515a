"""The CPU cache policy: the GPU hit table feeding the shared LFU cache (semoe.lfu_cache), hand-worked."""

from __future__ import annotations

import pytest
import torch

from reference.offload.policy import ExpertCachePolicy


def _rec(p: ExpertCachePolicy, *per_layer) -> None:
    for layer, counts in enumerate(per_layer):
        p.record(layer, torch.tensor(counts))


def test_hand_worked_sequence_admission_eviction_decay():
    # 1 layer x 4 experts, 2 cached experts per layer, beta 0.5 every 2 steps, admission at 2 tokens
    p = ExpertCachePolicy(1, 4, 2, beta=0.5, every=2, threshold=2.0)
    assert p.capacity == 2
    # step 1: tokens [3, 0, 1, 0]: two misses; expert 0 (count 3) admitted, expert 2 (1 < 2) not
    _rec(p, [3, 0, 1, 0])
    res, snap = p.end_step()
    assert snap.tolist() == [[3.0, 0.0, 1.0, 0.0]] and p.hits_LE.sum() == 0  # the table restarts each step
    assert (res.hits, res.misses, res.admitted, res.evicted) == ([], [(0, 0), (0, 2)], [(0, 0)], [])
    # step 2 (two micro-batches add up): [1, 2, 1, 0] + [0, 2, 1, 0] -> counts 4, 4, 3, 0; then halved
    _rec(p, [1, 2, 1, 0])
    _rec(p, [0, 2, 1, 0])
    res, _ = p.end_step()
    assert res.hits == [(0, 0)] and res.misses == [(0, 1), (0, 2)]
    assert res.admitted == [(0, 1)]  # most frequent miss first (4), fills the cache; 3 finds no weaker victim
    assert p.lfu.counts == {(0, 0): 2.0, (0, 1): 2.0, (0, 2): 1.5}
    # step 3: expert 3 gets 5 tokens: evicts the weakest resident (tie 2.0 vs 2.0 -> the lowest key (0, 0))
    _rec(p, [0, 0, 0, 5])
    res, _ = p.end_step()
    assert res.admitted == [(0, 3)] and res.evicted == [(0, 0)]
    assert p.resident == {(0, 1), (0, 3)}
    s = p.stats()
    assert (s["cache_hits"], s["cache_misses"], s["cache_admissions"], s["cache_evictions"]) == (1, 5, 3, 1)
    assert s["cache_hit_rate"] == pytest.approx(1 / 6)


def test_capacity_is_per_layer_and_layers_are_separate_keys():
    p = ExpertCachePolicy(2, 3, 1, threshold=0.0)
    assert p.capacity == 2
    _rec(p, [0, 4, 0], [7, 0, 0])
    res, _ = p.end_step()
    assert sorted(res.admitted) == [(0, 1), (1, 0)]
    assert ExpertCachePolicy(2, 3, 10).capacity == 6  # never more than every expert


def test_record_stays_on_the_device_tensor():
    p = ExpertCachePolicy(1, 2, 1)
    table = p.hits_LE
    p.record(0, torch.tensor([2, 0]))
    assert p.hits_LE is table and table.tolist() == [[2.0, 0.0]]


def test_bad_parameters():
    with pytest.raises(ValueError, match="capacity_per_layer"):
        ExpertCachePolicy(1, 2, -1)
    with pytest.raises(ValueError, match="decay"):
        ExpertCachePolicy(1, 2, 1, beta=0.0)
