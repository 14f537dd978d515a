"""Shared helpers of the paper_repro modules: run metadata, atomic CSV/PNG writing, quick flag, specs.

Every CSV row written by the modules of issue 9 carries ``META_COLUMNS`` (``date``, ``commit``,
``device``, ``python``, ``simpy``, ``numpy``, ``pandas``): the simulator is deterministic, so these
say which code and environment produced a row. ``device`` is the machine that ran the simulator
("cpu" here: every number is simulated; the simulated hardware is in each row's ``cluster`` column).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from semoe.io import git_commit  # noqa: F401 (re-exported)

META_COLUMNS = ["date", "commit", "device", "python", "simpy", "numpy", "pandas"]
DEFAULT_OUT = Path("results/paper")


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - metadata only
        return "absent"


@functools.lru_cache(maxsize=1)

def meta() -> dict:
    """Run metadata columns (same for every row of one collect())."""
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores; simulated)",
        "python": platform.python_version(),
        "simpy": _version("simpy"),
        "numpy": _version("numpy"),
        "pandas": _version("pandas"),
    }


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    """Write ``rows`` to ``path`` atomically (temp file in the same folder, then rename): never half a file.
    Columns are ``columns`` then the metadata; missing values are written empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(columns) + [c for c in META_COLUMNS if c not in columns]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(fig, png: Path, dpi: int = 110) -> Path:
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png.parent, suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return png


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cost_model_name(gpu) -> str:
    from simulator.cost import find_profile

    try:
        p = find_profile(gpu)
    except Exception:  # noqa: BLE001
        p = None
    return f"profile {Path(p).name}" if p else "roofline (HARDWARE.md ceilings; no measured profile)"


def a100_single(memory_gb: int = 80):
    """One A100 of a DGX A100 node (inference studies): the DGX preset with one GPU and no NVLink."""
    from semoe.presets import cluster_preset

    c = cluster_preset(f"dgx-a100-{memory_gb}g", 1)
    return c.replace(name=f"a100-{memory_gb}g-single", gpus_per_node=1, nics_per_node=1, nvlink=None)


def main_for(
    doc: str, collect: Callable, plot: Callable, argv: Iterable[str] | None = None, default_out: Path = DEFAULT_OUT
) -> int:
    """``python -m paper_repro.X [--quick] [--out DIR]``: collect then plot, one line per file."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        path = collect(args.out, args.quick)
        png = plot(path)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {png}")
    return 0


def read_csv(path: Path, str_cols: Iterable[str] = ("oom", "whatif", "note")):
    """A module's CSV as a DataFrame with its text columns as strings ('' where empty)."""
    import pandas as pd

    head = pd.read_csv(path, nrows=0).columns
    cols = [c for c in str_cols if c in head]
    df = pd.read_csv(path, dtype={c: str for c in cols})
    for c in cols:
        df[c] = df[c].fillna("")
    return df
