"""The H100 offload benchmark runs end to end on the CPU in --quick mode (so the GPU run cannot die on a typo)."""

from __future__ import annotations

import csv

from reference.offload.bench import COLUMNS, main
from semoe.trace import read_csv


def test_bench_quick_writes_rows_and_traces(tmp_path):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--quick", "--budget-s", "120", "--ssd-dir", str(tmp_path / "ssd")]) == 0
    with open(out / "offload_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    got = {(r["config"], r["placement"], r["prefetch"], r["metric"]) for r in rows}
    for placement, pf in (("gpu", "-"), ("cpu", "on"), ("cpu", "off"), ("ssd", "on"), ("ssd", "off")):
        assert ("a_compute_bound", placement, pf, "step_ms") in got
        assert ("a_compute_bound", placement, pf, "tokens_per_s") in got
    assert ("a_compute_bound", "cpu", "on", "ratio_vs_gpu") in got
    assert ("a_compute_bound", "ssd", "on", "cache_hit_rate") in got
    assert ("b_over_budget", "ssd", "on", "cache_hit_rate") in got
    assert ("c_deepspeed", "zero_offload_cpu", "-", "skipped") in got  # no CUDA here
    for m in ("ssd_write_GBps", "ssd_read_GBps"):
        assert ("bandwidth", "ssd", "-", m) in got
    vals = {(r["config"], r["placement"], r["prefetch"], r["metric"]): float(r["value"]) for r in rows}
    states, budget = vals[("b_over_budget", "-", "-", "states_gb")], vals[("b_over_budget", "-", "-", "budget_gb")]
    assert states >= 3 * budget * 0.999
    assert not any(r["metric"] == "error" for r in rows), [r for r in rows if r["metric"] == "error"]
    trace = read_csv(out / "trace_a_ssd_on.csv")
    assert {"step", "h2d_fetch", "d2h_grad", "ssd_read", "ssd_write", "cpu_adam"} <= {r.phase for r in trace}
    # appending: a second run adds rows under the same header
    n = len(rows)
    assert main(["--out", str(out), "--quick", "--configs", "bandwidth", "--ssd-dir", str(tmp_path / "ssd")]) == 0
    with open(out / "offload_train.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) > n


def test_deepspeed_child_script_compiles_and_a_failure_becomes_a_row(tmp_path, monkeypatch):
    from reference.offload import bench
    from semoe.presets import load_model

    compile(bench.DS_CHILD, "ds_child", "exec")  # no syntax slip in the GPU-only child

    class FakePopen:  # the child as it fails on a machine without ninja
        def __init__(self, cmd, **kw):
            assert cmd[1] == "-c" and kw["start_new_session"]
            self.pid, self.returncode = 0, 1

        def communicate(self, timeout=None):
            assert timeout == 30
            return ('{"metric": "cpu_adam_build_s", "value": 2.5}\n',
                    "Traceback ...\nRuntimeError: Ninja is required to load C++ extensions")

    rows = bench.Rows(tmp_path / "rows.csv", "cpu")  # (asks git for the commit: before the patch)
    monkeypatch.setattr(bench.subprocess, "Popen", FakePopen)
    why = bench.run_deepspeed(rows, load_model("tiny"), 2, 16, 2, None, 30, tmp_path)
    rows.close()
    assert why == "rc=1: RuntimeError: Ninja is required to load C++ extensions"
    with open(tmp_path / "rows.csv", newline="") as f:
        got = {(r["metric"], r["value"]) for r in csv.DictReader(f)}
    assert ("deepspeed_failed", "1") in got and ("cpu_adam_build_s", "2.5") in got
    assert "Ninja is required" in (tmp_path / "deepspeed_child.log").read_text()
