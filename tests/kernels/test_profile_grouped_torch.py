"""kernels.profile sweep ``grouped_torch`` (torch._grouped_mm forward + the dgrad / wgrad GEMMs autograd issues) on
the CPU at tiny sizes, its rows feeding the cost model's curves, and ``append_to`` with the cost model's mean over
repeated measurements of a shape."""

import csv

import pytest
import torch

from kernels.profile import COLUMNS, Profile, append_to, sweep_grouped_torch
from simulator.cost import Profile as CostProfile

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")


def _rows(tmp_path):
    p = Profile("cpu", 1e9)
    sweep_grouped_torch(p, device="cpu", shapes=[(2, 16, 32)], rows=[8, 16], timer=lambda fn: (fn(), 1e-3)[1])
    path = tmp_path / "prof.csv"
    p.write(path)
    return p.rows, path


def test_rows_cover_forward_and_both_backward_gemms_of_both_projections(tmp_path):
    rows, _ = _rows(tmp_path)
    got = {(r["op"], r["m"], r["n"], r["k"]) for r in rows}
    for m in (8, 16):
        for K, N in ((16, 32), (32, 16)):
            assert ("grouped_gemm_fwd", m, N, K) in got
            assert ("grouped_gemm_dgrad", m, K, N) in got  # dgrad keyed as computed: n=K, k=N
            assert ("grouped_gemm_wgrad", m, N, K) in got
    assert {r["impl"] for r in rows} == {"torch"} and len(rows) == 12
    assert all(float(r["flop"]) == 2 * 2 * r["m"] * r["n"] * r["k"] for r in rows)


def test_backward_gemms_match_autograd():
    """dgrad / wgrad as timed are the gradients autograd computes for the forward (so the rows price what runs)."""
    torch.manual_seed(0)
    E, m, K, N = 2, 8, 16, 32
    a = torch.randn(E * m, K, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(E, K, N, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(E * m, N, dtype=torch.bfloat16)
    offs = torch.tensor([m, 2 * m], dtype=torch.int32)
    ga, gb = torch.autograd.grad(torch._grouped_mm(a, b, offs=offs), (a, b), g)
    torch.testing.assert_close(torch._grouped_mm(g, b.detach().transpose(-2, -1), offs=offs), ga)
    torch.testing.assert_close(torch._grouped_mm(a.detach().t(), g, offs=offs), gb)


def test_cost_model_reads_the_torch_backward_curves(tmp_path):
    _, path = _rows(tmp_path)
    prof = CostProfile.from_csv(path, impl=("torch",))
    assert ("grouped_gemm_dgrad", "bf16", 16, 32, 2) in prof.curves
    assert ("grouped_gemm_wgrad", "bf16", 32, 16, 2) in prof.curves


def test_appended_measurements_of_a_shape_are_averaged(tmp_path):
    base = tmp_path / "base.csv"
    new = tmp_path / "new.csv"

    def write(path, rows):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for op, impl, m, t in rows:
                w.writerow(dict(gpu="G", op=op, impl=impl, dtype="bf16", batch=1, m=m, n=4, k=4, groups=2,
                                io_bytes=0, flop=1, time_s=t, TFLOPps=0, GBps=0))

    write(base, [("grouped_gemm_fwd", "torch", 8, 1.0), ("grouped_gemm_fwd", "triton", 8, 7.0)])
    write(new, [("grouped_gemm_fwd", "torch", 8.0, 3.0), ("grouped_gemm_wgrad", "torch", 8, 5.0)])
    assert append_to(base, new) == 2
    with base.open(newline="") as f:
        assert [float(r["time_s"]) for r in csv.DictReader(f)] == [1.0, 7.0, 3.0, 5.0]
    flops = 2.0 * 8 * 4 * 4 * 2
    torch_first = CostProfile.from_csv(base, impl=("torch", "triton"))
    ms, fps = torch_first.curves[("grouped_matmul", "bf16", 4, 4, 2)]
    assert fps[0] == pytest.approx(flops / 2.0)  # the mean of the torch impl's two measurements, not the first
    triton_first = CostProfile.from_csv(base, impl=("triton", "torch"))
    assert triton_first.curves[("grouped_matmul", "bf16", 4, 4, 2)][1][0] == pytest.approx(flops / 7.0)
