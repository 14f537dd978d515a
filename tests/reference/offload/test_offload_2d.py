"""2D prefetch in one run: ZeRO-3 dense gathers (horizontal) + offloaded experts (vertical) on 2 gloo ranks.

fp32 on the CPU: ZeRO-3 with experts offloaded to cpu / ssd gives bit-equal losses to ZeRO-3 with the
experts on the GPU tier, at EP = 1 (expert grads all-reduced over the 2-rank EDP group by the engine)
and EP = 2 (each rank offloads its 2 local experts); the merged trace shows gather(l+1) and the expert
fetch of l+1 issued while block l computes. Also: world-size-1 ZeRO-3 + offload, and the CLI's checks.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from semoe.plan_spec import OffloadPlacement, ParallelPlan
from semoe.trace import read_csv

STEPS = 4


def _plan(world: int, ep: int, where: str, zero_stage: int = 3) -> ParallelPlan:
    off = {} if where == "gpu" else {
        "offload": OffloadPlacement(expert_params=where, expert_optimizer=where), "prefetch_depth": 1,
        "cpu_cache_experts": 1 if where == "ssd" else 0}
    return ParallelPlan(data_parallel=world, expert_parallel=ep, gpus_per_node=world, zero_stage=zero_stage, **off)


def _train_worker(out: str, ep: int, where: str, trace: bool = False) -> list[float]:
    import torch.distributed as dist

    from reference.train import TrainConfig, train
    from semoe.presets import load_model

    cfg = TrainConfig(steps=STEPS, batch_size=4, seq_len=16, device="cpu", progress=False, out=Path(out),
                      plan=_plan(dist.get_world_size(), ep, where), trace=trace)
    return train(load_model("tiny"), cfg).losses


@pytest.mark.distributed
def test_zero3_with_offloaded_experts_equals_zero3_on_gpu_tier_ep1_ep2(pool2, tmp_path):
    for ep in (1, 2):
        runs = {}
        for where in ("gpu", "cpu", "ssd"):
            out = tmp_path / f"ep{ep}_{where}"
            losses = pool2.run(_train_worker, str(out), ep, where, trace=(where == "cpu"))
            assert losses[0] == losses[1]  # every rank logs the global mean
            runs[where] = losses[0]
        base = runs["gpu"]
        assert len(base) == STEPS and base[-1] < base[0]
        assert runs["cpu"] == base, (ep, runs)  # bit-equal, not merely close
        assert runs["ssd"] == base, (ep, runs)
        # the global clip norm (dense shards over the node + experts over EP) is the same, and it clips
        norms = {}
        for where in runs:
            with open(tmp_path / f"ep{ep}_{where}" / "metrics.csv", newline="") as f:
                norms[where] = [r["grad_norm"] for r in csv.DictReader(f)]
        assert norms["cpu"] == norms["gpu"] == norms["ssd"] and all(float(g) > 1.0 for g in norms["gpu"])
        for r in (0, 1):  # one SSD tier per rank, holding that rank's local experts (2 MoE layers)
            blocks = list((tmp_path / f"ep{ep}_ssd" / "ssd" / f"rank{r}").glob("L*_E*.bin"))
            assert len(blocks) == 2 * (4 // ep)
        _check_2d_trace(tmp_path / f"ep{ep}_cpu")


def _check_2d_trace(out: Path) -> None:
    for r in (0, 1):
        rows = read_csv(out / f"offload_trace_rank{r}.csv")
        assert {t.rank for t in rows} == {r}
        by = {}
        for t in rows:
            by.setdefault((t.phase, t.layer, t.micro_batch), []).append(t)
        for step in range(STEPS):
            (b0,) = by[("block_forward", 0, step)]
            (e0,) = by[("expert_compute", 0, step)]
            g1 = by[("gather_fwd", 1, step)]  # block 1's dense flats (weights, and biases/norms)
            fetch1 = by[("h2d_fetch", 1, step)]  # block 1's experts, prefetched on layer 0's forward
            # horizontal: issued in block 0's pre-hook, before block 0 computes; ready once block 1 needs it
            assert all(g.start_s < b0.start_s and g.end_s >= b0.end_s and g.bytes > 0 for g in g1), (step, g1, b0)
            assert by[("gather_wait_fwd", 1, step)]
            # vertical: issued after block 0's experts are launched, before block 0's forward is over
            assert all(b0.start_s < e0.start_s <= f.start_s < b0.end_s and f.bytes > 0 for f in fetch1), (step, fetch1)
            assert by[("gather_bwd", 0, step)] and by[("d2h_grad", 0, step)] and by[("cpu_adam", 1, step)]


def test_world1_zero3_with_offload_and_cli_checks(tmp_path, capsys):
    """World size 1: --zero-stage 3 shards over a node group of one, together with offloaded experts, and
    trains like the unsharded GPU tier; bad combinations are one error line."""
    from reference.train import TrainConfig, train
    from semoe.cli import main
    from semoe.presets import load_model

    spec = load_model("tiny")
    base = train(spec, TrainConfig(steps=3, batch_size=2, seq_len=16, device="cpu", progress=False)).losses
    out = tmp_path / "w1"
    rc = main(["train", "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--quiet",
               "--device", "cpu", "--zero-stage", "3", "--offload-experts", "cpu", "--trace", "--out", str(out)])
    assert rc == 0
    with open(out / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses == pytest.approx(base, rel=1e-6, abs=0)  # dense AdamW on flat shards vs per tensor
    assert "zero_stage: 3" in (out / "plan.yaml").read_text()
    phases = {t.phase for t in read_csv(out / "offload_trace_rank0.csv")}
    assert {"gather_fwd", "gather_wait_fwd", "gather_bwd", "h2d_fetch", "block_forward"} <= phases
    for args, msg in ((["--checkpoint-every", "2"], "checkpointing (--checkpoint-every, --resume) is not supported"),
                      (["--embedding-partition"], "not combined with --embedding-partition")):
        capsys.readouterr()
        rc = main(["train", "--nproc", "2", "--dry-run", "--offload-experts", "ssd", *args, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, err
    rc = main(["train", "--dry-run", "--offload-experts", "cpu", "--cpu-cache-experts", "2", "--out", str(tmp_path)])
    assert rc == 2 and "--cpu-cache-experts needs --offload-experts ssd" in capsys.readouterr().err


def test_bench_2d_quick_writes_every_case_with_gather_and_fetch_metrics(tmp_path):
    """The H100 benchmark end to end on the CPU (--quick), so the GPU run cannot die on a typo."""
    from reference.offload.bench import COLUMNS
    from reference.offload.bench_2d import CASES, main

    out = tmp_path / "out"
    assert main(["--out", str(out), "--quick", "--budget-s", "120"]) == 0
    with open(out / "offload_2d.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS and rows[0]["commit"] and rows[0]["device"] == "cpu"
    got = {(r["placement"], r["prefetch"], r["metric"]): r["value"] for r in rows}
    for placement, prefetch in CASES:
        pf = "on" if prefetch else "off"
        for m in ("step_ms", "tokens_per_s", "gather_ms_per_step", "gather_exposed_ms_per_step", "gather_hidden_frac"):
            assert (placement, pf, m) in got, (placement, pf, m)
        assert float(got[(placement, pf, "gather_ms_per_step")]) > 0
        assert 0.0 <= float(got[(placement, pf, "gather_hidden_frac")]) <= 1.0
        phases = {t.phase for t in read_csv(out / f"trace_2d_{placement}_{pf}.csv")}
        assert {"gather_fwd", "gather_wait_fwd", "gather_bwd", "block_forward", "step"} <= phases
        if placement == "cpu":
            assert {"h2d_demand", "d2h_grad", "cpu_adam"} <= phases
            assert ("h2d_fetch" in phases) == prefetch  # off: every expert copy is on demand
            assert (placement, pf, "ratio_vs_gpu") in got and (placement, pf, "h2d_ms_per_step") in got
    assert ("-", "-", "tokens_per_step") in got and "a_zero3_world1" in rows[0]["config"]


def test_summarise_trace_hidden_gather_and_forward_fetch_overlap():
    """The trace arithmetic on hand-made rows: 3 ms of gathers of which 1 ms was waited for; a 2 ms fetch
    half inside a block's forward."""
    from reference.offload.bench_2d import summarise_trace
    from semoe.trace import TraceRow

    def row(phase, layer, s, e, step=1):
        return TraceRow(0, layer, step, phase, s, e, 0, 0, "x")

    rows = [row("block_forward", 0, 0.000, 0.004), row("block_forward", 1, 0.005, 0.006),
            row("gather_fwd", 1, 0.001, 0.003), row("gather_wait_fwd", 1, 0.0045, 0.005),
            row("gather_bwd", 0, 0.007, 0.008), row("gather_wait_bwd", 0, 0.0075, 0.008),
            row("h2d_fetch", 1, 0.003, 0.005), row("gather_fwd", 0, 0.0, 1.0, step=0)]  # step 0: not counted
    s = summarise_trace(rows, {1})
    assert s["gather_ms_per_step"] == pytest.approx(3.0)
    assert s["gather_exposed_ms_per_step"] == pytest.approx(1.0)
    assert s["gather_hidden_frac"] == pytest.approx(2 / 3)
    assert s["h2d_ms_per_step"] == pytest.approx(2.0)
    assert s["h2d_fwd_overlap_frac"] == pytest.approx(0.5)


@pytest.mark.gpu
def test_cuda_world1_zero3_side_stream_gathers_with_offload_train(tmp_path):
    """On one GPU: ZeRO-3 (side-stream gathers) + cpu-offloaded experts train like ZeRO-3 with the experts
    in HBM (bf16 autocast: close, not equal), and the trace holds event-timed gathers and fetches."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from reference.train import TrainConfig, train
    from semoe.presets import load_model

    spec = load_model("tiny").replace(dtype="bf16")
    losses = {}
    for where in ("gpu", "cpu"):
        cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, device="cuda", progress=False, trace=True,
                          plan=_plan(1, 1, where), out=tmp_path / where)
        losses[where] = train(spec, cfg).losses
    assert losses["cpu"] == pytest.approx(losses["gpu"], abs=2e-2)
    rows = read_csv(tmp_path / "cpu" / "offload_trace_rank0.csv")
    g = [r for r in rows if r.phase == "gather_fwd"]
    assert g and all(r.end_s >= r.start_s for r in g) and any(r.end_s > r.start_s for r in g)
    assert any(r.phase == "h2d_fetch" for r in rows)


@pytest.mark.distributed
def test_semoe_train_nproc_2_zero3_offload_ssd_runs_torchrun(tmp_path):
    """`semoe train --nproc 2 --zero-stage 3 --offload-experts ssd` (torchrun, gloo): every rank keeps its
    own SSD tier and writes its stats and merged trace."""
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "semoe", "train", "--nproc", "2", "--ep", "2", "--backend", "gloo",
                          "--device", "cpu", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                          "--zero-stage", "3", "--offload-experts", "ssd", "--cpu-cache-experts", "1", "--trace",
                          "--quiet", "--out", str(run)], capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    for r in (0, 1):
        assert json.loads((run / f"offload_stats_rank{r}.json").read_text())["steps"] == 2
        assert len(list((run / "ssd" / f"rank{r}").glob("L*_E*.bin"))) == 2 * 2  # 2 layers x 2 local experts
        phases = {t.phase for t in read_csv(run / f"offload_trace_rank{r}.csv")}
        assert {"gather_fwd", "h2d_fetch", "ssd_write"} <= phases
