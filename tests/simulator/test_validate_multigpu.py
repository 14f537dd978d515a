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
    assert set(rows["status"]) >= {"validated", "extrapolated", "derived", "not_modelled"}
    # nothing here is fitted: no row may claim it
    assert not rows["used_for_fitting"].any()
    scored = rows[rows["status"].isin(SCORED)]
    assert np.isfinite(scored["predicted"]).all() and (scored["predicted"] > 0).all()
    assert np.allclose(scored["error"], scored["predicted"] / scored["measured"] - 1)


def test_every_committed_row_and_time_metric_has_a_row(rows):
    total = 0
    for name, metric in TIME_METRICS.items():
        df = pd.read_csv(RUN / name, dtype={"commit": str})
        total += len(df)
        timed = df[df["metric"] == metric]
        assert len(timed) > 0
        got = rows[(rows["metric"] == metric) & rows["status"].isin(SCORED)]
        if name == "collectives.csv":
            keys = {f"{r.config} {int(r.size_bytes)} B world{int(r.world)}" for r in timed.itertuples()}
        else:
            keys = {f"{r.config} {r.impl}" for r in timed.itertuples()}
        assert keys <= set(got["config"]), keys - set(got["config"])
    assert len(rows) == total  # one row per measured number, none dropped


def test_collective_part_is_validated_and_the_rest_extrapolated(rows):
    sc = rows[rows["status"].isin(SCORED)]
    parts = sc["config"].map(V._part)
    assert set(sc.loc[parts == "collectives", "status"]) == {"validated"}
    assert set(sc.loc[parts != "collectives", "status"]) == {"extrapolated"}
    s = V.summary(rows.to_dict("records"))
    assert set(s["part"]) == {"collectives", "moe", "train"}
    assert s["rows"].sum() == len(sc)


def test_predicted_all_reduce_time_grows_with_size(rows):
    ar = rows[rows["config"].str.startswith("all_reduce ") & (rows["metric"] == "time_us")].copy()
    ar["size"] = ar["config"].str.split(" ").str[1].astype(int)
    pred = ar.sort_values("size")["predicted"].to_numpy()
    assert len(pred) >= 10 and np.all(np.diff(pred) > 0)


def test_hetu_vs_flat_ordering_matches_the_measurement(rows):
    moe = rows[(rows["metric"] == "fwd_bwd_ms") & (rows["status"] == "extrapolated")]
    base = moe["config"].str.rsplit(" ", n=1).str[0]
    for cfg in set(base):
        d = moe[base == cfg].set_index(moe[base == cfg]["config"].str.rsplit(" ", n=1).str[1])
        if {"flat", "hetu_p2"} <= set(d.index):
            assert np.sign(d.loc["hetu_p2", "measured"] - d.loc["flat", "measured"]) == np.sign(
                d.loc["hetu_p2", "predicted"] - d.loc["flat", "predicted"]), cfg
            assert "off-rank bytes" in d.loc["hetu_p2", "note"]


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
    plain = CostModel.auto(h100)
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
