"""Decode routing persistence (simulator.workload.inference_persist): the overlap model and its inverse, the
estimate from an engine trace (recovers a known q from a synthetic trace), the sampler, and the simulator's
use of it (q = 0 is the old random stream exactly; q = 1 at B = 1 repeats every step, so the LRU pool hits)."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest

from semoe import SpecError, cluster_preset
from semoe.presets import model_preset
from simulator.workload.inference import InferConfig, simulate_inference
from simulator.workload.inference_persist import (
    expected_overlap,
    persist_topk,
    routing_persistence,
    solve_q,
)


def test_expected_overlap_ends_and_inverse():
    assert expected_overlap(0.0, 8, 2) == pytest.approx(4 / 8)  # independent top-2 of 8: k^2 / E
    assert expected_overlap(1.0, 8, 2) == pytest.approx(2.0)
    xs = [expected_overlap(q, 8, 2) for q in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in itertools.pairwise(xs))  # monotone, so solve_q is well defined
    for q in (0.05, 0.3, 0.9):
        assert solve_q(expected_overlap(q, 8, 2), 8, 2) == pytest.approx(q, abs=1e-9)
    assert solve_q(0.3, 8, 2) == 0.0 and solve_q(2.5, 8, 2) == 1.0  # clipped
    with pytest.raises(SpecError, match="q must be in"):
        expected_overlap(1.5, 8, 2)


def test_persist_topk_keeps_and_draws_distinct():
    rng = np.random.default_rng(0)
    p = np.full(8, 1 / 8)
    prev = np.array([[0, 1], [2, 3], [4, 5]])
    assert (persist_topk(p, prev, 1.0, 2, rng) == prev).all()
    for _ in range(50):
        out = persist_topk(p, prev, 0.5, 2, rng)
        assert all(len(set(row)) == 2 for row in out.tolist())
    # q = 0: the mean overlap with prev is the independent draws' k^2 / E
    ov = np.mean([len(set(persist_topk(p, prev[:1], 0.0, 2, rng)[0]) & {0, 1}) for _ in range(4000)])
    assert ov == pytest.approx(0.5, abs=0.05)


def write_trace(path, q: float, steps: int, blocks: int, reps: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    p = np.full(8, 1 / 8)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("mode", "batch", "pool_slots", "ring_slots", "step", "block", "call", "experts", "repeat"))
        for rep in range(reps):
            for b in range(blocks):
                ids = rng.permutation(8)[:2][None, :]
                for s in range(1, steps + 1):
                    if s > 1:
                        ids = persist_topk(p, ids, q, 2, rng)
                    w.writerow(("expert_nopred", 1, 24, 3, s, b, "fetch", " ".join(map(str, ids[0])), rep))
                    w.writerow(("expert_nopred", 2, 24, 3, s, b, "fetch", "0 1 2", rep))  # B = 2: unions, ignored


def test_routing_persistence_recovers_a_known_q(tmp_path):
    path = tmp_path / "t.csv"
    write_trace(path, 0.4, steps=30, blocks=8, reps=4)
    est = routing_persistence(path, 8, 2)
    assert est.pairs == 29 * 8 * 4
    assert est.q == pytest.approx(0.4, abs=0.07)
    assert est.overlap > est.independent + 3 * est.overlap_se
    write_trace(path, 0.0, steps=30, blocks=8, reps=4, seed=1)
    assert routing_persistence(path, 8, 2).q < 0.08
    assert "consecutive decode-step pairs at B = 1" in est.note()


def test_routing_persistence_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="trace not found"):
        routing_persistence(tmp_path / "none.csv", 8, 2)
    path = tmp_path / "t.csv"
    write_trace(path, 0.5, steps=1, blocks=2, reps=1)
    with pytest.raises(SpecError, match="fewer than 2 consecutive decode steps"):
        routing_persistence(path, 8, 2)


def sim(q: float, B: int = 1):
    m = model_preset("mixtral-8x7b").replace(layers=4, name="m-L4")
    cfg = InferConfig(mode="expert", batch=B, prompt_len=64, gen_len=9, gpu_budget_bytes=5e9, route_persist=q)
    return simulate_inference(m, cluster_preset("h100-single"), cfg, trace=False)[1]


def test_simulator_persistence():
    """q = 0 reproduces the independent draws (same hits, same time); q = 1 at B = 1 makes every decode step after
    the first route as the one before, so its experts are still in the pool: the hit rate rises well above."""
    base = simulate_inference(model_preset("mixtral-8x7b").replace(layers=4, name="m-L4"), cluster_preset("h100-single"),
                              InferConfig(mode="expert", batch=1, prompt_len=64, gen_len=9, gpu_budget_bytes=5e9),
                              trace=False)[1]
    r0, r1 = sim(0.0), sim(1.0)
    assert (r0.hits, r0.misses, r0.decode_s) == (base.hits, base.misses, base.decode_s)
    assert r1.hits + r1.misses == r0.hits + r0.misses
    assert r1.hit_rate > r0.hit_rate + 0.3
    with pytest.raises(SpecError, match="InferConfig.route_persist"):
        InferConfig(route_persist=-0.1)
