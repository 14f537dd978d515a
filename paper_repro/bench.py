"""Regression benchmarks: run the GPU suites, plot every metric over commits, flag regressions.

``semoe bench [--suite NAME]`` (on a GPU) runs the benchmark scripts that append tidy rows to
``results/bench/*.csv``; ``semoe bench plot`` draws each metric over runs per device;
``semoe bench check`` exits 1 when the latest row of a series is more than ``--tolerance`` (5%) worse
than the best earlier row of the same series.

A *series* is every column of a CSV except ``date``, ``commit`` and ``value`` (so device, config,
impl, mode, batch, metric... whatever the file has); rows keep file order, which is run order since
the benchmarks append. Whether larger is better is read from the metric name (throughputs, TFLOP/s,
GB/s, MFU, fractions: larger; times: smaller); other metrics (losses, byte counts) are not checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

META_COLUMNS = ("date", "commit", "value")

# the suites: the benchmark scripts that append to results/bench/*.csv (their own --help says more)
SUITES: dict[str, list[str]] = {
    "kernels": ["-m", "kernels.bench.moe_layer"],
    "train": ["-m", "reference.parallel.bench", "--preset", "paper-13.9b", "--layers", "4", "--hidden", "2048",
              "--heads", "16", "--ffn", "8192", "--experts", "8", "--top-k", "1", "--steps", "40"],
    "infer": ["-m", "reference.inference.bench", "--out", "runs/bench_infer"],
}

_HIGHER = re.compile(r"(tflops|gbps|per_s|tokens_per_s|mfu|fraction|ratio|speedup|hit_rate|busbw|algbw)", re.I)
_LOWER = re.compile(r"(^|_)(ms|s|us|time|latency)($|_)", re.I)


def direction(metric: str) -> int:
    """+1 if larger is better, -1 if smaller is better, 0 if not a performance metric."""
    if _HIGHER.search(metric):
        return 1
    if _LOWER.search(metric):
        return -1
    return 0


def series_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in META_COLUMNS]


def check_frame(df: pd.DataFrame, tolerance: float = 0.05) -> pd.DataFrame:
    """Rows (one per series whose latest value is worse than the best earlier one by > tolerance)."""
    if "metric" not in df.columns or "value" not in df.columns:
        raise ValueError(f"a benchmark CSV needs 'metric' and 'value' columns, got {list(df.columns)}")
    keys = series_columns(df)
    out = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        sign = direction(str(dict(zip(keys, key))["metric"]))
        vals = pd.to_numeric(g["value"], errors="coerce").dropna()
        if sign == 0 or len(vals) < 2:
            continue
        latest, earlier = vals.iloc[-1], vals.iloc[:-1]
        best = earlier.max() if sign > 0 else earlier.min()
        if best == 0:
            continue
        worse = (best - latest) / abs(best) if sign > 0 else (latest - best) / abs(best)
        if worse > tolerance:
            row = dict(zip(keys, key))
            row.update(best=float(best), latest=float(latest), worse_by=float(worse),
                       latest_commit=str(g["commit"].iloc[-1]) if "commit" in g else "")
            out.append(row)
    return pd.DataFrame(out)


def is_tidy(df: pd.DataFrame) -> bool:
    return {"metric", "value"} <= set(df.columns)


def check(results: Path, tolerance: float = 0.05) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """Regressions per tidy CSV under ``results`` (a folder of benchmark CSVs), and the names of the
    CSVs skipped because they are not in the tidy ``...,metric,value`` form."""
    files = sorted(Path(results).glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no benchmark CSVs in {results}")
    found, skipped = {}, []
    for f in files:
        df = pd.read_csv(f, dtype={"commit": str})
        if is_tidy(df):
            found[f.name] = check_frame(df, tolerance)
        else:
            skipped.append(f.name)
    return found, skipped


def plot(results: Path, out: Path, max_series: int = 24) -> list[Path]:
    """One PNG per CSV: each performance metric over runs (x: run order), a line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in sorted(Path(results).glob("*.csv")):
        df = pd.read_csv(f, dtype={"commit": str})
        if not is_tidy(df):
            continue
        df = df[[direction(str(m)) != 0 for m in df["metric"]]]
        if df.empty:
            continue
        metrics = list(dict.fromkeys(df["metric"]))
        fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 2.6 * len(metrics)), squeeze=False)
        keys = [c for c in series_columns(df) if c != "metric"]
        for ax, metric in zip(axes[:, 0], metrics):
            d = df[df["metric"] == metric]
            for i, (key, g) in enumerate(d.groupby(keys, sort=False, dropna=False)):
                if i >= max_series:
                    break
                label = " ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))[:60]
                ax.plot(range(len(g)), pd.to_numeric(g["value"], errors="coerce"), marker="o", label=label)
            ax.set_title(f"{f.stem}: {metric} ({'higher' if direction(metric) > 0 else 'lower'} is better)")
            ax.set_xlabel("run (file order)")
            ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        path = out / f"{f.stem}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written


def run_suite(name: str) -> int:
    """Run one suite on this machine's GPU (its script appends to results/bench/)."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose from: {', '.join(SUITES)}")
    import torch

    if not torch.cuda.is_available():
        raise ValueError("semoe bench runs on a CUDA GPU (use the device tool); plot and check run anywhere")
    return subprocess.run([sys.executable, *SUITES[name]]).returncode
