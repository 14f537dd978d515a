import csv

from reference.train_profile import categorise, main


def test_categorise_kernel_names():
    assert categorise("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert categorise("flash_fwd_kernel") == "attention"
    assert categorise("multi_tensor_apply_kernel<AdamW>") == "optimizer"
    assert categorise("vectorized_layer_norm_kernel") == "norm"
    assert categorise("something_unheard_of") == "other"


def test_quick_run_writes_the_breakdown(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "train_profile.csv")))
    parts = {r["part"] for r in rows}
    assert {"step", "ops", "category", "kernel"} <= parts
    wall = next(float(r["ms_per_step"]) for r in rows if r["name"] == "wall_median")
    kernels = next(float(r["count_per_step"]) for r in rows if r["name"] == "aten_kernels")
    assert wall > 0 and kernels > 50
