"""Run every paper_repro module and write ``DIR/report.md`` (``semoe repro [--quick] --out DIR``).

For each module: ``collect(DIR, quick)`` (simulate, write the tidy CSV), ``plot(csv)`` (PNG from the
CSV only), a short table in the report, and the figure's mark: **calibrated** (kernel times from a
measured profile and a mechanism validated against GPU runs), **extrapolated** (modelled mechanism,
hardware nothing was measured on: the paper's A100 clusters use the roofline and HARDWARE.md link
speeds), **not measurable** (the simulator does not model it; no number invented). ``paper_vs_sim``
runs last and puts every paper number of SEMOE.md beside the simulated one.

    python -m paper_repro.repro [--quick] [--out results/paper]
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from paper_repro.common import DEFAULT_OUT, git_commit, meta, read_csv


@dataclass(frozen=True)
class Module:
    name: str  # paper_repro.<name>; writes <name>.csv / .png
    title: str
    mark: str
    what: str


MODULES = (
    Module("training_throughput", "Training throughput and per-GPU memory, SE-MoE vs DeepSpeed (8-128 A100-80G)",
           "extrapolated",
           "Paper GPT-MoE family, one expert per GPU; seq 1024/2048 x top-1/top-2 x tokens per GPU. Plans: "
           "`deepspeed` preset, `semoe-offload` (the `semoe` preset: experts on CPU/SSD, CPU Adam), `semoe-gpu` "
           "(SE-MoE mechanisms with experts on the GPU), `semoe` (= semoe-gpu when it fits HBM). A100 kernel "
           "times are roofline (no A100 profile); the H100 what-if uses the measured H100 profile."),
    Module("alltoall_hierarchical", "Hierarchical (rail, hetu) vs flat all-to-all, 4 nodes x 8 A100",
           "extrapolated",
           "80.3B GPT-MoE (hidden 3584, 24 layers, 32 experts; our config for the paper's 80.7B). Collective alone "
           "(analytic and flow backends) and end to end; what-ifs: NICs per node, spine oversubscription, H100."),
    Module("inference_throughput", "Inference throughput, SE-MoE vs DeepSpeed (10B / 106.5B / 209.6B)",
           "extrapolated (1 GPU); not measurable (8 and 16 GPUs)",
           "The simulator's inference workload runs one GPU; multi-GPU inference rows are marked not measurable. "
           "What-ifs: the 104B/207B models on one A100-80G with ring memory / expert-aware offload."),
    Module("ring_memory", "Ring-memory inference, 32-expert MoE on A100-40G",
           "extrapolated (ring mechanism validated on H100 within 3%, simulator/README.md)",
           "Memory saved and slowdown vs a hypothetical resident GPU, with (K from the budget, K=2) and without "
           "(K=1) overlapped copies."),
    Module("embedding_partition", "Embedding partition over data parallelism", "extrapolated",
           "Existing module (see its docstring): vocab x hidden x experts sweep, tied/untied, dp and dp_offload."),
    Module("elastic", "Elastic multi-task training (UFO, 48 A100-80G)", "extrapolated",
           "Existing module: naive equal split vs the planner vs downscaled, 24 tasks."),
)
SUMMARY = Module("paper_vs_sim", "Paper numbers vs simulation", "per row (basis column)",
                 "Every number SEMOE.md gives beside the simulated value or `not modelled`.")


def md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            return f"{v:.4g}"
        return str(v).replace("|", "/").replace("\n", " ")

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _summary(name: str, csv: Path) -> str:
    df = read_csv(csv)
    if name == "training_throughput":
        from paper_repro.training_throughput import speedups

        sp = speedups(df)
        parts = []
        for plan in ("semoe", "semoe-offload"):
            j = sp[plan].copy()
            j["throughput_vs_deepspeed_%"] = 100 * (j.speedup - 1)
            j["peak_hbm_vs_deepspeed_%"] = 100 * (j.hbm_ratio - 1)
            j["deepspeed_tokens_per_s"] = j.tokens_per_s
            parts.append(f"**{plan} vs deepspeed**\n\n" + md_table(j.to_dict("records"), [
                "whatif", "gpus", "seq_len", "top_k", "micro_batch", "micro_batches", "deepspeed_tokens_per_s",
                "throughput_vs_deepspeed_%", "peak_hbm_GB", "peak_hbm_vs_deepspeed_%", "oom"]))
        ab = df[df.experiment == "ablation"].copy()
        if len(ab):
            base = ab[ab.plan == "deepspeed"].set_index(["micro_batch", "micro_batches"]).tokens_per_s
            ab["vs_deepspeed_%"] = [100 * (t / base.loc[(a, b)] - 1) for t, a, b in
                                    zip(ab.tokens_per_s, ab.micro_batch, ab.micro_batches)]
            parts.append("**ablation: one SE-MoE mechanism at a time** (seq 1024, top-1)\n\n" + md_table(
                ab.to_dict("records"), ["gpus", "micro_batch", "micro_batches", "plan", "step_time_s", "tokens_per_s",
                                        "vs_deepspeed_%", "comm_s", "compute_s", "optimizer_s"]))
        return "\n\n".join(parts)
    if name == "alltoall_hierarchical":
        col = df[(df.part == "collective") & (df.backend == "analytic")]
        big = col[col.bytes_per_rank == col.bytes_per_rank.max()]
        piv = big.pivot_table(index="whatif", columns="algo", values="a2a_time_s").reset_index()
        piv["whatif"] = piv.whatif.replace("", "baseline")
        t1 = md_table(piv.to_dict("records"), ["whatif"] + [a for a in ("flat", "hetu", "rail") if a in piv])
        tr = df[df.part == "training"].copy()
        tr["whatif"] = tr.whatif.replace("", "baseline")
        t2 = md_table(tr.to_dict("records"), ["whatif", "top_k", "algo", "step_time_s", "tokens_per_s", "a2a_s",
                                              "comm_s", "compute_s"])
        mb = int(big.bytes_per_rank.max() // 2**20) if len(big) else 0
        return f"all-to-all time (s), {mb} MiB per rank, analytic backend\n\n{t1}\n\nend to end (training step)\n\n{t2}"
    if name == "inference_throughput":
        return md_table(df.to_dict("records"), ["part", "paper_model_B", "model", "gpus", "cluster", "system", "mode",
                                                "batch", "status", "tokens_per_s", "decode_tokens_per_s", "peak_hbm_GB",
                                                "oom"])
    if name == "ring_memory":
        return md_table(df.to_dict("records"), ["whatif", "model", "variant", "ring_slots", "batch", "prefill_s",
                                                "decode_step_s", "prefill_slowdown", "decode_slowdown", "peak_hbm_GB",
                                                "hbm_saved_GB"])
    if name == "embedding_partition":
        cols = ["vocab", "hidden", "experts", "tied", "plan", "embedding_partition", "tokens_per_s", "peak_hbm_GB",
                "embedding_states_GB", "oom"]
        return md_table(df.to_dict("records")[:48], cols) + ("\n\n(first 48 rows)" if len(df) > 48 else "")
    if name == "elastic":
        return md_table(df.to_dict("records"), ["allocation", "micro_batch_cap", "devices", "samples_per_s",
                                                "peak_hbm_bytes", "imbalance", "oom"])
    if name == "paper_vs_sim":
        return md_table(df.to_dict("records"), ["claim", "paper_value", "paper_unit", "sim_value", "sim_unit", "basis",
                                                "sim_detail"])
    return ""


def run_all(out: Path = DEFAULT_OUT, quick: bool = False, log=print) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    done: list[tuple[Module, Path, Path, float]] = []
    for mod in MODULES + (SUMMARY,):
        t0 = time.perf_counter()
        m = importlib.import_module(f"paper_repro.{mod.name}")
        csv = Path(m.collect(out, quick=quick))
        png = Path(m.plot(csv))
        dt = time.perf_counter() - t0
        done.append((mod, csv, png, dt))
        log(f"{mod.name}: {dt:.1f} s -> {csv.name}, {png.name}")
    total = time.perf_counter() - t_all
    md = meta()
    lines = [f"# SE-MoE paper reproduction ({'quick' if quick else 'full'} run, simulated)", "",
             (f"{md['date']}, commit {git_commit()}, {md['device']}, python {md['python']}, simpy {md['simpy']}; "
              f"total {total:.1f} s. Regenerate: `semoe repro{' --quick' if quick else ''} --out {out}`."), "",
             ("Paper numbers are for comparison only; nothing is fitted to them. Marks: **calibrated** (measured "
              "profile, mechanism validated on GPU runs), **extrapolated** (mechanism modelled, hardware not "
              "measured: A100 roofline, HARDWARE.md link speeds), **not measurable** (not modelled, no number)."), ""]
    lines += ["| figure | module | mark | runtime (s) | CSV | PNG |", "|---|---|---|---|---|---|"]
    for mod, csv, png, dt in done:
        lines.append(f"| {mod.title} | `paper_repro.{mod.name}` | {mod.mark} | {dt:.1f} | [{csv.name}]({csv.name}) | "
                     f"[{png.name}]({png.name}) |")
    order = [done[-1]] + done[:-1]  # summary table first
    for mod, csv, png, dt in order:
        lines += ["", f"## {mod.title}", "", f"Mark: **{mod.mark}**. {mod.what}", "", f"![{mod.name}]({png.name})", "",
                  _summary(mod.name, csv)]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    log(f"report: {report} ({total:.1f} s)")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run of every module")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    try:
        run_all(args.out, args.quick)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
