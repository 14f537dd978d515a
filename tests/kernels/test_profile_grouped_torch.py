"""kernels.profile sweep ``grouped_torch`` (torch._grouped_mm forward + the dgrad / wgrad GEMMs autograd issues) on
the CPU at tiny sizes, its rows feeding the cost model's curves, and ``merge_into``."""

import csv

import pytest
import torch

from kernels.profile import COLUMNS, Profile, merge_into, sweep_grouped_torch
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


def test_merge_replaces_same_key_and_appends_new(tmp_path):
    base = tmp_path / "base.csv"
    new = tmp_path / "new.csv"

    def write(path, rows):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for op, m, t in rows:
                w.writerow(dict(gpu="G", op=op, impl="torch", dtype="bf16", batch=1, m=m, n=4, k=4, groups=2,
                                io_bytes=0, flop=1, time_s=t, TFLOPps=0, GBps=0))

    write(base, [("grouped_gemm_fwd", 8, 1.0), ("gemm", 8, 2.0), ("grouped_gemm_fwd", 8, 3.0)])
    write(new, [("grouped_gemm_fwd", 8.0, 9.0), ("grouped_gemm_wgrad", 8, 5.0)])
    assert merge_into(base, new) == (1, 1)
    with base.open(newline="") as f:
        out = [(r["op"], float(r["time_s"])) for r in csv.DictReader(f)]
    # the duplicate old rows of the key are gone, the new one sits at the first one's place
    assert out == [("grouped_gemm_fwd", 9.0), ("gemm", 2.0), ("grouped_gemm_wgrad", 5.0)]
