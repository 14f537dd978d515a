"""``semoe simulate``: the what-if command. `register(app)` adds it to the lead's typer app."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from semoe import SpecError

_YAML = (".yaml", ".yml")


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
              micro_batches: Optional[int] = None, seed: Optional[int] = None):
    from semoe import Run, Workload, load_model

    m = load_model(model)
    c = load_cluster(cluster, nodes)
    p = load_plan(plan, c.world_size, m.experts)
    w = Workload.from_yaml(workload) if workload else Workload(seq_len=min(1024, m.max_seq))
    changes = {k: v for k, v in dict(micro_batch=micro_batch, seq_len=seq_len, micro_batches=micro_batches, seed=seed).items() if v is not None}
    if skew is not None:
        if skew < 0:
            raise SpecError(f"skew: skew ({skew}) must be >= 0")
        changes.update(routing="zipf" if skew > 0 else "uniform", routing_skew=skew, expert_histogram=None)
    if changes:
        w = w.replace(**changes)
    return Run(name=f"{m.name}-{c.name}x{c.nodes}-{p.name}", model=m, cluster=c, plan=p, workload=w)


def simulate_cmd(
    model: str = typer.Option(..., "--model", help="model preset name or ModelSpec YAML file"),
    cluster: str = typer.Option(..., "--cluster", help="cluster preset name or ClusterSpec YAML file"),
    plan: str = typer.Option(..., "--plan", help="plan preset name or ParallelPlan YAML file"),
    out: Path = typer.Option(..., "--out", help="output folder"),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="number of nodes (overrides the cluster's)"),
    skew: Optional[float] = typer.Option(None, "--skew", help="Zipf exponent of expert popularity (0: uniform)"),
    backend: str = typer.Option("analytic", "--backend", help="network backend: analytic or flow"),
    workload: Optional[str] = typer.Option(None, "--workload", help="Workload YAML file"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len"),
    micro_batches: Optional[int] = typer.Option(None, "--micro-batches"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="kernel profile CSV (results/profiles/<gpu>.csv)"),
) -> None:
    """Simulate one training iteration; print a table and write DIR/summary.csv, breakdown.csv,
    trace.json and PNGs."""
    from simulator.api import simulate
    from simulator.cost import Profile
    from simulator.network import BACKENDS
    from simulator.report import write_outputs

    if backend not in BACKENDS:
        raise typer.BadParameter(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}", param_hint="--backend")
    if nodes is not None and nodes < 1:
        raise typer.BadParameter(f"nodes: nodes ({nodes}) must be >= 1", param_hint="--nodes")
    run = build_run(model, cluster, plan, nodes, skew, workload, micro_batch, seq_len, micro_batches, seed)
    prof = Profile.from_csv(profile) if profile else None
    sim, summary = simulate(run, backend=backend, profile=prof)
    write_outputs(out, run, sim, summary, backend)
    _print(run, summary, out)


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


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_cmd)
