"""`semoe train`: the reference's command (registered into the `semoe` app by semoe/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command()(train)


def train(
    preset: str = typer.Option("tiny", "--preset", "--model", help="model preset name or YAML file"),
    steps: int = typer.Option(50, min=1, help="optimizer steps"),
    gate: Optional[str] = typer.Option(None, help="override the model's gate"),
    batch_size: int = typer.Option(8, min=1, help="sequences per step"),
    seq_len: int = typer.Option(64, min=2, help="tokens per sequence"),
    lr: float = typer.Option(3e-3, min=0.0, help="peak AdamW learning rate"),
    data: Optional[Path] = typer.Option(None, help="text file (byte-level); default: shipped corpus"),
    synthetic: bool = typer.Option(False, help="random tokens instead of text"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    seed: int = typer.Option(0, help="random seed"),
    out: Path = typer.Option(Path("runs/train"), help="output directory (metrics.csv, model.yaml)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train a model on one process (CPU fp32, or GPU with bf16 autocast)."""
    from reference.train import TrainConfig, train as run_train
    from semoe.presets import load_model

    spec = load_model(preset)
    if gate is not None:
        spec = spec.replace(gate=gate)
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
    )
    result = run_train(spec, cfg)
    typer.echo(
        f"trained {spec.name} ({spec.gate}) for {steps} steps: loss {result.first_loss:.4f} -> "
        f"{result.last_loss:.4f}, {result.tokens_per_s:,.0f} tokens/s; metrics in {result.metrics_path}"
    )
