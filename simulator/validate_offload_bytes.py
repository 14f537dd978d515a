"""Byte and counter rows of the offload validation (task hF, `simulator.validate_offload`).

The H2D bytes of a step are the engine's copy schedule times the experts each copy moves: `ExpertOffload._acquire`
/ `_prefetch` / the step's layer-ahead fetch copy only the experts of a layer that received tokens (``needed``,
``L.used``), so the bytes follow the trained router. The bench feeds uniform random tokens and its router
collapses over the run (config a's last MoE layer: 8 experts used in step 0, 2 by step 5 of run 675640a), which
the simulator's routing draw (every expert receives some of the ~98k tokens) cannot know. The H2D rows are
therefore predicted as the simulator's copy schedule (`copy_schedule`: copies per layer per step, slots, prefetch,
micro-batches) times the run's routed experts per (counted step, layer) (`trace_routing`: the engine's cache
events, one per (layer, expert) that received tokens in the step, recorded by the LFU policy for every offloaded
placement, not by the copies; with prefetch the first copy of a layer in a step follows the previous step's,
`routed_h2d_gb`). A case without such a record keeps the a-priori value, shown, not scored (`_routed`).

Counter rows of a bench whose counter window was still wrong are `MEASUREMENT_BUG` by a rule on the run's commit
(`measurement_bug`).
"""

from __future__ import annotations

from pathlib import Path

from simulator.validate_offload_case import (
    BYTES_METRICS,
    RATIO_METRICS,
    OffloadConfig,
    _iteration,
    parse_placement,
    parse_prefetch,
)
from simulator.validate_offload_inputs import _contains
from simulator.validate_offload_traces import _trace_cases, trace_dirs, trace_run

ROUTED_METRICS = ("h2d_gb_per_step",)
MEASUREMENT_BUG = "measurement_bug"  # status: the bench counted a wrong window (fixed later); shown, not scored
# the fixes of the bench's counter window (git log -- reference/offload/bench.py), with fallback dates (no git)
COUNTER_OPEN_FIX = ("3bd5bc4", "2026-11-24T07:03:35Z")  # run_case opens the window after eng.wait()
PROFILE_STEP_FIX = ("b638fe8", "2026-11-24T08:24:38Z")  # the window closes before the --profile step
# counters the engine advances on its optimizer / I/O threads, after ``step()`` returned: ``cpu_adam_s``
# (`_update_states`), the SSD store's bytes, and with prefetch the H2D bytes of the next forward's first layers
# (`_update` -> `_fill`); d2h_bytes and the cache's hits / misses are counted in ``step()`` on the training thread
ASYNC_COUNTERS = ("cpu_adam_ms_per_step", "ssd_read_gb_per_step", "ssd_write_gb_per_step")
COUNTER_METRICS = BYTES_METRICS + ("cpu_adam_ms_per_step",) + RATIO_METRICS
# the cases `reference.offload.bench` profiles with --profile (from 3bd5bc4): config a, offloaded, prefetch on
PROFILED_CASES = (("a_compute_bound", "cpu", "on"), ("a_compute_bound", "ssd", "on"))


def measurement_bug(commit: str, date: str, config: str, placement: str, prefetch: str, metric: str) -> str | None:
    """Why a bench counter row measured a wrong window, by a rule on the run's commit (never on its error), or
    None. Before `COUNTER_OPEN_FIX` the window opened while the last warm-up step's update still ran on the
    engine's threads, so the counters those threads advance (`ASYNC_COUNTERS`, and ``h2d_gb_per_step`` with
    prefetch on) took in up to one more step's worth; from it until `PROFILE_STEP_FIX` the ``--profile`` cases
    (`PROFILED_CASES`; run 3bd5bc4 ran with --profile) also counted the profiled step (5 steps over 4), in every
    counter (`COUNTER_METRICS`)."""
    if metric not in COUNTER_METRICS:
        return None
    label = str(config).split(" ", 1)[0]
    if not _contains(COUNTER_OPEN_FIX, commit, date):
        try:
            ahead = parse_prefetch(prefetch, None) > 0
        except ValueError:
            ahead = False
        if metric in ASYNC_COUNTERS or (metric == "h2d_gb_per_step" and ahead):
            return (f"the bench before {COUNTER_OPEN_FIX[0]} opened its counter window while the last warm-up step's "
                    "update still ran on the engine's threads, which advance this counter (up to one more step's "
                    "worth counted)")
        return None
    if not _contains(PROFILE_STEP_FIX, commit, date) and (label, str(placement), str(prefetch)) in PROFILED_CASES:
        return (f"the bench from {COUNTER_OPEN_FIX[0]} until {PROFILE_STEP_FIX[0]} closed the counter window after the "
                "--profile step of this case: 5 steps counted over 4")
    return None


_SCHED_CACHE: dict = {}


def copy_schedule(cfg: OffloadConfig, placement: str, depth: int, io: tuple = ()) -> dict[int, tuple[float, float, int]]:
    """The simulated step's H2D copies of expert weights, per MoE layer (block index): ``(copies per step, bytes per
    copied expert, experts the simulated routing uses)``, from the trace of the simulated step (single GPU; {} when
    nothing is offloaded or the run has several ranks)."""
    key = (cfg, placement, depth, tuple((k, v) for k, v in io if not k.startswith("_")))
    if key not in _SCHED_CACHE:
        _, it, sim = _iteration(cfg, placement, depth, io, trace=True)
        out: dict[int, tuple[float, float, int]] = {}
        if it.W == 1 and getattr(it, "used", None):
            per: dict[int, list[float]] = {}
            for rank, layer, _mb, phase, _s, _e, nbytes, *_ in sim.rows:
                if rank == 0 and phase in ("h2d_prefetch", "h2d_params"):
                    c = per.setdefault(int(layer), [0.0, 0.0])
                    c[0] += 1
                    c[1] += nbytes
            for layer, (n, nb) in per.items():
                used = int(it.used[layer][0].sum())
                if n and used:
                    out[layer] = (n / it.n_iter, nb / n / used, used)
        _SCHED_CACHE[key] = out
    return _SCHED_CACHE[key]


def trace_routing(path: Path, warmup: int, counted: int) -> dict[tuple[int, int], int] | None:
    """``{(engine step, layer block): experts that received tokens}`` over the counted steps ``warmup ..
    warmup + counted - 1`` of a bench trace, and the step before them when the trace has it (the history the first
    prefetch of a counted step follows): its ``cache_hit`` / ``cache_miss`` rows, which the engine's LFU policy
    writes at each ``step()`` for every (layer, expert) with tokens in any of the step's micro-batches (the
    ``micro_batch`` column is the engine's step index). None when a counted step has no such row (not recorded)."""
    from semoe.trace import read_csv

    steps = range(warmup - 1, warmup + counted)
    used: dict[tuple[int, int], int] = {}
    for r in read_csv(path):
        if r.phase in ("cache_hit", "cache_miss") and r.micro_batch in steps:
            used[(r.micro_batch, r.layer)] = used.get((r.micro_batch, r.layer), 0) + 1
    if counted <= 0 or not set(steps[1:]) <= {s for s, _ in used}:
        return None
    return used


def routed_h2d_gb(schedule: dict[int, tuple[float, float, int]], routing: dict[tuple[int, int], int], first: int,
                  steps: int, depth: int) -> float:
    """H2D GB per step over the counted steps ``first .. first + steps - 1``: per layer, its simulated copies per
    step x bytes per expert x the experts the step routed tokens to (a layer without a record in a step used none).
    With prefetch (``depth`` > 0) the first copy of a layer in a step follows the routing history as the engine's
    does (the step's layer-ahead fetch and the first forward prefetch copy the experts the layer used in the previous
    step, `ExpertOffload._prefetch` / ``step()``; the forward then fetches the missing ones on demand): it moves at
    least ``max(previous, current)`` experts, taken when the record has the previous step (the counts do not say
    which experts, so not their union)."""
    total = 0.0
    for layer, (copies, per_expert, _) in schedule.items():
        for s in range(first, first + steps):
            cur = routing.get((s, layer), 0)
            prev = routing.get((s - 1, layer)) if depth > 0 and any(k[0] == s - 1 for k in routing) else None
            lead = cur if prev is None else max(prev, cur)
            total += per_expert * (min(copies, 1.0) * lead + max(copies - 1.0, 0.0) * cur)
    return total / steps / 1e9


def routing_dirs(traces: Path | None) -> list[Path]:
    """Directories whose traces can give a run's routing: `trace_dirs` and the raw run folders beside ``traces``
    (``offload_*/<run>/`` with a ``run.json``, e.g. results/bench/offload_hB_raw/run1)."""
    if traces is None or not Path(traces).is_dir():
        return []
    extra = sorted(p.parent for p in Path(traces).parent.glob("offload_*/*/run.json"))
    return trace_dirs(traces) + [d for d in extra if d not in trace_dirs(traces)]


def routing_traces(traces: Path | None) -> dict[tuple, Path]:
    """``(date, commit, device, label, placement, prefetch) -> trace path`` of every run with traces
    (`routing_dirs`; the first directory of a run wins)."""
    out: dict[tuple, Path] = {}
    for d in routing_dirs(traces):
        run = trace_run(d)
        for label, placement, prefetch, path in _trace_cases(d):
            out.setdefault((*run, label, placement, prefetch), path)
    return out


def _routed(apriori: float, cfg: OffloadConfig, placement: str, depth: int, io: tuple,
            trace: Path | None) -> tuple[float, str, str]:
    """An H2D row's prediction: ``(value, status, note)``: the simulated copy schedule x the case's routing record
    (`copy_schedule`, `trace_routing`, `routed_h2d_gb`; status validated), else the a-priori value (every expert the
    simulated routing uses), not scored (``not_modelled``: the bytes follow a router the simulator does not train)."""
    routing = trace_routing(trace, cfg.warmup, cfg.steps) if trace is not None else None
    sched = copy_schedule(cfg, parse_placement(placement), depth, io) if routing else {}
    if not routing or not sched:
        return apriori, "not_modelled", (
            "no routing record of this case (trace cache events): the engine copies only the experts with tokens and "
            f"the bench's router collapses; a-priori (the simulated routing: every expert used) {apriori:.4g} GB")
    counted = range(cfg.warmup, cfg.warmup + cfg.steps)
    used = {lay: sum(n for (s, l2), n in routing.items() if l2 == lay and s in counted) / cfg.steps
            for lay in sorted(sched)}
    copies = {lay: sched[lay][0] for lay in sorted(sched)}
    return routed_h2d_gb(sched, routing, cfg.warmup, cfg.steps, depth), "validated", (
        f"simulated copies per step per layer {copies} x the run's routed experts per layer (mean of the "
        f"{cfg.steps} counted steps' cache events in {trace.parent.name}/{trace.name}) "
        + str({k: round(v, 2) for k, v in used.items()})
        + f" of {max(v[2] for v in sched.values())}"
        + ("; with prefetch the first copy of a layer in a step moves max(previous step's, this step's)"
           if depth > 0 else "") + f" (a-priori, every expert used: {apriori:.4g} GB)")
