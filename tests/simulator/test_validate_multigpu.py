"""simulator.validate_multigpu: the committed 2 x H200 run beside the simulator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from paper_repro.validate import COLUMNS
from simulator import validate_multigpu as V

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "results" / "multigpu" / "h200x2"
SCORED = {"validated", "extrapolated"}
TIME_METRICS = {"collectives.csv": "time_us", "moe.csv": "fwd_bwd_ms", "train.csv": "tokens_per_s"}


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    if not RUN.is_dir():
        pytest.skip("no committed multi-GPU run")
    return pd.DataFrame(V.rows(ROOT / "results" / "multigpu"))


def test_schema_and_statuses(rows):
    assert list(rows.columns) == list(COLUMNS)
    assert (rows["source"] == "multigpu").all()
    assert set(rows["status"]) <= set(V.STATUSES)
    assert set(rows["status"]) >= {"validated", "derived", "not_modelled"}
    # only the documented fit subsets are fitted: all_reduce time_us at every other size from 16 MiB up (NVLink),
    # each collective's smallest size (host floor at world 2), the largest size of every other collective (the
    # uneven all-to-all's p2p rate, the others' own bandwidth)
    fit = rows[rows["status"] == "fitted"]
    df = pd.read_csv(RUN / "collectives.csv", dtype={"commit": str})
    want = {f"all_reduce {x} B world2" for x in V.fit_subset(df)}
    assert len(want) == 3
    want |= {f"{c} 1024 B world2" for c in V.COLLECTIVES}
    want |= {f"{c} 268435456 B world2" for c in V.COLLECTIVES if c != "all_reduce"}
    assert set(fit["config"]) == want and len(fit) == 12 and (fit["metric"] == "time_us").all()
    assert fit["used_for_fitting"].all()
    assert not rows.loc[rows["status"] != "fitted", "used_for_fitting"].any()  # derived rows stay unmarked
    t = rows[(rows["metric"] == "time_us")]
    for name in V.COLLECTIVES:  # at least half of every collective's rows held out
        c = t[t["config"].str.split(" ").str[0] == name]
        assert (~c["used_for_fitting"]).sum() >= len(c) / 2, name
    scored = rows[rows["status"].isin(SCORED | {"fitted"})]
    assert np.isfinite(scored["predicted"]).all() and (scored["predicted"] > 0).all()
    assert np.allclose(scored["error"], scored["predicted"] / scored["measured"] - 1)


def test_every_committed_row_and_time_metric_has_a_row(rows):
    total = 0
    for name, metric in TIME_METRICS.items():
        df = pd.read_csv(RUN / name, dtype={"commit": str})
        total += len(df)
        timed = df[df["metric"] == metric]
        assert len(timed) > 0
        got = rows[(rows["metric"] == metric) & (rows["status"].isin(SCORED | {"fitted"})
                                                 | rows["note"].str.startswith("measurement_bug:"))]
        if name == "collectives.csv":
            keys = {f"{r.config} {int(r.size_bytes)} B world{int(r.world)}" for r in timed.itertuples()}
        else:
            keys = {f"{r.config} {r.impl}" for r in timed.itertuples()}
        assert keys <= set(got["config"]), keys - set(got["config"])
    assert len(rows) == total  # one row per measured number, none dropped


def test_collective_part_is_validated_and_the_rest_by_profile(rows):
    sc = rows[rows["status"].isin(SCORED | {"fitted"})]
    parts = sc["config"].map(V._part)
    coll = sc[parts == "collectives"]
    assert "validated" in set(coll["status"]) and set(coll["status"]) <= {"validated", "fitted", "extrapolated"}
    # a collective row is extrapolated only where another machine's host probe sets its time
    assert coll.loc[coll["status"] == "extrapolated", "note"].str.contains("another machine").all()
    # MoE and training rows: validated with the H200's own kernel profile when one is committed, else extrapolated
    from semoe import cluster_preset
    from simulator.cost import find_profile

    want = "validated" if find_profile(cluster_preset("h200-x2").gpu) is not None else "extrapolated"
    mem = sc["kind"] == "memory"
    other = sc[(parts != "collectives") & ~mem]
    assert set(other["status"]) == {want}
    assert other["note"].str.contains("own kernel profile" if want == "validated" else "extrapolated").all()
    # memory rows need no kernel profile: scored only where simulator.train_memory models the step's peak
    assert mem.any() and set(sc.loc[mem, "status"]) == {"validated"}
    assert sc.loc[mem, "note"].str.startswith("simulator.train_memory").all()
    s = V.summary(rows.to_dict("records"))
    assert set(s["part"]) == {"collectives", "moe", "train"}
    assert s["rows"].sum() == len(sc)


def test_calibrated_link_beats_the_preset_on_held_out_large_rows(rows):
    """The NVLink fit (3 all_reduce rows) moves every large held-out row: error over the held-out >= 16 MiB rows
    of all five collectives below the preset's."""
    plain = pd.DataFrame(V.rows(ROOT / "results" / "multigpu", calibrate=False, host=None, outliers=False))
    assert not plain["used_for_fitting"].any() and "fitted" not in set(plain["status"])

    def large_held_out(df):
        t = df[(df["metric"] == "time_us") & (df["status"] == "validated") & df["config"].map(V._part).eq("collectives")]
        return t[t["config"].str.split(" ").str[1].astype(int) >= 16 << 20].set_index("config")["error"]

    cal, fitted = V.fit_nvlink(RUN / "collectives.csv")
    assert 150 < cal.nvlink_GBps < 380 and len(fitted) == 3  # below the preset's 450 x 0.844
    e_cal, e_plain = large_held_out(rows), large_held_out(plain)
    assert len(e_plain) == 25 and len(e_cal) == 15  # minus 3 NVLink rows, 4 largest sizes and 3 outliers
    assert e_cal.abs().mean() < e_plain.loc[e_cal.index].abs().mean()
    assert (rows.loc[rows["status"] == "fitted", "note"].str.contains("fitted on this row")).all()


def test_predicted_all_reduce_time_grows_with_size(rows):
    ar = rows[rows["config"].str.startswith("all_reduce ") & (rows["metric"] == "time_us")].copy()
    ar["size"] = ar["config"].str.split(" ").str[1].astype(int)
    pred = ar.sort_values("size")["predicted"].to_numpy()
    assert len(pred) >= 10 and np.all(np.diff(pred) > 0)


def test_hetu_vs_flat_ordering_matches_the_measurement(rows):
    moe = rows[(rows["metric"] == "fwd_bwd_ms") & rows["status"].isin(SCORED)]
    assert len(moe) >= 4
    base = moe["config"].str.rsplit(" ", n=1).str[0]
    for cfg in set(base):
        d = moe[base == cfg].set_index(moe[base == cfg]["config"].str.rsplit(" ", n=1).str[1])
        if {"flat", "hetu_p2"} <= set(d.index):
            assert np.sign(d.loc["hetu_p2", "measured"] - d.loc["flat", "measured"]) == np.sign(
                d.loc["hetu_p2", "predicted"] - d.loc["flat", "predicted"]), cfg
            assert "whole buffer through the leader" in d.loc["hetu_p2", "note"]


def test_ring_all_reduce_oracle_on_the_h200_preset():
    """Large all-reduce on 2 GPUs: base + 2 (n-1) (a + S / (n B)) with Simple, B = achievable NVLink."""
    from simulator.hardware import SIMPLE, nvlink_effective_GBps

    c = V.cluster_for("NVIDIA H200", 2)
    assert c.world_size == 2 and c.nodes == 1 and c.nvlink.bandwidth_GBps == 450.0
    sim = V._sim(c)
    S = 1 << 30
    B = nvlink_effective_GBps(450.0, c.gpu.name) * 1e9
    want = SIMPLE.base_latency_s + 2 * (c.nvlink.latency_s + S / (2 * B))
    assert V.predict_collective(sim, "all_reduce", S, 2) == pytest.approx(want, rel=1e-9)
    # even all-to-all of S per rank: half of it crosses NVLink each way, one step
    assert V.predict_collective(sim, "all_to_all", S, 2) == pytest.approx(
        SIMPLE.base_latency_s + c.nvlink.latency_s + S / 2 / B, rel=1e-9)
    # uneven: rank 0 sends 2/3 of its buffer to rank 1 (uneven_splits), so it takes 4/3 of the even time
    even = V.predict_collective(sim, "all_to_all", S, 2) - SIMPLE.base_latency_s - c.nvlink.latency_s
    uneven = V.predict_collective(sim, "all_to_all_uneven", S, 2) - SIMPLE.base_latency_s - c.nvlink.latency_s
    assert uneven / even == pytest.approx(4 / 3, rel=1e-6)


def test_h200_extrapolation_scales_memory_terms_only():
    from semoe import cluster_preset
    from simulator.cost import CostModel

    h200 = cluster_preset("h200-x2").gpu
    h100 = cluster_preset("h100-single").gpu
    c200 = V.h200_cost_model(h200)
    c100 = V.h200_cost_model(h100)  # the same profile on the H100 itself: ratio 1
    nb = 1e9
    assert (c100.memory(nb) - c100.launch_s) / (c200.memory(nb) - c200.launch_s) == pytest.approx(4800 / 3350)
    # a profile row-wise curve (gelu) is scaled by the same ratio, a measured GEMM curve is not
    key = next(iter(c200.profile.mem_curves))
    xs = c200.profile.mem_curves[key][0]
    x = float(xs[len(xs) // 2])
    assert c100.elementwise(key[0], x, key[1]) / c200.elementwise(key[0], x, key[1]) == pytest.approx(4800 / 3350)
    assert c200.matmul(4096, 14336, 4096, groups=8) == pytest.approx(c100.matmul(4096, 14336, 4096, groups=8))
    # and the cached profile itself is left untouched
    from simulator.cost import PROFILES_DIR, _load_profile

    plain = CostModel(h100, _load_profile(str(PROFILES_DIR / V.PROFILE_GPU), ("torch", "triton")))
    assert plain.elementwise(key[0], x, key[1]) == pytest.approx(c100.elementwise(key[0], x, key[1]))


def test_unknown_device_and_bad_config(tmp_path):
    d = tmp_path / "a10x2"
    d.mkdir()
    (d / "collectives.csv").write_text(
        "date,commit,device,backend,world,part,config,impl,size_bytes,tokens,rank,metric,value\n"
        "2026-01-01,abc,NVIDIA A10G,nccl,2,collectives,all_reduce,nccl,1024,,all,time_us,30\n")
    rs = V.rows(tmp_path)
    assert len(rs) == 1 and rs[0]["status"] == "not_modelled" and "no cluster preset" in rs[0]["note"]
    assert math.isnan(rs[0]["predicted"])
    assert V.rows(tmp_path / "missing") == []
    with pytest.raises(ValueError, match="cannot parse moe.csv config"):
        V.parse_moe_config("mixtral_like E8 k2")
    with pytest.raises(ValueError, match="cannot parse train.csv config"):
        V.parse_train("paper-13.9b-scaled L2", "zero0_bucket0")


def test_alpha_beta_fit_recovers_a_synthetic_link_and_holds_out_half(tmp_path):
    alpha, B = 20e-6, 300e9
    lines = ["date,commit,device,backend,world,part,config,impl,size_bytes,tokens,rank,metric,value"]
    for name in ("all_reduce", "all_to_all"):
        for e in range(10, 29):
            S = 1 << e
            t = alpha + V.wire_bytes(name, S, 2) / B
            lines.append(f"d,c,NVIDIA H200,nccl,2,collectives,{name},nccl,{S},,all,time_us,{t * 1e6!r}")
    (tmp_path / "collectives.csv").write_text("\n".join(lines) + "\n")
    f = V.fit_alpha_beta(tmp_path / "collectives.csv", ("all_reduce", "all_to_all"))
    assert f["alpha_s"] == pytest.approx(alpha, rel=1e-6) and f["B_GBps"] == pytest.approx(300, rel=1e-6)
    assert f["held_out"] >= f["fitted"] - 2 and f["held_out"] + f["fitted"] == 38
    assert f["mape"] < 1e-9
    # the all-reduce puts twice the all-to-all's bytes on the link (2 ranks)
    assert V.wire_bytes("all_reduce", 1 << 20, 2) == 2 * V.wire_bytes("all_to_all", 1 << 20, 2)


# ----------------------------------------------------------------------------- issue 9: host floor, link fit
CSV_HEAD = "date,commit,device,backend,world,part,config,impl,size_bytes,tokens,rank,metric,value"


def _probe_file(folder: Path, gpu: str, us: float, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"collective_host_{name}.csv"
    lines = ["gpu,op,impl,dtype,batch,m,n,k,groups,io_bytes,flop,time_s,TFLOPps,GBps"]
    for c in V.COLLECTIVES:
        lines.append(f"{gpu},host_call_{c},nccl,fp32,1,1024,1,20,1,1024,0,{us * 1e-6!r},0,0")
        lines.append(f"{gpu},host_issue_{c},nccl,fp32,1,1024,1,20,1,1024,0,{us * 0.9e-6!r},0,0")
    p.write_text("\n".join(lines) + "\n")
    return p


def test_back_to_back_formula_and_probe_lookup(tmp_path):
    from simulator.network import host_dispatch as HD

    # host-bound: call i starts at i h, the last ends at N h + d; device-bound: h + N d
    assert HD.back_to_back_s(5e-6, 30e-6, 20) == pytest.approx((20 * 30e-6 + 5e-6) / 20)
    assert HD.back_to_back_s(100e-6, 30e-6, 20) == pytest.approx((30e-6 + 20 * 100e-6) / 20)
    with pytest.raises(ValueError, match="calls must be >= 1"):
        HD.back_to_back_s(1e-6, 1e-6, 0)
    assert HD.gpu_family("NVIDIA H100 80GB HBM3") == "H100" and HD.gpu_family("cpu") is None
    assert HD.find_collective_host("NVIDIA H200", tmp_path / "none") == (None, False)
    _probe_file(tmp_path, "NVIDIA H100 80GB HBM3", 20.0, "h100")
    p, same = HD.find_collective_host("NVIDIA H200", tmp_path)
    assert not same and p.gpu.startswith("NVIDIA H100") and p.host_s("all_reduce") == pytest.approx(20e-6)
    assert p.world == 1 and p.calls == 20 and p.host_s("broadcast") is None
    _probe_file(tmp_path, "NVIDIA H200", 30.0, "h200")
    p, same = HD.find_collective_host("NVIDIA H200", tmp_path)
    assert same and p.host_s("all_to_all") == pytest.approx(30e-6)  # the run's own GPU family wins
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "collective_host_x.csv").write_text("gpu,op,n,k,time_s\ncpu,host_issue_all_reduce,1,5,1e-5\n")
    with pytest.raises(ValueError, match="no host_call_<collective> rows"):
        HD.find_collective_host("cpu", tmp_path / "bad")


def _run_csv(tmp_path: Path, sizes, times_us, config="all_reduce", iters=20) -> Path:
    d = tmp_path / "h200x2"
    d.mkdir(exist_ok=True)
    lines = [CSV_HEAD]
    for S, t in zip(sizes, times_us):
        for metric, v in (("time_us", t), ("iters", iters)):
            lines.append(f"d,c,NVIDIA H200,nccl,2,collectives,{config},nccl,{S},,all,{metric},{v!r}")
    (d / "collectives.csv").write_text("\n".join(lines) + "\n")
    return d / "collectives.csv"


def test_collective_rows_with_and_without_the_host_floor(tmp_path):
    from simulator.network.host_dispatch import back_to_back_s, load_collective_host

    sizes = [1024, 1 << 20, 1 << 28]
    path = _run_csv(tmp_path, sizes, [40.0, 42.0, 900.0])
    sim = V._sim(V.cluster_for("NVIDIA H200", 2))
    dev = [V.predict_collective(sim, "all_reduce", S, 2) for S in sizes]
    bare = V.collective_rows(path, host=None)
    t = [r for r in bare if r["metric"] == "time_us"]
    assert [r["predicted"] for r in t] == pytest.approx([d * 1e6 for d in dev])
    assert {r["status"] for r in t} == {"validated"} and "none given" in t[0]["note"]
    for gpu, status in (("NVIDIA H100 80GB HBM3", "extrapolated"), ("NVIDIA H200", "validated")):
        probe = load_collective_host(_probe_file(tmp_path / gpu.split()[1], gpu, 35.0, "x"))
        t = [r for r in V.collective_rows(path, host=probe) if r["metric"] == "time_us"]
        want = [back_to_back_s(d, 35e-6, 20) * 1e6 for d in dev]
        assert [r["predicted"] for r in t] == pytest.approx(want)
        assert t[0]["predicted"] == pytest.approx(35 + dev[0] * 1e6 / 20)  # host-bound
        assert t[2]["predicted"] == pytest.approx(dev[2] * 1e6 + 35 / 20)  # device-bound
        assert [r["status"] for r in t] == [status, status, "validated"]
        assert "host-bound" in t[0]["note"] and "host-bound" not in t[2]["note"]
    with pytest.raises(ValueError, match="host must be"):
        V.collective_rows(path, host="h100")


def test_nvlink_fit_recovers_a_synthetic_link_and_marks_only_its_rows(tmp_path):
    from simulator.network.host_dispatch import LinkCalibration, back_to_back_s, load_collective_host

    B = 250.0
    c = V.cluster_for("NVIDIA H200", 2)
    sim = V._sim(c, cal=LinkCalibration(B))
    assert sim.topo.nvlink_GBps == B and V._sim(c).topo.nvlink_GBps == pytest.approx(450 * 380 / 450)
    sizes = [1 << e for e in range(10, 29)]
    probe = load_collective_host(_probe_file(tmp_path / "p", "NVIDIA H200", 30.0, "h200"))
    times = [back_to_back_s(V.predict_collective(sim, "all_reduce", S, 2), 30e-6, 20) * 1e6 for S in sizes]
    path = _run_csv(tmp_path, sizes, times)
    cal, fitted = V.fit_nvlink(path, host=probe)
    assert cal.nvlink_GBps == pytest.approx(B, rel=1e-9)
    assert fitted == {("all_reduce", 1 << e) for e in (24, 26, 28)} and "16 MiB, 64 MiB, 256 MiB" in cal.source
    # without the probe the fit absorbs the host's 30 / 20 us per call: a slightly different bandwidth
    assert V.fit_nvlink(path)[0].nvlink_GBps != pytest.approx(B, rel=1e-6)
    rs = [r for r in V.collective_rows(path, cal, probe, fitted) if r["metric"] == "time_us"]
    assert [r["predicted"] for r in rs] == pytest.approx(times, rel=1e-9)
    assert sum(r["used_for_fitting"] for r in rs) == 3 == sum(r["status"] == "fitted" for r in rs)
    # no preset for the device: nothing to fit
    path.write_text(path.read_text().replace("NVIDIA H200", "NVIDIA A10G"))
    assert V.fit_nvlink(path) == (None, frozenset())
    with pytest.raises(ValueError, match="must be > 0"):
        LinkCalibration(0.0)


def test_hetu_schedule_ships_what_the_reference_ships():
    """`reference.comm.alltoall.AllToAll._hetu`: a non-leader sends its whole buffer (send1 = [x.shape[0], 0..])
    and the leader sends local rank j every row for it (send3[j] = sum_s C[s][(a, j)]), own rows included."""
    from semoe import cluster_preset
    from simulator import collectives as C
    from simulator.topology import Topology

    topo = Topology(cluster_preset("h200-x4", nodes=2))
    rng = np.random.default_rng(0)
    M = rng.integers(1, 100, size=(8, 8)).astype(float)
    op = C.all_to_all(topo, range(8), M, "hetu")
    gather, exchange, scatter = op.steps
    for leader, members in ((0, (1, 2, 3)), (4, (5, 6, 7))):
        for r in members:
            assert gather.nbytes[(gather.src == r) & (gather.dst == leader)].sum() == M[r].sum()
            assert scatter.nbytes[(scatter.src == leader) & (scatter.dst == r)].sum() == M[:, r].sum()
    assert exchange.nbytes[(exchange.src == 0) & (exchange.dst == 4)].sum() == M[:4, 4:].sum()


def test_moe_prediction_is_the_torch_layer_plus_the_ep_dispatcher():
    """The EP rows price the reference's torch-backend layer (its kernels, not the Triton layer's model), the
    dispatcher's regroups and count sync, and for HetuMoE the leader's regroups of the node's rows."""
    import warnings

    from semoe import cluster_preset
    from semoe.moe_layer_configs import MOE_LAYER_CONFIGS
    from simulator.calibration import predict_moe_layer

    c = cluster_preset("h200-x2")
    cfg = MOE_LAYER_CONFIGS["fine_grained"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost, _ = V.gpu_cost_model(c.gpu)
        flat = V.moe_prediction(V._sim(c, cost), cfg, 2, "flat", 2)
        hetu = V.moe_prediction(V._sim(c, cost), cfg, 2, "hetu_p2", 2)
        triton = predict_moe_layer(c, cfg, cost)["fwd_bwd"]
    assert flat["kernels"] > 60 and flat["regroup_s"] > 0 and flat["hetu_regroup_s"] == 0
    # the torch layer's memory passes alone exceed a third of its GEMMs at these widths (scatter, casts, copies)
    assert flat["mem_s"] > flat["gemm_s"] / 3
    assert flat["compute_s"] > triton  # the eager torch layer is slower than the fused Triton layer's model
    assert flat["fwd_bwd_s"] == pytest.approx(flat["compute_s"] + flat["comm_s"] + flat["regroup_s"])
    assert hetu["hetu_regroup_s"] > 0 and hetu["a2a_s"] > flat["a2a_s"] + hetu["hetu_regroup_s"] * 0.99
    assert hetu["fwd_bwd_s"] > flat["fwd_bwd_s"] + 4 * hetu["hetu_regroup_s"] * 0.99


def test_train_rows_use_the_host_program_and_ep_program():
    from paper_repro.validate import TRAIN_HEADS
    from semoe.presets import model_preset

    m = model_preset("paper-13.9b").replace(layers=2, hidden=2048, heads=TRAIN_HEADS, ffn=8192, experts=8, top_k=1,
                                            dtype="bf16", name="x")
    prog, note = V.train_host_program(m)
    if prog is None:
        pytest.skip("no committed training host program")
    assert "L4" in note or "L2" in note
    ep = V.ep_program(prog, top_k=1)
    a, b = prog.group("moe.ffn"), ep.group("moe.ffn")
    assert len(b) == len(a) + 1 and b[-2].sync and b[-2].kernels == V.EP_COUNT_KERNELS
    assert [s.name for s in b] == ["moe.ffn"] + [f"moe.ffn_{i}" for i in range(1, len(b))]
    assert b[-1].kernels == a[-1].kernels + V.EP_FWD_KERNELS
    blocks = {"moe": 2}
    assert ep.syncs(blocks) == prog.syncs(blocks) + 2
    cat = [x for x in b[-1].mem if x not in a[-1].mem]
    assert cat == [("copy", 2.0, (2.0 * 2 * 1 * V.EP_ROW_BYTES, 0.0, 0.0, 0.0, 0.0))]
    bw = ep.group("moe.bwd")[0]
    assert bw.kernels == prog.group("moe.bwd")[0].kernels + V.EP_BWD_KERNELS


def test_train_rows_report_the_host_program(rows):
    t = rows[(rows["metric"] == "tokens_per_s") & rows["status"].isin(SCORED)]
    assert len(t) == 4 and t["note"].str.contains("host program").all()
    assert t["note"].str.contains("EPDispatcher").all()


# ------------------------------------------------------------------ issue 9: outliers, world-2 floor, p2p rate
def _sizes_csv(tmp_path: Path, series: dict[str, list[float]], sizes, iters=20) -> Path:
    d = tmp_path / "h200x2"
    d.mkdir(exist_ok=True)
    lines = [CSV_HEAD]
    for config, times in series.items():
        for S, t in zip(sizes, times):
            for metric, v in (("time_us", t), ("iters", iters)):
                lines.append(f"d,c,NVIDIA H200,nccl,2,collectives,{config},nccl,{S},,all,{metric},{v!r}")
    (d / "collectives.csv").write_text("\n".join(lines) + "\n")
    return d / "collectives.csv"


def test_outlier_rule_flags_only_size_inversions_beyond_the_floor_spread():
    sizes = [1 << e for e in range(10, 17)]

    def frame(times):
        return pd.DataFrame({"config": "all_reduce", "size_bytes": sizes, "metric": "time_us", "value": times})

    # floor jitter (+-10%, inversions included) and a monotone rise: nothing flagged
    assert V.measurement_outliers(frame([40, 44, 38, 41, 39, 60, 90])) == {}
    # a spike above the next size and > 1.25 x the previous: flagged, with the evidence
    got = V.measurement_outliers(frame([40, 41, 100, 42, 43, 60, 90]))
    assert list(got) == [("all_reduce", 4096)] and got[("all_reduce", 4096)].startswith("measurement_bug:")
    assert set(V.measurement_outliers(frame([40, 41, 100, 42, 110, 43, 90]))) == {("all_reduce", 4096),
                                                                                  ("all_reduce", 16384)}
    # a jump not followed by a faster call is a size effect (kept); the last size has no larger one (kept)
    assert V.measurement_outliers(frame([40, 41, 100, 120, 140, 160, 200])) == {}
    assert V.measurement_outliers(frame([40, 41, 42, 43, 44, 45, 400])) == {}
    # the committed run: exactly the 6 rows the module docstring lists
    df = pd.read_csv(RUN / "collectives.csv", dtype={"commit": str})
    assert set(V.measurement_outliers(df)) == {("all_reduce", 8 << 20), ("all_reduce", 32 << 20),
                                               ("all_gather", 32 << 20), ("reduce_scatter", 64 << 20),
                                               ("all_to_all", 64 << 10), ("all_to_all_uneven", 128 << 10)}


def test_host_floor_fit_recovers_a_synthetic_floor_from_one_row_per_collective(tmp_path):
    from simulator.network.host_dispatch import back_to_back_s

    sim = V._sim(V.cluster_for("NVIDIA H200", 2))
    sizes = [1024, 1 << 20, 1 << 26]
    floors = {"all_reduce": 41e-6, "all_gather": 33e-6}
    series = {c: [back_to_back_s(V.predict_collective(sim, c, S, 2), h, 20) * 1e6 for S in sizes]
              for c, h in floors.items()}
    path = _sizes_csv(tmp_path, series, sizes)
    probe, keys = V.fit_host_floor(path)
    assert keys == {("all_reduce", 1024), ("all_gather", 1024)} and probe.world == 2 and probe.calls == 20
    assert probe.host_s("all_reduce") == pytest.approx(41e-6, rel=1e-9)
    assert probe.host_s("all_gather") == pytest.approx(33e-6, rel=1e-9) and probe.fitted_on
    rs = [r for r in V.collective_rows(path, host="run") if r["metric"] == "time_us"]
    assert [r["predicted"] for r in rs] == pytest.approx([x for c in series for x in series[c]], rel=1e-9)
    fit = [r for r in rs if r["status"] == "fitted"]
    assert len(fit) == 2 and all("fitted on this row" in r["note"] for r in fit)
    # a smallest row that is not host-bound (device time above the would-be floor) gives no floor
    path = _sizes_csv(tmp_path, {"all_reduce": [5.0, 50.0, 300.0]}, sizes)
    assert V.fit_host_floor(path) == (None, frozenset())


def test_p2p_fit_recovers_a_synthetic_rate_on_one_row_and_helps_held_out_rows(tmp_path, rows):
    from simulator.network.host_dispatch import CollectiveHost, back_to_back_s

    sim = V._sim(V.cluster_for("NVIDIA H200", 2))
    sizes = [1 << e for e in (20, 24, 26, 28)]
    host = CollectiveHost({"all_to_all_uneven": 39e-6}, "NVIDIA H200", 2, 20, "x", fitted_on="x")
    times = [back_to_back_s(V.predict_collective(sim, "all_to_all_uneven", S, 2, 120.0), 39e-6, 20) * 1e6
             for S in sizes]
    path = _sizes_csv(tmp_path, {"all_to_all_uneven": times}, sizes)
    bp, keys = V.fit_p2p(path, host=host)
    assert bp == pytest.approx(120.0, rel=1e-9) and keys == {("all_to_all_uneven", 1 << 28)}
    # a p2p path as fast as the link: the link sets the time, nothing to fit
    fast = [back_to_back_s(V.predict_collective(sim, "all_to_all_uneven", S, 2), 39e-6, 20) * 1e6 for S in sizes]
    assert V.fit_p2p(_sizes_csv(tmp_path, {"all_to_all_uneven": fast}, sizes), host=host) == (None, frozenset())
    # the committed run: held-out uneven rows >= 8 MiB within 10% with the p2p path, ~-55% without it
    u = rows[(rows["metric"] == "time_us") & (rows["status"] == "validated")
             & rows["config"].str.startswith("all_to_all_uneven ")]
    big = u[u["config"].str.split(" ").str[1].astype(int) >= 8 << 20]
    assert len(big) == 5 and (big["error"].abs() < 0.10).all() and big["note"].str.contains("p2p path").all()
    cal, h, p2p, _, _ = V.run_calibration(RUN / "collectives.csv")
    flat = [r for r in V.collective_rows(RUN / "collectives.csv", cal, h) if r["metric"] == "time_us"
            and r["config"] in set(big["config"])]
    assert len(flat) == 5 and all(r["error"] < -0.2 for r in flat) and 50 < p2p < 250


def test_per_collective_links_are_fitted_on_the_largest_row_only(tmp_path):
    from simulator.network.host_dispatch import CollectiveHost, LinkCalibration, back_to_back_s

    c = V.cluster_for("NVIDIA H200", 2)
    sizes = [1 << e for e in (10, 20, 24, 28)]
    true = {"all_gather": 240.0, "all_reduce": 300.0}
    host = CollectiveHost({k: 35e-6 for k in true}, "NVIDIA H200", 2, 20, "x", fitted_on="x")
    series = {k: [back_to_back_s(V.predict_collective(V._sim(c, cal=LinkCalibration(B)), k, S, 2), 35e-6, 20) * 1e6
                  for S in sizes] for k, B in true.items()}
    path = _sizes_csv(tmp_path, series, sizes)
    links, keys = V.fit_collective_links(path, host=host)
    assert set(links) == {"all_gather"} and keys == {("all_gather", 1 << 28)}  # the all-reduce keeps fit_nvlink
    assert links["all_gather"].nvlink_GBps == pytest.approx(240.0, rel=1e-9)
    rs = {r["config"]: r for r in V.collective_rows(path, LinkCalibration(300.0), host, keys, links=links)
          if r["metric"] == "time_us"}
    for k, ts in series.items():  # every size of both collectives reproduced with its own link
        assert [rs[f"{k} {S} B world2"]["predicted"] for S in sizes] == pytest.approx(ts, rel=1e-9)
    assert rs[f"all_gather {1 << 28} B world2"]["status"] == "fitted"
    assert "own" in rs[f"all_gather {1 << 24} B world2"]["note"]
    assert "own" not in rs[f"all_reduce {1 << 24} B world2"]["note"]
