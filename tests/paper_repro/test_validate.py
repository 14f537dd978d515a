"""paper_repro.validate (`semoe validate`, issue 9 item 3) on the committed measurements, on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from paper_repro.validate import (
    COLUMNS,
    GOAL_ROWS,
    RESULTS,
    collect,
    format_table,
    parse_train_config,
    run,
    summarise,
)
from paper_repro.validate_cli import register

STATUSES = {"validated", "fitted", "derived", "not_modelled", "extrapolated"}


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return collect(RESULTS)


def test_schema_and_statuses(df):
    assert tuple(df.columns) == COLUMNS
    assert set(df["status"]) <= STATUSES
    assert {"moe_layer", "train", "infer"} <= set(df["source"])
    pred = df[df["status"].isin(["validated", "fitted"])]
    assert pred["predicted"].notna().all() and (pred["measured"] != 0).all()
    err = pred["predicted"] / pred["measured"] - 1
    assert (err - pred["error"]).abs().max() < 1e-12
    # every row the simulator does not model says why
    nm = df[df["status"] == "not_modelled"]
    assert len(nm) and nm["note"].str.len().gt(0).all()


def test_every_measured_row_appears_once(df):
    n = {name: len(pd.read_csv(RESULTS / "bench" / name)) for name in ("train.csv", "infer.csv")}
    layer = pd.read_csv(RESULTS / "bench" / "moe_layer.csv")
    assert (df["source"] == "train").sum() == n["train.csv"]
    assert (df["source"] == "infer").sum() == n["infer.csv"]
    assert (df["source"] == "moe_layer").sum() == layer["impl"].isin(["ours", "torch_grouped"]).sum()


def test_fitted_rows_are_exactly_the_calibration_points(df):
    fit = df[df["used_for_fitting"]]
    assert set(fit["status"]) == {"fitted"}
    layer = fit[fit["source"] == "moe_layer"]
    assert list(zip(layer["run"], layer["config"], layer["metric"])) == [("65fffb4+wip3", "mixtral_like", "fwd_bwd_ms")]
    # the measured pinned H2D bandwidth, each run's host probe (the engine's code path at tiny widths) and the copy
    # probes next to the copy-bound rows
    infer_fit = set(fit.loc[fit["source"] == "infer", "metric"].str.split().str[-1])
    assert "h2d_pinned_GBps" in infer_fit
    stats = ("before", "after", "median", "min", "max")
    probes = {f"host_adj_{ph}_{stat}" for ph in ("prefill_ms", "decode_ms_per_step") for stat in stats}
    probes |= {f"h2d_adj_{ph}_GBps_{stat}" for ph in ("prefill", "decode") for stat in stats}  # the copy probes
    assert infer_fit <= {"h2d_pinned_GBps", "host_op_us", "host_prefill_ms", "host_decode_ms_per_step",
                         "host_probe_moe_blocks"} | probes
    assert not df.loc[df["status"] != "fitted", "used_for_fitting"].any()


def test_held_out_layer_rows_of_the_calibration_run_within_5pct(df):
    d = df[(df["source"] == "moe_layer") & (df["run"] == "65fffb4+wip3") & df["config"].isin(
        ["mixtral_like", "hetu_switch_b32", "fine_grained"]) & (df["status"] == "validated")]
    assert len(d) == 5
    assert d["error"].abs().max() < 0.05


def test_train_rows_simulated_on_one_gpu(df):
    t = df[(df["source"] == "train") & (df["metric"] == "tokens_per_s")]
    assert len(t) >= 8 and (t["status"] == "validated").all() and (t["predicted"] > 0).all()
    mfu = df[(df["source"] == "train") & (df["metric"] == "mfu")]
    assert (mfu["status"] == "derived").all()


def test_train_rows_use_the_reference_trainer_model(df):
    """impl="reference": the reference trainer's extra HBM passes make it slower than the ideal step, and its
    host program (kernels per segment and host syncs, counted on the reference code) sets the host time."""
    import warnings

    from paper_repro.validate import reference_host_ops, simulate_train
    from semoe import model_preset

    t = df[(df["source"] == "train") & (df["metric"] == "tokens_per_s")]
    assert t["note"].str.contains("syncs").all()
    c = parse_train_config(t["config"].iloc[0])
    s = simulate_train(c)
    from semoe import Run, Workload, cluster_preset
    from semoe.plan_spec import ParallelPlan
    from simulator.api import simulate

    m = model_preset("paper-13.9b").replace(layers=c.layers, hidden=c.hidden, heads=16, ffn=c.ffn, experts=c.experts,
                                            top_k=c.top_k, dtype=c.dtype, name="paper-13.9b-scaled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ideal = simulate(Run(model=m, cluster=cluster_preset("h100-single"), plan=ParallelPlan(),
                                workload=Workload(micro_batch=c.batch, seq_len=c.seq, steps=1)), trace=False)
    assert s["step_time_s"] > 1.5 * ideal["step_time_s"]
    ops4 = reference_host_ops(m)
    assert 100 < ops4 < reference_host_ops(m.replace(layers=8))
    from simulator.cost import CostModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        host_op_s = CostModel.auto(cluster_preset("h100-single").gpu).host_op_s  # the profile's host_op row
    # the host program issues at least the counted forward's kernels at a measured rate, and syncs (the
    # routing read-backs of every MoE block and the loss) leave the GPU idle
    assert s["host_syncs"] >= c.layers and s["host_program"]
    assert s["host_s"] > 0.5 * ops4 * host_op_s


def test_parse_train_config_both_formats():
    c = parse_train_config("paper-13.9b-scaled L4 D2048 E8 k2 F8192 bf16 B8 S1024 lr0.0003 steps40 world1 "
                           "single-process params1248151552")
    assert (c.preset, c.layers, c.hidden, c.top_k, c.batch, c.seq, c.zero, c.alltoall) == (
        "paper-13.9b", 4, 2048, 2, 8, 1024, 0, "flat")
    c = parse_train_config("paper-13.9b-scaled L4 D2048 E8 k1 F8192 bf16 B8 S1024 lr0.0003 steps30 world1 nccl "
                           "ep1 rail bucket26214400 zero3 params1248151552")
    assert (c.ep, c.alltoall, c.bucket, c.zero) == (1, "rail", 26214400, 3)
    with pytest.raises(ValueError, match="cannot parse train.csv config"):
        parse_train_config("nonsense")


def _frame(rows):
    base = {"source": "s", "run": "r", "config": "c", "metric": "m", "kind": "time", "note": ""}
    return pd.DataFrame([{**base, **r} for r in rows], columns=list(COLUMNS))


def test_summarise_hand_computed():
    rows = [{"measured": m, "predicted": p, "error": p / m - 1, "used_for_fitting": False, "status": "validated"}
            for m, p in [(1.0, 1.1), (2.0, 1.8), (4.0, 4.0), (8.0, 9.0)]]
    rows.append({"measured": 1.0, "predicted": 5.0, "error": 4.0, "used_for_fitting": True, "status": "fitted"})
    rows.append({"measured": 1.0, "predicted": 9.0, "error": 8.0, "used_for_fitting": False, "status": "derived"})
    rows.append({"measured": 1.0, "predicted": math.nan, "error": math.nan, "used_for_fitting": False,
                 "status": "not_modelled"})
    s = summarise(_frame(rows))
    assert s["rows"] == 4
    assert s["mape"] == pytest.approx((0.1 + 0.1 + 0.0 + 0.125) / 4)
    assert s["max_error"] == pytest.approx(0.125)
    assert s["spearman"] == pytest.approx(1.0)
    assert s["fitted"]["rows"] == 1 and s["derived"] == 1 and s["not_modelled"] == 1
    assert not s["goal_met"]  # fewer than GOAL_ROWS rows
    good = _frame([{"measured": float(i), "predicted": float(i) * 1.01, "error": 0.01, "used_for_fitting": False,
                        "status": "validated"} for i in range(1, GOAL_ROWS + 1)])
    assert summarise(good)["goal_met"]
    assert "goal" in format_table(good, summarise(good))


def test_run_writes_csv_and_png(tmp_path):
    out = tmp_path / "validation"
    df, s = run(out, RESULTS)
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.png"]
    back = pd.read_csv(out / "summary.csv")
    assert len(back) == len(df) and tuple(back.columns) == COLUMNS
    assert s["rows"] >= GOAL_ROWS  # enough unfitted rows to judge the goal (met or not)
    assert (out / "summary.png").stat().st_size > 10_000


def test_cli(tmp_path):
    app = typer.Typer()
    register(app)

    @app.command()
    def _noop() -> None:  # a second command, so typer keeps `validate` as a subcommand
        pass

    r = CliRunner().invoke(app, ["validate", "--out", str(tmp_path), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "MAPE" in r.output and "goal" in r.output and (tmp_path / "summary.csv").is_file()
    r = CliRunner().invoke(app, ["validate", "--results", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "results folder not found" in r.output


def test_committed_summary_is_current(df):
    committed = Path(RESULTS / "validation" / "summary.csv")
    assert committed.is_file(), "run `semoe validate` and commit results/validation/summary.csv"
    c = pd.read_csv(committed)
    assert len(c) == len(df)
    assert list(c["status"]) == list(df["status"])


def test_parse_train_config_backend_tokens_and_expert_options():
    from paper_repro.validate import expert_options

    base = ("paper-13.9b-scaled L4 D2048 E8 k1 F8192 bf16 B8 S1024 lr0.0003 steps20 world1 auto ep1 flat bucket0 "
            "zero0 params1248151552")
    old = parse_train_config(base)
    assert (old.moe, old.adamw) == ("torch", "foreach")
    c = parse_train_config(base + " moe-triton adamw-fused")
    assert (c.moe, c.adamw, c.backend) == ("triton", "fused", "auto")
    assert expert_options(c, "4efec81", "2026-11-24T06:48:48Z") == ("grouped", "triton")
    t = parse_train_config(base + " moe-torch adamw-fused")
    # before 676c520 the torch backend looped over experts in fp32; from it on, torch._grouped_mm
    assert expert_options(t, "4efec81", "2026-11-24T06:42:10Z") == ("loop", "torch")
    assert expert_options(t, "676c520", "2026-11-24T06:52:37Z") == ("grouped", "torch")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_train_config(base + " junk")


def test_new_train_rows_use_fused_adamw_notes(df):
    t = df[(df["source"] == "train") & (df["metric"] == "tokens_per_s")]
    new = t[t["config"].str.contains("adamw-fused")]
    assert len(new) >= 4 and new["note"].str.contains("AdamW fused").all()
    assert t[~t["config"].str.contains("adamw-")]["note"].str.contains("AdamW foreach").all()


def test_latest_runs_keep_each_sources_newest_dated_run():
    from paper_repro.validate import latest_runs

    rows = [dict(source="offload", run="aaa 2026-11-24T08:00:00Z", error=0.5),
            dict(source="offload", run="bbb 2026-11-24T13:10:45Z", error=0.02),
            dict(source="offload", run="bbb 2026-11-24T13:10:45Z", error=-0.03),
            dict(source="infer", run="ccc 2026-11-24T12:41:18Z", error=0.01),
            dict(source="infer", run="ddd 2026-11-24T06:58:41Z", error=0.7),
            dict(source="moe_layer", run="65fffb4+wip3", error=0.04),  # no date: all its rows kept
            dict(source="moe_layer", run="65fffb4+wip4", error=0.06)]
    got = latest_runs(pd.DataFrame(rows))
    assert sorted(got["run"]) == ["65fffb4+wip3", "65fffb4+wip4", "bbb 2026-11-24T13:10:45Z",
                                  "bbb 2026-11-24T13:10:45Z", "ccc 2026-11-24T12:41:18Z"]
    assert got["error"].abs().max() == pytest.approx(0.06)
