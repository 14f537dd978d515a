"""Issue 6 follow-up (task hB2): why the host's CPU AdamW rate drifts 2x within minutes (NUMA / binding probe).

Run from the repository root on the GPU machine::

    PYTHONPATH=. python -m reference.offload.host_probe --out DIR [--quick] [--duration-s 60] [--budget-s 150]

What it measures (rows ``date,commit,device,case,metric,value`` appended to ``DIR/host_probe.csv``, one at a
time, flushed, so a killed run keeps what it measured; ``case`` is ``key=value`` tokens, `parse_case`):

1. facts (``DIR/host_facts.txt``): lscpu, ``numactl -H``, ``nvidia-smi topo -m``, transparent huge pages
   (enabled, defrag, khugepaged), automatic NUMA balancing, the cpufreq governor, nproc, the affinity mask, torch's
   thread count, the engine's AdamW thread rule, the NUMA node and SMT siblings of every CPU, cgroup CPU limits
   and pressure (PSI); the numeric ones also as rows (``scope=facts``);
2. ``scope=main``: the engine's AdamW (`reference.offload.cpu_adam.adamw_layer_`, fused, bf16 gradients, on
   config (b)'s layer: 16 experts of d 1024 x F 4096, as `bench.measure_engine_adam` probes it) on the engine's
   optimizer worker (`reference.offload.engine.host_executors`: intra-op threads = the engine's rule), every
   ``--interval-s`` over ``--duration-s``, on buffers laid out as `VARIANTS` (``pinned``: states, gradients and
   mirror pinned, as the engine holds tier ``cpu`` on CUDA; ``plain``: all pageable; ``states_plain``: the fp32
   states pageable, the DMA buffers pinned; ``registered``: pageable memory pinned in place by
   ``cudaHostRegister``; ``plain_thp``: pageable, madvised to huge pages before first touch, as ``registered`` is),
   one call each per tick in a rotating order; beside each call a read of the layer's
   states (``state_read_GBps``, ``torch.sum`` on the same worker) and, per tick, the host's steal time, mean
   MHz, CPU pressure and page-migration / THP counters over the tick (time series: shows drift);
3. ``scope=child``: the same (layouts ``pinned`` and ``plain``) in fresh processes whose CPU mask is set before
   the interpreter starts (so before torch's OpenMP runtime reads it), buffers allocated and first-touched inside
   them: one per NUMA node (or, with one node, each half of the CPUs), one thread per physical core (with SMT),
   the whole mask with ``OMP_PROC_BIND=close`` / ``spread`` (``OMP_PLACES=cores``), plain allocations on huge
   pages (``THP_MEM_ALLOC_ENABLE=1``) and an unbound fresh process (per-process state vs time). Before each child, the
   main process takes one more tick (``scope=ref``): the time reference it is compared against;
4. ``scope=alloc``: where each buffer's pages are: the NUMA node of 512 of its pages (``move_pages(2)`` in query
   mode: is torch's pinned memory on one node?), the VMA that holds it (``/proc/<pid>/maps``), that VMA's pages
   per node and page size (``numa_maps``) and its huge pages (``smaps`` AnonHugePages), at the start and the end.

``--quick``: tiny layer on the CPU (pinned = plain: no CUDA), 2 ticks, two short children (CI smoke test, < 15 s).
Nothing here changes the engine; NOTES.md says what the data showed.

This module is the CLI, the main process's time series and the bound children (`main`, `child_main`,
`run_child`); the rest lives beside it and is re-exported here: `reference.offload.host_probe_rows` (the row
file, `log`, the ``case`` tokens), `host_probe_facts` (CPU topology, host counters, page placement, the facts
file) and `host_probe_update` (the probed layer's buffers per layout, a tick, the setup).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from reference.offload.host_probe_facts import (
    CPU_ROOT,
    MEMINFO_KEYS,
    MOVE_PAGES_NR,
    NODE_ROOT,
    VMSTAT_KEYS,
    Counters,
    bind_cases,
    collect_facts,
    cpu_mhz_mean,
    cpu_times,
    format_cpulist,
    numa_nodes,
    one_per_core,
    page_nodes,
    parse_cpulist,
    pressure,
    proc_maps,
    read_text,
    smt_siblings,
    vma_info,
    vmstat,
)
from reference.offload.host_probe_rows import (
    COLUMNS,
    CSV_NAME,
    Rows,
    case_name,
    log,
    parse_case,
)
from reference.offload.host_probe_update import (
    VARIANTS,
    VARIANTS_CPU,
    Buffers,
    layer_shapes,
    madvise_huge,
    record_pages,
    setup,
    tick,
)

FACTS_NAME = "host_facts.txt"
CHILD_VARIANTS = ("pinned", "plain")  # the bound children: the engine's layout and the pageable one (time budget)

# the names other modules and tests import from here (their homes: host_probe_rows, host_probe_facts,
# host_probe_update)
__all__ = [
    "CHILD_VARIANTS", "COLUMNS", "CPU_ROOT", "CSV_NAME", "FACTS_NAME", "MEMINFO_KEYS", "MOVE_PAGES_NR", "NODE_ROOT",
    "VARIANTS", "VARIANTS_CPU", "VMSTAT_KEYS", "Buffers", "Counters", "Rows", "bind_cases", "build_parser",
    "case_name", "child_main", "collect_facts", "cpu_mhz_mean", "cpu_times", "format_cpulist", "layer_shapes", "log",
    "madvise_huge", "main", "numa_nodes", "one_per_core", "page_nodes", "parse_case", "parse_cpulist", "pressure",
    "proc_maps", "read_text", "record_pages", "run_child", "setup", "smt_siblings", "tick", "vma_info", "vmstat",
]


# ------------------------------------------------------------------------------------ child processes
def child_main(args) -> int:
    """Part 3 inside a bound process (its mask was set before the interpreter started)."""
    import torch

    cuda = torch.cuda.is_available()
    rows = Rows(args.out / CSV_NAME, torch.cuda.get_device_name() if cuda else "cpu", os.environ.get("SEMOE_COMMIT"))
    name = args.child
    variants = CHILD_VARIANTS
    base = {"scope": "child", "bind": name}
    aff = sorted(os.sched_getaffinity(0))
    rows.add(case_name(**base, variant="-"), "affinity_cpus", len(aff))
    log(f"child {name}: cpus {format_cpulist(aff)}, OMP_PROC_BIND={os.environ.get('OMP_PROC_BIND', '-')}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '-')}")
    E, P, bufs, worker, io, threads, scratch = setup(rows, base, args.quick, variants)
    variants = list(bufs)
    try:
        rows.add(case_name(**base, variant="-"), "threads_adam", threads["adam"])
        wa = worker.submit(os.sched_getaffinity, 0).result()
        rows.add(case_name(**base, variant="-"), "worker_affinity_cpus", len(wa))
        log(f"  child {name}: worker thread affinity {format_cpulist(wa)}")
        record_pages(rows, "child", bufs, "start", bind=name)
        counters = Counters()
        order = list(variants)
        for i in range(args.ticks):
            tick(rows, worker, bufs, scratch, order, counters, E, P, **base, tick=i)
            order = order[1:] + order[:1]
    finally:
        worker.shutdown(wait=True)
        io.shutdown(wait=True)
        for b in bufs.values():
            b.close()
        rows.close()
    return 0


def run_child(args, name: str, cpus: list[int], env: dict, timeout_s: float) -> int:
    cmd = [sys.executable, "-m", "reference.offload.host_probe", "--out", str(args.out.resolve()), "--child", name,
           "--ticks", str(args.child_ticks)] + (["--quick"] if args.quick else [])
    repo = Path(__file__).resolve().parents[2]
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = os.pathsep.join(x for x in (str(repo), os.environ.get("PYTHONPATH", "")) if x)
    for k in ("OMP_PROC_BIND", "OMP_PLACES", "THP_MEM_ALLOC_ENABLE"):  # only what the case names
        if k not in env:
            full.pop(k, None)
    # the child inherits the CPU mask of the thread that starts it: set this thread's mask for the spawn only (no
    # Python code runs between fork and exec), so the interpreter, and torch's OpenMP runtime, start bound
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        proc = subprocess.Popen(cmd, env=full, cwd=repo)
    finally:
        os.sched_setaffinity(0, old)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        log(f"  child {name} timed out after {timeout_s:.0f} s")
        return 124


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference.offload.host_probe", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny layer on the CPU, 2 ticks, 2 children (CI smoke test)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="length of the main time series (default 60; quick 0.2)")
    p.add_argument("--interval-s", type=float, default=None, help="time between ticks (default 3; quick 0.1)")
    p.add_argument("--budget-s", type=float, default=150.0, help="children start only while this much is left")
    p.add_argument("--child-ticks", type=int, default=None, help="ticks per child (default 2; quick 1)")
    p.add_argument("--children", default=None, help="comma list of child cases to run (default: all that apply)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ticks", type=int, default=3, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child_main(args)
    t_start = time.perf_counter()
    duration = args.duration_s if args.duration_s is not None else (0.2 if args.quick else 60.0)
    interval = args.interval_s if args.interval_s is not None else (0.1 if args.quick else 3.0)
    args.child_ticks = args.child_ticks or (1 if args.quick else 2)
    if duration < 0 or interval <= 0 or args.child_ticks < 1:
        raise SystemExit("host_probe: need --duration-s >= 0, --interval-s > 0 and --child-ticks >= 1")

    import torch

    from semoe.io import git_commit

    cuda = torch.cuda.is_available()
    commit = git_commit()
    os.environ.setdefault("SEMOE_COMMIT", commit)  # the children label their rows with the same commit
    rows = Rows(args.out / CSV_NAME, torch.cuda.get_device_name() if cuda else "cpu", commit)
    topo = collect_facts(args.out / FACTS_NAME, rows)
    variants = VARIANTS if cuda else VARIANTS_CPU
    log(f"part 2: main process, variants {', '.join(variants)}")
    E, P, bufs, worker, io, threads, scratch = setup(rows, {"scope": "main"}, args.quick, variants)
    variants = list(bufs)
    try:
        rows.add(case_name(scope="main", variant="-"), "threads_adam", threads["adam"])
        record_pages(rows, "main", bufs, "start")
        counters = Counters()
        t0 = time.perf_counter()
        order = list(variants)
        i = 0
        while True:
            tick(rows, worker, bufs, scratch, order, counters, E, P, scope="main", tick=i,
                 t_s=f"{time.perf_counter() - t0:.1f}")
            order = order[1:] + order[:1]
            i += 1
            nxt = t0 + i * interval
            if nxt - t0 > duration:
                break
            time.sleep(max(0.0, nxt - time.perf_counter()))

        log("part 3: bound children (a main-process tick before each: the time reference)")
        cases = bind_cases(topo["affinity"], topo["nodes"], topo["siblings"])
        if len(topo["nodes"]) <= 1:
            log(f"  {len(topo['nodes'])} NUMA node(s): binding to halves of the CPUs instead")
        if args.children:
            want = args.children.split(",")
            cases = [c for c in cases if c[0] in want]
        if args.quick:
            cases = cases[:2]
        est = None
        for name, cpus, env in cases:
            left = args.budget_s - (time.perf_counter() - t_start)
            if est is not None and left < est * 1.2:
                rows.add(case_name(scope="child", bind=name, variant="-"), "skipped_budget", 1)
                continue
            tick(rows, worker, bufs, scratch, list(variants), counters, E, P, scope="ref", before=name,
                 t_s=f"{time.perf_counter() - t0:.1f}")
            log(f"  child {name}: cpus {format_cpulist(cpus)} env {env or '-'}")
            t = time.perf_counter()
            rc = run_child(args, name, cpus, env, timeout_s=max(30.0, left))
            est = max(est or 0.0, time.perf_counter() - t)
            rows.add(case_name(scope="child", bind=name, variant="-"), "child_s", time.perf_counter() - t)
            if rc != 0:
                rows.add(case_name(scope="child", bind=name, variant="-"), "child_rc", rc)
        record_pages(rows, "main", bufs, "end")
    finally:
        worker.shutdown(wait=True)
        io.shutdown(wait=True)
        for b in bufs.values():
            b.close()
    rows.add(case_name(scope="facts"), "total_s", time.perf_counter() - t_start)
    rows.close()
    log(f"done: {args.out / CSV_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
