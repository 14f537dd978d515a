"""CPU checks of the benchmark/profile plumbing (CSV schema, plot), no GPU needed."""

from __future__ import annotations

import csv

from kernels.bench import moe_layer, plot_moe_layer
from kernels.profile import COLUMNS, Profile, gpu_slug


def test_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "h100_80gb_hbm3"
    assert gpu_slug("NVIDIA H200") == "h200"


def test_profile_rows_and_atomic_write(tmp_path):
    p = Profile("NVIDIA H100 80GB HBM3", budget_s=10)
    p.add("gemm", "torch", "bf16", m=128, n=256, k=64, io_bytes=1000, flop=2 * 128 * 256 * 64, time_s=1e-5)
    p.add("copy_d2d", "torch", "bytes", m=2**20, io_bytes=2**21, time_s=1e-3)
    out = tmp_path / "h100.csv"
    p.write(out)
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == COLUMNS and len(rows) == 2
    assert abs(float(rows[0]["TFLOPps"]) - 2 * 128 * 256 * 64 / 1e-5 / 1e12) < 1e-3
    assert float(rows[1]["GBps"]) == 2**21 / 1e-3 / 1e9 or abs(float(rows[1]["GBps"]) - 2.097) < 1e-3
    assert not (tmp_path / "h100.tmp").exists()


def test_flop_count_and_plot(tmp_path):
    c = moe_layer.CONFIGS["mixtral_like"]
    assert c.flops("fwd") == 4 * 16384 * 2 * 4096 * 14336 and c.flops("fwd_bwd") == 3 * c.flops("fwd")
    path = tmp_path / "moe.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(moe_layer.CSV_HEADER)
        for impl, v in (("dense", 700.0), ("ours", 500.0)):
            for mode in ("fwd", "fwd_bwd"):
                w.writerow(["2026-11-24", "abc", "H100", "mixtral_like", impl, mode, "tflops", v])
    png = plot_moe_layer.plot(path, tmp_path / "moe.png")
    assert png.exists() and png.stat().st_size > 1000


def test_profile_host_sweep_rows_feed_the_cost_model(tmp_path):
    from kernels.profile import Profile as ProfileRows
    from kernels.profile import sweep_host
    from semoe.presets import cluster_preset
    from simulator.cost import HOST_OP_S, CostModel, Profile

    rows = ProfileRows("cpu", budget_s=1e9)
    sweep_host(rows, device="cpu")
    ref = next(r for r in rows.rows if r["impl"] == "reference")
    assert ref["op"] == "host_op" and int(ref["m"]) > 20  # the tiny model issues dozens of kernels
    path = tmp_path / "prof.csv"
    rows.write(path)
    gpu = cluster_preset("h100-single").gpu
    cm = CostModel(gpu, Profile.from_csv(path))
    assert cm.host_op_s == float(ref["time_s"]) > 0
    assert cm.host_time(10) == 10 * cm.host_op_s
    assert CostModel(gpu, None).host_op_s == HOST_OP_S
