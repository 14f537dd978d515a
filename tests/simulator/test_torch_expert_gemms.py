"""simulator.workload.training.torch_expert_gemms: the torch._grouped_mm expert GEMMs of the reference, each projection
at its own profile curve, backward from the profile's torch dgrad / wgrad rows (else 2x forward)."""

import pytest

from semoe.presets import cluster_preset
from simulator.cost import CostModel, Profile
from simulator.workload.training import TORCH_EXPERT_BWD_FACTOR, torch_expert_gemms

GPU = cluster_preset("h100-single").gpu
E, H, F, M = 8, 64, 256, 512  # experts, hidden, ffn, rows per expert


def _row(op, n, k, tflops, m=M):
    flop = 2.0 * m * n * k * E
    return dict(op=op, dtype="bf16", m=float(m), n=n, k=k, groups=E, time_s=flop / (tflops * 1e12), impl="torch",
                gpu="G", batch=1)


def _cm(with_backward: bool) -> CostModel:
    rows = []
    for m in (256, 1024):  # a two-point curve per op, at a constant rate
        rows += [_row("grouped_gemm_fwd", F, H, 500, m), _row("grouped_gemm_fwd", H, F, 600, m)]
        if with_backward:
            rows += [_row("grouped_gemm_dgrad", H, F, 400, m), _row("grouped_gemm_wgrad", F, H, 700, m),
                     _row("grouped_gemm_dgrad", F, H, 450, m), _row("grouped_gemm_wgrad", H, F, 650, m)]
    return CostModel(GPU, Profile(rows, impl=("torch",)))


def test_forward_prices_each_projection_at_its_own_curve():
    f = 2.0 * M * H * F * E
    fwd, _ = torch_expert_gemms(_cm(False), M, E, H, F, mats=2, dtype="bf16")
    assert fwd == pytest.approx(f / 500e12 + f / 600e12)
    fwd3, _ = torch_expert_gemms(_cm(False), M, E, H, F, mats=3, dtype="bf16")  # swiglu: two input projections
    assert fwd3 == pytest.approx(2 * f / 500e12 + f / 600e12)


def test_backward_from_the_dgrad_and_wgrad_rows():
    f = 2.0 * M * H * F * E
    fwd, bwd = torch_expert_gemms(_cm(True), M, E, H, F, mats=2, dtype="bf16")
    # input projection (n=F, k=H): dgrad keyed n=H, k=F (400), wgrad n=F, k=H (700); output projection the reverse
    assert bwd == pytest.approx(f / 400e12 + f / 700e12 + f / 450e12 + f / 650e12)
    assert bwd != pytest.approx(2 * fwd)


def test_without_backward_rows_twice_the_forward():
    fwd, bwd = torch_expert_gemms(_cm(False), M, E, H, F, mats=2, dtype="bf16")
    assert bwd == pytest.approx(2.0 * TORCH_EXPERT_BWD_FACTOR * fwd)
