"""``semoe repro [--quick] --out DIR``: every paper_repro module, then ``DIR/report.md``.
`register(app)` adds the command to the lead's typer app (semoe/cli.py ``_PLUGIN_MODULES``)."""

from __future__ import annotations

from pathlib import Path

import typer


def repro_cmd(
    out: Path = typer.Option(Path("results/paper"), "--out", help="output folder (CSV, PNG, report.md)"),  # noqa: B008
    quick: bool = typer.Option(False, "--quick", help="CI-sized run (< 3 minutes on 2 CPU cores)"),
) -> None:
    """Reproduce the SE-MoE paper's experiments in simulation: CSV + PNG per module and report.md."""
    from paper_repro.repro import run_all

    run_all(out, quick=quick, log=typer.echo)


def register(app: typer.Typer) -> None:
    app.command("repro")(repro_cmd)
