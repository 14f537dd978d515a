"""The bench's probe of the engine's CPU AdamW (alone and under load) and its block-read probe, on the CPU."""

from __future__ import annotations

import csv
import time

import pytest

from reference.offload import bench


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_engine_adam_probe_rows_per_layer_gradient_dtype_and_load(tmp_path):
    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    layers = {"a": (2, {"w1_EDF": (8, 32), "w2_EFD": (32, 8)}), "b": (4, {"w1_EDF": (8, 32), "w2_EFD": (32, 8)})}
    got = bench.measure_engine_adam(rows, tmp_path / "ssd", True, layers)
    rows.close()
    recs = _rows(tmp_path / "rows.csv")
    # on the CPU: alone, on the worker with the engine's and with 1 thread, and beside the SSD I/O thread; bf16 and
    # fp32 gradients; both layer shapes
    from reference.offload.cpu_adam import adam_threads

    threads = {r["metric"]: int(r["value"]) for r in recs if r["metric"].startswith("cpu_threads")}
    # the worker's intra-op thread count, read inside it, is the engine's rule; the main thread keeps its own
    assert threads == {"cpu_threads_worker": adam_threads(), "cpu_threads_main": __import__("torch").get_num_threads()}
    beside = [r for r in recs if r["metric"] in bench.SSD_BESIDE_ADAM]  # the I/O thread's rates beside the update
    assert {(r["config"], r["placement"], r["metric"]) for r in beside} == {
        (bench.adam_probe_config(E, 512, "-"), "ssd@worker", m) for E in (2, 4) for m in bench.SSD_BESIDE_ADAM}
    assert all(float(r["value"]) > 0 for r in beside)
    recs = [r for r in recs if not r["metric"].startswith("cpu_threads") and r["metric"] not in bench.SSD_BESIDE_ADAM]
    keys = {(r["config"], r["placement"]) for r in recs}
    assert keys == set(got) and len(recs) == 2 * 2 * len(bench.ADAM_LOADS_CPU)
    assert set(bench.ADAM_LOADS_CPU) == {"alone", "alone@worker", "alone@worker:t1", "ssd@worker"}
    assert {r["placement"] for r in recs} == set(bench.ADAM_LOADS_CPU)
    assert {r["metric"] for r in recs} == {bench.ENGINE_ADAM_METRIC}
    assert {r["config"] for r in recs} == {bench.adam_probe_config(E, 512, g) for E in (2, 4) for g in ("bf16", "fp32")}
    assert all(float(r["value"]) > 0 for r in recs)
    assert not (tmp_path / "ssd" / "adam_load").exists()  # the load's blocks are cleaned up
    # the probe's config is what the simulator's validation reads back
    import pandas as pd

    from simulator.validate_offload import engine_adam_probes

    probes = engine_adam_probes(pd.DataFrame(recs))
    (run,) = probes
    assert set(probes[run]) == {(E, 512, g, load) for E in (2, 4) for g in ("bf16", "fp32")
                                for load in bench.ADAM_LOADS_CPU}


def test_adam_load_names_parse_to_parts_and_thread_role():
    assert bench.parse_adam_load("alone") == (set(), False)
    assert bench.parse_adam_load("alone@worker") == (set(), True)
    assert bench.parse_adam_load("gpu+pcie+ssd@worker") == ({"gpu", "pcie", "ssd"}, True)
    assert bench.parse_adam_load("gpusleep@worker") == ({"gpusleep"}, True)
    assert bench.parse_adam_load("gpu+pcie+ssd@worker:tall") == ({"gpu", "pcie", "ssd"}, True)
    assert bench.parse_adam_load("alone@worker:t4") == (set(), True)
    for load in bench.ADAM_LOADS_CUDA + bench.ADAM_LOADS_CPU:
        bench.parse_adam_load(load)
    # the update's intra-op threads: the main thread's own, the engine's rule, N, or torch's default
    assert bench.adam_load_threads("gpu", 14, 16) is None
    assert bench.adam_load_threads("gpu@worker", 14, 16) == 14
    assert bench.adam_load_threads("alone@worker:t4", 14, 16) == 4
    assert bench.adam_load_threads("gpu+pcie+ssd@worker:tall", 14, 16) == 16
    for bad in ("alone@worker:t0", "alone@worker:x", "alone:t2", "alone@worker:t"):
        with pytest.raises(ValueError, match="threads|thread role|unknown part"):
            bench.parse_adam_load(bad)
    with pytest.raises(ValueError, match="unknown part"):
        bench.parse_adam_load("gpu+nvme")
    with pytest.raises(ValueError, match="thread role"):
        bench.parse_adam_load("gpu@main")


def test_worker_probe_times_the_update_on_the_worker_thread(tmp_path, monkeypatch):
    """``@worker`` loads run the update on the probe's worker thread (the engine's thread role), the others on the
    caller's thread."""
    import threading

    # measure_engine_adam's own module: the ADAM_LOADS_CPU it reads is patched below
    from reference.offload import bench_adam as bench
    from reference.offload import cpu_adam

    seen = []
    real = cpu_adam.adamw_layer_

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(cpu_adam, "adamw_layer_", spy)
    monkeypatch.setattr(bench, "ADAM_LOADS_CPU", ("alone", "alone@worker"))
    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    bench.measure_engine_adam(rows, tmp_path / "ssd", True, {"a": (2, {"w1_EDF": (4, 8), "w2_EFD": (8, 4)})}, reps=1)
    rows.close()
    # per load: 2 gradient dtypes x (1 warm-up + 1 timed) calls
    main = threading.main_thread().name
    assert seen[:4] == [main] * 4 and all(n.startswith("adam-worker") for n in seen[4:]) and len(seen) == 8


def test_ssd_load_runs_the_io_threads_writes_and_reads_until_stopped(tmp_path):
    with bench._Load({"ssd"}, tmp_path / "load", 1 << 12) as load:
        time.sleep(0.2)
        assert load.rounds["ssd"] > 0 and (tmp_path / "load").is_dir()
    n = load.rounds["ssd"]
    time.sleep(0.05)
    assert load.rounds["ssd"] == n and not load.threads[0].is_alive() and not (tmp_path / "load").exists()


def test_bandwidth_probes_include_the_engines_block_read(tmp_path):
    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    bench.measure_bandwidth(rows, tmp_path / "ssd", True)
    rows.close()
    got = {r["metric"]: float(r["value"]) for r in _rows(tmp_path / "rows.csv")}
    assert got["ssd_block_read_GBps"] > 0 and got["ssd_read_GBps"] > 0
    # the engine's write-back: timed write + fsync, and the host work around it when it replaces an old version
    assert got["ssd_block_write_GBps"] > 0 and got["ssd_block_rewrite_prep_GBps"] > 0
    assert "ssd_block_prep_GBps" not in got  # the fresh-name probe is gone (it left the old version's unlink out)


def test_rewrite_prep_probe_counts_the_rename_over_the_old_version(tmp_path, monkeypatch):
    """Every timed write replaces an existing block, so a slow unlink of the old version (here: 50 ms injected
    into the rename over an existing file) is in the prep rate, not in the write rate."""
    import os

    real = os.replace

    def slow_replace(src, dst):
        if os.path.exists(dst) and str(dst).endswith(".bin"):
            time.sleep(0.05)
        return real(src, dst)

    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    monkeypatch.setattr(os, "replace", slow_replace)
    bench.measure_bandwidth(rows, tmp_path / "ssd", True)
    rows.close()
    got = {r["metric"]: float(r["value"]) for r in _rows(tmp_path / "rows.csv")}
    # quick blocks are 16 MiB: the prep takes at least the injected 50 ms, so it is below 16 MiB / 50 ms
    assert got["ssd_block_rewrite_prep_GBps"] < (16 << 20) / 0.05 / 1e9


def test_gpu_load_loop_runs_on_the_cpu_stand_in_and_a_failed_load_is_a_row(tmp_path, monkeypatch):
    """The GPU load's loop (matmuls, the copies of both directions, the stop) runs on small CPU tensors, so
    the GPU run does not meet it for the first time; a load that fails costs only its own rows."""
    # measure_engine_adam's own module: the _Load it runs is patched below
    from reference.offload import bench_adam as bench

    with bench._Load({"gpu", "pcie"}, tmp_path / "load", 1 << 10, device="cpu") as load:
        time.sleep(0.1)
    assert load.rounds["gpu"] > 0 and not load.errors and not load.threads[0].is_alive()
    with bench._Load({"gpusleep"}, tmp_path / "load", 1 << 10, device="cpu") as load:  # the sleeping-host variant
        time.sleep(0.05)
    assert load.rounds["gpu"] > 0 and not load.errors and len(load.threads) == 1

    real = bench._Load

    def broken(parts, *a, **kw):
        ld = real(parts, *a, **kw)
        if "ssd" in parts:
            ld.errors.append("ssd load: OSError: disk full")
        return ld

    monkeypatch.setattr(bench, "_Load", broken)
    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    got = bench.measure_engine_adam(rows, tmp_path / "ssd", True, {"a": (2, {"w1_EDF": (4, 8), "w2_EFD": (8, 4)})})
    rows.close()
    assert {load for _, load in got} == {"alone", "alone@worker", "alone@worker:t1"}
    recs = _rows(tmp_path / "rows.csv")
    assert [(r["placement"], r["metric"]) for r in recs if r["metric"] == "error"] == [("ssd@worker", "error")]
