"""paper_repro.validate's moe_layer rows: standalone kernels timed with events around one call are
predicted as max(device, host launch chain); the outlier row is listed with its reason, not scored."""

from __future__ import annotations

import csv

import pytest

from paper_repro.validate import (
    OUTLIER_LAYER_ROWS,
    RESULTS,
    kernel_rows,
    standalone_wall_ms,
)
from semoe.presets import cluster_preset
from simulator.cost import CostModel, Profile

GPU = cluster_preset("h100-single").gpu


def _profile(tmp_path, rows):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["gpu", "op", "impl", "dtype", "m", "n", "k", "groups", "flop", "time_s"])
        w.writeheader()
        for r in rows:
            w.writerow({"gpu": "NVIDIA H100 80GB HBM3", "dtype": "bf16", "m": 1, "n": 0, "k": 0, "groups": 1, "flop": 0,
                        **r})
    return CostModel(GPU, Profile.from_csv(path))


def test_host_bound_and_device_bound(tmp_path):
    cm = _profile(tmp_path, [{"op": "host_op", "impl": "reference", "time_s": 30e-6},
                             {"op": "host_op", "impl": "reference_triton", "time_s": 80e-6}])
    ms, note = standalone_wall_ms(10e-6, "gating", 1, cm)
    assert ms == pytest.approx(0.080) and "host-bound" in note  # one Triton launch x 80 us
    ms, note = standalone_wall_ms(400e-6, "permute", 2, cm)
    assert ms == pytest.approx(0.400) and "device-bound" in note
    # a measured host_call row wins over the per-kernel estimate
    cm = _profile(tmp_path, [{"op": "host_op", "impl": "reference_triton", "time_s": 80e-6},
                             {"op": "host_call_gating", "impl": "triton", "time_s": 110e-6}])
    ms, note = standalone_wall_ms(10e-6, "gating", 1, cm)
    assert ms == pytest.approx(0.110) and "host_call_gating" in note


def test_committed_rows():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = kernel_rows(RESULTS / "bench" / "moe_layer.csv")
    by = {(r["run"], r["config"], r["metric"]): r for r in rows}
    for run, config, mode in OUTLIER_LAYER_ROWS:
        r = by[(run, config, f"{mode}_ms")]
        assert r["status"] == "not_modelled" and r["note"].startswith("measurement_outlier")
    g = [r for r in rows if r["config"].startswith("gating_") and r["status"] == "validated"]
    assert g and all(r["predicted"] > 5 * 0.0091 for r in g)  # host-bound: far above the 9 us of device time
    p = [r for r in rows if r["config"].startswith("permute_") and r["status"] == "validated"]
    assert p and all(abs(r["error"]) < 0.10 for r in p)
