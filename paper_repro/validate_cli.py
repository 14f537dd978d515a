"""``semoe validate``: every committed GPU measurement beside its simulation. `register(app)` adds the
command to the lead's typer app (logic in `paper_repro.validate`)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def validate(
        out: Path = typer.Option(Path("results/validation"), "--out", help="folder for summary.csv and summary.png"),
        results: Path = typer.Option(Path("results"), "--results", help="folder with the committed measurements"),
        quiet: bool = typer.Option(False, "--quiet", help="print only the statistics, not every row"),
    ) -> None:
        """Simulate every committed GPU measurement under results/ and report the error table
        (MAPE, max error, Spearman on rows not used for fitting) -> OUT/summary.csv + summary.png."""
        from paper_repro.validate import format_table, run

        if not results.is_dir():
            typer.echo(f"semoe validate: results folder not found: {results}", err=True)
            raise typer.Exit(2)
        df, s = run(out, results)
        text = format_table(df, s)
        if quiet:
            text = text[text.index("validated rows (not used for fitting)"):]
        typer.echo(text)
        typer.echo(f"wrote {out / 'summary.csv'} and {out / 'summary.png'}")
