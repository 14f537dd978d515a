"""simulator.validate_infer: the expert-aware count rows pooled over a run's repeats (``*_pooled``, the bench's
``pooled_rows``) are predicted by the simulated pool pooled the same way over `POOL_SEEDS` routing seeds (the rule
in the module doc); the single-pass rows of earlier runs keep their one-pass prediction."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from simulator import validate_infer as V
from simulator import validate_infer_predict as VP  # the part that reads SYNC_SPLIT

CONFIG = "mixtral-8x7b-L8 bf16 budget=10GB P=256 G=8"


def rows(*specs):
    return pd.DataFrame([{"date": "2026-12-01T00:00:00Z", "commit": "x", "device": "H100", "config": CONFIG, "mode": mode,
                          "batch": b, "metric": metric, "value": value} for mode, b, metric, value in specs])


def test_pooled_prediction_is_a_ratio_of_sums_over_the_seeds():
    """Pooled over 3 seeds = sum of the 3 simulated passes' hits / sum of their lookups (not the mean of the 3
    ratios); one seed = that seed's single pass; the sd is that of the single-pass values over the seeds."""
    import statistics

    res = [V._sim(CONFIG, "expert", 4, None, 4, False, seed=s)[1] for s in range(3)]
    got = V.pooled_prediction(CONFIG, 4, False, seeds=3)
    hits, look = sum(r.hits for r in res), sum(r.hits + r.misses for r in res)
    assert got["hit_rate_pooled"][0] == pytest.approx(hits / look, rel=1e-12)
    assert got["hit_rate_pooled"][1] == pytest.approx(statistics.stdev([r.hit_rate for r in res]), rel=1e-9)
    gb = sum(r.fetch_bytes_decode for r in res) / (3 * 7) / 1e9
    assert got["decode_GB_copied_per_step_pooled"][0] == pytest.approx(gb, rel=1e-12)
    assert got["prefetched_used_frac_pooled"][0] == 0.0  # no predictor: nothing prefetched
    # the seeds route differently (else pooling would only repeat one draw)
    assert len({(r.hits, r.misses) for r in res}) > 1
    one = V.pooled_prediction(CONFIG, 4, False, seeds=1)
    assert one["hit_rate_pooled"][0] == pytest.approx(res[0].hit_rate) and math.isnan(one["hit_rate_pooled"][1])


def test_pooled_rows_of_a_run():
    """A run with pooled rows: each is predicted by `pooled_prediction` (POOL_SEEDS seeds), validated, its note
    gives the R-pass sampling noise; pool_passes is a spread row; nopred's used fraction is 0 by definition; the
    predicting run is recognised by its pooled prefetched_used_frac row."""
    spec = [("expert", 1, "pool_passes", 4), ("expert", 1, "hit_rate_pooled", 0.85),
            ("expert", 1, "prefetched_used_frac_pooled", 0.92), ("expert", 1, "decode_GB_copied_per_step_pooled", 4.2),
            ("expert_nopred", 4, "pool_passes", 4), ("expert_nopred", 4, "hit_rate_pooled", 0.04),
            ("expert_nopred", 4, "prefetched_used_frac_pooled", 0.0)]
    d = V.predict_all(rows(*spec)).set_index(["mode", "batch", "metric"])
    for mode, B, predict in (("expert", 1, True), ("expert_nopred", 4, False)):
        want = V.pooled_prediction(CONFIG, B, predict)["hit_rate_pooled"]
        r = d.loc[(mode, B, "hit_rate_pooled")]
        assert r["predicted"] == pytest.approx(want[0]) and r["kind"] == "ratio" and r["status"] == "validated"
        sd_r = want[1] / 2  # R = 4 passes
        assert f"pooled over 4 measured passes (other prompts each): sampling sd ~ {sd_r:.3g}" in r["note"]
        assert f"over {V.POOL_SEEDS} routing seeds" in r["note"]
        assert d.loc[(mode, B, "pool_passes"), "kind"] == "spread"
    # the predictor prefetches (a predicting run), so its used fraction is a prediction, nopred's is 0
    assert 0.5 < d.loc[("expert", 1, "prefetched_used_frac_pooled"), "predicted"] < 1.0
    assert d.loc[("expert", 1, "decode_GB_copied_per_step_pooled"), "kind"] == "bytes"
    assert d.loc[("expert_nopred", 4, "prefetched_used_frac_pooled"), "status"] == "by_definition"
    # the expert row's B1 prediction pools a predictor: more hits than nopred's B4 (the LRU alone)
    assert d.loc[("expert", 1, "hit_rate_pooled"), "predicted"] > 5 * d.loc[("expert_nopred", 4, "hit_rate_pooled"), "predicted"]


def test_single_pass_rows_keep_their_rule():
    """Runs before the pooled rows: hit_rate is one simulated pass at the default routing (unchanged)."""
    d = V.predict_all(rows(("expert_nopred", 4, "hit_rate", 0.04))).set_index(["mode", "batch", "metric"])
    one = V._sim(CONFIG, "expert", 4, None, 4, False)[1]
    assert d.loc[("expert_nopred", 4, "hit_rate"), "predicted"] == pytest.approx(one.hit_rate)
    assert "pooled" not in d.loc[("expert_nopred", 4, "hit_rate"), "note"]


def test_resident_prefill_takes_the_sync_split(monkeypatch):
    """bf16 resident rows with an engine probe are simulated with the sync probe's split (each host sync's latency
    serial): at B = 1 of the 76200c0 run the prefill is slower than with the probe's seconds spread evenly;
    decode is not split; rows without a probe take no split."""
    m = pd.read_csv(V.MEASURED, dtype={"commit": str})
    run = m[(m["commit"] == "76200c0") & (m["mode"].isin(["resident", "-"]) | m["metric"].str.startswith("host_"))]
    assert set(run["date"]) == {"2026-11-24T12:41:18Z"}
    keys = [("resident", 1, "prefill_tokens_per_s"), ("resident", 1, "decode_tokens_per_s")]
    assert V._sync_split()
    with_split = V.predict_all(run).set_index(["mode", "batch", "metric"]).loc[keys, "predicted"]
    monkeypatch.setattr(VP, "SYNC_SPLIT", False)
    V._sync_split.cache_clear()
    V._sim.cache_clear()
    try:
        flat = V.predict_all(run).set_index(["mode", "batch", "metric"]).loc[keys, "predicted"]
    finally:
        monkeypatch.setattr(VP, "SYNC_SPLIT", True)
        V._sync_split.cache_clear()
        V._sim.cache_clear()
    assert with_split.iloc[0] < 0.97 * flat.iloc[0]  # ~0.2 ms of serial sync latency per ~2.4 ms block
    assert with_split.iloc[1] == pytest.approx(flat.iloc[1], rel=1e-9)


def test_routing_persistence_applies_to_runs_with_pooled_rows_only(monkeypatch):
    """Under --persist the calibration run's persistence (76200c0's B = 1 trace) is an input of the expert-aware rows
    of runs with pooled rows (held out, noted); a run without pooled rows keeps independent draws; by default (the
    committed table: rejected on held-out data) every row keeps independent draws."""
    pers = V.routing_persistence()
    assert pers is not None and 0 <= pers.q <= 1 and pers.pairs >= 40 and pers.source.startswith("2026-11-24_76200c0")
    pooled = rows(("expert_nopred", 1, "hit_rate_pooled", 0.3), ("expert_nopred", 1, "pool_passes", 3),
                  ("expert_nopred", 1, "decode_tokens_per_s", 9.0), ("ring", 1, "decode_tokens_per_s", 2.3))
    single = rows(("expert_nopred", 1, "hit_rate", 0.3))
    q0 = V.pooled_prediction(CONFIG, 1, False)["hit_rate_pooled"][0]
    qq = V.pooled_prediction(CONFIG, 1, False, persist=pers.q)["hit_rate_pooled"][0]
    d0 = V.predict_all(pooled).set_index(["mode", "batch", "metric"])
    assert not V.PERSIST and d0.loc[("expert_nopred", 1, "hit_rate_pooled"), "predicted"] == pytest.approx(q0)
    monkeypatch.setattr(V, "PERSIST", True)
    d = V.predict_all(pooled).set_index(["mode", "batch", "metric"])
    d1 = V.predict_all(single).set_index(["mode", "batch", "metric"])
    assert d.loc[("expert_nopred", 1, "hit_rate_pooled"), "predicted"] == pytest.approx(qq)
    assert "held out" in d.loc[("expert_nopred", 1, "hit_rate_pooled"), "note"]
    assert "routing persistence" not in str(d.loc[("ring", 1, "decode_tokens_per_s"), "note"])
    assert d1.loc[("expert_nopred", 1, "hit_rate"), "predicted"] == pytest.approx(
        V._sim(CONFIG, "expert", 1, None, 1, False)[1].hit_rate)
    if pers.q > 0:  # the persistence raises the B = 1 pool's hits (the previous step's experts are still resident)
        assert qq > q0
