"""Reports of a simulated run: summary and breakdown DataFrames, Chrome trace, plots, output folder.

``DIR/summary.csv`` (one row: step_time_s, tokens_per_s, mfu, peak_hbm_bytes (max over ranks),
peak_dram_bytes and peak_ssd_bytes (max over nodes), oom, and the run's identity), ``DIR/breakdown.csv``
(per rank: compute, exposed communication, exposed copies, optimizer, idle, in seconds),
``DIR/trace.json`` (Chrome trace, `semoe.trace` schema; Perfetto opens it) and ``DIR/trace.csv``,
``DIR/breakdown.png``, ``DIR/memory.png``. Every file is written to a temp name and renamed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from semoe import Run, TraceRow
from semoe.io import atomic_write_text
from semoe.trace import write_chrome_trace, write_csv


def trace_rows(sim) -> list[TraceRow]:
    return [TraceRow(*r) for r in sim.rows]


def summary_frame(run: Run, summary: dict, backend: str) -> pd.DataFrame:
    row = {k: v for k, v in summary.items() if k != "breakdown"}
    row.update(
        model=run.model.name, cluster=run.cluster.name, nodes=run.cluster.nodes, gpus=run.cluster.world_size,
        plan=run.plan.name, backend=backend, routing=run.workload.routing, skew=run.workload.routing_skew,
        micro_batch=run.workload.micro_batch, seq_len=run.workload.seq_len, micro_batches=run.workload.micro_batches,
    )
    return pd.DataFrame([row])


def breakdown_frame(summary: dict) -> pd.DataFrame:
    b = summary["breakdown"]
    df = pd.DataFrame({f"{k}_s": v for k, v in b.items()})
    df.insert(0, "rank", range(len(df)))
    return df


def _save_png(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def plot_breakdown(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in df.columns if c.endswith("_s")]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if len(df) > 64:  # aggregate: mean, min and max rank by busy time
        busy = df[cols[:-1]].sum(axis=1)
        pick = {"min": busy.idxmin(), "mean": None, "max": busy.idxmax()}
        rows = [df.loc[i, cols] if i is not None else df[cols].mean() for i in pick.values()]
        plot_df = pd.DataFrame(rows, index=list(pick))
    else:
        plot_df = df.set_index("rank")[cols]
    plot_df.plot.bar(stacked=True, ax=ax, width=0.9)
    ax.set_ylabel("seconds")
    ax.set_title("per-rank breakdown of one iteration")
    ax.legend(fontsize=7, loc="upper right")
    _save_png(fig, path)
    plt.close(fig)


def plot_memory(sim, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = pd.DataFrame(sim.memory.timeline, columns=["t", "rank", "tier", "bytes"])
    fig, ax = plt.subplots(figsize=(8, 3))
    for tier, d in tl.groupby("tier"):
        ax.step(d["t"], d["bytes"] / 1e9, where="post", label=f"{tier} (rank {int(d['rank'].iloc[0])})")
    ax.axhline(sim.memory.capacity["hbm"] / 1e9, color="k", ls=":", lw=0.8, label="HBM capacity")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GB")
    ax.legend(fontsize=7)
    _save_png(fig, path)
    plt.close(fig)


def write_outputs(out: str | Path, run: Run, sim, summary: dict, backend: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / v for k, v in dict(summary="summary.csv", breakdown="breakdown.csv", trace="trace.json",
                                          trace_csv="trace.csv", breakdown_png="breakdown.png",
                                          memory_png="memory.png").items()}
    atomic_write_text(paths["summary"], summary_frame(run, summary, backend).to_csv(index=False))
    bdf = breakdown_frame(summary)
    atomic_write_text(paths["breakdown"], bdf.to_csv(index=False))
    rows = trace_rows(sim)
    write_chrome_trace(rows, paths["trace"])
    write_csv(rows, paths["trace_csv"])
    plot_breakdown(bdf, paths["breakdown_png"])
    plot_memory(sim, paths["memory_png"])
    return paths
