"""Checkpoints on gloo ranks: exact resume, resharding EP=4 -> 2 -> 1 (and to one process), corruption named, atomicity;
and a rank SIGKILLed under torchrun --max-restarts resumes to the same losses bit for bit."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reference.checkpoint import latest_checkpoint, load_checkpoint
from semoe.plan_spec import ParallelPlan


def _spec(dtype="fp64"):
    from semoe.presets import model_preset

    return model_preset("tiny").replace(dtype=dtype)


def _cfg(out, steps, ep=1, world=1, every=0, resume=False, a2a="flat", zero_stage=0):
    from reference.train import TrainConfig

    plan = ParallelPlan(data_parallel=world, expert_parallel=ep, alltoall=a2a, gpus_per_node=2 if world > 1 else None,
                        zero_stage=zero_stage)
    return TrainConfig(steps=steps, batch_size=4, seq_len=16, progress=False, out=Path(out), plan=plan,
                       checkpoint_every=every, resume=resume)


def _train_worker(out: str, steps: int, ep: int, every: int, resume: bool, zero_stage: int = 0) -> list[float]:
    import torch.distributed as dist

    from reference.train import train

    return train(_spec(), _cfg(out, steps, ep, dist.get_world_size(), every, resume, zero_stage=zero_stage)).losses


def _rewind(out: Path, step: int) -> None:
    """Make ``step`` the latest checkpoint (as if the run had died right after saving it)."""
    ck = out / "checkpoints"
    (ck / "latest").write_text(f"step_{step:06d}\n")


def _outputs_worker(ckpt: str, ep: int) -> torch.Tensor:
    import torch.distributed as dist

    from reference.model import MoEDecoder
    from reference.parallel.parallelize import parallelize

    model = MoEDecoder(_spec(), seed=123).to(torch.float64)  # different init: everything must come from the file
    plan = ParallelPlan(data_parallel=dist.get_world_size(), expert_parallel=ep, gpus_per_node=2)
    model, _ = parallelize(model, plan)
    load_checkpoint(ckpt, model)
    x = torch.arange(4 * 16).view(4, 16) % 256
    r = dist.get_rank()
    return model(x[r : r + 1]).logits_BSV.detach()


@pytest.mark.distributed
def test_resume_exact_and_reshard_ep4_to_2_to_1(pool4, tmp_path):
    a = tmp_path / "a"
    full = pool4.run(_train_worker, str(a), 6, 4, 2, False)[0]
    # exact resume at the same EP: steps 4, 5 bit for bit
    _rewind(a, 4)
    again = pool4.run(_train_worker, str(a), 6, 4, 2, True)[0]
    assert again == full[4:]
    rows = list(csv.DictReader(open(a / "metrics.csv")))
    assert [float(r["loss"]) for r in rows] == full  # metrics.csv keeps steps 0-3 and rewrites 4-5
    # reshard: the EP=4 checkpoint at step 4 continues at EP=2 and EP=1 (optimizer states too)
    for ep in (2, 1):
        b = tmp_path / f"ep{ep}"
        shutil.copytree(a / "checkpoints", b / "checkpoints")
        _rewind(b, 4)
        cont = pool4.run(_train_worker, str(b), 6, ep, 0, True)[0]
        torch.testing.assert_close(torch.tensor(cont), torch.tensor(full[4:]), rtol=1e-12, atol=0)
    # identical model outputs at EP = 4, 2, 1 from the saved step-6 checkpoint
    ck = str(a / "checkpoints" / "step_000006")
    outs = {ep: pool4.run(_outputs_worker, ck, ep) for ep in (4, 2, 1)}
    for ep in (2, 1):
        for r in range(4):
            torch.testing.assert_close(outs[ep][r], outs[4][r], rtol=1e-12, atol=1e-13)
    # ... and in one process without torch.distributed
    from reference.model import MoEDecoder

    model = MoEDecoder(_spec(), seed=5).to(torch.float64)
    load_checkpoint(ck, model)
    x = torch.arange(4 * 16).view(4, 16) % 256
    torch.testing.assert_close(model(x[2:3]).logits_BSV, outs[4][2], rtol=1e-12, atol=1e-13)


@pytest.mark.distributed
def test_zero3_checkpoint_resumes_exactly_and_loads_unsharded(pool4, tmp_path):
    a = tmp_path / "z"
    full = pool4.run(_train_worker, str(a), 6, 2, 2, False, 3)[0]
    _rewind(a, 4)
    assert pool4.run(_train_worker, str(a), 6, 2, 0, True, 3)[0] == full[4:]  # ZeRO-3 -> ZeRO-3, bit for bit
    b = tmp_path / "plain"
    shutil.copytree(a / "checkpoints", b / "checkpoints")
    _rewind(b, 4)
    cont = pool4.run(_train_worker, str(b), 6, 4, 0, True, 0)[0]  # ZeRO-3 EP 2 -> unsharded EP 4
    torch.testing.assert_close(torch.tensor(cont), torch.tensor(full[4:]), rtol=1e-12, atol=0)


def _read_losses(path: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader(open(path))]


def _torchrun(out: Path, extra_env: dict, max_restarts: int) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1", "SEMOE_PG_TIMEOUT_S": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", "-m", "reference.train",
           "--preset", "tiny", "--steps", "40", "--batch-size", "4", "--seq-len", "16", "--ep", "2",
           "--gpus-per-node", "2", "--backend", "gloo", "--device", "cpu", "--checkpoint-every", "5",
           "--resume", "--quiet", "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.distributed
def test_sigkill_rank_under_torchrun_restarts_and_matches_bit_for_bit(tmp_path):
    ref = _torchrun(tmp_path / "ref", {}, 0)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = _torchrun(tmp_path / "killed", {"SEMOE_KILL_RANK_AT_STEP": "1:23"}, 1)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "exitcode: -9" in killed.stderr  # rank 1 really died of SIGKILL, then the job restarted
    a, b = _read_losses(tmp_path / "ref" / "metrics.csv"), _read_losses(tmp_path / "killed" / "metrics.csv")
    assert len(a) == len(b) == 40
    assert a == b
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_000040"
