"""kernels.profile sweep ``infer`` on the CPU (--quick shapes): every op it writes, in the profile schema,
and read back by the simulator's `InferProfile` (and ignored by `simulator.cost.Profile`)."""

from __future__ import annotations

import csv

import pytest
import torch

from kernels.profile import COLUMNS, Profile, routed_counts, sweep_infer


def test_routed_counts_are_uneven_and_sum_to_the_rows():
    c = routed_counts(8, 512, 2, "cpu", seed=0)
    assert c.dtype == torch.int32 and int(c.sum()) == 8 * 512
    assert len(set(c.tolist())) > 1  # uneven groups
    assert any(v % 128 for v in c.tolist())  # not tile-aligned
    assert torch.equal(c, routed_counts(8, 512, 2, "cpu", seed=0))  # seeded


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    p = Profile("cpu", budget_s=1e9)
    sweep_infer(p, device="cpu", quick=True)
    path = tmp_path_factory.mktemp("prof") / "cpu.csv"
    p.write(path)
    return p.rows, path


def test_quick_sweep_writes_every_op(quick_rows):
    rows, path = quick_rows
    ops = {r["op"] for r in rows}
    assert {"dequant", "qgemm_fwd", "host_call_gating", "host_call_permute"} <= ops
    with open(path) as f:
        assert next(csv.reader(f)) == COLUMNS
    deq = [r for r in rows if r["op"] == "dequant"]
    assert {r["dtype"] for r in deq} == {"int8", "fp8"}
    for r in deq:  # 1 byte read + 2 written per weight + fp32 scales
        E, In, Out = r["m"], r["k"], r["n"]
        assert r["io_bytes"] == E * In * Out * 3 + 4 * E * Out and float(r["time_s"]) > 0
    q = [r for r in rows if r["op"] == "qgemm_fwd"]
    assert q and all(r["flop"] == 2 * r["groups"] * r["m"] * r["k"] * r["n"] for r in q)
    assert all(r["impl"] in ("triton_dequant_gemm", "scaled_grouped_mm", "scaled_mm_loop", "dequant_ref") for r in q)


def test_rows_feed_the_inference_profile_not_the_gemm_curves(quick_rows):
    from semoe.presets import cluster_preset
    from simulator.cost import CostModel
    from simulator.cost import Profile as CostProfile
    from simulator.workload.inference_profile import InferProfile

    rows, path = quick_rows
    cp = CostProfile.from_csv(path)
    assert not any(k[0] in ("dequant", "qgemm_fwd", "grouped_gemm_fwd_routed") for k in cp.curves)
    ip = InferProfile.of(CostModel(cluster_preset("h100-single").gpu, cp))
    assert ip and ip.source == str(path)
    r = next(r for r in rows if r["op"] == "dequant" and r["dtype"] == "int8")
    assert ip.dequant_s("int8", r["k"], r["n"], r["m"]) == pytest.approx(float(r["time_s"]))
    assert ip.dequant_s("int8", r["k"], r["n"], 2 * r["m"]) == pytest.approx(2 * float(r["time_s"]))
    assert ip.host_call_s("gating") > 0 and ip.host_call_s("permute") > 0
    assert ip.dequant_s("int8", 7, 9, 1) is None  # shape not measured
