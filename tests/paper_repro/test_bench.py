"""Regression benchmarks: direction of metrics, the check, the plot, the CLI."""

from __future__ import annotations

import pandas as pd
import pytest

from paper_repro.bench import check, check_frame, direction, plot
from semoe.cli import main

ROWS = [
    # date, commit, device, config, impl, metric, value
    ("d1", "a", "H100", "mix", "ours", "ms", 10.0),
    ("d1", "a", "H100", "mix", "ours", "tflops", 600.0),
    ("d1", "a", "H100", "mix", "ours", "loss", 3.0),
    ("d2", "b", "H100", "mix", "ours", "ms", 9.0),  # best so far
    ("d2", "b", "H100", "mix", "ours", "tflops", 640.0),
    ("d3", "c", "H100", "mix", "ours", "ms", 9.6),  # 6.7% worse than the best earlier: flagged
    ("d3", "c", "H100", "mix", "ours", "tflops", 630.0),  # 1.6% worse: within 5%
    ("d3", "c", "H100", "mix", "ours", "loss", 9.0),  # not a performance metric: never flagged
    ("d3", "c", "H200", "mix", "ours", "ms", 50.0),  # other device: its own series (one row)
]


def _frame():
    return pd.DataFrame(ROWS, columns=["date", "commit", "device", "config", "impl", "metric", "value"])


def test_direction_of_metrics():
    assert direction("tflops") == direction("tokens_per_s") == direction("gbps") == direction("mfu") == 1
    assert direction("ms") == direction("step_time_s") == direction("block_compute_ms") == -1
    assert direction("loss") == direction("expert_GB_total") == 0


def test_check_flags_only_series_worse_than_their_best_earlier_row():
    bad = check_frame(_frame(), tolerance=0.05)
    assert len(bad) == 1
    row = bad.iloc[0]
    assert (row["metric"], row["device"], row["best"], row["latest"]) == ("ms", "H100", 9.0, 9.6)
    assert row["worse_by"] == pytest.approx(0.6 / 9.0)
    assert row["latest_commit"] == "c"
    assert check_frame(_frame(), tolerance=0.10).empty


def test_check_and_plot_over_a_folder_and_the_cli(tmp_path, capsys):
    _frame().to_csv(tmp_path / "moe.csv", index=False)
    pd.DataFrame({"date": ["x"], "wall_s": [1.0]}).to_csv(tmp_path / "wide.csv", index=False)
    found, skipped = check(tmp_path)
    assert list(found) == ["moe.csv"] and skipped == ["wide.csv"]
    paths = plot(tmp_path, tmp_path / "png")
    assert [p.name for p in paths] == ["moe.png"] and paths[0].stat().st_size > 1000
    assert main(["bench", "check", "--results", str(tmp_path)]) == 1
    assert "1 regression(s)" in capsys.readouterr().out
    assert main(["bench", "check", "--results", str(tmp_path), "--tolerance", "0.1"]) == 0
    assert main(["bench", "check", "--results", str(tmp_path / "empty")]) == 2  # no CSVs: one line, exit 2


def test_bench_run_needs_a_gpu_or_a_known_suite(capsys):
    assert main(["bench", "--suite", "nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
