"""Hierarchical (SE-MoE rail-aligned, HetuMoE leader-based) vs flat all-to-all on 4 nodes x 8 A100
(SEMOE.md mechanism 4 and experiment "Hierarchical all-to-all study: an 80.7B model on 4 nodes x 8
GPUs"), simulated: communication time of the collective alone and end to end in training.

Model (the paper does not give the config; our choice, documented): the paper's GPT-MoE shape
(vocab 50304, FFN 4h, heads = h/64, every layer MoE, one expert per GPU) at hidden 3584, 24 layers,
32 experts = 80.3B parameters (0.4% below 80.7B; the 12-layer hidden-4096 family gives 52.6B at 32
experts and cannot reach 80.7B with an integer number of experts per GPU).

Parts (``part`` column):

* ``collective``: one all-to-all over the 32 ranks with a uniform byte matrix, per-rank send size
  16 KiB .. 512 MiB, algorithms flat / hetu / rail, analytic (alpha-beta + per-link load) and flow
  (max-min fair) network backends; what-ifs: 1/2/4/8 NICs per node, spine oversubscription 1/2/4,
  DGX-H100 nodes.
* ``training``: one training step of the 80.3B model, seq 1024, top-1 and top-2, micro-batch 4, with
  the ``semoe-gpu`` plan of `paper_repro.training_throughput` (experts on the GPU, fused buckets,
  ZeRO-3 with prefetch) and only ``alltoall`` changed; ``a2a_s`` is the mean per-rank time spent in the
  4 blocking all-to-alls of each MoE layer (dispatch, combine, and their backward), from trace rows.

    python -m paper_repro.alltoall_hierarchical [--quick] [--out results/paper]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

from paper_repro.common import (
    DEFAULT_OUT,
    cost_model_name,
    main_for,
    meta,
    pyplot,
    read_csv,
    save_png,
    write_csv,
)

ALGOS = ("flat", "hetu", "rail")
NODES = 4
MiB = 2**20
SIZES = tuple(2**k for k in range(14, 30))  # 16 KiB .. 512 MiB per rank (512 B .. 16 MiB per pair)
QUICK_SIZES = (2**16, MiB, 16 * MiB, 256 * MiB)
WHATIFS = (("", {}), ("nics=4", {"nics_per_node": 4}), ("nics=2", {"nics_per_node": 2}),
           ("nics=1", {"nics_per_node": 1}), ("spine=2:1", {"spine_oversubscription": 2.0}),
           ("spine=4:1", {"spine_oversubscription": 4.0}), ("h100", {}))

COLUMNS = ["part", "whatif", "cluster", "nodes", "gpus", "nics_per_node", "spine_oversubscription", "backend",
           "algo", "bytes_per_rank", "a2a_time_s", "algbw_GBps", "model", "params_B", "seq_len", "top_k",
           "micro_batch", "step_time_s", "tokens_per_s", "a2a_s", "comm_s", "compute_s", "peak_hbm_GB", "oom",
           "cost_model", "sim_wall_s"]


def model_80b(top_k: int = 1):
    from semoe.presets import _paper_gpt_moe

    return _paper_gpt_moe(32, "gpt-moe-80.3b").replace(hidden=3584, ffn=4 * 3584, heads=56, layers=24, top_k=top_k)


def cluster(whatif: str = "", **changes):
    from semoe.presets import cluster_preset

    c = cluster_preset("dgx-h100" if whatif == "h100" else "dgx-a100-80g", NODES)
    return c.replace(**changes) if changes else c


def collective_time(c, algo: str, nbytes: float, backend: str) -> float:
    from simulator import collectives as C
    from simulator.engine import Sim

    sim = Sim(c, backend=backend, profile=None, trace=False)
    W = c.world_size
    M = np.full((W, W), nbytes / W)
    op = C.all_to_all(sim.topo, np.arange(W), M, algo)
    if backend == "analytic":
        return float(sim.net.op_offsets(op).max())
    ev = sim.net.run(op)
    sim.env.run()
    return float(np.max(ev.value))


def training_row(c, algo: str, top_k: int, whatif: str = "") -> dict:
    from paper_repro.training_throughput import make_plan
    from semoe import Run
    from semoe.sizing import count_params
    from semoe.workload_spec import Workload
    from simulator.api import simulate

    m = model_80b(top_k)
    plan = make_plan("semoe-gpu", c.world_size).replace(alltoall=algo, name=f"semoe-gpu-{algo}")
    wl = Workload(micro_batch=4, seq_len=1024)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim, s = simulate(Run(model=m, cluster=c, plan=plan, workload=wl), trace=True)
    a2a = np.zeros(c.world_size)
    for r in sim.rows:
        if "a2a" in r[3]:
            a2a[r[0]] += r[5] - r[4]
    b = {k: float(v.mean()) for k, v in s["breakdown"].items()}
    return {"part": "training", "whatif": whatif, "algo": algo, "backend": "analytic", "model": m.name,
            "params_B": count_params(m).total / 1e9, "seq_len": 1024, "top_k": top_k, "micro_batch": 4,
            "step_time_s": s["step_time_s"], "tokens_per_s": s["tokens_per_s"], "a2a_s": float(a2a.mean()),
            "comm_s": b["comm"], "compute_s": b["compute"], "peak_hbm_GB": s["peak_hbm_bytes"] / 1e9, "oom": s["oom"],
            "cost_model": cost_model_name(c.gpu), "sim_wall_s": time.perf_counter() - t0}


def _cl(c) -> dict:
    return {"cluster": c.name, "nodes": c.nodes, "gpus": c.world_size, "nics_per_node": c.nics_per_node,
            "spine_oversubscription": c.spine_oversubscription}


def collect(out: Path = DEFAULT_OUT, quick: bool = False) -> Path:
    md = meta()
    rows = []
    sizes = QUICK_SIZES if quick else SIZES
    whatifs = WHATIFS[:1] + WHATIFS[3:4] if quick else WHATIFS
    for name, ch in whatifs:
        c = cluster(name, **ch)
        for backend in (("analytic",) if quick or name else ("analytic", "flow")):
            for algo in ALGOS:
                for nb in sizes:
                    t0 = time.perf_counter()
                    t = collective_time(c, algo, nb, backend)
                    rows.append({**_cl(c), "part": "collective", "whatif": name, "backend": backend, "algo": algo,
                                 "bytes_per_rank": nb, "a2a_time_s": t, "algbw_GBps": nb / t / 1e9,
                                 "cost_model": "network only", "sim_wall_s": time.perf_counter() - t0})
    for name, ch in (whatifs[:1] if quick else (WHATIFS[0], WHATIFS[3], WHATIFS[5], WHATIFS[6])):
        c = cluster(name, **ch)
        for k in ((1,) if quick else (1, 2)):
            for algo in ALGOS:
                rows.append({**_cl(c), **training_row(c, algo, k, name)})
    rows = [{**r, **md} for r in rows]
    return write_csv(Path(out) / "alltoall_hierarchical.csv", rows, COLUMNS)


def plot(csv_path: Path, png: Path | None = None) -> Path:
    plt = pyplot()
    df = read_csv(csv_path)
    col = df[df.part == "collective"]
    tr = df[df.part == "training"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    base = col[(col.whatif == "")]
    for (backend, algo), sub in base.groupby(["backend", "algo"]):
        sub = sub.sort_values("bytes_per_rank")
        ax.plot(sub.bytes_per_rank / MiB, sub.a2a_time_s * 1e3, marker="o", ms=3,
                ls="-" if backend == "analytic" else ":", label=f"{algo} ({backend})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes sent per rank (MiB)")
    ax.set_ylabel("all-to-all time (ms)")
    ax.set_title("32 x A100 (4 DGX nodes, 8 NICs each), uniform all-to-all", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    big = col[(col.backend == "analytic") & (col.bytes_per_rank == col.bytes_per_rank.max())]
    names = list(dict.fromkeys(big.whatif))
    x = np.arange(len(names))
    for k, algo in enumerate(ALGOS):
        sub = big[big.algo == algo].set_index("whatif").reindex(names)
        ax.bar(x + 0.27 * k, sub.a2a_time_s * 1e3, 0.27, label=algo)
    ax.set_xticks(x + 0.27, [n or "baseline" for n in names], fontsize=7, rotation=20)
    ax.set_ylabel("all-to-all time (ms)")
    ax.set_yscale("log")
    ax.set_title(f"what-ifs at {int(big.bytes_per_rank.max() // MiB) if len(big) else ''} MiB per rank", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    if len(tr):
        tr = tr.assign(label=tr.whatif.replace("", "baseline") + " top-" + tr.top_k.astype(int).astype(str))
        labels = list(dict.fromkeys(tr.label))
        x = np.arange(len(labels))
        for k, algo in enumerate(ALGOS):
            sub = tr[tr.algo == algo].set_index("label").reindex(labels)
            ax.bar(x + 0.27 * k, sub.step_time_s, 0.27, label=f"{algo} step", alpha=0.5)
            ax.bar(x + 0.27 * k, sub.a2a_s, 0.27, label=f"{algo} all-to-all part", hatch="//", fill=False)
        ax.set_xticks(x + 0.27, labels, fontsize=7, rotation=20)
        ax.set_ylabel("seconds per training step (mean rank)")
        ax.set_title(f"end to end: {tr.model.iloc[0]}, seq 1024, 4x1024 tokens/GPU", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Hierarchical vs flat all-to-all, 4 nodes x 8 GPUs (simulated)")
    fig.tight_layout()
    return save_png(fig, png or Path(csv_path).with_suffix(".png"))


def main(argv=None) -> int:
    return main_for(__doc__, collect, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
