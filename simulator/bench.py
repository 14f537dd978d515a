"""Speed benchmark of the simulator: wall time of one simulated `paper-104b` iteration.

Targets (issue 4): 64 GPUs <= 1 s and 1024 GPUs <= 30 s on one core with the analytic backend; the
flow backend is reported too (64 GPUs only by default: it is far slower). ``ok`` compares the CPU time
of the (single-threaded) process with the target, so that other users of a shared machine do not
count; ``wall_s`` is reported beside it. Appends rows to
``results/bench/simulator.csv`` with date, commit, machine.

    python -m simulator.bench [--out results/bench/simulator.csv] [--flow-gpus 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import time
from pathlib import Path

TARGETS = {("analytic", 64): 1.0, ("analytic", 1024): 30.0}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "simulator"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_one(gpus: int, plan: str, backend: str, trace: bool = True) -> dict:
    import math

    from semoe import Run, Workload, cluster_preset, model_preset, plan_preset
    from simulator.api import simulate

    m = model_preset("paper-104b")
    c = cluster_preset("dgx-a100-80g", gpus // 8)
    run = Run(model=m, cluster=c, plan=plan_preset(plan, gpus, math.gcd(gpus, m.experts)),
              workload=Workload(micro_batch=1, seq_len=1024))
    t0, c0 = time.perf_counter(), time.process_time()
    sim, s = simulate(run, backend=backend, trace=trace)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    limit = TARGETS.get((backend, gpus))
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": _commit(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus py{platform.python_version()}",
        "model": "paper-104b",
        "cluster": "dgx-a100-80g",
        "gpus": gpus,
        "plan": plan,
        "backend": backend,
        "trace_rows": len(sim.rows),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "target_s": limit if limit is not None else "",
        "ok": (cpu <= limit) if limit is not None else "",
        "simulated_step_time_s": s["step_time_s"],
    }


def main(argv: list[str] | None = None) -> None:
    import pandas as pd

    from semoe.io import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench/simulator.csv")
    ap.add_argument("--gpus", type=int, nargs="*", default=[64, 1024])
    ap.add_argument("--flow-gpus", type=int, nargs="*", default=[16, 64])
    ap.add_argument("--plans", nargs="*", default=["semoe", "deepspeed"])
    a = ap.parse_args(argv)
    out = Path(a.out)

    def append(row: dict) -> None:  # after every row, so that a long flow run loses nothing before it
        print(row, flush=True)
        df = pd.DataFrame([row])
        if out.is_file():
            df = pd.concat([pd.read_csv(out), df], ignore_index=True)
        atomic_write_text(out, df.to_csv(index=False))

    for plan in a.plans:
        for g in a.gpus:
            append(bench_one(g, plan, "analytic"))
        for g in a.flow_gpus:
            append(bench_one(g, plan, "flow"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
