"""simulator.validate_offload: config parsing, synthetic bench rows -> validation rows (semoe validate)."""

import math

import pandas as pd
import pytest

from simulator.validate_offload import (
    BENCH_COLUMNS,
    OUT_COLUMNS,
    compare,
    config_string,
    main,
    parse_config,
    parse_placement,
    parse_prefetch,
    rows,
)

from offload_cases import CFG


def test_parse_config_compact_and_key_value_forms():
    c = parse_config("paper-13.9b-scaled L4 D2048 E8 k1 F8192 bf16 B8 S1024 lr0.0003 steps40 world1 nccl "
                     "params1248151552 cache=2 depth=2 budget=20GB beta=0.25 K=5 admit=3 skew=1.5")
    assert (c.preset, c.layers, c.hidden, c.experts, c.top_k, c.ffn, c.dtype, c.batch, c.seq, c.steps) == (
        "paper-13.9b", 4, 2048, 8, 1, 8192, "bf16", 8, 1024, 40)
    assert (c.params, c.cache, c.depth, c.budget_gb, c.beta, c.decay_every, c.admit, c.skew) == (
        1248151552, 2, 2, 20.0, 0.25, 5, 3.0, 1.5)
    d = parse_config("layers=4 hidden=2048 experts=8 top_k=2 ffn=8192 batch=4 seq=512 preset=mixtral-8x7b junk")
    assert (d.preset, d.layers, d.top_k, d.batch, d.seq) == ("mixtral-8x7b", 4, 2, 4, 512)
    assert parse_config("").preset == "paper-13.9b"
    with pytest.raises(ValueError, match="bad value"):
        parse_config("L4 cache=many")


def test_placement_and_prefetch_words():
    assert [parse_placement(p) for p in ("HBM", "cpu-offload", "ssd", "nvme")] == ["gpu", "cpu", "ssd", "ssd"]
    assert [parse_prefetch(p, None) for p in ("on", "off", "True", "0", 2)] == [1, 0, 1, 0, 2]
    assert parse_prefetch("on", 3) == 3
    with pytest.raises(ValueError, match="placement"):
        parse_placement("tape")
    with pytest.raises(ValueError, match="prefetch"):
        parse_prefetch("maybe", None)


def _bench(tmp_path):
    base = {"date": "2026-11-24T07:00:00Z", "commit": "abc", "device": "NVIDIA H100 80GB HBM3"}
    recs = [(CFG, "gpu", "on", "step_ms", 20.0), (CFG, "cpu", "on", "step_ms", 40.0),
            (CFG, "cpu", "off", "step_ms", 60.0), (CFG + " cache=2", "ssd", "on", "step_ms", 900.0),
            (CFG + " cache=2", "ssd", "on", "hit_rate", 0.4), (CFG, "cpu", "on", "tokens_per_s", 12800.0),
            (CFG, "cpu", "on", "peak_gb", 3.0), (CFG, "tape", "on", "step_ms", 1.0)]
    df = pd.DataFrame([dict(base, config=c, placement=p, prefetch=f, metric=m, value=v) for c, p, f, m, v in recs],
                      columns=list(BENCH_COLUMNS))
    path = tmp_path / "offload_train.csv"
    df.to_csv(path, index=False)
    return path


def test_compare_simulates_every_row(tmp_path):
    out = compare(_bench(tmp_path))
    assert tuple(out.columns) == OUT_COLUMNS and len(out) == 8
    v = out[out["status"] == "validated"]
    assert list(v["metric"]) == ["step_ms", "step_ms", "step_ms", "step_ms", "hit_rate", "tokens_per_s"]
    assert (v["predicted"] > 0).all() and not v["used_for_fitting"].any()
    assert ((v["predicted"] / v["measured"] - 1 - v["error"]).abs() < 1e-12).all()
    ms = v[v["metric"] == "step_ms"].set_index(["placement", "prefetch"])["predicted"]
    # (this small model's step is bound by the CPU update chain, so prefetch gains nothing measurable)
    assert ms[("gpu", "on")] < ms[("cpu", "on")] <= ms[("cpu", "off")] * (1 + 1e-9) < ms[("ssd", "on")]
    tps = v[v["metric"] == "tokens_per_s"]["predicted"].iloc[0]
    assert tps == pytest.approx(2 * 256 / (ms[("cpu", "on")] / 1e3))
    hr = v[v["metric"] == "hit_rate"]["predicted"].iloc[0]
    assert 0 < hr < 1
    nm = out[out["status"] == "not_modelled"]
    assert list(nm["metric"]) == ["peak_gb", "step_ms"] and nm["note"].str.len().gt(0).all()
    assert "placement" in nm["note"].iloc[1]


def test_rows_for_semoe_validate_and_main(tmp_path):
    from paper_repro.validate import COLUMNS, collect

    path = _bench(tmp_path)
    rs = rows(path)
    assert len(rs) == 8 and all(set(r) == set(COLUMNS) for r in rs)
    assert {r["source"] for r in rs} == {"offload"}
    assert {r["kind"] for r in rs} == {"time", "ratio"}
    res = tmp_path / "results"
    (res / "bench").mkdir(parents=True)
    (res / "bench" / "offload_train.csv").write_bytes(path.read_bytes())
    df = collect(res)
    assert (df["source"] == "offload").sum() == 8
    out = tmp_path / "val.csv"
    assert main(["--bench", str(path), "--out", str(out)]) == 0
    back = pd.read_csv(out)
    assert len(back) == 8 and not math.isnan(back["predicted"].iloc[0])
    assert main(["--bench", str(tmp_path / "missing.csv"), "--out", str(out)]) == 1


def test_config_string_round_trips_a_bench_spec():
    from semoe.presets import load_model
    from simulator.validate_offload import build_run

    tiny = load_model("tiny")
    spec = tiny.replace(name="bench_a_compute_bound", layers=2, hidden=256, ffn=512, experts=4, heads=4, vocab=256,
                        max_seq=128, top_k=2, dtype="bf16", capacity_factor=1.25)
    cfg = config_string(spec, 4, 128, label="a_compute_bound", steps=6, warmup=2, cache=3, micro_batches=2)
    assert cfg.startswith("a_compute_bound preset=tiny ") and "capacity_factor=1.25" in cfg
    c = parse_config(cfg)
    assert (c.preset, c.steps, c.warmup, c.cache, c.batch, c.seq) == ("tiny", 6, 2, 3, 4, 128)
    run = build_run(c, "ssd", 1)
    assert run.model.replace(name=spec.name) == spec
    assert run.workload.steps == 8 and run.plan.cpu_cache_experts == 3 and run.workload.micro_batches == 2
    with pytest.raises(ValueError, match="names no model"):
        parse_config("a_compute_bound")


def test_bench_case_rows_inputs_descriptions_and_extra_metrics(tmp_path):
    from semoe.presets import load_model

    spec = load_model("tiny").replace(name="a", layers=2, hidden=256, ffn=512, experts=4, heads=4, dtype="bf16")
    cfg = config_string(spec, 4, 128, label="a_compute_bound", steps=4, warmup=1, cache=2)
    base = {"date": "d", "commit": "c", "device": "H100"}
    recs = [("bandwidth", "-", "-", "h2d_pinned_GBps", 53.0), ("bandwidth", "ssd", "-", "ssd_read_GBps", 1.5),
            ("a_compute_bound", "-", "-", "expert_params", 1e6), (cfg, "gpu", "-", "step_ms", 5.0),
            (cfg, "cpu", "on", "ratio_vs_gpu", 2.0), (cfg, "cpu", "on", "h2d_gb_per_step", 0.01),
            (cfg, "cpu", "on", "d2h_gb_per_step", 0.005), (cfg, "cpu", "on", "cpu_adam_ms_per_step", 3.0),
            (cfg, "ssd", "on", "cache_hit_rate", 0.5), (cfg, "cpu", "on", "peak_mem_gb", 1.0),
            ("a_compute_bound", "cpu", "on", "step_ms", 5.0)]
    df = pd.DataFrame([dict(base, config=c, placement=p, prefetch=f, metric=m, value=v) for c, p, f, m, v in recs])
    out = compare(df).set_index("metric")
    assert out.loc["h2d_pinned_GBps", "status"] == "fitted" and out.loc["h2d_pinned_GBps", "used_for_fitting"]
    assert out.loc["h2d_pinned_GBps", "predicted"] == pytest.approx(53.5)
    assert 1.0 < out.loc["ssd_read_GBps", "predicted"] < 2.0  # the profile's disk_read rate
    assert out.loc["expert_params", "status"] == "not_modelled"
    assert out.loc["ratio_vs_gpu", "predicted"] > 1.0
    from semoe.sizing import expert_params

    P = expert_params(spec.replace(dtype="bf16"))
    # reference pool: 2 slots for 2 layers, so the backward finds both layers resident: one fetch per layer
    assert out.loc["h2d_gb_per_step", "predicted"] == pytest.approx(2 * 4 * 2 * P / 1e9)
    assert out.loc["d2h_gb_per_step", "predicted"] == pytest.approx(2 * 4 * 2 * P / 1e9)
    assert out.loc["cpu_adam_ms_per_step", "predicted"] > 0 and out.loc["peak_mem_gb", "predicted"] > 0
    assert 0 <= out.loc["cache_hit_rate", "predicted"] <= 1
    sm = out.loc["step_ms"]
    assert list(sm["status"]) == ["validated", "not_modelled"] and "names no model" in sm["note"].iloc[1]


def test_the_runs_measured_rates_are_inputs_of_its_simulations():
    base = {"date": "d", "commit": "c", "device": "H100", "config": CFG + " cache=0"}
    recs = [("ssd", "on", "step_ms", 100.0)]
    slow = [("-", "-", "ssd_read_GBps", 0.01), ("-", "-", "ssd_write_GBps", 0.01),
            ("cpu", "-", "cpu_adam_Mparams_per_s", 10.0)]
    mk = lambda rs: pd.DataFrame([dict(base, placement=p, prefetch=f, metric=m, value=v) for p, f, m, v in rs])
    fast = compare(mk(recs)).set_index("metric")
    measured = compare(mk(recs + slow)).set_index("metric")
    assert measured.loc["step_ms", "predicted"] > 5 * fast.loc["step_ms", "predicted"]
    assert "measured inputs" in measured.loc["step_ms", "note"]
    assert measured.loc["cpu_adam_Mparams_per_s", "status"] == "fitted"


def _trace_dir(tmp_path, gap_s=0.05, block=10**8):
    import json

    from semoe.trace import TraceRow, write_csv

    d = tmp_path / "traces"
    d.mkdir()
    (d / "run.json").write_text(json.dumps({"date": "d", "commit": "c", "device": "H100"}))
    rows, t = [], 0.0
    for step in range(3):  # warm-up step 0, measured 1, 2: 1 s each, 2 reads and 2 writes per step
        rows.append(TraceRow(0, -1, step, "step", t, t + 1.0, 0, 0, "compute"))
        rows += [TraceRow(0, 0, step, "ssd_read", t + 0.1, t + 0.2, block, 0, "ssd"),
                 TraceRow(0, 0, step, "ssd_read", t + 0.2, t + 0.3, block, 0, "ssd"),
                 TraceRow(0, 0, step, "ssd_write", t + 0.4, t + 0.5, block, 0, "ssd"),
                 TraceRow(0, 0, step, "ssd_write", t + 0.5 + gap_s, t + 0.6 + gap_s, block, 0, "ssd"),
                 TraceRow(0, 0, step, "cpu_adam", t + 0.3, t + 0.35, 0, 0, "cpu")]
        t += 1.0
    write_csv(rows, d / "trace_a_ssd_on.csv")
    return d


def test_traces_give_phase_rows_and_the_write_prep_input(tmp_path):
    """A run's traces (with run.json naming it): per-step phase rows beside the simulated phases, and the
    block-write preparation rate (block bytes / write-to-write gap) as an input of that run's simulations."""
    from semoe.presets import load_model
    from simulator.validate_offload import write_prep_rate

    spec = load_model("tiny").replace(name="a", layers=2, hidden=256, ffn=512, experts=4, heads=4, dtype="bf16")
    cfg = config_string(spec, 4, 128, label="a_compute_bound", steps=2, warmup=1, cache=2)
    df = pd.DataFrame([{"date": "d", "commit": "c", "device": "H100", "config": cfg, "placement": "ssd",
                        "prefetch": "on", "metric": "step_ms", "value": 50.0}])
    traces = _trace_dir(tmp_path)
    rate, n = write_prep_rate(traces)
    assert n == 3 and rate == pytest.approx(1e8 / 0.05)  # the gap inside each step; none across steps (> 0)
    plain = compare(df, traces=None)
    out = compare(df, traces=traces)
    assert len(plain) == 1 and len(out) > 1
    ph = out[out["metric"].str.startswith("trace_")].set_index("metric")
    assert ph.loc["trace_ssd_read_gb_per_step", "measured"] == pytest.approx(0.2)  # 2 x 1e8 B per measured step
    assert ph.loc["trace_ssd_read_ms_per_step", "measured"] == pytest.approx(200.0)
    assert ph.loc["trace_cpu_adam_ms_per_step", "measured"] == pytest.approx(50.0)
    assert (ph["predicted"] > 0).all() and "ssd_write_prep" in ph.loc["trace_ssd_write_gb_per_step", "note"]
    # the preparation before every block write occupies the I/O queue: a slower one lengthens the step
    (tmp_path / "slow").mkdir()
    slow = compare(df, traces=_trace_dir(tmp_path / "slow", gap_s=5.0))
    assert slow.iloc[0]["predicted"] > out.iloc[0]["predicted"] >= plain.iloc[0]["predicted"]
    # a run without run.json: no trace rows, no derived input
    (traces / "run.json").unlink()
    assert len(compare(df, traces=traces)) == 1


def test_fp32_gradient_adam_rate_applies_with_gradient_accumulation():
    base = {"date": "d", "commit": "c", "device": "H100"}
    recs = [("cpu", "on", "cpu_adam_ms_per_step", 10.0), ("cpu", "-", "cpu_adam_Mparams_per_s", 1000.0),
            ("cpu", "-", "cpu_adam_fp32grad_Mparams_per_s", 100.0)]
    def adam_ms(cfg):
        df = pd.DataFrame([dict(base, config=cfg, placement=p, prefetch=f, metric=m, value=v) for p, f, m, v in recs])
        out = compare(df, traces=None).set_index("metric")
        assert out.loc["cpu_adam_fp32grad_Mparams_per_s", "status"] == "fitted"
        return out.loc["cpu_adam_ms_per_step", "predicted"]
    one, accumulated = adam_ms(CFG), adam_ms(CFG + " micro_batches=2")
    assert accumulated == pytest.approx(10 * one)  # fp32 gradients: the 10x slower measured rate


def test_run_options_follow_the_reference_code_of_each_run():
    """Fused AdamW from 42307ef on, torch._grouped_mm experts from 676c520 on (git ancestry; without git
    history, e.g. a shallow clone or an unknown hash, the row's date)."""
    from simulator.validate_offload import commit_contains, run_options

    assert run_options("4ceddea", "2026-11-24T06:27:20Z") == {"_ref_optimizer": "foreach", "_expert_impl": "loop"}
    assert run_options("3bd5bc4", "2026-11-24T07:04:17Z") == {"_ref_optimizer": "fused", "_expert_impl": "grouped"}
    # an unknown commit falls back to the date
    assert commit_contains("676c520", "0000000", "2026-11-24T06:52:37Z", "2026-11-24T06:50:00Z")
    assert not commit_contains("676c520", "0000000", "2026-11-24T06:42:10Z", "2026-11-24T06:50:00Z")


def test_fused_optimizer_shortens_the_all_in_hbm_step():
    from simulator.validate_offload import parse_config, simulate

    cfg = parse_config("a_compute_bound preset=tiny L4 D1024 F4096 E8 k2 H16 V256 bf16 B48 S2048 max_seq=2048 "
                       "steps=4 warmup=2 cache=6 micro_batches=8")
    fo = simulate(cfg, "gpu", 0, (("_expert_impl", "grouped"), ("_ref_optimizer", "foreach")))
    fu = simulate(cfg, "gpu", 0, (("_expert_impl", "grouped"), ("_ref_optimizer", "fused")))
    assert 0 < fo["step_time_s"] - fu["step_time_s"] < 0.05
