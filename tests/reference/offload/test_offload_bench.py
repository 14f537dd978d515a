"""The H100 offload benchmark runs end to end on the CPU in --quick mode (so the GPU run cannot die on a typo)."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from reference.offload.bench import COLUMNS, main
from semoe.trace import read_csv


def test_bench_quick_writes_rows_and_traces(tmp_path):
    out = tmp_path / "out"
    assert main(["--out", str(out), "--quick", "--budget-s", "120", "--ssd-dir", str(tmp_path / "ssd"), "--profile"]) == 0
    for placement in ("gpu", "cpu", "ssd"):  # one profiled step per placement (prefetch on)
        assert "Self CPU" in (out / f"profile_a_{placement}.txt").read_text()
    # the contract with the simulator: every measured case's rows validate as written, with its traces
    from simulator.validate_offload import compare

    val = compare(out / "offload_train.csv", traces=out)
    # a run dated now is past the lead's step-mean rule (withdrawn after its one run, 0eab4a0): each case's step is
    # scored by the bench's median row, and no mean rows are made
    st = val[(val["metric"] == "step_ms") & (val["status"] == "validated")]
    assert len(st) == 7 and (st["predicted"] > 0).all()
    assert not val["metric"].isin(["step_ms_mean", "tokens_per_s_mean"]).any()
    # and each traced case once more, given its own trace's phase rates (diagnostic, not a prediction)
    diag = val[val["status"] == "diagnostic"]
    assert len(diag) == 7 and (diag["metric"] == "step_ms").all() and (diag["predicted"] > 0).all()
    assert (val["metric"] == "trace_ssd_read_gb_per_step").any()
    assert val[val["metric"] == "ssd_block_rewrite_prep_GBps"]["used_for_fitting"].all()
    assert (val["metric"] == "ssd_block_write_GBps").sum() == 1
    # the run probed the block preparation: its traces check the probe instead of replacing it
    assert (val["metric"] == "trace_ssd_block_prep_GBps").sum() == 1
    # the engine's AdamW probes; a run on the CPU (inline executors) takes the 'alone' ones as inputs, of the
    # case's layer size and gradient dtype (a: accumulated fp32 gradients, b: bf16)
    probes = val[val["metric"] == "cpu_adam_engine_Mparams_per_s"]
    assert len(probes) == 2 * 2 * 4
    assert probes[probes["placement"] == "alone"]["used_for_fitting"].all()
    assert not probes[probes["placement"] != "alone"]["used_for_fitting"].any()
    off = val[(val["metric"] == "step_ms") & val["placement"].isin(["cpu", "ssd"]) & (val["status"] == "validated")]
    # (the run-level rule, which the adjacent probes of task hB3 replace here: checked without them)
    runlevel = compare(pd.read_csv(out / "offload_train.csv", dtype=str).pipe(
        lambda d: d[~d["metric"].str.startswith("cpu_adam_adjacent_")]), traces=out)
    rl = runlevel[(runlevel["metric"] == "step_ms") & runlevel["placement"].isin(["cpu", "ssd"])
                  & (runlevel["status"] == "validated")]
    assert len(rl) == len(off) and rl["cpu_adam_input"].str.startswith("engine probe 'alone'").all()
    assert rl[rl["config"].str.startswith("a_")]["cpu_adam_input"].str.contains("grad=fp32:").all()
    assert rl[rl["config"].str.startswith("b_")]["cpu_adam_input"].str.contains("grad=bf16:").all()
    assert (val[val["metric"] == "step_ms"].query("placement == 'gpu'")["cpu_adam_input"] == "").all()
    # task hB: the engine's I/O cycle probe is the SSD input; the thread A/B cases are listed, not predicted
    cyc = val[val["metric"].str.startswith("ssd_cycle_")]
    assert len(cyc) == 3 and cyc["used_for_fitting"].all()
    ab = val[val["config"].str.split().str[0].str.endswith("_torch_threads")]
    assert set(ab[ab["metric"] == "step_ms"]["placement"]) == {"ssd", "cpu"} and (ab["status"] == "not_modelled").all()
    assert (val[val["metric"] == "threads_adam"]["status"] == "not_modelled").all()
    # task hB3: every offloaded case of (a) and (b), not the gpu one nor the A/B twins, bracketed by its own
    # adjacent AdamW probes, which are its AdamW input
    adj = val[val["metric"].str.startswith("cpu_adam_adjacent_")]
    cases = {(c.split()[0], p, pf) for c, p, pf in zip(adj["config"], adj["placement"], adj["prefetch"])}
    assert cases == {("a_compute_bound", p, pf) for p in ("cpu", "ssd") for pf in ("on", "off")} | {
        ("b_over_budget", "ssd", "on"), ("b_over_budget", "cpu", "on")}
    assert len(adj) == 2 * len(cases) and (adj["measured"] > 0).all() and (adj["status"] == "fitted").all()
    assert off["cpu_adam_input"].str.startswith("adjacent probes of this case (mean of before").all()
    # task hH: every ssd case (a on / off, b on), not the cpu ones, also bracketed by its contention probes (AdamW
    # and the SSD I/O cycle, alone and beside each other), whose beside / alone ratios its simulation takes
    con = val[val["metric"].str.startswith("contention_")]
    ccases = {(c.split()[0], p, pf) for c, p, pf in zip(con["config"], con["placement"], con["prefetch"])}
    assert ccases == {("a_compute_bound", "ssd", "on"), ("a_compute_bound", "ssd", "off"), ("b_over_budget", "ssd", "on")}
    assert len(con) == 3 * 2 * 9 and (con["measured"] > 0).all() and con["used_for_fitting"].all()
    ssd = off[off["placement"] == "ssd"]
    assert ssd["cpu_adam_input"].str.contains("; contention (beside / alone", regex=False).all()
    assert not off[off["placement"] == "cpu"]["cpu_adam_input"].str.contains("contention").any()
    for pos in ("before", "after"):  # the "alone" AdamW of a contention probe is the adjacent idle probe just taken
        for (lab, p, pf), g in con.groupby([con["config"].str.split().str[0], "placement", "prefetch"]):
            alone = g[g["metric"] == f"contention_{pos}_adam_alone_Mparams_per_s"]["measured"]
            idle = adj[(adj["config"].str.split().str[0] == lab) & (adj["placement"] == p) & (adj["prefetch"] == pf)
                       & (adj["metric"] == f"cpu_adam_adjacent_{pos}_Mparams_per_s")]["measured"]
            assert len(alone) == len(idle) == 1 and float(alone.iloc[0]) == pytest.approx(float(idle.iloc[0]))
    with open(out / "offload_train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    # config: the full `config_string`, label first, that the simulator's validation parses back
    from simulator.validate_offload import parse_config

    for r in rows:
        if r["config"].split()[0] in ("a_compute_bound", "b_over_budget", "c_deepspeed"):
            cfg = parse_config(r["config"])
            assert cfg.preset == "tiny" and cfg.seq == 32
            if r["config"].startswith("c_"):  # DeepSpeed child: 2 warm-up steps, 2 timed
                assert (cfg.warmup, cfg.steps) == (2, 2)
            else:  # the engine's counters cover one counted step + 2 timed ones
                assert (cfg.warmup, cfg.steps) == (1, 3)
    cfg_b = parse_config(next(r["config"] for r in rows if r["config"].startswith("b_over_budget")))
    assert cfg_b.cache == 6 and cfg_b.experts == 8 and cfg_b.budget_gb > 0  # 0.75 of 8 experts, per layer
    got = {(r["config"].split()[0], r["placement"], r["prefetch"], r["metric"]) for r in rows}
    for placement, pf in (("gpu", "-"), ("cpu", "on"), ("cpu", "off"), ("ssd", "on"), ("ssd", "off")):
        assert ("a_compute_bound", placement, pf, "step_ms") in got
        assert ("a_compute_bound", placement, pf, "tokens_per_s") in got
    assert ("a_compute_bound", "cpu", "on", "ratio_vs_gpu") in got
    assert ("a_compute_bound", "ssd", "on", "cache_hit_rate") in got
    assert ("a_compute_bound", "ssd", "on", "counted_steps") in got
    for m in ("cpu_adam_Mparams_per_s", "cpu_adam_fp32grad_Mparams_per_s"):
        assert ("bandwidth", "cpu", "-", m) in got
    assert ("bandwidth", "ssd", "-", "ssd_block_rewrite_prep_GBps") in got
    assert ("bandwidth", "cpu", "-", "cpu_threads_worker") in got
    for m in ("ssd_cycle_read_GBps", "ssd_cycle_write_GBps", "ssd_cycle_prep_GBps"):
        assert ("bandwidth", "ssd", "-", m) in got
    for case in (("a_compute_bound", "cpu", "on"), ("a_compute_bound_torch_threads", "ssd", "on"),
                 ("b_over_budget_torch_threads", "cpu", "on")):
        for m in ("step_ms", "cpu_adam_ms_per_step", "threads_adam", "threads_io"):
            assert (*case, m) in got, (case, m)
    assert (out / "ab_trace_a_ssd_on.csv").is_file() and (out / "ab_trace_b_cpu_on.csv").is_file()
    assert ("bandwidth", "ssd", "-", "ssd_block_read_GBps") in got
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["device"] == "cpu" and run["date"] == rows[0]["date"]
    assert ("b_over_budget", "ssd", "on", "cache_hit_rate") in got
    assert ("c_deepspeed", "zero_offload_cpu", "-", "skipped") in got  # no CUDA here
    for m in ("ssd_write_GBps", "ssd_read_GBps"):
        assert ("bandwidth", "ssd", "-", m) in got
    vals = {(r["config"].split()[0], r["placement"], r["prefetch"], r["metric"]): float(r["value"]) for r in rows}
    assert vals[("a_compute_bound", "ssd", "on", "counted_steps")] == vals[("a_compute_bound", "ssd", "on", "steps")] + 1
    # the profiled step (cpu on, ssd on) stays out of the counters: every step ships the same gradients
    d2h = {pf: vals[("a_compute_bound", "cpu", pf, "d2h_gb_per_step")] for pf in ("on", "off")}
    assert d2h["on"] == d2h["off"] > 0
    assert vals[("a_compute_bound", "ssd", "on", "ssd_write_gb_per_step")] == vals[("a_compute_bound", "ssd", "off",
                                                                                      "ssd_write_gb_per_step")]
    assert "profile_step" in {r.phase for r in read_csv(out / "trace_a_cpu_on.csv")}
    assert vals[("a_compute_bound", "ssd", "on", "cache_experts_per_layer")] == parse_config(
        next(r["config"] for r in rows if r["config"].startswith("a_compute_bound"))).cache
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
    # run_deepspeed's own module: its subprocess / os are patched below
    from reference.offload import bench_cases as bench
    from semoe.presets import load_model

    compile(bench.DS_CHILD, "ds_child", "exec")  # no syntax slip in the GPU-only child

    class FakePopen:  # the child as it fails on a machine without ninja: output goes straight to the log
        def __init__(self, cmd, stdout=None, **kw):
            assert cmd[1] == "-u" and cmd[2] == "-c" and kw["start_new_session"]
            assert kw["env"]["PYTHONUNBUFFERED"] == "1"
            stdout.write('[child 0.1 s] building\n{"metric": "cpu_adam_build_s", "value": 2.5}\n'
                         "Traceback ...\nRuntimeError: Ninja is required to load C++ extensions\n")
            self.pid, self.returncode = 0, 1

        def wait(self, timeout=None):
            assert timeout == 30
            return 1

    rows = bench.Rows(tmp_path / "rows.csv", "cpu")  # (asks git for the commit: before the patch)
    monkeypatch.setattr(bench.subprocess, "Popen", FakePopen)
    why = bench.run_deepspeed(rows, load_model("tiny"), 2, 16, 2, None, 30, tmp_path)
    rows.close()
    assert why == "rc=1: RuntimeError: Ninja is required to load C++ extensions"
    with open(tmp_path / "rows.csv", newline="") as f:
        got = {(r["metric"], r["value"]) for r in csv.DictReader(f)}
    assert ("deepspeed_failed", "1") in got and ("cpu_adam_build_s", "2.5") in got
    assert "Ninja is required" in (tmp_path / "deepspeed_child.log").read_text()


def test_deepspeed_timeout_keeps_the_childs_progress(tmp_path, monkeypatch):
    import subprocess

    # run_deepspeed's own module: its subprocess / os are patched below
    from reference.offload import bench_cases as bench
    from semoe.presets import load_model

    class SlowPopen:  # a JIT build that outlives the cap
        def __init__(self, cmd, stdout=None, **kw):
            stdout.write("[child 12.0 s]   CPUAdam build still running (10 s)\n")
            self.pid, self.waited = 10**9, 0  # no such process group: killpg must tolerate that

        def wait(self, timeout=None):
            self.waited += 1
            if self.waited == 1:
                raise subprocess.TimeoutExpired("child", timeout)
            return -9

    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    monkeypatch.setattr(bench.subprocess, "Popen", SlowPopen)
    monkeypatch.setattr(bench.os, "killpg", lambda pid, sig: (_ for _ in ()).throw(ProcessLookupError()))
    why = bench.run_deepspeed(rows, load_model("tiny"), 2, 16, 2, None, 30, tmp_path, "c_deepspeed L2")
    rows.close()
    assert why.startswith("rc=timeout: timed out after 30 s") and "CPUAdam build still running" in why
    log_text = (tmp_path / "deepspeed_child.log").read_text()
    assert "still running" in log_text and "rc=timeout" in log_text
    with open(tmp_path / "rows.csv", newline="") as f:
        assert [(r["config"], r["metric"]) for r in csv.DictReader(f)] == [("c_deepspeed L2", "deepspeed_failed")]


def test_cache_per_layer_is_a_fraction_of_one_layers_experts():
    from reference.offload.bench import cache_per_layer
    from semoe.presets import load_model

    m = load_model("tiny").replace(experts=16)
    assert cache_per_layer(m, 0.75) == 12  # per MoE layer, whatever the number of layers
    assert cache_per_layer(m.replace(layers=m.layers * 2), 0.75) == 12
    assert cache_per_layer(m, 0.01) == 1
    with pytest.raises(ValueError, match="cache fraction"):
        cache_per_layer(m, 1.5)
