"""`semoe train`: the reference's command (registered into the `semoe` app by semoe/cli.py).

``--offload-experts cpu|ssd`` works on one process and on N ranks, also with ``--zero-stage 3`` (each
rank offloads its local experts; ZeRO-3 gathers the dense blocks one ahead: the 2D prefetch); with one
process ``--zero-stage 3`` shards over a node group of one. One process by default; with ``--nproc N`` (or ``--nnodes``) it starts
``python -m torch.distributed.run ... -m reference.train ...`` itself and waits for it
(``--dry-run`` prints that line instead), so ``semoe train`` and ``torchrun -m reference.train``
run the same code with the same arguments.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command()(train)


def train(
    preset: str = typer.Option("tiny", "--preset", "--model", help="model preset name or YAML file"),
    steps: int = typer.Option(50, min=1, help="optimizer steps"),
    gate: Optional[str] = typer.Option(None, help="override the model's gate"),
    top_k: Optional[int] = typer.Option(None, help="override the model's top-k (e.g. 1 with --gate switch)"),
    batch_size: int = typer.Option(8, min=1, help="sequences per step"),
    seq_len: int = typer.Option(64, min=2, help="tokens per sequence"),
    lr: float = typer.Option(3e-3, min=0.0, help="peak AdamW learning rate"),
    data: Optional[Path] = typer.Option(None, help="text file (byte-level); default: shipped corpus"),
    synthetic: bool = typer.Option(False, help="random tokens instead of text"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    seed: int = typer.Option(0, help="random seed"),
    out: Path = typer.Option(Path("runs/train"), help="output directory (metrics.csv, model.yaml)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
    nproc: int = typer.Option(1, min=1, help="processes per node; > 1 launches torchrun"),
    nnodes: int = typer.Option(1, min=1, help="nodes (torchrun --nnodes; needs --rdzv-endpoint)"),
    rdzv_endpoint: Optional[str] = typer.Option(None, help="host:port of the rendezvous (multi-node)"),
    backend: str = typer.Option("auto", help="gloo, nccl or auto (nccl iff CUDA)"),
    dp: Optional[int] = typer.Option(None, min=1, help="data-parallel size (default: all ranks)"),
    ep: int = typer.Option(1, min=1, help="expert-parallel size (divides --dp)"),
    a2a: str = typer.Option("flat", help="all-to-all: flat, hetu (HetuMoE) or rail (SE-MoE)"),
    gpus_per_node: Optional[int] = typer.Option(None, min=1, help="pretend nodes of this many ranks"),
    bucket_bytes: int = typer.Option(0, min=0, help="gradient bucket bytes (0: one all-reduce per tensor)"),
    zero_stage: int = typer.Option(0, help="0, or 3: dense parameters sharded inside the node (ZeRO-3)"),
    checkpoint_every: int = typer.Option(0, min=0, help="save a checkpoint every N steps (0: never)"),
    resume: bool = typer.Option(False, help="continue from the latest checkpoint in OUT/checkpoints"),
    max_restarts: int = typer.Option(0, min=0, help="torchrun --max-restarts (with --resume)"),
    trace: bool = typer.Option(False, help="per-rank phase traces (CSV + Chrome JSON) in OUT"),
    embedding_partition: bool = typer.Option(False, help="split the token embedding's columns over the DP ranks"),
    offload_experts: str = typer.Option("gpu", help="expert weights + Adam states on gpu, cpu (pinned) or ssd"),
    prefetch_depth: int = typer.Option(1, min=0, help="with offload: MoE layers fetched ahead (0: on demand)"),
    cpu_cache_experts: int = typer.Option(0, min=0, help="with --offload-experts ssd: experts per MoE layer in the CPU cache"),
    ssd_dir: Optional[Path] = typer.Option(None, help="with --offload-experts ssd: directory (default OUT/ssd)"),
    dry_run: bool = typer.Option(False, help="print the torchrun command line and exit"),
) -> None:
    """Train a model on one process (CPU fp32, or GPU with bf16 autocast), or on N ranks via torchrun."""
    if a2a not in ("flat", "hetu", "rail"):
        raise ValueError(f"--a2a: {a2a!r} is not one of flat, hetu, rail")
    if zero_stage not in (0, 3):
        raise ValueError(f"--zero-stage: {zero_stage} is not one of 0, 3")
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"--backend: {backend!r} is not one of auto, gloo, nccl")
    if offload_experts not in ("gpu", "cpu", "ssd"):
        raise ValueError(f"--offload-experts: {offload_experts!r} is not one of gpu, cpu, ssd")
    if offload_experts != "gpu" and (checkpoint_every or resume):
        raise ValueError("--offload-experts cpu|ssd: checkpointing (--checkpoint-every, --resume) is not supported "
                         "together with expert offload")
    if offload_experts != "gpu" and embedding_partition:
        raise ValueError("--offload-experts cpu|ssd is not combined with --embedding-partition")
    if cpu_cache_experts and offload_experts != "ssd":
        raise ValueError("--cpu-cache-experts needs --offload-experts ssd")
    world = nproc * nnodes
    if (dp or world) != world:
        raise ValueError(f"--dp ({dp}) must equal --nproc x --nnodes ({world})")
    if world > 1 or dry_run:
        args = ["--preset", preset, "--steps", str(steps), "--batch-size", str(batch_size), "--seq-len", str(seq_len),
                "--lr", str(lr), "--device", device, "--seed", str(seed), "--out", str(out), "--backend", backend,
                "--ep", str(ep), "--a2a", a2a, "--bucket-bytes", str(bucket_bytes), "--zero-stage", str(zero_stage),
                "--checkpoint-every", str(checkpoint_every)]
        args += ["--gate", gate] if gate else []
        args += ["--top-k", str(top_k)] if top_k is not None else []
        args += ["--data", str(data)] if data else []
        args += ["--gpus-per-node", str(gpus_per_node)] if gpus_per_node else []
        if offload_experts != "gpu":
            args += ["--offload-experts", offload_experts, "--prefetch-depth", str(prefetch_depth),
                     "--cpu-cache-experts", str(cpu_cache_experts)]
            args += ["--ssd-dir", str(ssd_dir)] if ssd_dir else []
        args += [flag for flag, on in (("--synthetic", synthetic), ("--quiet", quiet), ("--resume", resume),
                                       ("--trace", trace),
                                       ("--embedding-partition", embedding_partition)) if on]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                  "--max-restarts", str(max_restarts)]
        if nnodes == 1:
            launch += ["--standalone"]
        else:
            if not rdzv_endpoint:
                raise ValueError("--rdzv-endpoint host:port is needed with --nnodes > 1")
            launch += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        cmd = [*launch, "-m", "reference.train", *args]
        if dry_run:
            typer.echo(shlex.join(cmd))
            return
        rc = subprocess.run(cmd).returncode
        if rc:
            raise typer.Exit(rc)
        return
    from reference.train import TrainConfig, train as run_train
    from semoe.plan_spec import ParallelPlan
    from semoe.presets import load_model

    from reference.train import offload_plan_fields, override_spec

    spec = override_spec(load_model(preset), gate=gate, top_k=top_k)
    offload = offload_plan_fields(offload_experts, prefetch_depth, cpu_cache_experts)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        data=data,
        synthetic=synthetic,
        device=device,
        seed=seed,
        out=out,
        progress=not quiet,
        checkpoint_every=checkpoint_every,
        resume=resume,
        trace=trace,
        plan=None if (ep, a2a, gpus_per_node, bucket_bytes, zero_stage, offload) == (1, "flat", None, 0, 0, {})
        else ParallelPlan(expert_parallel=ep, alltoall=a2a, gpus_per_node=gpus_per_node, fusion_bucket_bytes=bucket_bytes,
                          zero_stage=zero_stage, **offload),
        ssd_dir=ssd_dir,
    )
    result = run_train(spec, cfg)
    typer.echo(
        f"trained {spec.name} ({spec.gate}) for {steps} steps: loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s; metrics in {result.metrics_path}"
    )
