"""The offload bench's traces beside the simulation (`simulator.validate_offload`): the run and cases a trace
folder holds (`trace_run`, `trace_dirs`), the window of a case's counted steps (`trace_window`) and what ran in it
(`trace_phases`: busy time and bytes per phase; `trace_rates`: the rates the case showed; `queued_write_gaps` and
`write_prep_rate`: the I/O thread's block prep; `timed_steps`), and the rows built from them: per-phase rows
(`_trace_rows`), the mean-of-timed-steps twin of a step row (`_step_mean_row`, the lead's rule) and the step simulated
given a case's own rates (`_diagnostic_rows`, status `DIAGNOSTIC`).
"""

from __future__ import annotations

import math
import re
from itertools import pairwise
from pathlib import Path

from simulator.validate_offload_case import (
    OffloadConfig,
    parse_config,
    parse_prefetch,
    simulate,
)
from simulator.validate_offload_inputs import (
    DERIVED,
    STEP_MEAN_METRICS,
    case_io,
    step_mean_rule,
)

# a run's own rates taken from its traces for the diagnostic simulation (`trace_rates`): io_rates key -> label
DIAG_RATES = {"cpu_adam": "CPU AdamW", "disk_read": "SSD read", "disk_write": "SSD write",
              "ssd_write_prep": "block prep"}
# trace_<letter>_<placement>_<on|off>.csv of a bench run -> the case label of its config
TRACE_LABELS = {"a": "a_compute_bound", "b": "b_over_budget"}


def timed_steps(path: Path, warmup: int, counted: int) -> list[float]:
    """Durations (s) of a bench trace's timed steps: its ``step`` rows after the warm-up and the counted step
    (`reference.offload.bench.run_case`: ``warmup`` steps, one counted step, then the timed ones; ``counted`` =
    the config's ``steps``, i.e. timed + 1), in order."""
    from semoe.trace import read_csv

    steps = sorted((r for r in read_csv(path) if r.phase == "step"), key=lambda r: r.start_s)
    return [r.end_s - r.start_s for r in steps[warmup + 1 : warmup + max(counted, 1)]]


def trace_run(traces: Path | None) -> tuple | None:
    """``(date, commit, device)`` of the bench run whose traces are in ``traces`` (its ``run.json``)."""
    import json

    if traces is None or not (Path(traces) / "run.json").is_file():
        return None
    d = json.loads((Path(traces) / "run.json").read_text())
    return (d["date"], d["commit"], d["device"])


def _trace_cases(traces: Path) -> list[tuple[str, str, str, Path]]:
    out = []
    for f in sorted(Path(traces).glob("trace_*_*_*.csv")):
        m = re.fullmatch(r"trace_([a-z])_(\w+?)_(on|off)\.csv", f.name)
        if m and m[1] in TRACE_LABELS:
            out.append((TRACE_LABELS[m[1]], m[2], "-" if m[2] == "gpu" else m[3], f))
    return out


def write_prep_rate(traces: Path) -> tuple[float, int] | None:
    """Bytes/s of the host work between two SSD block writes on the engine's I/O thread (``reference.offload.ssd``:
    the rename of the first over its block's previous version, which unlinks it, then the crc32 of the second,
    outside the timed writes), from the traces: block bytes over the median of the `queued_write_gaps` (pairs whose
    second write was queued before the first ended, so the gap is not a wait for an update). Returns (rate, gaps)."""
    import numpy as np

    from semoe.trace import read_csv

    rates = []
    for *_, f in _trace_cases(traces):
        rates += [b / g for b, g in queued_write_gaps(read_csv(f))]
    return (float(np.median(rates)), len(rates)) if rates else None


def trace_window(rows: list, warmup: int, counted: int | None = None) -> tuple[float, float, int] | None:
    """``(t0, t1, steps)``: the host-clock window of a bench trace that holds the work of its counted steps (step
    rows ``warmup .. warmup + counted - 1``, all of them when ``counted`` is None), including their asynchronous
    tails. An update runs on the optimizer thread after its step's ``step`` row ends, and its SSD writes after
    that, so the window is not the step rows' span (that lost the last step's update and write-backs: 3 of 4
    steps' SSD bytes in 3bd5bc4's traces, fewer in b where the write queue lags). It opens at the first counted
    step (the bench drains the warm-up's updates before it) and closes where later work begins: the next
    ``step`` / ``profile_step`` row, the first ``cpu_adam`` row past the counted steps' ``counted x layers``
    ones, or the first ``ssd_read`` after the last of those (the next step's reads; the bench drains the counted
    steps' updates before anything else runs); else the end of the trace."""
    marks = sorted((r for r in rows if r.phase in ("step", "profile_step")), key=lambda r: r.start_s)
    steps = [r for r in marks if r.phase == "step"][warmup:]
    if counted is not None:
        steps = steps[:counted]
    if not steps:
        return None
    t0, n = steps[0].start_s, len(steps)
    ends = [r.start_s for r in marks if r.start_s > steps[-1].start_s]
    adam = sorted((r for r in rows if r.phase == "cpu_adam" and r.start_s >= t0), key=lambda r: r.start_s)
    layers = len({r.layer for r in adam})
    if layers and len(adam) >= n * layers:
        last = adam[n * layers - 1]
        ends += [r.start_s for r in adam[n * layers :]]
        ends += [r.start_s for r in rows if r.phase == "ssd_read" and r.start_s >= last.end_s]
    return t0, min(ends, default=float("inf")), n


def trace_phases(path: Path, warmup: int, counted: int | None = None) -> dict[str, float]:
    """Per counted step (step rows ``warmup``.., ``counted`` of them): busy ms and GB of each host / copy phase
    in a bench trace (rows that start inside `trace_window`)."""
    from semoe.trace import read_csv

    rows = read_csv(path)
    win = trace_window(rows, warmup, counted)
    if win is None:
        return {}
    t0, t1, n = win
    steps = range(n)
    out: dict[str, float] = {"steps": n}
    for phase, key in (("cpu_adam", "cpu_adam"), ("ssd_read", "ssd_read"), ("ssd_write", "ssd_write"),
                       ("d2h_grad", "d2h"), ("h2d_fetch", "h2d"), ("h2d_demand", "h2d")):
        sel = [r for r in rows if r.phase == phase and t0 <= r.start_s < t1]
        out[f"{key}_ms"] = out.get(f"{key}_ms", 0.0) + 1e3 * sum(r.end_s - r.start_s for r in sel) / len(steps)
        out[f"{key}_gb"] = out.get(f"{key}_gb", 0.0) + sum(r.bytes for r in sel) / 1e9 / len(steps)
    return out


def queued_write_gaps(rows: list, t0: float = -math.inf, t1: float = math.inf) -> list[tuple[float, float]]:
    """``(bytes, gap_s)`` of each pair of consecutive SSD block writes on the engine's I/O thread (rows starting in
    ``[t0, t1)``) whose second write was already queued when the first ended: no ``cpu_adam`` row (the update that
    queues write-backs) ends inside the gap, so the gap is the I/O thread's own host work between two writes (the
    rename of the first over its block's previous version, which unlinks that file, and the crc32 of the second),
    not idle time waiting for an update."""
    sel = [r for r in rows if t0 <= r.start_s < t1]
    adam_ends = sorted(r.end_s for r in sel if r.phase == "cpu_adam")
    io = sorted((r for r in sel if r.phase in ("ssd_read", "ssd_write")), key=lambda r: r.start_s)
    out = []
    for a, b in pairwise(io):
        queued = not any(a.end_s < e <= b.start_s for e in adam_ends)
        if a.phase == b.phase == "ssd_write" and b.start_s > a.end_s and queued:
            out.append((float(b.bytes), b.start_s - a.end_s))
    return out


def trace_rates(path: Path, warmup: int, counted: int | None = None) -> dict[str, float]:
    """The host-side rates one bench case showed in its own trace (rows in `trace_window`), as `TrainingIteration`
    ``io_rates``: ``cpu_adam`` / ``cpu_adam_fp32grad`` (parameters/s: the ``cpu_adam`` rows' parameters, bytes / 16,
    over their busy time), ``disk_read`` / ``disk_write`` (bytes/s over the ``ssd_read`` / ``ssd_write`` rows' busy
    time: the engine's timed read with its crc32, the timed write + fsync) and ``ssd_write_prep`` (bytes/s: block
    bytes over the median of `queued_write_gaps`). Only the phases the trace has. These are measurements of the run
    being predicted: the diagnostic simulation uses them, the a-priori prediction never does."""
    import numpy as np

    from semoe.trace import read_csv

    rows = read_csv(path)
    win = trace_window(rows, warmup, counted)
    if win is None:
        return {}
    t0, t1, _ = win
    sel = [r for r in rows if t0 <= r.start_s < t1]
    out: dict[str, float] = {}

    def busy(phase):
        xs = [r for r in sel if r.phase == phase]
        return sum(r.bytes for r in xs), sum(r.end_s - r.start_s for r in xs)

    nb, dt = busy("cpu_adam")
    if nb and dt > 0:
        out["cpu_adam"] = out["cpu_adam_fp32grad"] = nb / 16 / dt  # row bytes: 16 B per parameter (the engine's)
    for phase, key in (("ssd_read", "disk_read"), ("ssd_write", "disk_write")):
        nb, dt = busy(phase)
        if nb and dt > 0:
            out[key] = nb / dt
    gaps = queued_write_gaps(rows, t0, t1)
    if gaps:
        out["ssd_write_prep"] = float(np.median([b / g for b, g in gaps]))
    return out


def trace_dirs(traces: Path | None) -> list[Path]:
    """``traces`` (the latest run's traces) and its ``run_<commit>/`` subdirectories (older runs' traces), those
    with a ``run.json``."""
    if traces is None or not Path(traces).is_dir():
        return []
    dirs = [Path(traces)] + sorted(p for p in Path(traces).glob("run_*") if p.is_dir())
    return [d for d in dirs if (d / "run.json").is_file()]


# trace metric -> (simulated busy_s key(s), or bytes key(s)); "ms" ones compare busy time, "gb" ones bytes
TRACE_METRICS = {
    "trace_cpu_adam_ms_per_step": ("cpu_adam_ms", "busy", ("cpu_adam",)),
    "trace_ssd_read_ms_per_step": ("ssd_read_ms", "busy", ("ssd_read",)),
    "trace_ssd_write_ms_per_step": ("ssd_write_ms", "busy", ("ssd_write", "ssd_writeback")),
    "trace_ssd_read_gb_per_step": ("ssd_read_gb", "bytes", ("ssd_read",)),
    "trace_ssd_write_gb_per_step": ("ssd_write_gb", "bytes", ("ssd_write", "ssd_writeback")),
}


def _step_mean_row(row: dict, cfg: OffloadConfig, trace: Path | None) -> dict | None:
    """The lead's rule (`STEP_MEAN_RULE`): for a validated ``step_ms`` / ``tokens_per_s`` row of a run from that commit
    on whose case has a trace with timed steps, mark ``row`` `DERIVED` (in place) and return its ``*_mean`` twin
    (measured from the trace's timed steps, the same prediction, validated); else None."""
    if (row["metric"] not in STEP_MEAN_METRICS or row["status"] != "validated" or trace is None
            or not step_mean_rule(row["commit"], row["date"])):
        return None
    ts = timed_steps(trace, cfg.warmup, cfg.steps)
    if not ts:
        return None
    mean = sum(ts) / len(ts)
    measured = 1e3 * mean if row["metric"] == "step_ms" else cfg.micro_batches * cfg.batch * cfg.seq / mean
    pred = row["predicted"]
    twin = dict(row, metric=STEP_MEAN_METRICS[row["metric"]], measured=measured,
                error=pred / measured - 1 if measured and not math.isnan(pred) else float("nan"),
                note=(f"the mean of the {len(ts)} timed steps in {trace.name} ("
                      + ", ".join(f"{1e3 * t:.0f}" for t in ts) + " ms; results/validation/offload_step_mean_rule.md); "
                      + row["note"]))
    row.update(status=DERIVED, note=(f"{DERIVED}: the bench's median of the timed steps, scored as its "
                                     f"{STEP_MEAN_METRICS[row['metric']]} twin (results/validation/"
                                     f"offload_step_mean_rule.md); " + row["note"]))
    return twin


def _trace_rows(df, traces: Path, run: tuple, inputs: dict, prep_note: str, probes: dict | None = None,
                adjacent: dict | None = None, contention: dict | None = None) -> list[dict]:
    """Per-phase rows: each trace's measured busy time and bytes per step beside the simulation's."""
    out = []
    run_io = tuple(sorted(inputs.get(run, {}).items()))
    date, commit, device = run
    for label, placement, prefetch, path in _trace_cases(traces):
        sel = df[(df["date"] == date) & (df["commit"] == commit) & (df["config"].astype(str).str.split().str[0] == label)]
        if sel.empty:
            continue
        cfg = parse_config(sel["config"].iloc[0])
        measured = trace_phases(path, cfg.warmup, cfg.steps or None)
        if not measured:
            continue
        case = (date, commit, device, str(sel["config"].iloc[0]), placement, prefetch)
        io, adam_label = case_io(run_io, probes or {}, cfg, placement, device, (adjacent or {}).get(case),
                                 (contention or {}).get(case))
        s = simulate(cfg, placement, parse_prefetch(prefetch, cfg.depth), io)
        for metric, (key, what, sim_keys) in TRACE_METRICS.items():
            m = measured.get(key, 0.0)
            src = s["busy_s"] if what == "busy" else s["bytes"]
            scale = 1e3 if what == "busy" else 1e-9
            p = sum(src.get(k, 0.0) for k in sim_keys) * scale
            if metric == "trace_ssd_write_ms_per_step" and dict(io).get("ssd_write_prep"):
                # the trace's write rows time the write + fsync only; the simulated disk busy time includes
                # the block's serialise + crc32 before it (ssd_write_prep), taken out here
                nb = sum(s["bytes"].get(k, 0.0) for k in sim_keys)
                p -= 1e3 * nb / dict(io)["ssd_write_prep"]
            if m == 0 and p == 0:
                continue
            out.append({"date": date, "commit": commit, "device": device, "config": sel["config"].iloc[0],
                        "placement": placement, "prefetch": prefetch, "metric": metric, "measured": m,
                        "predicted": p, "error": p / m - 1 if m else float("nan"), "used_for_fitting": False,
                        "status": "validated",
                        "note": f"from {path.name} over {int(measured['steps'])} counted steps (host clock, each "
                                "step's asynchronous update and write-backs included: `trace_window`)"
                                + (prep_note if "write" in metric else ""),
                        "cpu_adam_input": adam_label})
    return out


DIAGNOSTIC = "diagnostic"  # status of `_diagnostic_rows` (offload CSV only: `rows` leaves them out of semoe validate)


def _diagnostic_rows(df, traces: Path, run: tuple, inputs: dict, probes: dict, adjacent: dict | None = None) -> list[dict]:
    """Per traced case: the bench's step time beside the simulation GIVEN THIS RUN'S MEASURED PHASE RATES
    (`trace_rates` of the case's own trace: CPU AdamW, SSD read, SSD write, block prep replace the probes; the
    other inputs stay the a-priori ones). Status `DIAGNOSTIC`: it tests the scheduling / overlap model with the
    rate model taken out, it is not a prediction (the rates come from the run it is compared with)."""
    out = []
    date, commit, device = run
    run_io = tuple(sorted(inputs.get(run, {}).items()))
    for label, placement, prefetch, path in _trace_cases(traces):
        sel = df[(df["date"] == date) & (df["commit"] == commit) & (df["device"] == device)
                 & (df["config"].astype(str).str.split().str[0] == label) & (df["placement"] == placement)
                 & (df["prefetch"].astype(str) == prefetch) & (df["metric"] == "step_ms")]
        if sel.empty:
            continue
        r = sel.iloc[0]
        try:
            cfg = parse_config(r["config"])
            depth = parse_prefetch(prefetch, cfg.depth)
            io, adam_label = case_io(run_io, probes, cfg, placement, device, (adjacent or {}).get(
                (date, commit, device, str(r["config"]), placement, prefetch)))
            got = trace_rates(path, cfg.warmup, cfg.steps or None)
            rates = dict(io)
            rates.update(got)
            s_diag = simulate(cfg, placement, depth, tuple(sorted(rates.items())))
            s_pri = simulate(cfg, placement, depth, io)
        except ValueError:
            continue
        measured, what = float(r["value"]), "the median of the timed steps"
        if step_mean_rule(commit, date):  # the lead's rule: compared with the mean of the timed steps
            ts = timed_steps(path, cfg.warmup, cfg.steps)
            if ts:
                measured, what = 1e3 * sum(ts) / len(ts), f"the mean of the {len(ts)} timed steps"
        pred = s_diag["step_time_s"] * 1e3
        used = ", ".join(f"{DIAG_RATES[k]} {got[k] / (1e6 if k == 'cpu_adam' else 1e9):.4g} "
                         f"{'Mparams/s' if k == 'cpu_adam' else 'GB/s'}" for k in DIAG_RATES if k in got)
        out.append({"date": date, "commit": commit, "device": device, "config": r["config"], "placement": placement,
                    "prefetch": prefetch, "metric": "step_ms", "measured": measured, "predicted": pred,
                    "error": pred / measured - 1 if measured else float("nan"), "used_for_fitting": True,
                    "status": DIAGNOSTIC,
                    "note": (f"diagnostic, not a prediction (measured: {what}): simulated with this run's phase rates "
                             f"from {path.name} "
                             f"({used or 'no host phase: the a-priori inputs'}); the a-priori simulation gives "
                             f"{s_pri['step_time_s'] * 1e3:.1f} ms"),
                    "cpu_adam_input": (f"this run's trace: {got['cpu_adam'] / 1e6:.0f} Mparams/s" if "cpu_adam" in got
                                       else adam_label)})
    return out
