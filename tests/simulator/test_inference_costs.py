"""simulator.workload.inference_costs: tile padding of uneven routed groups, and the profile's inference
rows (dequant, fused quantised GEMMs) used when present, the analytic model otherwise."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest

from semoe.presets import cluster_preset, model_preset
from simulator.cost import CostModel, Profile
from simulator.workload.inference_costs import (
    BlockCosts,
    grouped_mm_tile_m,
    padded_rows,
)
from simulator.workload.inference_profile import InferProfile
from simulator.workload.inference_quant import weight_shapes

GPU = cluster_preset("h100-single").gpu
U8 = np.full(8, 1 / 8)


def test_padded_rows_hand_cases():
    assert padded_rows(2048, 2, U8, 1) == pytest.approx(4096)  # no padding: E[sum X_e] = T k
    # one token, top-2 of 8: each expert has 0 or 1 row (p = 1/4) -> a full tile with prob 1/4
    assert padded_rows(1, 2, U8, 64) == pytest.approx(8 * 0.25 * 64)
    # every expert always routed: X_e = T exactly (q = 1), 100 rows -> 2 tiles of 64
    assert padded_rows(100, 2, np.full(2, 0.5), 64) == pytest.approx(2 * 128)
    p = padded_rows(2048, 2, U8, 128)
    assert 4096 < p < 4096 + 8 * 127  # mean 512 per expert sits on a tile boundary: ~half the groups round up
    assert p == pytest.approx(4096 + 8 * 64, rel=0.03)


def test_tile_choice():
    assert grouped_mm_tile_m(2.0, 14336) == 64 and grouped_mm_tile_m(128, 14336) == 64
    assert grouped_mm_tile_m(512, 14336) == 128 and grouped_mm_tile_m(512, 64) == 64


def _mixtral():
    return model_preset("mixtral-8x7b").replace(layers=2, dtype="bf16")


def test_uneven_groups_cost_more_than_aligned_ones():
    m = _mixtral()
    cm = CostModel(GPU)  # roofline: the padding effect alone
    c = BlockCosts(m, cm, popularity=U8)
    T = 2048
    assert c.grouped_rows(T, 8, m.ffn) == pytest.approx(padded_rows(T, 2, U8, 128) / 8)
    aligned = 2 * cm.matmul(512, m.ffn, m.hidden, groups=8) + cm.matmul(512, m.hidden, m.ffn, groups=8)
    padded = 2 * cm.matmul(c.grouped_rows(T, 8, m.ffn), m.ffn, m.hidden, groups=8) + cm.matmul(
        c.grouped_rows(T, 8, m.hidden), m.hidden, m.ffn, groups=8)
    assert padded > 1.08 * aligned
    rest = c.experts(T, 8) - padded
    assert rest > 0  # activation, combine, residual


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["gpu", "op", "impl", "dtype", "m", "n", "k", "groups", "flop", "time_s"])
        w.writeheader()
        for r in rows:
            w.writerow({"gpu": "NVIDIA H100 80GB HBM3", "flop": 0, "groups": r.get("groups", 1), **r})


def test_dequant_and_fused_rows_replace_the_analytic_model(tmp_path):
    m = _mixtral()
    E = m.experts
    shapes = weight_shapes(m)
    rows = [{"op": "dequant", "impl": "torch", "dtype": "int8", "m": E, "k": i, "n": o, "groups": E, "time_s": 0.005}
            for i, o in shapes]
    for i, o in set(shapes):
        for mm, tf in ((256, 300e12), (1024, 600e12)):
            rows.append({"op": "qgemm_fwd", "impl": "triton_dequant_gemm", "dtype": "int8", "m": mm, "k": i, "n": o,
                         "groups": E, "time_s": 2 * mm * i * o * E / tf})
    path = tmp_path / "prof.csv"
    _write(path, rows)
    cm = CostModel(GPU, Profile.from_csv(path))
    ws = BlockCosts(m, cm, "int8", "workspace")
    assert ws.dequant(E) == pytest.approx(0.005 * len(shapes))
    assert ws.dequant(1) == pytest.approx(0.005 * len(shapes) / E)  # linear in the experts
    fused = BlockCosts(m, cm, "int8", "fused")
    tf512 = math.exp((math.log(300e12) + math.log(600e12)) / 2)  # power law halfway in log m
    want = sum(2 * 512 * i * o * E / tf512 for i, o in shapes)
    assert fused.fused_gemms(512, E) == pytest.approx(want)
    assert fused.experts(2048, E) > want  # + activation, combine, residual
    # no rows: the analytic memory pass and the bf16 rate (fp8: the datasheet ratio)
    bare = CostModel(GPU)
    assert not InferProfile.of(bare)
    b = BlockCosts(m, bare, "int8", "workspace")
    assert b.dequant(E) == pytest.approx(bare.memory(sum(E * (i * o * 7 + 4 * o) for i, o in shapes)))
    assert BlockCosts(m, bare, "int8", "fused").fused_gemms(512, E) is None


def test_fused_rows_of_another_expert_count_scale_by_groups(tmp_path):
    m = _mixtral()
    rows = [{"op": "qgemm_fwd", "impl": "scaled_grouped_mm", "dtype": "fp8", "m": mm, "k": i, "n": o, "groups": 8,
             "time_s": t} for i, o in set(weight_shapes(m)) for mm, t in ((16, 1e-4), (64, 1.2e-4))]
    path = tmp_path / "prof.csv"
    _write(path, rows)
    ip = InferProfile.of(CostModel(GPU, Profile.from_csv(path)))
    i, o = weight_shapes(m)[0]
    assert ip.qgemm_s("fp8", 16, i, o, 8) == pytest.approx(1e-4)
    assert ip.qgemm_s("fp8", 16, i, o, 2) == pytest.approx(1e-4 * 2 / 8)  # two groups: a quarter of the work
    assert ip.qgemm_s("fp8", 4, i, o, 8) == pytest.approx(1e-4)  # below the range: the weights are read anyway
    assert ip.qgemm_s("fp8", 128, i, o, 8) == pytest.approx(2 * 1.2e-4)  # above: the largest rows' FLOP/s


def test_routed_rows_replace_the_padding_model_inside_their_range(tmp_path):
    """The profile's ``grouped_gemm_fwd_routed`` rows (torch._grouped_mm on uneven routed groups of the same
    shape) price the bf16 expert GEMMs at mean rows per expert inside the measured range (power law in the
    rows); outside it, for skewed routing, for another expert count and for quantised experts, the padding
    model stays."""
    m = _mixtral()
    E = m.experts
    rows = [{"op": "grouped_gemm_fwd_routed", "impl": "torch", "dtype": "bf16", "m": mm, "k": k, "n": n, "groups": E,
             "time_s": t * (2 if n == m.hidden else 1)}
            for k, n in ((m.hidden, m.ffn), (m.ffn, m.hidden)) for mm, t in ((256, 1e-3), (1024, 4e-3))]
    path = tmp_path / "prof.csv"
    _write(path, rows)
    cm = CostModel(GPU, Profile.from_csv(path))
    ip = InferProfile.of(cm)
    assert ip.routed_gemm_s(256, m.hidden, m.ffn, E) == pytest.approx(1e-3)
    assert ip.routed_gemm_s(512, m.hidden, m.ffn, E) == pytest.approx(2e-3)  # halfway in log m: time x2
    assert ip.routed_gemm_s(512, m.ffn, m.hidden, E) == pytest.approx(4e-3)
    assert ip.routed_gemm_s(128, m.hidden, m.ffn, E) is None and ip.routed_gemm_s(2048, m.hidden, m.ffn, E) is None
    assert ip.routed_gemm_s(512, m.hidden, m.ffn, 4) is None  # another expert count: not measured
    c = BlockCosts(m, cm, popularity=U8)
    assert c.routed_gemms(512, E) == pytest.approx((2e-3, 4e-3))
    T = 512 * E // m.top_k  # 512 rows per expert
    rest = c.experts(T, E) - (2 * 2e-3 + 4e-3)
    assert 0 < rest < 1e-3  # activation, combine, residual on top of the measured GEMMs
    # 64 rows per expert: below the range, the padding model (roofline here: the file has no GEMM rows)
    assert c.routed_gemms(64, E) is None
    assert c.experts(T // 8, E) == pytest.approx(BlockCosts(m, CostModel(GPU), popularity=U8).experts(T // 8, E))
    assert c.routed_gemms(512, E - 1) is None  # not every expert has rows
    skew = np.arange(1, E + 1) / np.arange(1, E + 1).sum()
    assert BlockCosts(m, cm, popularity=skew).routed_gemms(512, E) is None
    assert BlockCosts(m, cm, "int8", "workspace", popularity=U8).routed_gemms(512, E) is None


# ---------------------------------------------------------------- issue 7: unpriced kernel time, the FFN lead
def _h100_mixtral():
    from simulator.workload.inference_costs import BlockCosts

    m = model_preset("mixtral-8x7b").replace(layers=4, name="mixtral-8x7b-L4", dtype="bf16")
    return BlockCosts(m, CostModel.auto(GPU, impl=("torch", "triton"), loglog=True))


def test_kernel_device_s_is_the_diagnostic_residual():
    """KERNEL_DEVICE_S is what the engine's profiled non-GEMM kernels take beyond BlockCosts' prices, per counted
    kernel, and it is one constant across batches (a per-kernel overhead, not a size effect)."""
    from simulator.workload.inference_costs import KERNEL_DEVICE_S, diag_kernel_device_s
    from simulator.workload.inference_host import host_program

    bc = _h100_mixtral()
    n = host_program(None, "resident", "prefill").block_kernels - bc.ffn_gemms
    assert n == 68
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roofline fallbacks of the small router GEMM
        per = diag_kernel_device_s(bc, n)
    assert sorted(per) == [1, 2, 4]
    assert float(np.median(list(per.values()))) == pytest.approx(KERNEL_DEVICE_S, abs=0.02e-6)
    assert all(abs(v / KERNEL_DEVICE_S - 1) < 0.1 for v in per.values())
    assert bc.kernels(10) == pytest.approx(10 * KERNEL_DEVICE_S) and bc.kernels(-1) == 0.0


def test_read_kernel_table(tmp_path):
    from simulator.workload.inference_costs import DIAG, read_kernel_table

    t = read_kernel_table(DIAG / "kernels_resident_prefill_B2.txt")
    assert t["total_s"] == pytest.approx(7.865e-3)
    gmm = [r for r in t["rows"] if r[0] == "aten::_grouped_mm"]
    assert gmm == [("aten::_grouped_mm", pytest.approx(5.963e-3), 12)]  # 3 per block, 4 blocks
    bad = tmp_path / "x.txt"
    bad.write_text("no table here\n")
    with pytest.raises(ValueError, match="not a torch.profiler kernel table"):
        read_kernel_table(bad)


def test_gemms_are_the_routed_rows_and_experts_adds_the_rest():
    bc = _h100_mixtral()
    m = bc.m
    T = 512  # B = 2, P = 256: 128 rows per expert, a measured routed row
    w13, w2 = bc.routed_gemms(T * m.top_k / m.experts, m.experts)
    assert bc.gemms(T, m.experts) == pytest.approx(2 * w13 + w2)
    rest = bc.experts(T, m.experts) - bc.gemms(T, m.experts)
    assert 0 < rest < 0.2 * bc.gemms(T, m.experts)
    assert bc.ffn_gemms == 3 and bc.ffn_lead() == 5


def test_ffn_lead_is_what_the_reference_issues_before_its_first_grouped_gemm(tmp_path):
    """FFN_LEAD_KERNELS counted from the reference engine (CPU, tiny Mixtral store): after the last host sync of
    a block's MoE part, the kernels before the first aten._grouped_mm."""
    import torch

    from reference.inference.engine import Engine, InferConfig, random_prompts
    from reference.inference.store import ModelStore
    from simulator import op_counts as oc
    from simulator.workload.inference_costs import FFN_LEAD_KERNELS

    oc.build_store(str(tmp_path / "store"))
    store = ModelStore.load(tmp_path / "store", pin=False)
    eng = Engine(store, InferConfig(mode="resident", device="cpu", trace=False), batch=2, max_len=24,
                 prefill_tokens=32)
    rec = oc._recorder()
    idx = random_prompts(2, 16, store.spec.vocab)
    with torch.no_grad():
        eng.begin_pass(idx.numel())
        eng.model(idx, eng._experts, None, 0, False)
        rec.seq.clear()
        with rec:
            eng.begin_pass(idx.numel())
            eng.model(idx, eng._experts, None, 0, False)
    ops = [o for o in rec.seq if not isinstance(o, str) and not o.view]
    leads, since = [], None
    for o in ops:
        if o.sync:
            since = 0
        elif o.name == "aten._grouped_mm":
            if since is not None:
                leads.append(since)
            since = None
        elif since is not None:
            since += 1
    assert leads == [FFN_LEAD_KERNELS] * len(eng.blocks)
