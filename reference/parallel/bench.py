"""Training throughput benchmark: tokens/s and model FLOP utilisation (MFU) of a training run, appended to
``results/bench/train.csv`` as tidy rows ``date,commit,device,config,metric,value``.

    python -m reference.parallel.bench --preset paper-13.9b --layers 4 --hidden 2048 --heads 16 \\
        --ffn 8192 --experts 8 --steps 20 --batch-size 8 --seq-len 1024 [--torchrun-world 1]

MFU = tokens/s x ``semoe.sizing.training_flops_per_token`` (3 x forward FLOPs: forward + 2 x backward,
Kaplan et al. 2020 / PaLM appendix B convention) / (ranks x peak dense bf16 FLOP/s of the GPU, from
the datasheet values in ``semoe.presets``). tokens/s is the median over the steps after ``warmup``
(the per-step column of metrics.csv), so compilation and allocator warm-up do not count.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
from pathlib import Path
from semoe.io import git_commit  # noqa: F401 (re-exported)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM datasheets (semoe.presets)
COLUMNS = ("date", "commit", "device", "config", "metric", "value")


def peak_tflops(device_name: str) -> float | None:
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return v
    return None



def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    import torch

    from reference.train import TrainConfig, train
    from semoe import sizing
    from semoe.presets import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper-13.9b")
    for name in ("layers", "hidden", "heads", "ffn", "experts", "top-k"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--backend", default="auto")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--a2a", default="flat")
    p.add_argument("--bucket-bytes", type=int, default=0)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--synthetic", action="store_true", help="random tokens instead of the byte corpus")
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--csv", type=Path, default=Path("results/bench/train.csv"))
    a = p.parse_args(argv)
    spec = load_model(a.preset)
    over = {k: getattr(a, k.replace("-", "_")) for k in ("layers", "hidden", "heads", "ffn", "experts", "top-k")}
    over = {k.replace("-", "_"): v for k, v in over.items() if v is not None}
    spec = spec.replace(**over, name=f"{spec.name}-scaled") if over else spec
    from semoe.plan_spec import ParallelPlan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = ParallelPlan(data_parallel=world, expert_parallel=a.ep, alltoall=a.a2a,
                        fusion_bucket_bytes=a.bucket_bytes, zero_stage=a.zero_stage)
    cfg = TrainConfig(plan=plan, trace=a.trace, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, synthetic=a.synthetic, out=a.out, lr=a.lr,
                      progress=False, backend=a.backend, warmup_steps=min(5, a.steps))
    train(spec, cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    rows = list(csv.DictReader(open(a.out / "metrics.csv")))
    tps = statistics.median(float(r["tokens_per_s"]) for r in rows[a.warmup:] or rows)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    flops_tok = sizing.training_flops_per_token(spec, a.seq_len)
    peak = peak_tflops(device)
    backend = os.environ.get("SEMOE_BENCH_BACKEND_LABEL", a.backend)
    from reference.moe.layer import resolve_backend

    moe_backend = resolve_backend("auto")  # what the run's MoE layers used (SEMOE_MOE_BACKEND or the default)
    adamw = "fused" if torch.cuda.is_available() else "default"  # reference.train.make_optimizer's choice
    config = (f"{spec.name} L{spec.layers} D{spec.hidden} E{spec.experts} k{spec.top_k} F{spec.ffn} {spec.dtype} "
              f"B{a.batch_size} S{a.seq_len} lr{a.lr:g} steps{a.steps} world{world} {backend} ep{a.ep} {a.a2a} "
              f"bucket{a.bucket_bytes} zero{a.zero_stage} "
              f"params{sizing.count_params(spec).total} moe-{moe_backend} adamw-{adamw}")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = [{"date": date, "commit": git_commit(), "device": device, "config": config, "metric": "tokens_per_s",
            "value": f"{tps:.1f}"}]
    if peak is not None:
        mfu = tps * flops_tok / (world * peak * 1e12)
        out.append({**out[0], "metric": "mfu", "value": f"{mfu:.4f}"})
    out.append({**out[0], "metric": "first_loss", "value": rows[0]["loss"]})
    out.append({**out[0], "metric": "final_loss", "value": rows[-1]["loss"]})
    append_rows(a.csv, out)
    for r in out:
        print(r["metric"], r["value"], "|", r["config"], "|", r["device"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
