"""paper_repro.multigpu_run (issue 10) under torchrun with 2 and 4 gloo ranks (fake nodes of 2), quick mode.

The script is what a later session runs on 2-8 H200s with NCCL; here it must produce every CSV with the
tidy columns, positive bus bandwidths, correct collectives, flat = hetu = rail MoE outputs (checked by
the script before timing and recorded), and training rows with per-rank memory and phase traces.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from paper_repro.multigpu_run import (
    COLLECTIVES,
    COLUMNS,
    NO_MULTICAST_ENV,
    bus_factor,
    device_command,
    main,
    moe_impls,
    uneven_splits,
)

ROOT = Path(__file__).resolve().parents[2]
FILES = {"collectives.csv", "moe.csv", "train.csv", "train_trace.csv", "run_info.json"}


def _read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def _torchrun(nproc: int, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "paper_repro.multigpu_run", "--out", str(out), "--quick", "--backend", "gloo", "--node-sizes", "2",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)


# ------------------------------------------------------------------------------------- pure helpers
def test_bus_factors_are_nccl_tests():
    assert bus_factor("all_reduce", 8) == pytest.approx(2 * 7 / 8)
    for name in ("all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven"):
        assert bus_factor(name, 4) == pytest.approx(3 / 4)


@pytest.mark.parametrize("n,elems", [(2, 256), (4, 64), (8, 32), (8, 1000003)])
def test_uneven_splits_rows_sum_and_pairs_differ(n, elems):
    S = uneven_splits(n, elems)
    assert all(sum(row) == elems for row in S) and all(v >= 0 for row in S for v in row)
    if elems >= 4 * n * n:
        assert len({S[0][d] for d in range(n)}) > 1


def test_moe_impls_per_ep_and_node_size():
    assert moe_impls(8, (2, 4)) == [("flat", "flat", None), ("hetu_p2", "hetu", 2), ("rail_p2", "rail", 2),
                                    ("hetu_p4", "hetu", 4), ("rail_p4", "rail", 4)]
    assert moe_impls(2, (2, 4)) == [("flat", "flat", None), ("hetu_p2", "hetu", 2)]  # rail in one node = flat
    assert moe_impls(1, (2,)) == [("flat", "flat", None)]


def test_world_size_that_does_not_fit_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main(["--out", str(tmp_path / "o"), "--quick", "--backend", "gloo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "world size 3 does not fit moe config mixtral_like" in err
    assert main(["--out", str(tmp_path / "o"), "--quick", "--backend", "gloo", "--parts", "collectives,bogus"]) == 2
    assert "--parts: bogus" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_device_command_fits_the_tool():
    for quick in (False, True):
        call = device_command("nvidia-h200-x8", "abc1234", quick)
        assert len(call["command"]) <= 2000 and call["timeout_s"] <= 600
        assert all(f"{k}={v}" in call["command"] for k, v in NO_MULTICAST_ENV.items())
        assert "--backend nccl" in call["command"] and "$OUT" in call["command"]


# ------------------------------------------------------------------------------------ torchrun runs
def _check_run(out: Path, world: int) -> None:
    assert {p.name for p in out.iterdir()} == FILES  # flat, <= 8 files: what the device tool returns
    coll, moe, train = (_read(out / f"{p}.csv") for p in ("collectives", "moe", "train"))
    for part, rows in (("collectives", coll), ("moe", moe), ("train", train)):
        assert rows and {r["part"] for r in rows} == {part}
        assert {r["world"] for r in rows} == {str(world)} and {r["backend"] for r in rows} == {"gloo"}

    # collectives: every kind, several sizes, correct results, positive bus bandwidth
    by = defaultdict(dict)
    for r in coll:
        by[(r["config"], int(r["size_bytes"]))][r["metric"]] = float(r["value"])
    assert {name for name, _ in by} == set(COLLECTIVES)
    timed = {k: m for k, m in by.items() if "busbw_GBps" in m}
    assert len({s for _, s in timed}) >= 2
    assert all(m["busbw_GBps"] > 0 and m["algbw_GBps"] > 0 and m["time_us"] > 0 for m in timed.values())
    assert [r["value"] for r in coll if r["metric"] == "check_ok"] == ["1"] * len(COLLECTIVES)

    # moe: flat/hetu(/rail) agree before timing, every variant timed
    agree = {(r["config"], r["impl"]): r["value"] for r in moe if r["metric"] == "agree_with_flat"}
    timed = {(r["config"], r["impl"]) for r in moe if r["metric"] == "tokens_per_s" and float(r["value"]) > 0}
    assert agree and set(agree.values()) == {"1"}
    assert all(float(r["value"]) <= 1e-6 for r in moe if r["metric"] == "max_rel_diff_vs_flat")
    assert {k for k in timed if k[1] != "flat"} == set(agree)
    assert {c.split()[0] for c, _ in timed} == {"mixtral_like", "hetu_switch_b32", "fine_grained"}
    impls = {i for _, i in timed}
    assert {"flat", "hetu_p2"} <= impls and (world < 4 or "rail_p2" in impls)
    assert {c.split()[-1] for c, _ in timed} == ({"ep4", "ep2"} if world == 4 else {"ep2"})

    # train: ZeRO-3 x fused buckets, tokens/s, peak memory of every rank, same losses, phase traces
    tps = {r["impl"]: float(r["value"]) for r in train if r["metric"] == "tokens_per_s"}
    assert set(tps) == {"zero0_bucket0", "zero0_bucket65536", "zero3_bucket0", "zero3_bucket65536"}
    assert all(v > 0 for v in tps.values())
    mem = {(r["impl"], r["rank"]) for r in train if r["metric"] == "peak_rss_bytes" and float(r["value"]) > 0}
    assert mem == {(i, str(r)) for i in tps for r in range(world)}
    assert all(float(r["value"]) < 1e-4 for r in train if r["metric"] == "max_abs_loss_diff_vs_zero0_bucket0")
    phases = {r["metric"] for r in train if r["impl"] == "zero3_bucket65536" and r["metric"].startswith("phase_")}
    assert {"phase_dispatch_s_per_step", "phase_combine_s_per_step", "phase_gather_fwd_s_per_step"} <= phases
    with (out / "train_trace.csv").open(newline="") as f:
        trace = list(csv.DictReader(f))
    assert {int(r["rank"]) for r in trace} == set(range(world))
    assert {"dispatch", "combine", "expert_compute", "grad_bucket_experts", "gather_fwd"} <= {r["phase"] for r in trace}

    info = json.loads((out / "run_info.json").read_text())
    assert info["status"] == "complete" and info["world"] == world and not info["skipped"]
    assert all(rk["env"][k] == v for rk in info["ranks"] for k, v in NO_MULTICAST_ENV.items())


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_quick_run_under_torchrun(world, tmp_path):
    out = tmp_path / "out"
    extra = ("--train-gpus-per-node", "2") if world == 4 else ()
    proc = _torchrun(world, out, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--- moe" in proc.stdout and "done in" in proc.stdout
    _check_run(out, world)
