"""`semoe train --nproc N` launches torchrun (or prints the line with --dry-run) and writes per-rank traces."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from semoe.trace import read_csv


def _semoe(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "semoe", "train", *args], capture_output=True, text=True,
                          timeout=240, cwd=cwd)


def test_dry_run_prints_the_torchrun_line(tmp_path):
    out = _semoe("--nproc", "4", "--ep", "2", "--a2a", "rail", "--gpus-per-node", "2", "--backend", "gloo",
                 "--out", str(tmp_path), "--dry-run")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert "-m torch.distributed.run --nproc-per-node 4" in line and "--standalone -m reference.train" in line
    assert "--ep 2 --a2a rail" in line and "--gpus-per-node 2" in line


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nproc", "2", "--dp", "3"], "--dp (3) must equal --nproc x --nnodes (2)"),
        (["--nproc", "2", "--a2a", "ring"], "--a2a: 'ring' is not one of flat, hetu, rail"),
        (["--nproc", "2", "--nnodes", "2"], "--rdzv-endpoint host:port is needed"),
    ],
)
def test_bad_launch_options_are_one_line(args, message, tmp_path):
    out = _semoe(*args, "--dry-run", "--out", str(tmp_path))
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.distributed
def test_semoe_train_nproc_2_ep_2_zero3_runs_torchrun_with_traces(tmp_path):
    out = _semoe("--nproc", "2", "--ep", "2", "--a2a", "hetu", "--gpus-per-node", "2", "--backend", "gloo",
                 "--device", "cpu", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--bucket-bytes", "65536",
                 "--zero-stage", "3", "--trace", "--quiet", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for r in (0, 1):
        phases = {t.phase for t in read_csv(tmp_path / "run" / f"trace_rank{r}.csv")}
        assert {"dispatch", "combine", "expert_compute", "grad_bucket_experts", "gather_fwd", "gather_bwd"} <= phases
