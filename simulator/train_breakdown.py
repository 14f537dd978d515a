"""Where a training step's device time goes, simulated and measured, per kernel category (issues 6 and 9).

``python -m simulator.train_breakdown [--profile TXT] [--config CONFIG] [--out MD]`` simulates one step of an
offload-bench configuration's all-in-HBM case (`simulator.validate_offload` builds it the way its
validation does: the reference trainer, the host program, fused AdamW, the torch MoE backend) with a trace,
splits the trace's compute phases into kernel categories (`TrainingIteration.phase_parts`) and puts them
beside a torch.profiler table of one step of the same configuration on the GPU
(``reference.offload.bench --profile``: ``prof.key_averages().table(sort_by=cuda time, row_limit=60)``):
its ``aten::`` rows' self CUDA time per category (`PROFILE_CATEGORY`), backward parts from the autograd rows
where the table has them, and the rest of the step's self CUDA total (operators beyond the table's 60 rows:
fills, the fused AdamW, the loss, the router's small kernels, ...) as ``not in the table``. Default: config
a of run 3bd5bc4 (``results/bench/offload/run_3bd5bc4/profile_a_gpu.txt``) ->
``results/validation/train_breakdown_a.md``.

Categories (simulated phase -> category in ``simulator.workload.training.PHASE_CATEGORY`` and
``TrainingIteration.parts``): expert GEMMs (``torch._grouped_mm``), dense GEMMs (cuBLAS ``mm``: qkv, o,
router, head), attention core (cuDNN SDPA), expert activation (gelu), dispatch (index_select / index_add_ /
index_copy of the torch permute), casts (``copy_``: the activation casts and the fp32 -> bf16 weight copies),
and the memory-bound rest (layer norms, residual adds, muls, sums, the loss, embedding, optimizer).
Nothing here feeds the simulator: it is a diagnostic, and its table is committed beside the validation.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "results" / "bench" / "offload" / "run_3bd5bc4" / "profile_a_gpu.txt"
OUT = ROOT / "results" / "validation" / "train_breakdown_a.md"
CONFIG_A = ("a_compute_bound preset=tiny L4 D1024 F4096 E8 k2 H16 V256 bf16 B48 S2048 max_seq=2048 steps=4 warmup=2 "
            "cache=6 micro_batches=8")
# measured step times of config a, all in HBM (results/bench/offload_train.csv, step_ms)
MEASURED_A = {"4ceddea": 1384.35, "3bd5bc4": 1384.73, "0252961": 1378.86}
# aten operator of a profiler row -> category (operators with kernels of their own; others are "rest")
PROFILE_CATEGORY = {
    "aten::_grouped_mm": "expert_gemm",
    "aten::mm": "dense_gemm", "aten::addmm": "dense_gemm", "aten::bmm": "dense_gemm",
    "aten::_cudnn_attention_forward": "attention_core", "aten::_cudnn_attention_backward": "attention_core",
    "aten::_flash_attention_forward": "attention_core", "aten::_flash_attention_backward": "attention_core",
    "aten::_efficient_attention_forward": "attention_core", "aten::_efficient_attention_backward": "attention_core",
    "aten::gelu": "expert_act", "aten::gelu_backward": "expert_act", "aten::silu": "expert_act",
    "aten::silu_backward": "expert_act",
    "aten::gather": "dispatch", "aten::index_add_": "dispatch", "aten::index_select": "dispatch",
    "aten::index_copy": "copies", "aten::index_copy_": "copies", "aten::cat": "copies", "aten::fill_": "copies",
    "aten::zero_": "copies",
    "aten::copy_": "casts",
    "aten::native_layer_norm": "norm", "aten::native_layer_norm_backward": "norm",
    "aten::mul": "elementwise", "aten::add": "elementwise", "aten::add_": "elementwise", "aten::sum": "elementwise",
    "aten::div": "elementwise",
    "aten::_fused_adamw_": "optimizer", "aten::_foreach_mul_": "optimizer",
}
# backward-only operators: their self CUDA time is backward time
BACKWARD_OPS = {"aten::_cudnn_attention_backward", "aten::_flash_attention_backward",
                "aten::_efficient_attention_backward", "aten::gelu_backward", "aten::silu_backward",
                "aten::native_layer_norm_backward", "aten::index_add_"}
# autograd rows whose CUDA total is the backward of a category (the table's nested totals)
BACKWARD_TOTALS = {"GroupedMmBackward0": "expert_gemm", "MmBackward0": "dense_gemm"}
# the comparison's rows: (label, simulated categories, measured categories)
ROWS = (
    ("expert GEMMs (torch._grouped_mm)", ("expert_gemm",), ("expert_gemm",)),
    ("dense GEMMs (cuBLAS mm: qkv, o, router, head)", ("dense_gemm",), ("dense_gemm",)),
    ("attention core (cuDNN SDPA)", ("attention_core",), ("attention_core",)),
    ("expert activation (gelu fwd / bwd)", ("expert_act",), ("expert_act",)),
    ("permute gathers / scatters (index_select, index_add_)", ("dispatch",), ("dispatch",)),
    ("copies, fills (index_copy, cat, zeros)", ("mem_copy",), ("copies",)),
    ("casts (copy_: activations + fp32 -> bf16 weights)", ("act_cast", "param_cast"), ("casts",)),
    ("layer norms (fwd / bwd)", ("norm",), ("norm",)),
    ("elementwise (mul, add, add_, sum, ...)", ("elementwise", "norm_residual", "gate_elementwise"), ("elementwise",)),
    ("loss, embedding, optimizer, clipping", ("loss", "embedding", "optimizer", "expert_grad_select"), ("optimizer",)),
    ("not in the profile table (60 rows)", (), ("not_in_table",)),
)
MARKER = "<!-- generated above by python -m simulator.train_breakdown; notes below are kept -->"
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(us|ms|s)", text.strip())
    if m is None:
        raise ValueError(f"train_breakdown: not a time: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_profile(text: str) -> dict:
    """A torch.profiler ``key_averages().table()`` -> ``{"rows": [{name, self_cuda_s, cuda_total_s, calls}],
    "self_cuda_total_s": float}``. Columns are found from the header (``Self CUDA``, ``CUDA total``, ``# of
    Calls``); a table without them is refused."""
    lines = text.splitlines()
    head = next((i for i, ln in enumerate(lines) if "Self CUDA" in ln and "Name" in ln), None)
    if head is None:
        raise ValueError("train_breakdown: no profiler table header (Name ... Self CUDA ...) found")
    cols = [c.strip() for c in re.split(r"\s{2,}", lines[head].strip())]
    try:
        i_self, i_tot, i_calls = cols.index("Self CUDA"), cols.index("CUDA total"), cols.index("# of Calls")
    except ValueError:
        raise ValueError(f"train_breakdown: profiler table lacks Self CUDA / CUDA total / # of Calls: {cols}") from None
    rows = []
    for ln in lines[head + 1:]:
        f = [c.strip() for c in re.split(r"\s{2,}", ln.strip())]
        if len(f) != len(cols) or set(ln.strip()) <= {"-", " "}:
            continue
        rows.append({"name": f[0], "self_cuda_s": _seconds(f[i_self]), "cuda_total_s": _seconds(f[i_tot]),
                     "calls": int(f[i_calls])})
    m = re.search(r"Self CUDA time total:\s*([0-9.]+\s*(?:us|ms|s))", text)
    if m is None:
        raise ValueError("train_breakdown: no 'Self CUDA time total' line")
    return {"rows": rows, "self_cuda_total_s": _seconds(m.group(1))}


def measured_categories(prof: dict) -> dict[str, dict[str, float]]:
    """Per category the profile's seconds per step: ``{"total", "bwd"}`` (``bwd`` where the table tells)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"total": 0.0, "bwd": float("nan")})
    listed = 0.0
    for r in prof["rows"]:
        if r["name"].startswith("aten::") and r["self_cuda_s"] > 0:
            listed += r["self_cuda_s"]
            cat = PROFILE_CATEGORY.get(r["name"], "not_in_table")
            out[cat]["total"] += r["self_cuda_s"]
            if r["name"] in BACKWARD_OPS:
                b = out[cat]["bwd"]
                out[cat]["bwd"] = r["self_cuda_s"] + (0.0 if math.isnan(b) else b)
    for r in prof["rows"]:
        if r["name"] in BACKWARD_TOTALS:
            out[BACKWARD_TOTALS[r["name"]]]["bwd"] = r["cuda_total_s"]
    out["not_in_table"]["total"] += prof["self_cuda_total_s"] - listed
    return dict(out)


def simulate_breakdown(config: str = CONFIG_A, placement: str = "gpu", depth: int = 0) -> dict:
    """The simulated step of an offload-bench config (as `simulator.validate_offload` builds it, fused AdamW,
    grouped torch experts) with its compute time per category ``{"total", "bwd"}`` per step, and the summary."""
    from simulator import validate_offload as V
    from simulator.engine import Sim
    from simulator.train_host import train_program
    from simulator.workload.training import TrainingIteration

    cfg = V.parse_config(config)
    run = V.build_run(cfg, placement, depth)
    prog = train_program(run.model, "fused", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = Sim(run.cluster, seed=run.workload.seed, trace=True)
        it = TrainingIteration(run, sim, impl="reference", measured_steps=max(cfg.steps, 1), expert_kernels="torch",
                               host_program=prog, ref_optimizer="fused", expert_impl="grouped")
        summary = it.run()
    parts = it.phase_parts()
    t_step0 = float(it.t0.max())  # the reported (last) step starts here
    cats: dict[str, dict[str, float]] = defaultdict(lambda: {"total": 0.0, "bwd": 0.0})
    idle = 0.0
    for rank, layer, mb, phase, st, en, nb, fl, res in sim.rows:
        if rank != 0 or st < t_step0:
            continue
        if phase == "host_wait":
            idle += en - st
            continue
        if res != "compute":
            continue
        for cat, frac in parts.get(phase, {"unclassified": 1.0}).items():
            cats[cat]["total"] += frac * (en - st)
            if phase.endswith("_bwd") or phase in ("grad_cast", "expert_grad_select"):
                cats[cat]["bwd"] += frac * (en - st)
    return {"categories": dict(cats), "summary": summary, "host_wait_s": idle, "program": prog.source if prog else ""}


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.1f}"


def markdown(sim: dict, meas: dict, prof_total: float, title: str, measured_steps: dict | None = None) -> str:
    """The comparison table (ms per step; + = the simulation is slower)."""
    lines = [f"# {title}", "",
             ("ms per step (8 micro-batches); simulated = the categories of the simulated step's compute phases; "
              "measured = the torch.profiler table's self CUDA time of one step; bwd = the backward part where "
              "known. Generated by `python -m simulator.train_breakdown`."), "",
             "| category | simulated | sim bwd | measured | meas bwd | sim - meas |", "|---|---:|---:|---:|---:|---:|"]
    sc, tot_s = sim["categories"], 0.0
    for label, s_cats, m_cats in ROWS:
        s = sum(sc.get(c, {}).get("total", 0.0) for c in s_cats) if s_cats else float("nan")
        sb = sum(sc.get(c, {}).get("bwd", 0.0) for c in s_cats) if s_cats else float("nan")
        mt = sum(meas.get(c, {}).get("total", 0.0) for c in m_cats) if m_cats else float("nan")
        mb = sum(meas.get(c, {}).get("bwd", float("nan")) for c in m_cats) if m_cats else float("nan")
        d = s - mt  # nan where either side has no such category
        lines.append(f"| {label} | {_ms(s)} | {_ms(sb)} | {_ms(mt)} | {_ms(mb)} | {_ms(d)} |")
        tot_s += 0.0 if math.isnan(s) else s
    known = {c for _, s_cats, _ in ROWS for c in s_cats}
    other = sum(v["total"] for c, v in sc.items() if c not in known)
    if other:
        lines.append(f"| other simulated phases | {_ms(other)} | | | | |")
        tot_s += other
    summ = sim["summary"]
    lines += [f"| **device total** | **{_ms(tot_s)}** | | **{_ms(prof_total)}** | | **{_ms(tot_s - prof_total)}** |",
              f"| host waits (GPU idle after syncs) | {_ms(sim['host_wait_s'])} | | | | |",
              f"| **step** | **{_ms(summ['step_time_s'])}** | | "
              + (" / ".join(f"{v:.0f} ({k})" for k, v in measured_steps.items()) if measured_steps else "-")
              + " | | |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", type=Path, default=PROFILE)
    ap.add_argument("--config", default=CONFIG_A)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--print", action="store_true", help="print the table, write nothing")
    a = ap.parse_args(argv)
    if not a.profile.is_file():
        ap.error(f"profile table not found: {a.profile}")
    prof = parse_profile(a.profile.read_text())
    meas = measured_categories(prof)
    sim = simulate_breakdown(a.config)
    text = markdown(sim, meas, prof["self_cuda_total_s"], f"Training step breakdown: {a.config.split()[0]}, all in HBM",
                    MEASURED_A if a.config == CONFIG_A else None)
    if a.print:
        print(text)
        return 0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # hand-written findings below the marker are kept when the table is regenerated
    old = a.out.read_text() if a.out.is_file() else ""
    keep = old[old.index(MARKER):] if MARKER in old else MARKER + "\n"
    a.out.write_text(text + "\n" + keep)
    print(text)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
