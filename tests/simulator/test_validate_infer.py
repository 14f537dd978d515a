"""simulator.validate_infer: quantised ring rows (synthetic: the H100 rows come later) are predicted
and marked validated; rows that validate nothing are marked apart."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from simulator import validate_infer as V

CONFIG = "mixtral-8x7b-L8 bf16 budget=10GB P=256 G=8"


def rows(*specs):
    return pd.DataFrame([{"date": "2026-12-01T00:00:00Z", "commit": "x", "device": "H100", "config": CONFIG, "mode": mode,
                              "batch": b, "metric": metric, "value": value} for mode, b, metric, value in specs])


def test_parse_mode_and_config():
    assert V.parse_mode("ring") == ("ring", None, None, "workspace")
    assert V.parse_mode("ring_K2") == ("ring", 2, None, "workspace")
    assert V.parse_mode("ring_int8") == ("ring", None, "int8", "workspace")
    assert V.parse_mode("ring_fp8_fused") == ("ring", None, "fp8", "fused")
    assert V.parse_mode("ring_K3_fp8") == ("ring", 3, "fp8", "workspace")
    assert V.parse_mode("expert_nopred_int8") == ("expert_nopred", None, "int8", "workspace")
    c = V.parse_config("tiny-L2 bf16 budget=K1 P=8 G=3")
    assert c["budget"] is None and c["slots"] == 1 and c["layers"] == 2
    assert V.parse_config(CONFIG)["budget"] == 10e9


def test_quantised_ring_rows_are_predicted():
    m = rows(("ring", 8, "prefill_tokens_per_s", 4800.0), ("ring_int8", 8, "prefill_tokens_per_s", 9000.0),
             ("ring_fp8", 8, "prefill_tokens_per_s", 9000.0), ("ring_int8", 1, "decode_tokens_per_s", 4.0),
             ("ring_int8", 8, "speedup_vs_bf16_prefill", 1.9), ("ring_fp8", 8, "gpu_peak_GB", 9.0),
             ("ring_int8", 8, "maxabs_logit_diff_vs_resident", 0.01))
    d = V.predict_all(m)
    p = d.set_index(["mode", "batch", "metric"])["predicted"]
    bf, i8 = p[("ring", 8, "prefill_tokens_per_s")], p[("ring_int8", 8, "prefill_tokens_per_s")]
    assert 1.6 < i8 / bf < 2.05  # PCIe-bound: about half the bytes per block
    assert p[("ring_fp8", 8, "prefill_tokens_per_s")] == pytest.approx(i8, rel=1e-3)  # same bytes; dequant hidden
    assert p[("ring_int8", 8, "speedup_vs_bf16_prefill")] == pytest.approx(i8 / bf)
    assert 4 < p[("ring_fp8", 8, "gpu_peak_GB")] <= 10  # within the 10 GB budget, with the dequant workspace
    st = d.set_index(["mode", "batch", "metric"])["status"]
    assert st[("ring_int8", 8, "prefill_tokens_per_s")] == "validated"
    assert st[("ring_int8", 8, "maxabs_logit_diff_vs_resident")] == "not_modelled"
    assert math.isnan(p[("ring_int8", 8, "maxabs_logit_diff_vs_resident")])


def test_issue11_bench_rows():
    """The rows reference/inference/bench.py (issue 11) writes: quantised and fused ring, compiled."""
    m = rows(("ring", 8, "prefill_tokens_per_s", 4800.0), ("ring", 8, "block_compute_ms", 4.4),
             ("ring_int8", 8, "block_compute_ms", 5.0), ("ring_int8_fused", 8, "block_compute_ms", 4.6),
             ("ring_fp8_fused", 8, "prefill_tokens_per_s", 9000.0), ("ring_int8", 8, "ring_K", 4),
             ("ring_int8", 8, "bytes_per_block", 1.4e9), ("ring_int8", 8, "copy_ms_per_block", 26.0),
             ("ring_int8", 8, "bytes_copied_per_forward", 11e9), ("ring_int8", 8, "prefill_speedup_vs_bf16_ring", 1.9),
             ("ring_int8", 1, "decode_speedup_vs_bf16_ring", 1.9), ("ring_int8", 1, "decode_ms_per_step", 200.0),
             ("ring_int8", 8, "logit_maxabs_vs_bf16_resident", 0.1), ("ring_int8", 0, "tokens_equal_frac_vs_bf16_resident", 1),
             ("compiled", 8, "decode_tokens_per_s", 900.0), ("compiled", 8, "prefill_tokens_per_s", 8e4),
             ("ring_compiled", 8, "decode_tokens_per_s", 19.0), ("resident", 8, "decode_tokens_per_s", 400.0),
             ("ring", 8, "decode_tokens_per_s", 19.0),
             ("-", 0, "moe_blocks", 8))
    d = V.predict_all(m).set_index(["mode", "batch", "metric"])
    p, st = d["predicted"], d["status"]
    from semoe.presets import model_preset
    from simulator.workload.inference_quant import expert_bytes

    eb = expert_bytes(model_preset("mixtral-8x7b"), "int8")
    assert p[("ring_int8", 8, "bytes_per_block")] == 8 * eb
    assert p[("ring_int8", 8, "copy_ms_per_block")] == pytest.approx(1e3 * 8 * eb / 53.5e9)
    assert p[("ring_int8", 8, "ring_K")] >= 2
    assert p[("ring_int8", 8, "bytes_copied_per_forward")] == 8 * 8 * eb
    # dequantising every expert of the block costs time; the fused GEMMs do not
    assert p[("ring_int8", 8, "block_compute_ms")] > p[("ring_int8_fused", 8, "block_compute_ms")]
    # (the fused GEMMs' own rate is the profile's qgemm_fwd rows when it has them, else the bf16 rate)
    assert 1.6 < p[("ring_int8", 8, "prefill_speedup_vs_bf16_ring")] < 2.05
    assert 1.6 < p[("ring_int8", 1, "decode_speedup_vs_bf16_ring")] < 2.05
    assert p[("-", 0, "moe_blocks")] == 8
    # CUDA-graph decode: the eager device time, host cost one launch per step -> faster than eager
    assert st[("compiled", 8, "decode_tokens_per_s")] == "validated"
    assert p[("compiled", 8, "decode_tokens_per_s")] > 1.3 * p[("resident", 8, "decode_tokens_per_s")]
    # the compiled ring is copy-bound: the eager ring's prediction
    assert p[("ring_compiled", 8, "decode_tokens_per_s")] == pytest.approx(p[("ring", 8, "decode_tokens_per_s")])
    for key in (("compiled", 8, "prefill_tokens_per_s"), ("ring_int8", 8, "logit_maxabs_vs_bf16_resident"),
                ("ring_int8", 0, "tokens_equal_frac_vs_bf16_resident")):
        assert st[key] == "not_modelled" and math.isnan(p[key])
    assert st[("ring_fp8_fused", 8, "prefill_tokens_per_s")] == "validated"


def test_status_marks_rows_that_validate_nothing():
    m = rows(("-", 0, "h2d_pinned_GBps", 54.0), ("expert_nopred", 1, "prefetched_used_frac", 0.0))
    m.loc[len(m)] = {"date": "2026-11-24T04:05:13Z", "commit": "x", "device": "H100", "config": CONFIG, "mode": "resident",
                         "batch": 1, "metric": "decode_tokens_per_s", "value": 5.0}
    d = V.predict_all(m)
    assert list(d["status"]) == ["input", "by_definition", "measurement_bug"]
    assert set(d["status"]) <= set(V.STATUSES)
    # the 344a526 run: int8-fused B=1 decode timed the Triton autotune; host-bound rows of older runs ran
    # another engine (superseded_code); their ring rows still validate
    m = rows(("ring_int8_fused", 1, "decode_tokens_per_s", 1.8), ("ring_int8_fused", 8, "decode_tokens_per_s", 38.0))
    m["date"] = "2026-11-24T06:34:29Z"
    for mode in ("resident", "expert", "ring"):
        m.loc[len(m)] = {"date": "2026-11-24T04:16:32Z", "commit": "x", "device": "H100", "config": CONFIG, "mode": mode,
                         "batch": 1, "metric": "decode_tokens_per_s", "value": 5.0}
    assert list(V.predict_all(m)["status"]) == ["measurement_bug", "validated", "superseded_code", "superseded_code",
                                                "validated"]


def test_committed_validation_table_has_status():
    """Every ring prefill row of the committed table is a validated prediction (none excused by its run), and a
    copy-bound ring prefill row that misses 10% says why (a slow stretch of the machine's copies)."""
    d = pd.read_csv(V.OUT_CSV)
    assert "status" in d.columns and set(d["status"]) <= set(V.STATUSES)
    ring = d[(d["mode"] == "ring") & (d["metric"] == "prefill_tokens_per_s")]
    assert len(ring) and (ring["status"] == "validated").all()
    missed = ring[~ring["within_10pct"].astype(bool)]
    assert missed["note"].str.contains("copy-bound").all()


def test_host_op_what_if_rejects_negative(capsys):
    assert V.main(["--host-op-us", "-1"]) == 2


def test_quick_bench_config_without_budget():
    """``bench --quick`` (tiny-L2, ring slots given instead of a budget) rows are predicted too."""
    cfg = "tiny-L2 bf16 budget=K1 P=8 G=3"
    m = pd.DataFrame([{"date": "d", "commit": "x", "device": "cpu", "config": cfg, "mode": mode, "batch": 2, "metric": metric, "value": 1.0}
                      for mode, metric in (("resident", "prefill_tokens_per_s"), ("ring", "ring_K"),
                                           ("ring_int8", "decode_tokens_per_s"), ("ring_fp8_fused", "gpu_peak_GB"))])
    d = V.predict_all(m)
    assert (d["status"] == "validated").all() and (d["predicted"] > 0).all()
    assert d.loc[d["metric"] == "ring_K", "predicted"].item() == 1


def test_run_host_probe_is_an_input_of_that_run_only():
    """A run's own host_op_us probe row replaces the profile's host seconds per kernel for that run's
    host-bound rows (status input, like the pinned H2D bandwidth); other runs keep the profile's."""
    spec = [("resident", 1, "decode_ms_per_step", 20.0), ("-", 0, "host_op_us", 60.0)]
    probed = V.predict_all(rows(*spec))
    other = rows(spec[0]).assign(date="2026-12-02T00:00:00Z")
    plain = V.predict_all(pd.concat([rows(*spec), other], ignore_index=True))
    p = probed.set_index(["mode", "metric"])
    assert p.loc[("-", "host_op_us"), "status"] == "input"
    assert p.loc[("-", "host_op_us"), "predicted"] == pytest.approx(V._host_op_s() * 1e6)
    fast = plain[plain["date"] == "2026-12-02T00:00:00Z"].iloc[0]["predicted"]
    slow = p.loc[("resident", "decode_ms_per_step"), "predicted"]
    assert slow > 1.5 * fast  # host-bound decode: ~60 vs ~31 us per kernel
    assert "this run's probe" in p.loc[("resident", "decode_ms_per_step"), "note"]


def probe_rows(step_ms: float, batch: int = 1):
    return [("-", 0, "host_probe_moe_blocks", 8), ("resident", batch, "host_decode_ms_per_step", step_ms),
            ("resident", batch, "host_decode_copies_per_step", 0), ("resident", batch, "host_prefill_ms", 19.0),
            ("resident", batch, "host_prefill_copies", 0)]


def test_engine_host_probe_sets_the_runs_host_bound_rows():
    """A run's engine host probe (the engine's code path at tiny widths, same run) gives its bf16 rows their
    host seconds per kernel: a host-bound resident decode step takes about the probe's step time; the probe
    rows are inputs, predicted as the per-kernel model would (counted kernels x host_op_us)."""
    spec = [("resident", 1, "decode_ms_per_step", 25.0), ("ring_int8", 1, "decode_ms_per_step", 200.0),
            ("-", 0, "host_op_us", 35.0)]
    fast = V.predict_all(rows(*spec, *probe_rows(10.0))).set_index(["mode", "metric"])
    slow = V.predict_all(rows(*spec, *probe_rows(25.0))).set_index(["mode", "metric"])
    none = V.predict_all(rows(*spec)).set_index(["mode", "metric"])
    f, s = (d.loc[("resident", "decode_ms_per_step"), "predicted"] for d in (fast, slow))
    assert 25.0 <= s < 25.0 * 1.15 and 10.0 <= f < 10.0 * 1.3  # host time + the device's tails at the syncs
    assert "engine probe" in slow.loc[("resident", "decode_ms_per_step"), "note"]
    assert none.loc[("resident", "decode_ms_per_step"), "predicted"] == pytest.approx(
        V.predict_all(rows(*spec, ("-", 0, "host_probe_moe_blocks", 8))).set_index(["mode", "metric"])
        .loc[("resident", "decode_ms_per_step"), "predicted"])  # no probe points: the per-kernel model
    # quantised rows: the bf16 probe does not apply
    assert slow.loc[("ring_int8", "decode_ms_per_step"), "predicted"] == pytest.approx(
        none.loc[("ring_int8", "decode_ms_per_step"), "predicted"])
    pr = slow.loc[("resident", "host_decode_ms_per_step")]
    assert pr["status"] == "input" and pr["predicted"] == pytest.approx(572 * 35e-3, rel=0.05)  # CUDA counts
    assert slow.loc[("resident", "host_decode_copies_per_step"), "status"] == "input"


def test_expert_rows_at_the_ring_fallback_batch():
    """At B = 16 expert-aware decode falls back to the ring (16 tokens x top-2 touch ~all 8 experts): the
    bench's pool statistics stay 0, and so do the predictions of those rows."""
    m = rows(*[(mode, b, metric, v) for mode in ("expert", "expert_nopred") for b, metric, v in
               ((16, "decode_GB_copied_per_step", 0.0), (16, "prefetched_used_frac", 0.0), (16, "hit_rate", 0.0),
                (1, "decode_GB_copied_per_step", 3.9), (1, "prefetched_used_frac", 0.92))])
    d = V.predict_all(m).set_index(["mode", "batch", "metric"])
    for mode in ("expert", "expert_nopred"):
        for metric in ("decode_GB_copied_per_step", "prefetched_used_frac", "hit_rate"):
            assert d.loc[(mode, 16, metric), "predicted"] == 0.0
            assert "ring fallback" in d.loc[(mode, 16, metric), "note"]
        assert d.loc[(mode, 1, "decode_GB_copied_per_step"), "predicted"] > 1.0
    # the predictor at the diagnostic's measured accuracy: some prefetches are wasted
    assert 0.5 < d.loc[("expert", 1, "prefetched_used_frac"), "predicted"] < 1.0
    assert d.loc[("expert", 16, "decode_GB_copied_per_step"), "status"] == "validated"


def test_probe_run_expert_and_resident_prefill_rows():
    """The b238b9a run (engine host probe): expert-aware decode with prediction at B = 1 waits for its
    prefetches (it was +29% with the prefetch overlapped), and resident prefill at B = 1 takes the probe's
    median host rate (+39% from the probe's one low B = 1 point)."""
    m = pd.read_csv(V.MEASURED, dtype={"commit": str})
    df = V.predict_all(m[m["date"] == "2026-11-24T08:49:38Z"])  # a run's rows are predicted from that run alone
    run = df[df["status"] == "validated"].set_index(["mode", "batch", "metric"])
    for key in (("expert", 1, "decode_tokens_per_s"), ("resident", 1, "prefill_tokens_per_s"),
                ("resident", 1, "block_compute_ms"), ("resident", 4, "prefill_tokens_per_s")):
        assert abs(run.loc[key, "error"]) <= 0.10, key
    assert len(run) >= 100 and run["within_10pct"].astype(bool).sum() >= 0.9 * len(run)


def test_predict_accuracy_from_the_engine_diagnostic(tmp_path):
    """Wasted prefetch bytes (predicting run minus non-predicting run at B = 1, same greedy routing) over the
    prefetched bytes of the diagnostic's timeline; 1.0 without a diagnostic."""
    (tmp_path / "steps.csv").write_text("case,batch,decode_ms_per_step,prefill_ms,copies,bytes_copied\n"
                                        "expert_nopred,1,1,1,10,1000\nexpert,1,1,1,12,1300\nexpert_nopred,2,1,1,9,5000\n")
    (tmp_path / "timeline.csv").write_text("case,phase,layer,step,start_s,end_s,bytes,resource\n"
                                           "expert,h2d_prefetch,1,1,0,1,600,pcie_h2d\n"
                                           "expert,h2d_prefetch,2,1,1,2,600,pcie_h2d\n"
                                           "expert,h2d_experts,0,1,0,1,999,pcie_h2d\n")
    assert V.predict_accuracy(tmp_path) == pytest.approx(1 - 300 / 1200)
    assert V.predict_accuracy(tmp_path / "absent") == 1.0
    assert 0.5 < V.predict_accuracy() < 1.0  # the committed H100 diagnostic


def adj_rows(mode: str, batch: int, phase: str, before: float, after: float, copies: float = 0.0):
    ms, cp = V.ADJ_METRICS[phase]
    return [(mode, batch, f"{ms}_before", before), (mode, batch, f"{ms}_after", after), (mode, batch, cp, copies)]


def test_run_adjacent_and_with_adjacent():
    """The adjacent probe of a row (mean of before and after) replaces the run probe's points of that code path
    and phase only: `HostProbe.rate` is then that one point's; other phases and modes keep the run's median."""
    m = rows(*adj_rows("resident", 4, "decode", 30.0, 40.0), *adj_rows("ring_K2", 8, "prefill", 20.0, 22.0, 8))
    adj = V.run_adjacent(m)["2026-12-01T00:00:00Z"]
    assert adj == {("resident", "decode", 4): (pytest.approx(35e-3), 0.0),
                   ("ring_K2", "prefill", 8): (pytest.approx(21e-3), 8.0)}
    base = V.HostProbe(8, (("resident", "decode", 1, 20e-3, 0.0), ("resident", "decode", 4, 24e-3, 0.0),
                           ("resident", "prefill", 4, 19e-3, 0.0), ("ring", "prefill", 8, 25e-3, 8.0)))
    p = V.with_adjacent(base, adj, "resident", "resident", 4)

    def one(b, c):  # kernels per pass
        return 100

    assert p.rate("resident", "decode", 4, one) == pytest.approx(35e-3 / 100)
    assert p.rate("resident", "prefill", 4, one) == base.rate("resident", "prefill", 4, one)  # not probed adjacently
    assert V.with_adjacent(base, adj, "resident", "resident", 2) is base  # no adjacent probe at B = 2
    assert V.with_adjacent(base, adj, "ring_K2", "ring", 8).rate("ring", "prefill", 8, one) == pytest.approx(21e-5)
    assert V.with_adjacent(None, adj, "resident", "resident", 4) is None  # quantised rows: no engine probe


def test_adjacent_probe_sets_its_rows_host_only():
    """A run with adjacent probes: the host-bound resident decode row at B = 4 follows its own adjacent probe
    (a slower host there: a slower step), the B = 2 row (no adjacent probe) keeps the run probe's median; the
    adjacent rows are inputs predicted by the run-level probe (so their error is the host's drift)."""
    spec = [("resident", 2, "decode_ms_per_step", 25.0), ("resident", 4, "decode_ms_per_step", 25.0),
            *probe_rows(20.0, 2), *probe_rows(20.0, 4)[1:]]
    plain = V.predict_all(rows(*spec)).set_index(["mode", "batch", "metric"])
    slow = V.predict_all(rows(*spec, *adj_rows("resident", 4, "decode", 38.0, 42.0))).set_index(
        ["mode", "batch", "metric"])
    p2, p4 = (plain.loc[("resident", b, "decode_ms_per_step"), "predicted"] for b in (2, 4))
    s2, s4 = (slow.loc[("resident", b, "decode_ms_per_step"), "predicted"] for b in (2, 4))
    assert s2 == pytest.approx(p2)
    assert 20.0 * 0.9999 <= p4 < 20.0 * 1.15 and 40.0 * 0.9999 <= s4 < 40.0 * 1.1  # host time of the probe + the device's tails
    assert "measured right before and after it" in slow.loc[("resident", 4, "decode_ms_per_step"), "note"]
    assert "measured right before" not in slow.loc[("resident", 2, "decode_ms_per_step"), "note"]
    a = slow.loc[("resident", 4, "host_adj_decode_ms_per_step_after")]
    assert a["status"] == "input" and a["predicted"] == pytest.approx(20.0, rel=1e-6)  # the run probe's step
    assert a["error"] == pytest.approx(20.0 / 42.0 - 1)
    assert slow.loc[("resident", 4, "host_adj_decode_copies_per_step"), "status"] == "input"


def test_h100_pool_trace_replays_exactly():
    """The 151f5db H100 run traced its expert pool's calls: the simulator's pool on that routing gives the
    engine's hits, misses, prefetched and used prefetched experts exactly, for every expert-aware row."""
    got = V.pool_replays("151f5db")
    assert {k for k in got} == {(m, b) for m in ("expert", "expert_nopred") for b in (1, 2, 4, 8, 16)}
    for k, (replayed, engine) in got.items():
        assert replayed == engine, k
        if k[1] == 16:  # the ring fallback batch never calls the pool: no trace rows, zero counters
            assert sum(engine.values()) == 0
            continue
        assert engine["misses"] > 0 and (engine["prefetched"] > 0) == (k[0] == "expert")


def test_h100_run_with_adjacent_probes():
    """The 151f5db run's bf16 timed rows take their host from the probe next to them (notes say so), its
    adjacent rows are inputs, and its pool rows carry the replay note."""
    m = pd.read_csv(V.MEASURED, dtype={"commit": str})
    run = m[m["commit"] == "151f5db"]
    d = V.predict_all(run).set_index(["mode", "batch", "metric"])
    for key in (("resident", 4, "decode_tokens_per_s"), ("ring", 1, "prefill_tokens_per_s"),
                ("expert_nopred", 2, "decode_tokens_per_s"), ("ring_K2", 16, "prefill_tokens_per_s")):
        assert "measured right before and after it" in d.loc[key, "note"], key
    adj = d[[k[2].startswith(V.ADJ_PREFIX) for k in d.index]]
    assert len(adj) == 3 * (5 * 4 + 4 + 5 * 2) and (adj["status"] == "input").all()
    assert "equal to the engine's" in d.loc[("expert", 1, "hit_rate"), "note"]


def rep_rows(mode: str, batch: int, phase: str, probes: list, copies: float = 0.0):
    """The adjacent probe rows of a repeated row (bench --repeats): first, last, median, min, max of ``probes``."""
    import statistics

    ms, cp = V.ADJ_METRICS[phase]
    return [(mode, batch, f"{ms}_before", probes[0]), (mode, batch, f"{ms}_after", probes[-1]),
            (mode, batch, f"{ms}_median", statistics.median(probes)), (mode, batch, f"{ms}_min", min(probes)),
            (mode, batch, f"{ms}_max", max(probes)), (mode, batch, cp, copies)]


def test_repeated_row_takes_the_median_probe():
    """A repeated row's host input is the median of its R + 1 probes (the rule fixed in the module doc), not the
    mean of its first and last: probes 40, 20, 21, 22 ms give a ~21.5 ms step (the mean of the ends would give 31)."""
    m = rows(*rep_rows("resident", 4, "decode", [40.0, 20.0, 21.0, 22.0]))
    assert V.run_adjacent(m)["2026-12-01T00:00:00Z"][("resident", "decode", 4)][0] == pytest.approx(21.5e-3)
    spec = [("resident", 4, "decode_ms_per_step", 25.0), *probe_rows(30.0, 4)]
    d = V.predict_all(rows(*spec, *rep_rows("resident", 4, "decode", [40.0, 20.0, 21.0, 22.0]))).set_index(
        ["mode", "batch", "metric"])
    assert 21.5 * 0.9999 <= d.loc[("resident", 4, "decode_ms_per_step"), "predicted"] < 21.5 * 1.15
    assert "interleaved with its repeats (median" in d.loc[("resident", 4, "decode_ms_per_step"), "note"]
    med = d.loc[("resident", 4, "host_adj_decode_ms_per_step_median")]
    assert med["status"] == "input" and "the median of the probes" in med["note"]


def test_spread_rows_are_listed_not_validated():
    """The min / max / repeats rows of a repeated row validate nothing (kind spread); the median row's note gives
    the spread and whether the prediction lies in it."""
    spec = [("resident", 4, "decode_tokens_per_s", 160.0), ("resident", 4, "decode_tokens_per_s_min", 150.0),
            ("resident", 4, "decode_tokens_per_s_max", 170.0), ("resident", 4, "decode_repeats", 5),
            *probe_rows(24.0, 4), *rep_rows("resident", 4, "decode", [24.0, 25.0, 24.5])]
    d = V.predict_all(rows(*spec)).set_index(["mode", "batch", "metric"])
    for metric in ("decode_tokens_per_s_min", "decode_tokens_per_s_max", "decode_repeats"):
        assert d.loc[("resident", 4, metric), "kind"] == "spread"
        assert d.loc[("resident", 4, metric), "status"] == "not_modelled"
        assert math.isnan(d.loc[("resident", 4, metric), "predicted"])
    row = d.loc[("resident", 4, "decode_tokens_per_s")]
    assert row["status"] == "validated" and "median of 5 repeats: min 150, max 170 (12.5% of the median" in row["note"]
    inside = 150.0 <= row["predicted"] <= 170.0
    assert ("prediction inside it" in row["note"]) == inside and ("prediction outside it" in row["note"]) != inside
    assert not V.is_spread("host_adj_decode_ms_per_step_min") and V.is_spread("prefill_frac_of_bound_max")


def test_h100_run_with_repeats():
    """The 76200c0 H100 run repeated its timed rows (resident x5, ring prefill x3, expert-aware x3, ring decode x1)
    between adjacent probes: its repeated rows take the median probe (notes say so), carry their spread, and the
    spread rows validate nothing; the single-pass ring decode keeps the before / after mean."""
    m = pd.read_csv(V.MEASURED, dtype={"commit": str})
    run = m[m["commit"] == "76200c0"]
    d = V.predict_all(run).set_index(["mode", "batch", "metric"])
    for key in (("resident", 8, "decode_tokens_per_s"), ("ring", 1, "prefill_tokens_per_s"),
                ("expert_nopred", 2, "decode_tokens_per_s"), ("ring_K2", 16, "prefill_tokens_per_s")):
        assert "interleaved with its repeats (median" in d.loc[key, "note"], key
        assert "repeats: min" in d.loc[key, "note"], key
    assert "measured right before and after it" in d.loc[("ring", 8, "decode_tokens_per_s"), "note"]
    spread = d[d["kind"] == "spread"]
    assert len(spread) > 50 and (spread["status"] == "not_modelled").all() and spread["predicted"].isna().all()
    assert d.loc[("resident", 4, "decode_repeats"), "measured"] == 5


def h2d_rows(mode: str, batch: int, phase: str, probes: list):
    """The adjacent copy probe rows of a row (bench H2DProber): first, last, and with more than 2 probes the
    median, min, max of ``probes`` (GB/s)."""
    import statistics

    m = V.H2D_METRICS[phase]
    out = [(mode, batch, f"{m}_before", probes[0]), (mode, batch, f"{m}_after", probes[-1])]
    if len(probes) > 2:
        out += [(mode, batch, f"{m}_median", statistics.median(probes)), (mode, batch, f"{m}_min", min(probes)),
                (mode, batch, f"{m}_max", max(probes))]
    return out


def test_copy_probe_bandwidth_median_or_mean():
    """The rule: the median of a repeated row's R + 1 copy probes (40, 30, 31, 32 -> 31.5, not the ends' mean 36),
    the mean of before and after for a single pass; per phase."""
    m = rows(*h2d_rows("ring", 2, "prefill", [40.0, 30.0, 31.0, 32.0]), *h2d_rows("ring", 2, "decode", [50.0, 40.0]))
    got = V.run_h2d(m)["2026-12-01T00:00:00Z"]
    assert got[("ring", "prefill", 2)] == pytest.approx(31.5)
    assert got[("ring", "decode", 2)] == pytest.approx(45.0)
    assert V.run_h2d(rows(("ring", 2, "prefill_tokens_per_s", 1000.0))) == {}


def test_copy_probe_sets_the_copy_bound_rows_pcie_only():
    """A ring prefill row whose copy probes read half the preset's bandwidth is simulated copy-bound at that
    bandwidth (~half the tokens/s, within the host's small share); the same run's rows without probes of their
    own (phase, batch), and the bound, keep the preset's 53.5 GB/s; copy probe rows are inputs predicted at the
    preset's bandwidth."""
    bw = V.cluster_preset("h100-single").pcie.bandwidth_GBps
    base = [("ring", 1, "prefill_tokens_per_s", 600.0), ("ring", 1, "bound_prefill_tokens_per_s", 600.0),
            ("ring", 2, "prefill_tokens_per_s", 1200.0), ("ring", 1, "decode_tokens_per_s", 2.3)]
    d0 = V.predict_all(rows(*base)).set_index(["mode", "batch", "metric"])
    d1 = V.predict_all(rows(*base, *h2d_rows("ring", 1, "prefill", [bw / 2, bw / 2, bw / 2]))).set_index(
        ["mode", "batch", "metric"])
    r = d1.loc[("ring", 1, "prefill_tokens_per_s"), "predicted"] / d0.loc[("ring", 1, "prefill_tokens_per_s"), "predicted"]
    assert 0.5 <= r < 0.56
    assert "PCIe: 26.75 GB/s, the median of this row's prefill copy probes" in d1.loc[("ring", 1, "prefill_tokens_per_s"), "note"]
    for key in (("ring", 2, "prefill_tokens_per_s"), ("ring", 1, "decode_tokens_per_s"),
                ("ring", 1, "bound_prefill_tokens_per_s")):
        assert d1.loc[key, "predicted"] == pytest.approx(d0.loc[key, "predicted"]), key
        assert "PCIe:" not in str(d1.loc[key, "note"]), key
    probe = d1.loc[("ring", 1, "h2d_adj_prefill_GBps_median")]
    assert probe["kind"] == "input" and probe["status"] == "input" and probe["predicted"] == pytest.approx(bw)
    assert not V.is_spread("h2d_adj_prefill_GBps_min")
    with pytest.raises(ValueError, match="pcie_GBps must be > 0"):
        V._cluster(0.0)


def test_copy_probe_not_used_by_resident_or_quantised_rows():
    h2d = {("resident", "prefill", 2): 20.0, ("ring_int8", "prefill", 2): 20.0, ("expert", "decode", 2): 20.0}
    r = {"mode": "resident", "batch": 2, "metric": "prefill_tokens_per_s"}
    assert V._h2d_used(r, h2d) is None
    assert V._h2d_used({**r, "mode": "ring_int8"}, h2d) is None
    assert V._h2d_used({**r, "mode": "expert", "metric": "decode_tokens_per_s"}, h2d) == 20.0
    assert V._h2d_used({**r, "mode": "expert", "metric": "hit_rate_pooled"}, h2d) is None  # counts: no bandwidth
