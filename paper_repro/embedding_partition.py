"""SE-MoE embedding partition (SEMOE.md mechanism 6; paper sec. 3.4 "several vocab / hidden / expert
settings, e.g. 4 experts with hidden 8192"): simulated memory and throughput with and without it.

Setup: the paper's GPT-MoE family (12 layers, 64 heads, FFN 4h, top-1, one expert per GPU, so
DP = EP = experts) on DGX-A100-80G nodes (4 experts: one node of 4 GPUs), plain data parallelism
(ZeRO stage 0, the setting the mechanism targets), flat all-to-all, fused 32 MiB buckets, micro-batch
4 x 1024 tokens per GPU, tied and untied output embeddings. Swept: vocab x hidden x experts x plan:
``dp`` keeps every state on the GPU (hidden 8192 does not fit 80 GB: the ``oom`` column says so),
``dp_offload`` puts expert params on the CPU and expert fp32 states on SSD with one-layer prefetch
(SE-MoE's hierarchical storage; the partition is what makes 4 experts x hidden 8192 x vocab 50304
untied fit 80 GB). The PNG shows ``dp_offload``.

    python -m paper_repro.embedding_partition [--quick] [--out results/sim]

writes ``embedding_partition.csv`` (one row per setting and on/off, tidy) and ``embedding_partition.png``
(``plot()`` reads only the CSV). Quick mode (CI) runs 4 settings.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from paper_repro.common import main_for, save_png

VOCABS = (50304, 128000, 256000)
HIDDENS = (2048, 4096, 8192)
EXPERTS = (4, 8, 16)
QUICK = ((50304, 8192, 4), (256000, 4096, 8), (50304, 2048, 8), (128000, 8192, 16))

PLANS = ("dp", "dp_offload")  # dp_offload: expert params on the CPU, expert fp32 states on SSD, 2D prefetch

COLUMNS = ["vocab", "hidden", "experts", "gpus", "tied", "plan", "embedding_partition", "zero_stage", "micro_batch",
           "seq_len", "step_time_s", "tokens_per_s", "peak_hbm_GB", "model_states_gpu_GB", "embedding_states_GB",
           "embedding_comm_MB_per_step", "oom", "git_commit", "torch_free", "python"]


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - metadata only
        return "unknown"


def settings(quick: bool) -> list[tuple[int, int, int]]:
    if quick:
        return list(QUICK)
    return [(v, h, e) for v in VOCABS for h in HIDDENS for e in EXPERTS]


def one(vocab: int, hidden: int, experts: int, tied: bool, partition: bool, plan_name: str = "dp",
        micro_batch: int = 4, seq_len: int = 1024) -> dict:
    from semoe import Run
    from semoe.plan_spec import OffloadPlacement, ParallelPlan
    from semoe.presets import _paper_gpt_moe, cluster_preset
    from semoe.workload_spec import Workload
    from simulator.workload.embedding import (
        embedding_comm_bytes,
        embedding_state_bytes,
        simulate_embedding,
    )

    model = _paper_gpt_moe(experts, f"gpt-moe-v{vocab}-h{hidden}-e{experts}").replace(
        vocab=vocab, hidden=hidden, ffn=4 * hidden, tied_embeddings=tied)
    nodes = max(1, experts // 8)
    cluster = cluster_preset("dgx-a100-80g", nodes)
    if experts < 8:
        cluster = cluster.replace(gpus_per_node=experts, nics_per_node=experts)
    extra = {}
    if plan_name == "dp_offload":
        extra = dict(offload=OffloadPlacement(expert_params="cpu", expert_optimizer="ssd"), prefetch_depth=1,
                     cpu_cache_experts=1)
    plan = ParallelPlan(name=plan_name, data_parallel=experts, expert_parallel=experts, zero_stage=0,
                        fusion_bucket_bytes=32 * 2**20, embedding_partition=partition, **extra)
    wl = Workload(micro_batch=micro_batch, seq_len=seq_len)
    run = Run(model=model, cluster=cluster, plan=plan, workload=wl)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the roofline warning when no profile exists for the GPU
        _, s = simulate_embedding(run)
    emb = embedding_state_bytes(model, plan)
    comm = embedding_comm_bytes(model, plan, micro_batch * seq_len)
    return {
        "vocab": vocab, "hidden": hidden, "experts": experts, "gpus": cluster.world_size, "tied": tied,
        "plan": plan_name,
        "embedding_partition": partition, "zero_stage": 0, "micro_batch": micro_batch, "seq_len": seq_len,
        "step_time_s": s["step_time_s"], "tokens_per_s": s["tokens_per_s"],
        "peak_hbm_GB": s["peak_hbm_bytes"] / 1e9, "model_states_gpu_GB": s["state_bytes_gpu"] / 1e9,
        "embedding_states_GB": sum(emb.values()) / 1e9, "embedding_comm_MB_per_step": sum(comm.values()) / 1e6,
        "oom": s["oom"],
    }


def _write_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def collect(out: Path = Path("results/sim"), quick: bool = False) -> Path:
    meta = {"git_commit": _git(), "torch_free": True, "python": platform.python_version()}
    rows = []
    for v, h, e in settings(quick):
        for plan_name in PLANS:
            for tied in (True, False):
                for part in (False, True):
                    rows.append({**one(v, h, e, tied, part, plan_name), **meta})
    path = Path(out) / "embedding_partition.csv"
    _write_atomic(path, rows)
    return path


def plot(csv_path: Path, png: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.read_csv(csv_path)
    df["oom"] = df["oom"].fillna("").astype(str)
    key = ["vocab", "hidden", "experts", "tied", "plan"]
    j = df[~df.embedding_partition].merge(df[df.embedding_partition], on=key, suffixes=("_off", "_on"))
    j["gain_pct"] = 100.0 * (j.tokens_per_s_on / j.tokens_per_s_off - 1.0)
    j["hbm_saved_GB"] = j.peak_hbm_GB_off - j.peak_hbm_GB_on
    j["fits"] = (j.oom_off != "") & (j.oom_on == "")
    j["label"] = j.apply(lambda r: f"V{r.vocab // 1000}k h{r.hidden} E{r.experts}", axis=1)
    panels = (("dp_offload", "hbm_saved_GB", "peak HBM saved per GPU (GB), plan dp_offload\n* = fits 80 GB only with the partition"),
              ("dp", "gain_pct", "throughput change with the partition (%), plan dp (states on GPU)"))
    n = len(j[(j.plan == "dp") & j.tied])
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.2 * n + 2)))
    for ax, (plan_name, col, title) in zip(axes, panels):
        sub_plan = j[j.plan == plan_name]
        for k, (tied, sub) in enumerate(sub_plan.groupby("tied")):
            y = range(len(sub))
            ax.barh([v + 0.4 * k for v in y], sub[col], height=0.4, label=f"tied={tied}")
            labels = [lab + (" *" if f and col == "hbm_saved_GB" else "") for lab, f in zip(sub.label, sub.fits)]
            if k == 0:
                ax.set_yticks([v + 0.2 for v in y], labels, fontsize=6)
        ax.set_title(title, fontsize=9)
        ax.axvline(0.0, color="k", lw=0.8)
        ax.legend(fontsize=7)
    fig.suptitle("SE-MoE embedding partition over DP (simulated, DGX-A100-80G, ZeRO-0, 4x1024 tokens/GPU)")
    fig.tight_layout()
    return save_png(fig, Path(png or Path(csv_path).with_suffix(".png")))


def main(argv: list[str] | None = None) -> int:
    return main_for(__doc__, collect, plot, argv, default_out=Path("results/sim"))

if __name__ == "__main__":
    sys.exit(main())
