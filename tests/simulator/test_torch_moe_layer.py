"""simulator.torch_moe_layer: the torch-backend MoE layer counted from its code and priced kernel by kernel."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

from semoe import cluster_preset
from semoe.moe_layer_configs import MOE_LAYER_CONFIGS
from simulator import torch_moe_layer as M
from simulator.cost import CostModel

ROOT = Path(__file__).resolve().parents[2]
MOE_CSV = ROOT / "results" / "bench" / "moe_layer.csv"


@pytest.fixture(scope="module")
def h100():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"))


def _names(prog, phase):
    return [k.name for k in getattr(prog, phase)]


def test_bench_path_kernels_gemms_and_sync():
    k = 8
    p = M.count_layer("bench", 64, k)
    # router GEMM + two grouped GEMMs forward; dX / dW of each backward
    assert p.count("fwd", "gemm") == 3 and p.count("bwd", "gemm") == 6
    assert [g.grouped for g in p.fwd if g.kind == "gemm"] == [False, True, True]
    # bincount is the forward's one host sync (it reads max(input) back on CUDA); the backward has none
    syncs = [x.name for x in p.fwd if x.sync]
    assert syncs == ["aten.bincount"] and p.syncs("bwd") == 0
    # the gather x[tok]: reads x (2 B per token per unit D) and writes k rows (2k)
    gather = next(x for x in p.fwd if x.name == "aten.index" and x.bytes_per[0])
    assert gather.cls == "gather" and gather.bytes_per[0] == pytest.approx(2 + 2 * k)
    # the zero output of index_add is written, not read (ALLOC_OPS)
    z = next(x for x in p.fwd if x.name == "aten.zeros_like")
    assert z.cls == "copy" and z.bytes_per[0] == pytest.approx(2)
    # index_add adds k routed rows per token: k atomic adds per token per unit of hidden
    add = next(x for x in p.fwd if x.name == "aten.index_add")
    assert add.atomic_per[0] == pytest.approx(k) and add.cls == "scatter"


def test_reference_path_syncs_and_dispatcher_ops():
    p = M.count_layer("reference", 8, 2)
    f, b = _names(p, "fwd"), _names(p, "bwd")
    assert "aten.index_select" in f and "aten.index_copy" in f and f.count("aten._grouped_mm") == 2
    # the dispatcher's int(sum) and the gate / dispatcher bincounts make the host wait
    assert "aten._local_scalar_dense" in [x.name for x in p.fwd if x.sync] and p.syncs("fwd") >= 2
    # the fp32 gate: logits GEMM in fp32, and its backward
    assert next(g.gemm[3] for g in p.fwd if g.kind == "gemm") == "fp32"
    # the permute's backward is an index_add of the k routed rows back onto the tokens
    add = next(x for x in p.bwd if x.name == "aten.index_add")
    assert add.atomic_per[0] == pytest.approx(2)
    assert b.count("aten._grouped_mm") == 4


def test_bytes_scale_with_tokens_and_widths():
    p = M.count_layer("bench", 8, 2)
    a = p.mem_bytes("fwd", 1000, 256, 512)
    b = p.mem_bytes("fwd", 2000, 256, 512)
    assert set(a) >= {"gather", "scatter", "act", "elem"}
    assert all(b[c] == pytest.approx(2 * a[c]) for c in a)
    wide = p.mem_bytes("fwd", 1000, 512, 512)
    assert wide["gather"] > 1.9 * a["gather"] and wide["act"] == pytest.approx(a["act"])  # act: [rows, ffn]


def test_bad_inputs():
    with pytest.raises(ValueError, match="path must be"):
        M.count_layer("nope", 8, 2)
    with pytest.raises(ValueError, match="clash"):
        M.count_layer("bench", M.TINY_D, 2)


def _prog(*kinds):
    return M.LayerProgram("bench", 8, 1, "topk", tuple(M.Kernel(f"k{i}", "none", sync=s) for i, s in enumerate(kinds)),
                          ())


def test_timeline_host_issue_and_sync(h100):
    cm = CostModel(cluster_preset("h100-single").gpu, None, launch_s=1e-6)
    p = _prog(False, True, False)
    r = M.layer_time(p, 100, 64, 64, cm, None, host_fwd_s=1e-5, host_bwd_s=1e-5)
    # k0 issued at 10 us, done 11; k1 at 20, done 21 (sync: host waits to 21); k2 issued at 31, done 32
    assert r["fwd"] == pytest.approx(3.2e-5)
    # device-bound: host issue free, three launches back to back
    assert M.layer_time(p, 100, 64, 64, cm, None, 0.0, 0.0)["fwd"] == pytest.approx(3e-6)
    # an inserted collective after k1 that the host waits for delays k2's issue
    ins = M.layer_time(p, 100, 64, 64, cm, None, 1e-5, 1e-5, inserts={("fwd", "k1", 1): (1e-4, True)})
    assert ins["fwd"] == pytest.approx(3.2e-5 + 1e-4)
    with pytest.raises(ValueError, match="no kernel to insert after"):
        M.layer_time(p, 100, 64, 64, cm, None, inserts={("fwd", "k9", 1): (1e-4, False)})


def test_atomic_rate_prices_index_add(h100, tmp_path):
    csv = tmp_path / "rates.csv"
    csv.write_text("device,class,rows,width,io_bytes,time_s,GBps\n"
                   "X,scatter,100,10,1,0.001,1\nX,scatter,300,10,1,0.001,1\nX,scatter,1000,10,1,0.1,1\nX,copy,1,1,1,1,1\n")
    assert M.atomic_adds_per_s(csv) == pytest.approx(1e6)  # median of 1e6, 3e6, 1e5
    assert M.atomic_adds_per_s(tmp_path / "missing.csv") is None
    rate = M.atomic_adds_per_s()
    if rate is None:
        pytest.skip("no committed memory-class rates")
    from simulator.train_host import mem_rates

    cfg = MOE_LAYER_CONFIGS["fine_grained"]
    r = M.predict_torch_layer(cfg, h100, "bench", breakdown=True)
    # the forward's index_add of T k H elements takes at least that many atomic adds at the measured rate
    assert r["fwd_mem_s"]["scatter"] >= cfg.tokens * cfg.top_k * cfg.hidden / rate * 0.999
    # pricing it by bytes alone would be cheaper: the mechanism matters for bf16 top-8
    nbytes = M.count_layer("bench", 64, 8).mem_bytes("fwd", cfg.tokens, cfg.hidden, cfg.ffn)["scatter"]
    assert M.mem_time(h100, "scatter", nbytes, mem_rates()) < r["fwd_mem_s"]["scatter"]


def test_mem_rates_scale_to_the_h200_profile(h100):
    from simulator.validate_multigpu import gpu_cost_model

    assert M.mem_rate_scale(h100, "copy", 1e9) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm, native = gpu_cost_model(cluster_preset("h200-x2").gpu)
    if not native:
        pytest.skip("no H200 profile committed")
    s = M.mem_rate_scale(cm, "copy", 1e9)
    assert 1.1 < s < 4.8 / 3.35 + 0.05  # faster HBM, at most the datasheet ratio (plus noise)
    assert M.mem_rate_scale(cm, "copy", 1e12) == pytest.approx(M.mem_rate_scale(cm, "copy", 1e11))  # clamped


def test_ep_inserts_fall_on_reference_kernels(h100):
    p = M.count_layer("reference", 8, 2)
    base = M.layer_time(p, 4096, 256, 512, h100, None, 0.0, 0.0)
    ins = M.ep_inserts(1e-3, 1e-4, 2e-4)
    r = M.layer_time(p, 4096, 256, 512, h100, None, 0.0, 0.0, inserts=ins, breakdown=True)
    assert r["fwd_inserted_s"] == pytest.approx(2e-3 + 1e-4 + 4e-4)
    assert r["fwd_bwd"] == pytest.approx(base["fwd_bwd"] + 4e-3 + 1e-4 + 8e-4)


@pytest.mark.skipif(not MOE_CSV.is_file(), reason="results/bench/moe_layer.csv not measured yet")
def test_torch_grouped_rows_within_15_percent(h100):
    df = pd.read_csv(MOE_CSV)
    df = df[(df["impl"] == "torch_grouped") & (df["metric"] == "ms")]
    if df.empty:
        pytest.skip("no torch_grouped rows")
    for r in df.itertuples():
        p = M.predict_torch_layer(MOE_LAYER_CONFIGS[r.config], h100, "bench")[r.mode] * 1e3
        assert abs(p / r.value - 1) < 0.15, (r.config, r.mode, p, r.value)


def test_probe_rates_price_the_probed_kernels(h100, tmp_path):
    from simulator import torch_layer_probe as P

    # the CPU quick probe writes the committed file's schema, and load reads it back
    assert P.main(["--out", str(tmp_path), "--quick", "--device", "cpu"]) == 0
    got = P.load("cpu", tmp_path / "torch_layer_rates_cpu.csv")
    assert {("index_add", 8), ("index_gather", 1), ("index_put_acc", 2), ("sort", 4)} <= set(got)
    assert P.path_for("NVIDIA H100 80GB HBM3").name == "torch_layer_rates_h100.csv"
    # a probe of 1e9 elements/s for every kernel at every duplication: the bench forward's index_add alone then
    # takes T k H / 1e9 s, and the nearest duplication is chosen
    cfg = MOE_LAYER_CONFIGS["fine_grained"]
    probe = {(op, d): (1e9, 0.0, 0.0, 0) for op in ("index_add", "index_gather", "index_put_acc", "sort")
             for d in (1, 2, 8)}
    probe[("index_add", 8)] = (2e9, 0.0, 0.0, 0)
    assert M.probe_rate(probe, "index_add", 8) == 2e9 and M.probe_rate(probe, "index_add", 6) == 2e9
    assert M.probe_rate(probe, "index_add", 3) == 1e9 and M.probe_rate(None, "sort", 1) is None
    r = M.predict_torch_layer(cfg, h100, "bench", breakdown=True, probe=probe)
    assert r["fwd_mem_s"]["scatter"] == pytest.approx(cfg.tokens * cfg.top_k * cfg.hidden / 2e9)
    base = M.predict_torch_layer(cfg, h100, "bench", breakdown=True, probe=None)
    assert r["fwd_mem_s"]["gather"] > base["fwd_mem_s"]["gather"]  # x[tok] at 1e9 elements/s: slower


def test_calibration_compare_uses_the_torch_model_for_torch_grouped(h100, tmp_path):
    from simulator.calibration import compare

    csv = tmp_path / "moe_layer.csv"
    csv.write_text("date,commit,device,config,impl,mode,metric,value\n"
                   "d,c,NVIDIA H100 80GB HBM3,fine_grained,torch_grouped,fwd,ms,6.0\n"
                   "d,c,NVIDIA H100 80GB HBM3,fine_grained,ours,fwd,ms,3.0\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = compare(str(csv), cluster_preset("h100-single"), impl="torch_grouped")
        o = compare(str(csv), cluster_preset("h100-single"), impl="ours")
    want = M.predict_torch_layer(MOE_LAYER_CONFIGS["fine_grained"], h100, "bench")["fwd"] * 1e3
    assert t["predicted_ms"].iloc[0] == pytest.approx(want)
    assert o["predicted_ms"].iloc[0] < 0.8 * want  # the Triton layer's model is another (faster) layer
