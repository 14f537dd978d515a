"""`semoe distill`: Mixture-of-Students distillation into fewer experts (reference/distill.py).

Registered into the `semoe` app by semoe/cli.py's plugin list (``register(app)``).
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    app.command()(distill)


def distill(
    teacher: str = typer.Option(..., help="`semoe train --out` directory (model.yaml [+ checkpoints/]) or a preset / YAML"),
    experts: int = typer.Option(..., min=1, help="experts of the student (E_small)"),
    steps: int = typer.Option(100, min=1, help="training steps of the distilled and the from-scratch student"),
    out: Path = typer.Option(Path("runs/distill"), help="output directory (distill.csv)"),
    teacher_steps: int = typer.Option(200, min=0, help="steps to train the teacher here when there is no checkpoint"),
    temperature: float = typer.Option(2.0, help="distillation temperature T (loss scaled by T^2)"),
    alpha: float = typer.Option(0.5, help="weight of the KD term (1 - alpha on the LM loss)"),
    merge: str = typer.Option("router", help="student expert init: router (router-row cosine), coact "
                              "(co-activation on a calibration batch) or none (random)"),
    batch_size: int = typer.Option(8, min=1, help="sequences per step"),
    seq_len: int = typer.Option(64, min=2, help="tokens per sequence"),
    lr: float = typer.Option(3e-3, min=0.0, help="peak AdamW learning rate"),
    eval_batches: int = typer.Option(8, min=1, help="held-out batches for the loss"),
    quant: str = typer.Option("int8,fp8", help="also report the teacher with quantized experts ('' for none)"),
    controls: bool = typer.Option(True, help="also report merged_lm (merged init, LM loss only) and "
                                  "teacher_plus (teacher trained --steps more)"),
    data: Path | None = typer.Option(None, help="text file (byte-level); default: shipped corpus"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    seed: int = typer.Option(0, help="random seed (data order, init, held-out windows)"),
    append_to: Path | None = typer.Option(None, help="also append the rows to this CSV (e.g. results/bench/distill.csv)"),
) -> None:
    """Distil a teacher MoE into a student with fewer experts; print and write the held-out loss table."""
    from reference.distill import DistillConfig, write_csv
    from reference.distill import distill as run

    quant_fmts = tuple(f for f in quant.split(",") if f)
    for f in quant_fmts:
        if f not in ("int8", "fp8"):
            raise typer.BadParameter(f"--quant: {f!r} is not int8 or fp8")
    cfg = DistillConfig(experts=experts, steps=steps, teacher_steps=teacher_steps, temperature=temperature,
                        alpha=alpha, merge=merge, batch_size=batch_size, seq_len=seq_len, lr=lr,
                        eval_batches=eval_batches, quant=quant_fmts, controls=controls, data=data, device=device, seed=seed)
    res = run(teacher, cfg, out=out)
    typer.echo(f"teacher: {res.teacher_source}; expert groups per MoE block: {res.groups}")
    typer.echo(res.table())
    typer.echo(f"rows in {out / 'distill.csv'}")
    if append_to is not None:
        write_csv(res.rows, append_to, append=True)
        typer.echo(f"appended to {append_to}")
