"""``semoe simulate``: the what-if command. `register(app)` adds it to the lead's typer app."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from semoe import SpecError

_YAML = (".yaml", ".yml")
ROUTINGS = ("uniform", "zipf", "lognormal")


def _is_file(s: str) -> bool:
    return s.endswith(_YAML)


def load_cluster(name_or_file: str, nodes: Optional[int]):
    from semoe import CLUSTER_PRESETS, ClusterSpec, cluster_preset

    if _is_file(name_or_file):
        c = ClusterSpec.from_yaml(name_or_file)
        return c.replace(nodes=nodes) if nodes is not None else c
    if name_or_file not in CLUSTER_PRESETS:
        raise SpecError(f"cluster: unknown cluster {name_or_file!r}: not a preset ({', '.join(sorted(CLUSTER_PRESETS))}) nor a .yaml file")
    return cluster_preset(name_or_file, nodes if nodes is not None else 1)


def load_plan(name_or_file: str, world: int, experts: int):
    from semoe import PLAN_PRESETS, ParallelPlan, plan_preset

    if _is_file(name_or_file):
        return ParallelPlan.from_yaml(name_or_file)
    if name_or_file not in PLAN_PRESETS:
        raise SpecError(f"plan: unknown plan {name_or_file!r}: not a preset ({', '.join(sorted(PLAN_PRESETS))}) nor a .yaml file")
    # presets: data parallel over every GPU, experts spread over as many GPUs as divide both
    return plan_preset(name_or_file, world, math.gcd(world, experts))


def build_run(model: str, cluster: str, plan: str, nodes: Optional[int] = None, skew: Optional[float] = None,
              workload: Optional[str] = None, micro_batch: Optional[int] = None, seq_len: Optional[int] = None,
              micro_batches: Optional[int] = None, seed: Optional[int] = None, routing: Optional[str] = None):
    from semoe import Run, Workload, load_model

    m = load_model(model)
    c = load_cluster(cluster, nodes)
    p = load_plan(plan, c.world_size, m.experts)
    w = Workload.from_yaml(workload) if workload else Workload(seq_len=min(1024, m.max_seq))
    changes = {k: v for k, v in dict(micro_batch=micro_batch, seq_len=seq_len, micro_batches=micro_batches, seed=seed).items() if v is not None}
    if routing is not None and routing not in ROUTINGS:
        raise SpecError(f"routing: {routing!r} is not one of {', '.join(ROUTINGS)}")
    if skew is not None:
        if skew < 0:
            raise SpecError(f"skew: skew ({skew}) must be >= 0")
        kind = routing or "zipf"
        changes.update(routing=kind if skew > 0 else "uniform", routing_skew=skew, expert_histogram=None)
    elif routing is not None:
        changes.update(routing=routing, expert_histogram=None)
    if changes:
        w = w.replace(**changes)
    return Run(name=f"{m.name}-{c.name}x{c.nodes}-{p.name}", model=m, cluster=c, plan=p, workload=w)


def simulate_cmd(
    model: str = typer.Option(..., "--model", help="model preset name or ModelSpec YAML file"),
    cluster: str = typer.Option(..., "--cluster", help="cluster preset name or ClusterSpec YAML file"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    plan: Optional[str] = typer.Option(None, "--plan", help="plan preset name or ParallelPlan YAML file (training)"),
    kind: str = typer.Option("train", "--kind", help="train (one iteration) or infer (prefill + decode on one GPU)"),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="number of nodes (overrides the cluster's)"),
    skew: Optional[float] = typer.Option(None, "--skew", help="skew of expert popularity: Zipf exponent or log-normal sigma (0: uniform)"),
    routing: Optional[str] = typer.Option(None, "--routing", help="uniform, zipf (default with --skew) or lognormal"),
    infer_mode: str = typer.Option("ring", "--infer-mode", help="inference: ring, expert or resident"),
    batch: int = typer.Option(1, "--batch", help="inference: sequences per batch"),
    prompt_len: int = typer.Option(256, "--prompt-len", help="inference: prompt tokens"),
    gen_len: int = typer.Option(8, "--gen-len", help="inference: generated tokens (the first from the prefill)"),
    gpu_budget_gb: Optional[float] = typer.Option(None, "--gpu-budget-gb", help="inference: GPU memory budget (default: the GPU's)"),
    slots: Optional[int] = typer.Option(None, "--slots", help="inference: ring slots K (default: from the budget)"),
    predict: bool = typer.Option(False, "--predict", help="inference, expert mode: prefetch one block ahead"),
    quant: Optional[str] = typer.Option(None, "--quant", help="inference: expert weights none, int8 or fp8"),
    backend: str = typer.Option("analytic", "--backend", help="network backend: analytic or flow"),
    workload: Optional[str] = typer.Option(None, "--workload", help="Workload YAML file"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    micro_batches: Optional[int] = typer.Option(None, "--micro-batches"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="kernel profile CSV (results/profiles/<gpu>.csv)"),
) -> None:
    """Simulate one training iteration (``--kind train``) or offloaded inference on one GPU (``--kind
    infer``); print a table and write DIR/summary.csv, breakdown.csv, trace.json and PNGs."""
    from simulator.api import simulate
    from simulator.cost import Profile
    from simulator.network import BACKENDS
    from simulator.report import write_outputs

    if kind not in ("train", "infer"):
        raise typer.BadParameter(f"kind: {kind!r} is not one of train, infer", param_hint="--kind")
    if backend not in BACKENDS:
        raise typer.BadParameter(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}", param_hint="--backend")
    if nodes is not None and nodes < 1:
        raise typer.BadParameter(f"nodes: nodes ({nodes}) must be >= 1", param_hint="--nodes")
    if kind == "infer":
        _simulate_infer(model, cluster, out, infer_mode, batch, prompt_len, gen_len, gpu_budget_gb, slots, predict,
                        skew, routing, seed, profile, quant)
        return
    if plan is None:
        raise typer.BadParameter("plan: --plan is required for --kind train", param_hint="--plan")
    run = build_run(model, cluster, plan, nodes, skew, workload, micro_batch, seq_len, micro_batches, seed, routing)
    prof = Profile.from_csv(profile) if profile else "auto"
    sim, summary = simulate(run, backend=backend, profile=prof)
    write_outputs(out, run, sim, summary, backend)
    _print(run, summary, out)


def _simulate_infer(model, cluster, out, mode, batch, prompt_len, gen_len, gpu_budget_gb, slots, predict, skew,
                    routing, seed, profile, quant=None) -> None:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from semoe import Workload, load_model
    from semoe.io import atomic_write_text
    from semoe.trace import write_chrome_trace, write_csv
    from simulator.cost import Profile
    from simulator.report import breakdown_frame, plot_breakdown, plot_memory, trace_rows
    from simulator.workload.inference import InferConfig, simulate_inference

    m = load_model(model)
    c = load_cluster(cluster, 1)
    if c.world_size != 1:
        raise SpecError(f"cluster: inference is simulated on one GPU; {c.name} has {c.world_size} (use a single-GPU preset)")
    if routing is not None and routing not in ROUTINGS:
        raise SpecError(f"routing: {routing!r} is not one of {', '.join(ROUTINGS)}")
    if skew is not None and skew < 0:
        raise SpecError(f"skew: skew ({skew}) must be >= 0")
    r = (routing or "zipf") if skew else (routing or "uniform")
    w = Workload(kind="infer", micro_batch=batch, seq_len=prompt_len, gen_len=gen_len, routing=r,
                 routing_skew=skew or 0.0, seed=seed or 0)
    cfg = InferConfig(mode=mode, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
                      gpu_budget_bytes=gpu_budget_gb * 1e9 if gpu_budget_gb else None, slots=slots, predict=predict,
                      quant=None if quant in (None, "none") else quant)
    prof = Profile.from_csv(profile, impl=("torch", "triton")) if profile else "auto"
    sim, res = simulate_inference(m, c, cfg, w, profile=prof)
    s = res.summary()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    row = dict(s, model=m.name, cluster=c.name, mode=mode, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
               routing=r, skew=skew or 0.0, predict=predict, gpu_budget_bytes=res.plan.budget_bytes,
               quant=quant or "none")
    atomic_write_text(out / "summary.csv", pd.DataFrame([row]).to_csv(index=False))
    total = s["step_time_s"]
    import numpy as np

    bd = {"compute": np.array([res.compute_busy_s]), "copy": np.array([res.copy_busy_s]),
          "idle": np.array([max(0.0, total - res.compute_busy_s)])}
    bdf = breakdown_frame({"breakdown": bd})
    atomic_write_text(out / "breakdown.csv", bdf.to_csv(index=False))
    rows = trace_rows(sim)
    write_chrome_trace(rows, out / "trace.json")
    write_csv(rows, out / "trace.csv")
    plot_breakdown(bdf, out / "breakdown.png")
    plot_memory(sim, out / "memory.png")
    t = Table(title=f"{m.name} on {c.name}: {mode} inference, batch {batch}, prompt {prompt_len}, gen {gen_len}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("prefill tokens/s", f"{s['prefill_tokens_per_s']:,.1f}")
    t.add_row("decode tokens/s", f"{s['decode_tokens_per_s']:,.2f}")
    t.add_row("ring slots K / pool slots C", f"{s['ring_slots']} / {s['pool_slots']}")
    t.add_row("decode GB copied / step", f"{s['decode_bytes_copied_per_step'] / 1e9:.2f}")
    t.add_row("expert cache hit rate", f"{s['hit_rate']:.2f}")
    t.add_row("peak HBM", f"{s['peak_hbm_bytes'] / 1e9:.2f} GB")
    if s["oom"]:
        t.add_row("OUT OF MEMORY", s["oom"])
    Console().print(t)
    Console().print(f"wrote {out}/summary.csv, breakdown.csv, trace.json, trace.csv, breakdown.png, memory.png")


def _print(run, s: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{run.name} ({run.cluster.world_size} GPUs)")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("step time", f"{s['step_time_s'] * 1e3:.2f} ms")
    t.add_row("tokens/s", f"{s['tokens_per_s']:,.0f}")
    t.add_row("MFU", f"{100 * s['mfu']:.1f} %")
    for k, v in s["breakdown"].items():
        t.add_row(f"{k} (mean rank)", f"{float(v.mean()) * 1e3:.2f} ms")
    t.add_row("peak HBM / rank", f"{s['peak_hbm_bytes'] / 1e9:.2f} GB")
    t.add_row("peak DRAM / node", f"{s['peak_dram_bytes'] / 1e9:.2f} GB")
    t.add_row("peak SSD / node", f"{s['peak_ssd_bytes'] / 1e9:.2f} GB")
    if s["oom"]:
        t.add_row("OUT OF MEMORY", s["oom"])
    Console().print(t)
    Console().print(f"wrote {out}/summary.csv, breakdown.csv, trace.json, trace.csv, breakdown.png, memory.png")


def plan_inference_cmd(
    model: str = typer.Option(..., "--model", help="model preset name or ModelSpec YAML file"),
    gpus: int = typer.Option(..., "--gpus", help="number of GPUs"),
    gpu_mem_gb: float = typer.Option(..., "--gpu-mem-gb", help="GPU memory per GPU (GB) the plan may use"),
    batch: int = typer.Option(1, "--batch", help="sequences served together"),
    prompt_len: int = typer.Option(256, "--prompt-len", help="prompt tokens"),
    gen_len: int = typer.Option(32, "--gen-len", help="generated tokens (the first from the prefill)"),
    quant: Optional[str] = typer.Option(None, "--quant", help="expert weights: none, int8 or fp8 (default: compare all three)"),
    objective: str = typer.Option("decode", "--objective", help="recommend by decode or prefill tokens/s"),
    dequant: str = typer.Option("workspace", "--dequant", help="quantised experts: workspace (the reference's "
                                "dequant pass) or fused (scale in the GEMM epilogue, fp8 GEMM rate)"),
    cluster: str = typer.Option("h100-single", "--cluster", help="single-GPU preset of the offload candidates (GPU, PCIe)"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write the candidates to this .csv or .json file"),
) -> None:
    """Compare resident expert parallelism, ring memory and expert-aware offload (bf16 / int8 / fp8
    experts) with the simulator and recommend a plan."""
    from semoe import load_model
    from simulator.plan_inference import PlanRequest, plan, print_table, write_out

    if out is not None and Path(out).suffix not in (".csv", ".json"):
        raise SpecError(f"out: {out} must end in .csv or .json")
    req = PlanRequest(load_model(model), gpus, gpu_mem_gb, batch, prompt_len, gen_len,
                      quants=(quant,) if quant is not None else ("none", "int8", "fp8"), objective=objective,
                      dequant=dequant, cluster=cluster)
    cands, best = plan(req)
    print_table(req, cands, best)
    if out is not None:
        write_out(out, req, cands, best)
        typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_cmd)
    app.command("plan-inference")(plan_inference_cmd)
