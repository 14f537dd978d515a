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


bench_app = typer.Typer(help="Regression benchmarks: run GPU suites, plot over commits, check for regressions.",
                        invoke_without_command=True, no_args_is_help=False)


@bench_app.callback()
def bench_run(
    ctx: typer.Context,
    suite: str = typer.Option("kernels", "--suite", help="kernels, train or infer"),
) -> None:
    """Run a suite on the GPU (its rows are appended to results/bench/*.csv)."""
    if ctx.invoked_subcommand is not None:
        return
    from paper_repro.bench import run_suite

    raise typer.Exit(run_suite(suite))


@bench_app.command("plot")
def bench_plot(
    results: Path = typer.Option(Path("results/bench"), help="folder of benchmark CSVs"),  # noqa: B008
    out: Path = typer.Option(Path("results/bench/history"), help="where the PNGs go"),  # noqa: B008
) -> None:
    """Each performance metric over runs, per CSV."""
    from paper_repro.bench import plot

    for path in plot(results, out):
        typer.echo(f"wrote {path}")


@bench_app.command("check")
def bench_check(
    results: Path = typer.Option(Path("results/bench"), help="folder of benchmark CSVs"),  # noqa: B008
    tolerance: float = typer.Option(0.05, min=0.0, help="allowed loss against the best earlier row"),
) -> None:
    """Exit 1 when the latest row of a series is more than --tolerance worse than its best earlier row."""
    from paper_repro.bench import check

    bad = 0
    found, skipped = check(results, tolerance)
    for name in skipped:
        typer.echo(f"{name}: not a tidy benchmark CSV (no metric/value columns); skipped")
    for name, df in found.items():
        for row in df.to_dict("records"):
            bad += 1
            key = " ".join(f"{k}={v}" for k, v in row.items() if k not in ("best", "latest", "worse_by"))
            typer.echo(f"{name}: {key}: latest {row['latest']:g} vs best {row['best']:g} "
                       f"({100 * row['worse_by']:.1f}% worse)")
    typer.echo(f"{bad} regression(s) beyond {100 * tolerance:.0f}%")
    raise typer.Exit(1 if bad else 0)


def register(app: typer.Typer) -> None:
    app.command("repro")(repro_cmd)
    app.add_typer(bench_app, name="bench")
