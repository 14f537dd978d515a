"""The lead's a-priori rule (results/validation/offload_step_mean_rule.md): from its commit on, an offload case's step
time is scored as the mean of its trace's timed steps (``step_ms_mean``, ``tokens_per_s_mean``); the bench's median
rows become ``derived`` (code: simulator.validate_offload_inputs, _traces)."""

import json

import pandas as pd
import pytest

from semoe.trace import TraceRow, write_csv
from simulator.validate_offload import (
    DERIVED,
    DIAGNOSTIC,
    compare,
    markdown_tables,
    step_mean_rule,
    timed_steps,
)

CFG = "a_compute_bound preset=paper-13.9b L2 D512 E4 k1 F1024 bf16 B2 S256 steps=4 warmup=1"
# warm-up 1 step, the counted step, then 3 timed ones: 100, 200, 600 ms (median 200, mean 300)
DURS = (0.9, 0.05, 0.1, 0.2, 0.6)
NEW = {"date": "2026-11-24T14:46:04Z", "commit": "not-a-commit", "device": "NVIDIA H100 80GB HBM3"}
OLD = dict(NEW, date="2026-11-24T13:10:45Z")


def _trace(path):
    rows, t = [], 0.0
    for i, d in enumerate(DURS):
        rows.append(TraceRow(0, -1, i, "step", t, t + d, 0, 0, "compute"))
        t += d + 0.01
    rows.append(TraceRow(0, -1, len(DURS), "profile_step", t, t + 5.0, 0, 0, "compute"))  # never a timed step
    write_csv(rows, path)


def _compare(tmp_path, run):
    (tmp_path / "run.json").write_text(json.dumps(run))
    _trace(tmp_path / "trace_a_cpu_on.csv")
    bench = pd.DataFrame([dict(run, config=CFG, placement="cpu", prefetch="on", metric="step_ms", value=200.0),
                          dict(run, config=CFG, placement="cpu", prefetch="on", metric="tokens_per_s",
                               value=2 * 256 / 0.2)])
    return compare(bench, traces=tmp_path)


def test_timed_steps_are_those_after_the_warmup_and_the_counted_step(tmp_path):
    _trace(tmp_path / "t.csv")
    assert timed_steps(tmp_path / "t.csv", 1, 4) == pytest.approx([0.1, 0.2, 0.6])
    assert timed_steps(tmp_path / "t.csv", 1, 2) == pytest.approx([0.1])
    assert step_mean_rule("x", NEW["date"]) and not step_mean_rule("x", OLD["date"])
    assert not step_mean_rule("x", "d")  # a placeholder date never qualifies
    assert step_mean_rule("0eab4a0", "2026-11-24T14:46:04Z")  # the first run of the rule (git or its date)
    assert not step_mean_rule("x", "2026-11-24T15:00:00Z")  # withdrawn after its first run: later runs score the median


def test_from_the_rule_on_the_mean_is_scored_and_the_median_is_derived(tmp_path):
    full = _compare(tmp_path, NEW)
    out = full[full["status"] != DIAGNOSTIC].set_index("metric")
    mean, med = out.loc["step_ms_mean"], out.loc["step_ms"]
    assert mean["status"] == "validated" and med["status"] == DERIVED
    assert mean["measured"] == pytest.approx(300.0) and med["measured"] == 200.0
    assert mean["predicted"] == med["predicted"] > 0
    assert mean["error"] == pytest.approx(mean["predicted"] / 300.0 - 1)
    assert "100, 200, 600 ms" in mean["note"] and med["note"].startswith(f"{DERIVED}: ")
    tok = out.loc["tokens_per_s_mean"]
    assert tok["status"] == "validated" and tok["measured"] == pytest.approx(2 * 256 / 0.3)
    assert out.loc["tokens_per_s", "status"] == DERIVED
    # the diagnostic compares with the mean too
    diag = full[full["status"] == DIAGNOSTIC]
    assert len(diag) == 1 and diag["measured"].iloc[0] == pytest.approx(300.0)
    md = markdown_tables(full)
    assert "| a_compute_bound | cpu | on | mean | 300 |" in md and "| 200, " in md


def test_older_runs_keep_the_median(tmp_path):
    out = _compare(tmp_path, OLD)
    assert not out["metric"].str.endswith("_mean").any()
    st = out[(out["metric"] == "step_ms") & (out["status"] != DIAGNOSTIC)]
    assert st["status"].tolist() == ["validated"] and st["measured"].iloc[0] == 200.0
    assert out[out["status"] == DIAGNOSTIC]["measured"].iloc[0] == 200.0
