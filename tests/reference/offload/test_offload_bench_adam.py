"""The bench's probe of the engine's CPU AdamW (alone and under load) and its block-read probe, on the CPU."""

from __future__ import annotations

import csv
import time

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
    # on the CPU: alone and beside the SSD I/O thread; bf16 and fp32 gradients; both layer shapes
    keys = {(r["config"], r["placement"]) for r in recs}
    assert keys == set(got) and len(recs) == 2 * 2 * 2
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
    assert set(probes[run]) == {(E, 512, g, load) for E in (2, 4) for g in ("bf16", "fp32") for load in ("alone", "ssd")}


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
    assert got["ssd_block_read_GBps"] > 0 and got["ssd_read_GBps"] > 0 and got["ssd_block_prep_GBps"] > 0


def test_gpu_load_loop_runs_on_the_cpu_stand_in_and_a_failed_load_is_a_row(tmp_path, monkeypatch):
    """The GPU load's loop (matmuls, the copies of both directions, the stop) runs on small CPU tensors, so
    the GPU run does not meet it for the first time; a load that fails costs only its own rows."""
    with bench._Load({"gpu", "pcie"}, tmp_path / "load", 1 << 10, device="cpu") as load:
        time.sleep(0.1)
    assert load.rounds["gpu"] > 0 and not load.errors and not load.threads[0].is_alive()

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
    assert {load for _, load in got} == {"alone"}
    recs = _rows(tmp_path / "rows.csv")
    assert [(r["placement"], r["metric"]) for r in recs if r["metric"] == "error"] == [("ssd", "error")]
