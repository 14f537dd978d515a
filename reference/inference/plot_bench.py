"""Plot results/bench/infer.csv (written by reference/inference/bench.py): prefill throughput against
ring slots K, and prefill / decode throughput against batch size, for the latest run of each device.

``python -m reference.inference.plot_bench [--csv results/bench/infer.csv] [--out results/bench/infer.png]``
Reads only the CSV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot(csv: Path, out: Path) -> Path:
    df = pd.read_csv(csv)
    df = df[df["date"] == df["date"].max()]  # latest run
    dev, cfg = df["device"].iloc[0], df["config"].iloc[0]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    pre = df[df.metric == "prefill_tokens_per_s"]
    ks = pre[pre["mode"].str.startswith("ring_K")].copy()
    ks["K"] = ks["mode"].str[6:].astype(int)
    ks = ks.sort_values("K")
    ax[0].plot(ks["K"], ks["value"], "o-", label="ring")
    bound = df[(df.metric == "bound_prefill_tokens_per_s") & (df.batch == ks["batch"].max())]
    if len(bound):
        ax[0].axhline(float(bound["value"].iloc[0]), ls="--", c="gray", label="bound max(compute, bytes/H2D)")
    acc = pre[pre["mode"] == "accelerate"]
    if len(acc):
        ax[0].axhline(float(acc["value"].iloc[0]), ls=":", c="red", label="accelerate cpu_offload")
    ax[0].set(xlabel="ring slots K", ylabel="prefill tokens/s", title=f"prefill, batch {int(ks['batch'].max())}")
    ax[0].legend()
    for mode, style in (("ring", "o-"), ("resident", "s--")):
        d = pre[pre["mode"] == mode].sort_values("batch")
        ax[1].plot(d["batch"], d["value"], style, label=mode)
    b = df[df.metric == "bound_prefill_tokens_per_s"].sort_values("batch")
    ax[1].plot(b["batch"], b["value"], ":", c="gray", label="ring bound")
    ax[1].set(xlabel="batch", ylabel="prefill tokens/s", title="prefill vs batch", xscale="log", yscale="log")
    ax[1].legend()
    dec = df[df.metric == "decode_tokens_per_s"]
    for mode, style in (("expert", "o-"), ("expert_nopred", "o:"), ("ring", "s-"), ("resident", "^--")):
        d = dec[dec["mode"] == mode].sort_values("batch")
        ax[2].plot(d["batch"], d["value"], style, label=mode)
    ax[2].set(xlabel="batch", ylabel="decode tokens/s", title="greedy decode vs batch", xscale="log", yscale="log")
    ax[2].legend()
    ax[0].set_xticks(sorted(ks["K"].unique()))
    for a in ax[1:]:
        bs = sorted(int(b) for b in df[df.batch > 0]["batch"].unique())
        a.set_xticks(bs, [str(b) for b in bs])
        a.minorticks_off()
    fig.suptitle(f"{cfg} on {dev}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--csv", type=Path, default=Path("results/bench/infer.csv"))
    p.add_argument("--out", type=Path, default=Path("results/bench/infer.png"))
    a = p.parse_args()
    print(plot(a.csv, a.out))


if __name__ == "__main__":
    main()
