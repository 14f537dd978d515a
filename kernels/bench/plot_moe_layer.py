"""Plot results/bench/moe_layer.csv -> results/bench/moe_layer.png (reads only the CSV).

One panel per config: TFLOP/s of each implementation, forward and forward+backward, each from the
latest run (in file order) that measured that implementation; the label over each bar is its
fraction of ``dense`` measured in that same run (date, commit, device), as the issue asks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

IMPL_ORDER = ["dense", "ours", "ours_notma", "ours_torchgmm", "torch_grouped", "naive", "deepspeed"]
CONFIG_ORDER = ["mixtral_like", "hetu_switch_b32", "fine_grained"]


def plot(csv: Path, png: Path, device: str | None = None) -> Path:
    df = pd.read_csv(csv)
    df = df[(df.metric == "tflops") & df.config.isin(CONFIG_ORDER)]
    if device:
        df = df[df.device == device]
    if df.empty:
        raise SystemExit(f"{csv}: no tflops rows for the MoE configs")
    df = df.assign(run=df.date + " " + df.commit + " " + df.device)
    latest = df.groupby(["config", "impl", "mode"]).tail(1)  # latest run per bar
    dense = df[df.impl == "dense"].groupby(["config", "mode", "run"]).value.last()
    configs = [c for c in CONFIG_ORDER if c in set(df.config)]
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        d = latest[latest.config == cfg].set_index(["impl", "mode"])
        impls = [i for i in IMPL_ORDER if i in d.index.get_level_values(0)]
        for j, mode in enumerate(["fwd", "fwd_bwd"]):
            xs = [i + (j - 0.5) * 0.4 for i in range(len(impls))]
            vals = [d.value.get((i, mode), float("nan")) for i in impls]
            bars = ax.bar(xs, vals, width=0.4, label=mode)
            for b, i, v in zip(bars, impls, vals):
                ref = dense.get((cfg, mode, d.run.get((i, mode))), float("nan")) if v == v else float("nan")
                if ref == ref:
                    ax.annotate(f"{v / ref:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                                va="bottom", fontsize=7)
        ax.set_xticks(range(len(impls)), impls, rotation=20)
        ax.set_title(cfg)
        ax.set_ylabel("TFLOP/s on routed tokens")
        ax.legend(fontsize=8)
    runs = ", ".join(sorted(set(latest.commit)))
    fig.suptitle(f"MoE FFN layer, bf16, {latest.device.iloc[0]} (runs {runs}); labels: fraction of dense in the same run")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(png)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("results/bench/moe_layer.csv"))
    ap.add_argument("--png", type=Path, default=Path("results/bench/moe_layer.png"))
    ap.add_argument("--device", default=None, help="only rows of this device name")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"{args.csv}: no such file (run kernels.bench.moe_layer on a GPU first)", file=sys.stderr)
        return 2
    print(plot(args.csv, args.png, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
