"""Compute cost model: measured ceilings, profile interpolation, warnings outside the range."""

import pytest

from semoe import SpecError, cluster_preset
from simulator.cost import CostModel, Profile, gemm_efficiency


def h100():
    return CostModel(cluster_preset("h100-single").gpu)


def test_gemm_efficiency_reproduces_measured_h100_points():
    for m, tflops in [(128, 337), (512, 738), (2048, 777), (8192, 746)]:
        assert gemm_efficiency(m) * 989 == pytest.approx(tflops)
    assert gemm_efficiency(64) == pytest.approx(gemm_efficiency(128) / 2)


def test_roofline_matmul_time_h100_and_a100_scaled_by_peak():
    cm = h100()
    t = cm.matmul(2048, 16384, 4096)
    assert 2 * 2048 * 16384 * 4096 / (t - cm.launch_s) / 1e12 == pytest.approx(777)
    a100 = CostModel(cluster_preset("dgx-a100-80g").gpu)
    ta = a100.matmul(2048, 16384, 4096)
    assert (ta - a100.launch_s) / (t - cm.launch_s) == pytest.approx(989 / 312)


def test_memory_bound_kernel_uses_measured_hbm_fraction():
    cm = h100()
    assert cm.memory(3.1e9) - cm.launch_s == pytest.approx(3.1e9 / (3350e9 * 3100 / 3350))


def write_profile(tmp_path, rows, header="op,dtype,m,n,k,time_s"):
    p = tmp_path / "gpu.csv"
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_profile_interpolates_in_log_m_and_warns_outside(tmp_path):
    # 1 and 4 PFLOP-ish: m=1024 -> 100 TFLOP/s, m=4096 -> 400 TFLOP/s
    f = lambda m, tf: 2 * m * 1024 * 1024 / (tf * 1e12)  # noqa: E731
    p = write_profile(tmp_path, [f"matmul,bf16,1024,1024,1024,{f(1024, 100)}", f"matmul,bf16,4096,1024,1024,{f(4096, 400)}"])
    cm = CostModel(cluster_preset("h100-single").gpu, Profile.from_csv(p))
    assert 2 * 2048 * 1024 * 1024 / cm.matmul(2048, 1024, 1024) / 1e12 == pytest.approx(250)  # midpoint in log m
    assert cm.matmul(1024, 1024, 1024) == pytest.approx(f(1024, 100))
    with pytest.warns(UserWarning, match="roofline"):
        cm.matmul(8192, 1024, 1024)


def test_profile_accepts_alias_columns_and_names_missing_ones(tmp_path):
    p = write_profile(tmp_path, ["grouped_matmul,bf16,512,4096,1024,0.001,8"], header="op,dtype,tokens,hidden,ffn,time_s,groups")
    prof = Profile.from_csv(p)
    assert ("grouped_matmul", "bf16", 1024, 4096, 8) in prof.curves
    bad = write_profile(tmp_path, ["matmul,bf16,1,2,3"], header="op,dtype,m,n,k")
    with pytest.raises(SpecError, match="time_s"):
        Profile.from_csv(bad)
    with pytest.raises(SpecError, match="not found"):
        Profile.from_csv(tmp_path / "missing.csv")


def test_moe_layer_prediction_and_comparison(tmp_path):
    from simulator.calibration import CONFIGS, compare, predict_moe_layer

    c = cluster_preset("h100-single")
    for cfg in CONFIGS.values():
        p = predict_moe_layer(c, cfg)
        assert 2 * p["fwd"] < p["fwd_bwd"] < 4 * p["fwd"]
        assert p["flops_fwd"] / p["fwd"] < 685e12  # never above the measured grouped-GEMM ceiling
    csv = tmp_path / "moe_layer.csv"
    pred = predict_moe_layer(c, CONFIGS["mixtral_like"])["fwd"] * 1e3
    csv.write_text("date,commit,device,config,impl,mode,metric,value\n"
                   f"d,c,NVIDIA H100 80GB HBM3,mixtral_like,ours,fwd,ms,{pred * 1.25}\n"
                   "d,c,NVIDIA H100 80GB HBM3,mixtral_like,ours,fwd,tflops,1\n")
    df = compare(str(csv), c)
    assert len(df) == 1 and df["ratio"].iloc[0] == pytest.approx(0.8)


MOE_CSV = __import__("pathlib").Path(__file__).resolve().parents[2] / "results" / "bench" / "moe_layer.csv"


@pytest.mark.skipif(not MOE_CSV.is_file(), reason="results/bench/moe_layer.csv not measured yet")
def test_calibration_loop_moe_layer_within_10_percent_of_measured():
    """Issue 4 acceptance: predicted fwd / fwd+bwd of one MoE layer on the single-H100 preset within
    10% of the kernels' benchmark (impl ours). Calibrated on mixtral_like fwd+bwd only, against the
    complete benchmark run ``65fffb4+wip3`` (every impl and config measured in one run). The later
    partial rerun ``+wip4`` measured changed kernel variants (permute-first for mixtral, and for the
    switch config a permute-first variant that the default no longer takes for top-1); recalibrating
    on a full rerun of the final kernels is open work."""
    from simulator.calibration import compare

    df = compare(str(MOE_CSV), cluster_preset("h100-single"), impl="ours", commit="65fffb4+wip3")
    if df.empty:
        pytest.skip("no 'ours' rows in moe_layer.csv")
    assert df["ratio"].between(0.9, 1.1).all(), df.to_string()


def test_host_transfer_rates_from_profile_rows_else_the_cluster_spec():
    gpu = cluster_preset("h100-single").gpu
    rows = [{"op": "disk_read", "dtype": "bytes", "m": float(n), "n": 0, "k": 0, "groups": 1, "time_s": t,
             "io_bytes": float(n)} for n, t in ((1e6, 1e-3), (1e8, 0.05))]  # 1 GB/s, then 2 GB/s
    rows.append({"op": "cpu_adam", "dtype": "fp32", "m": 1e6, "n": 0, "k": 0, "groups": 1, "time_s": 1e-3,
                 "io_bytes": 1e6})
    cm = CostModel(gpu, Profile(rows))
    assert cm.transfer_time("disk_read", 1e6, 99.0) == pytest.approx(1e-3)
    assert cm.transfer_time("disk_read", 1e7, 99.0) == pytest.approx(1e7 / 1.5e9)  # halfway in log size
    assert cm.transfer_time("disk_read", 1e10, 99.0) == pytest.approx(1e10 / 2e9)  # the largest row's rate
    assert cm.transfer_time("disk_write", 2e9, 4.0) == pytest.approx(0.5)  # no row: the spec's bandwidth
    assert cm.profile.transfer_rate("cpu_adam", 5e6) == pytest.approx(1e9)
    assert not cm.profile.curves  # transfer rows are not GEMM curves
    assert CostModel(gpu).transfer_time("disk_read", 1e9, 2.0) == pytest.approx(0.5)
    assert cm.transfer_time("disk_read", 0, 1.0) == 0.0
