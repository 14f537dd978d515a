"""simulator.workload.inference_poolcounts: the pool's counters from the run's bookkeeping alone equal the timed
simulation's (`simulate_inference`) exactly, seed for seed: the bench's configuration at every batch with and without
the predictor, quantised experts, decode routing persistence, a tiny model with small pools, imperfect predictors,
skewed routing, expert-aware prefills and the ring / resident modes; and `pooled_prediction` gives the same pooled
rows from either path."""

from __future__ import annotations

import warnings

import pytest

from semoe import ModelSpec, Workload, cluster_preset
from simulator import validate_infer_predict as VP
from simulator.workload.inference import InferConfig, simulate_inference
from simulator.workload.inference_poolcounts import PoolCounts, count_pool

CONFIG = "mixtral-8x7b-L8 bf16 budget=10GB P=256 G=8"  # the bench's (results/bench/infer.csv)
SEEDS = 8
FIELDS = ("hits", "misses", "prefetched", "prefetch_used", "fetch_bytes_decode", "bytes_copied_decode", "passes",
          "hit_rate")


def counters(res) -> dict:
    return {f: getattr(res, f) for f in FIELDS}


def des(model, cluster, cfg, wl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roofline fallbacks of the cost model
        return simulate_inference(model, cluster, cfg, workload=wl, profile=None, trace=False)[1]


def tiny(layers: int = 4, experts: int = 8, top_k: int = 2) -> ModelSpec:
    return ModelSpec(name="tiny-moe", layers=layers, hidden=64, heads=4, vocab=128, max_seq=256, ffn=128,
                     experts=experts, top_k=top_k, activation="swiglu", norm="rmsnorm", position="rope", dtype="bf16")


@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("predict", [False, True])
def test_pooled_prediction_fast_equals_des(batch, predict):
    """The bench's configuration: the pooled rows (values and sds) from the bookkeeping equal the timed
    simulation's, and so does every seed's counters (B16 falls back to the ring: all zero)."""
    fast = VP.pooled_prediction(CONFIG, batch, predict, seeds=SEEDS)
    slow = VP.pooled_prediction(CONFIG, batch, predict, seeds=SEEDS, des=True)
    assert fast == slow
    c = VP.parse_config(CONFIG)
    cfg = InferConfig(mode="expert", batch=batch, prompt_len=c["P"], gen_len=c["G"], gpu_budget_bytes=c["budget"],
                      plan_batch=batch, predict=predict,
                      predict_accuracy=VP.predict_accuracy() if predict else 1.0)
    model = VP._model(c)
    for s in range(SEEDS):
        wl = Workload(kind="infer", seq_len=c["P"], gen_len=c["G"], seed=s)
        got = count_pool(model, VP._cluster(None), cfg, wl)
        want = VP._sim(CONFIG, "expert", batch, None, batch, predict, seed=s)[1]
        assert counters(got) == counters(want), (batch, predict, s)
    if batch < 16:  # not vacuous: the pool hits, misses and (predicting) prefetches
        assert got.hits > 0 and got.misses > 0 and got.passes["expert"] == c["G"] - 1
        assert (got.prefetched > 0) == predict
    else:
        assert got.passes == {"ring": 3 + c["G"] - 1, "expert": 0} and got.bytes_copied_decode > 0


@pytest.mark.parametrize(("quant", "batch", "persist"), [("int8", 4, 0.0), (None, 1, 0.4), (None, 4, 0.4),
                                                          ("fp8", 2, 0.4)])
def test_pooled_prediction_quant_and_persist(quant, batch, persist):
    """Quantised experts (another pool size and expert bytes), decode routing persistence (`persist_topk`)."""
    for predict in (False, True):
        fast = VP.pooled_prediction(CONFIG, batch, predict, quant, seeds=SEEDS, persist=persist)
        assert fast == VP.pooled_prediction(CONFIG, batch, predict, quant, seeds=SEEDS, persist=persist, des=True)
    assert 0 < fast["hit_rate_pooled"][0] < 1


TINY_CASES = [
    # (mode, batch, prompt, gen, budget, predict, accuracy, persist, quant, routing)
    ("expert", 1, 16, 6, 1.0e6, True, 1.0, 0.0, None, "uniform"),  # pool of 12, K = 1
    ("expert", 2, 16, 6, 1.5e6, True, 0.6, 0.0, None, "uniform"),  # wrong guesses: wasted prefetches
    ("expert", 1, 2, 8, 1.5e6, True, 0.7, 0.5, None, "lognormal"),  # expert-aware prefill, persistence, skew
    ("expert", 3, 1, 5, 1.0e6, False, 1.0, 0.0, "int8", "zipf"),  # quantised pool, every pass expert-aware
    ("expert", 4, 16, 4, None, True, 0.8, 0.0, None, "uniform"),  # every expert fits: no evictions
    ("ring", 2, 16, 5, 1.5e6, False, 1.0, 0.0, None, "uniform"),
    ("resident", 2, 16, 5, None, False, 1.0, 0.0, None, "uniform"),
]


@pytest.mark.parametrize("case", TINY_CASES, ids=[f"{c[0]}-B{c[1]}-P{c[2]}-{c[8]}-{c[9]}" for c in TINY_CASES])
def test_tiny_counts_equal_des(case):
    mode, B, P, G, budget, predict, acc, persist, quant, routing = case
    m, cl = tiny(), cluster_preset("h100-single")
    cfg = InferConfig(mode=mode, batch=B, prompt_len=P, gen_len=G, gpu_budget_bytes=budget, predict=predict,
                      predict_accuracy=acc, route_persist=persist, quant=quant)
    seen = set()
    for s in range(SEEDS):
        wl = Workload(kind="infer", seq_len=P, gen_len=G, seed=s, routing=routing,
                      routing_skew=1.0 if routing != "uniform" else 0.0)
        got = count_pool(m, cl, cfg, wl)
        assert counters(got) == counters(des(m, cl, cfg, wl)), (case, s)
        seen.add((got.hits, got.misses, got.prefetched, got.prefetch_used, got.bytes_copied_decode))
    if mode == "expert":
        assert len(seen) > 1  # the seeds route differently
    else:
        assert got.hits == got.misses == got.prefetched == 0 and got.passes["expert"] == 0
        assert (got.bytes_copied_decode > 0) == (mode == "ring")


def test_default_workload_and_result_type():
    """No workload: the default one's seed, as `simulate_inference`; the result is a `PoolCounts` with the plan."""
    m, cl = tiny(), cluster_preset("h100-single")
    cfg = InferConfig(mode="expert", batch=1, prompt_len=8, gen_len=6, gpu_budget_bytes=1.0e6, predict=True,
                      predict_accuracy=0.5)
    got = count_pool(m, cl, cfg)
    want = des(m, cl, cfg, None)
    assert isinstance(got, PoolCounts) and counters(got) == counters(want)
    assert got.plan == want.plan and got.hit_rate == pytest.approx(got.hits / (got.hits + got.misses))
