"""The `semoe` command.

Subcommands defined here: ``sizing``, ``gates``, ``plan-tasks``. Other packages add theirs through a
``register(app)`` function in a module listed in ``_PLUGIN_MODULES`` (``reference.cli`` adds
``train``, ``simulator.cli`` adds ``simulate``), so each package keeps its own command code. Heavy imports (torch) happen inside
commands, never at import time.

Every expected failure (a bad value, an unknown preset, a missing or corrupt file) prints one line
``semoe: error: ...`` and exits with code 2; usage errors from typer exit with 2 as well. Set
``SEMOE_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from semoe.spec_base import SpecError

app = typer.Typer(
    help="SE-MoE testbed: reference training, simulation and paper reproduction.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_PLUGIN_MODULES = (
    "reference.cli",
    "reference.infer_cli",
    "reference.distill_cli",
    "simulator.cli",
    "paper_repro.validate_cli",
    "paper_repro.cli",
)
USER_ERRORS = (SpecError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError)


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:g}"


@app.command()
def sizing(
    model: str = typer.Option(..., "--model", help="model preset name or ModelSpec YAML file"),
    seq_len: Optional[int] = typer.Option(None, help="sequence length for FLOPs (default: max_seq)"),
    plan: Optional[str] = typer.Option(None, help="plan preset or YAML, for bytes per tier"),
    data_parallel: int = typer.Option(1, help="ranks (with a plan preset)"),
    expert_parallel: int = typer.Option(1, help="expert-parallel size (with a plan preset)"),
) -> None:
    """Parameters, FLOPs per token and model-state bytes per tier of a model."""
    from rich.console import Console
    from rich.table import Table

    from semoe import sizing as sz
    from semoe.plan_spec import ParallelPlan
    from semoe.presets import PLAN_PRESETS, load_model, plan_preset

    m = load_model(model)
    p = None
    if plan is not None:
        p = (
            plan_preset(plan, data_parallel, expert_parallel)
            if plan in PLAN_PRESETS
            else ParallelPlan.from_yaml(plan)
        )
    rows = sz.summary(m, seq_len, p)
    table = Table(title=f"sizing of {m.name}" + (f" with plan {p.name}" if p else ""))
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("exact", justify="right")
    for k, v in rows.items():
        table.add_row(k, _fmt(v), f"{v:,.0f}")
    Console().print(table)


@app.command()
def gates() -> None:
    """List the gates (routers) the reference implements."""
    from reference.moe.router import GATES

    for name, cls in GATES.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        typer.echo(f"{name:14s} {doc[0] if doc else ''}")


@app.command("plan-tasks")
def plan_tasks(
    tasks: str = typer.Option(..., "--tasks", help="YAML file: tasks: [{name, batch_size, cost_per_sample_s}]"),
    gpus: int = typer.Option(..., "--gpus", min=1, help="devices available"),
    mode: str = typer.Option("up", help="up: balance over --gpus; down: fewest devices within --slowdown"),
    slowdown: float = typer.Option(0.1, min=0.0, help="allowed step-time increase for --mode down"),
    out: Optional[str] = typer.Option(None, help="write the table as CSV here"),
) -> None:
    """Elastic multi-task allocation: which device runs how many samples of which task."""
    from rich.console import Console
    from rich.table import Table

    from semoe.elastic import TaskSet, plan_downscale, plan_naive, plan_upscale

    if mode not in ("up", "down"):
        raise SpecError(f"--mode must be 'up' or 'down', got {mode!r}")
    ts = TaskSet.from_yaml(tasks)
    plan = plan_upscale(ts, gpus) if mode == "up" else plan_downscale(ts, gpus, slowdown)
    naive = plan_naive(ts)
    rows = plan.rows()
    table = Table(title=f"{mode}scaled plan on {plan.devices} devices (step {plan.step_time:g})")
    for col in ("device", "task", "samples", "task_load", "device_load"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for r in rows:
        table.add_row(*(f"{r[c]:g}" if isinstance(r[c], float) else str(r[c]) for c in r))
    console = Console()
    console.print(table)
    used = len({r["device"] for r in rows})
    console.print(
        f"devices used {used}/{plan.devices}; step time {plan.step_time:g} vs one device per task "
        f"({naive.devices} devices) {naive.step_time:g}; throughput {plan.throughput():g} vs "
        f"{naive.throughput():g} samples per time unit"
    )
    if out:
        import csv
        import io

        from semoe.io import atomic_write_text

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(Path(out), buf.getvalue())


_registered: set[str] = set()


def _register_plugins() -> None:
    for mod in _PLUGIN_MODULES:
        if mod in _registered:
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # the plugin does not exist (yet): nothing to add
                continue
            raise
        module.register(app)
        _registered.add(mod)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    _register_plugins()
    try:
        app(args=argv, prog_name="semoe", standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except USER_ERRORS as e:
        if os.environ.get("SEMOE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        typer.echo(f"semoe: error: {msg}", err=True)
        return 2
    return 0


def entry() -> None:  # console script
    sys.exit(main())
