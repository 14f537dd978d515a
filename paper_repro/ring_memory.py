"""Ring-memory inference (SEMOE.md inference mechanism 1; experiment "a 32-expert MoE on A100-40G,
with and without overlapped offload"), simulated: memory saved and slowdown.

Models (the paper gives only "32 experts"; our choices, both top-1, bf16, vocab 50304, FFN 4h):
``paper-52.6b`` (the training family with 32 experts: 12 layers, hidden 4096; 52.6B parameters,
8.6 GB of bf16 experts per layer, 103 GB in all) and ``gpt-moe-32e-h2048`` (24 layers, hidden 2048,
32 heads; 26.3B parameters, 2.1 GB of experts per layer, 51.5 GB in all). Neither fits 40 GB resident.

Variants (``variant`` column) on one A100-40G of the DGX-A100-40G preset (PCIe 25.6 GB/s):

* ``resident (hypothetical)``: every expert on the GPU with an unlimited memory budget: the speed of
  light the ring is compared with (its peak HBM exceeds 40 GB, reported in ``oom``);
* ``ring, overlap``: K slots from the 40 GB budget (the engine's plan), copies of block i+K overlap
  the compute of block i ("compute, release, load");
* ``ring K=2``: the smallest ring that overlaps;
* ``ring K=1, no overlap``: one slot, every copy waits for the previous block's compute.

``slowdown`` = time / resident time (prefill and per decode step); ``hbm_saved_GB`` = resident peak -
variant peak. Prompt 512, batch 1 / 8 / 32, 8 generated tokens. What-if: PCIe Gen5 (52 GB/s H2D, as
measured on the H100 machine) with the same A100 compute.

    python -m paper_repro.ring_memory [--quick] [--out results/paper]
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from paper_repro.common import (
    DEFAULT_OUT,
    a100_single,
    cost_model_name,
    main_for,
    meta,
    pyplot,
    read_csv,
    save_png,
    write_csv,
)

BATCHES = (1, 8, 32)
QUICK_BATCHES = (1, 8)
PROMPT, GEN = 512, 8
VARIANTS = (("resident (hypothetical)", "resident", None), ("ring, overlap", "ring", None),
            ("ring K=2", "ring", 2), ("ring K=1, no overlap", "ring", 1))

COLUMNS = ["whatif", "model", "params_B", "experts", "layers", "cluster", "pcie_GBps", "variant", "mode", "ring_slots",
           "batch", "prompt_len", "gen_len", "prefill_s", "decode_step_s", "prefill_slowdown", "decode_slowdown",
           "peak_hbm_GB", "hbm_saved_GB", "host_dram_GB", "compute_busy_s", "copy_busy_s", "oom", "cost_model",
           "sim_wall_s"]


def models():
    from semoe.presets import _paper_gpt_moe, model_preset

    return [model_preset("paper-52.6b"),
            _paper_gpt_moe(32, "gpt-moe-32e-h2048").replace(hidden=2048, ffn=8192, heads=32, layers=24)]


def one(model, cluster, variant: str, mode: str, slots, batch: int) -> dict:
    from semoe.sizing import count_params
    from simulator.workload.inference import InferConfig, simulate_inference

    budget = 1e13 if mode == "resident" else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, res = simulate_inference(model, cluster, InferConfig(mode=mode, batch=batch, prompt_len=PROMPT, gen_len=GEN,
                                                                slots=slots, gpu_budget_bytes=budget), trace=False)
    s = res.summary()
    return {"model": model.name, "params_B": count_params(model).total / 1e9, "experts": model.experts,
            "layers": model.layers, "cluster": cluster.name, "pcie_GBps": cluster.pcie.bandwidth_GBps,
            "variant": variant, "mode": mode, "ring_slots": s["ring_slots"], "batch": batch, "prompt_len": PROMPT,
            "gen_len": GEN, "prefill_s": s["prefill_s"], "decode_step_s": s["decode_s"] / max(1, GEN - 1),
            "peak_hbm_GB": s["peak_hbm_bytes"] / 1e9, "host_dram_GB": s["peak_dram_bytes"] / 1e9,
            "compute_busy_s": s["compute_busy_s"], "copy_busy_s": s["copy_busy_s"], "oom": s["oom"],
            "cost_model": cost_model_name(cluster.gpu), "sim_wall_s": time.perf_counter() - t0}


def collect(out: Path = DEFAULT_OUT, quick: bool = False) -> Path:
    from semoe.cluster_spec import LinkSpec

    md = meta()
    base = a100_single(40)
    clusters = [("", base)]
    if not quick:
        clusters.append(("pcie-gen5", base.replace(pcie=LinkSpec(bandwidth_GBps=52.0, latency_s=5e-6))))
    rows = []
    for whatif, c in clusters:
        for m in (models()[:1] if quick else models()):
            for b in (QUICK_BATCHES if quick else BATCHES):
                group = [{**one(m, c, v, mode, k, b), "whatif": whatif} for v, mode, k in VARIANTS]
                ref = group[0]
                for r in group:
                    r["prefill_slowdown"] = r["prefill_s"] / ref["prefill_s"]
                    r["decode_slowdown"] = r["decode_step_s"] / ref["decode_step_s"]
                    r["hbm_saved_GB"] = ref["peak_hbm_GB"] - r["peak_hbm_GB"]
                rows += group
    rows = [{**r, **md} for r in rows]
    return write_csv(Path(out) / "ring_memory.csv", rows, COLUMNS)


def plot(csv_path: Path, png: Path | None = None) -> Path:
    import numpy as np

    plt = pyplot()
    df = read_csv(csv_path)
    base = df[df.whatif == ""]
    variants = [v for v, _, _ in VARIANTS]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    groups = list(dict.fromkeys(zip(base.model, base.batch)))
    x = np.arange(len(groups))
    w = 0.8 / len(variants)
    for k, v in enumerate(variants):
        sub = base[base.variant == v].set_index(["model", "batch"]).reindex(groups)
        axes[0].bar(x + k * w, sub.peak_hbm_GB, w, label=v)
        axes[1].bar(x + k * w, sub.prefill_slowdown, w, label=v)
        axes[2].bar(x + k * w, sub.decode_slowdown, w, label=v)
    labels = [f"{m}\nbatch {int(b)}" for m, b in groups]
    for ax, t in zip(axes, ("peak HBM (GB); red line: 40 GB", "prefill time / resident", "decode step time / resident")):
        ax.set_xticks(x + w * (len(variants) - 1) / 2, labels, fontsize=6)
        ax.set_title(t, fontsize=9)
        ax.legend(fontsize=6)
    axes[0].axhline(40, color="r", ls="--", lw=0.8)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle("Ring-memory inference, 32-expert MoE on one A100-40G (simulated; PCIe 25.6 GB/s; roofline kernels)")
    fig.tight_layout()
    return save_png(fig, png or Path(csv_path).with_suffix(".png"))


def main(argv=None) -> int:
    return main_for(__doc__, collect, plot, argv)


if __name__ == "__main__":
    sys.exit(main())
