"""Offloaded training (issue 6): every row of ``results/bench/offload_train.csv`` beside its simulation.

``python -m simulator.validate_offload [--bench CSV] [--out CSV]`` writes
``results/validation/offload_train.csv`` (``date,commit,device,config,placement,prefetch,metric,measured,
predicted,error,used_for_fitting,status,note``); `rows` gives the same rows in `paper_repro.validate`'s
format for ``semoe validate`` (source ``offload``).

Bench schema: ``date,commit,device,config,placement,prefetch,metric,value``.

``config`` (parsed by `parse_config`, tolerant: tokens in any order, unknown tokens ignored, ``key=value``
and the compact ``L4 D2048`` style of ``results/bench/train.csv`` both accepted)::

    [name] L<layers> D<hidden> F<ffn> E<experts> k<top_k> B<micro batch> S<seq len> [H<heads>] [V<vocab>]
    [bf16|fp16|fp32] [steps<N>] [params<N>] [cache=<experts per layer>] [depth=<prefetch depth>]
    [budget=<GB>] [beta=<decay>] [K=<decay every>] [admit=<hits>] [skew=<lognormal sigma>] [preset=<name>]

    [warmup=<N>] [micro_batches=<N>] [<any ModelSpec field>=<value>, e.g. moe_every=1 capacity_factor=None tied_embeddings=True]

``name`` (first token that is not one of the above, e.g. ``paper-13.9b-scaled``) names the model preset the
sizes override (``-scaled`` dropped) when it is one; otherwise it is a label (e.g. ``a_compute_bound``) and
the base is ``preset=`` (default ``paper-13.9b``). A config that names no preset and gives no model field is
refused (``not_modelled``: the simulator would not know the model). ``key=value`` forms of the letters are
accepted too (``layers=4 hidden=2048 ffn=8192 experts=8 top_k=1 batch=8 seq=1024 heads=16 vocab=50304``);
any other ``ModelSpec`` field is accepted as ``field=value`` (None / True / False / numbers / words).
Heads default to ``hidden / 128`` when the sizes are overridden and ``H`` is not given. ``budget=<GB>``: the
GPU memory cap of the run (``torch.cuda.set_per_process_memory_fraction``), applied as the simulated GPU's
memory. ``steps`` and ``warmup``: the measured steps and the warm-up steps before them (the cache is
simulated over both; its hit rate is reported over the measured ones, as the bench's counters are).
`config_string` writes a config of this format for a `ModelSpec` (what the bench writer should call;
`parse_config` reads it back exactly).

``placement``: where expert states live. ``gpu`` (also ``hbm``, ``all-in-hbm``, ``none``): nothing offloaded;
``cpu`` (``cpu-offload``, ``dram``): expert params and optimizer states on the CPU; ``ssd``
(``ssd-offload``, ``nvme``, ``disk``): expert fp32 states on the SSD with the pinned CPU cache (``cache=``
experts per MoE layer, default 0; ignored for the other placements). ``prefetch``: ``on`` / ``off`` (also 1/0, true/false, yes/no)
or a depth; ``on`` means depth 1 unless ``depth=`` says otherwise, ``off`` depth 0 (fetch on demand).

Traces (``--traces``, default ``results/bench/offload``): the trace CSVs of one bench run and its
``run.json`` (date, commit, device). They add per-phase rows (``trace_cpu_adam_ms_per_step``,
``trace_ssd_{read,write}_{ms,gb}_per_step``: busy time and bytes per measured step on the host clock) beside
the simulated phases, and, for a run without the ``ssd_block_prep_GBps`` probe, that input measured in its
traces (`write_prep_rate`: the block bytes over the median gap between consecutive SSD writes on the
engine's I/O thread, where it serialises and checksums the next block; listed as an input row).

A-priori rule of task hB (written 2026-11-24 ~11:45 UTC, BEFORE the GPU run that first has these probes, and not
to be changed after its errors are seen): for a run whose probes carry the engine's thread layout (a
``cpu_threads_main`` row: from task hB on), a case's inputs are the run's probes run with the engine's own thread
layout and NOTHING beside them. CPU AdamW: the engine probe ``alone@worker`` of the case's gradient dtype and
nearest layer size, which from hB on runs on a worker thread with the engine's intra-op thread count (cores minus
the training and I/O threads, `reference.offload.cpu_adam.adam_threads`; the count read inside that worker is the
``cpu_threads_worker`` row, and the engine's own, read inside its optimizer thread, each case's ``threads_adam``
row). SSD: the engine's I/O cycle probe (`IO_CYCLE`: ``ssd_cycle_read_GBps`` / ``ssd_cycle_write_GBps`` /
``ssd_cycle_prep_GBps``: one thread reading blocks it wrote back one cycle before into fresh tensors, then writing
them back over their old versions, as the I/O thread does each step) where the run has it, else the block probes,
else the plain-file ones. The probes under synthetic loads (``gpu@worker``, ``gpu+pcie+ssd@worker``, their
``:tall`` twins with torch's default threads, the ``:t<N>`` thread sweep) and the SSD rates beside the update
(``ssd_beside_adam_*``) are diagnostics, never inputs. Older runs keep task hD2's rule below (the same code gives it
to them: they have no cycle probe, and their ``alone@worker`` ran with torch's default threads, as their engine
did). The A/B cases (label ``..._torch_threads``: the engine with torch's default threads) are listed, not
predicted.

A-priori rule of task hB3 (written 2026-11-24 ~13:00 UTC, BEFORE the GPU run that first has these probes, and not
to be changed after its errors are seen): the host's CPU AdamW rate drifts in time (2000 -> 1215 -> 1500-1860
Mparams/s within 60 s on one H100 lease, with the guest's steal time; results/bench/offload/host_probe), so from
task hB3 on the bench brackets each offloaded case (a and b, not the gpu placement, not the A/B twins) with the
engine probe ``alone@worker`` (the same call, thread role and intra-op thread count as the run's ``alone@worker``
rows, on the case's own layer shape and gradient dtype), run with the engine idle: ``before`` (the warm-up's updates
drained, right before the counted step) and ``after`` (the last timed step's updates drained). Rows: metric
``cpu_adam_adjacent_<position>_Mparams_per_s`` (`ADJACENT_RE`), config / placement / prefetch = the case's. A case
that has adjacent probes (same date, commit, device, config, placement, prefetch: `adjacent_probes`) takes as its
CPU AdamW input (``cpu_adam`` and ``cpu_adam_fp32grad``) the MEAN of all its adjacent probes (`adjacent_input`);
everything else (SSD, PCIe, the other cases) keeps the rules below. A case without them (every run before hB3, a
case whose probes failed: row ``adjacent_probe_error``) keeps the run-level rule of hB / hD2, unchanged. The adjacent
rows themselves are model inputs (status ``fitted``, compared with the simulator's own AdamW rate).

A-priori rule of task hH (written 2026-11-24 ~14:40 UTC, BEFORE the GPU run that first has these probes, and not
to be changed after its errors are seen): in b ssd on (run b57d4eb) the update ran at 0.62x its adjacent idle probes,
beside the busy SSD I/O thread, which no idle probe can see. From task hH on the bench brackets each ssd case (a and
b), right after each adjacent probe, with the contention probe (`reference.offload.bench.ContentionProbe`): the
engine's SSD I/O cycle alone (expert-state blocks read back into fresh tensors, then written back over their old
versions, on one I/O thread), then the case's AdamW call beside that thread's reads and beside its write-backs, and
those reads / writes beside the update; the update alone is the adjacent idle probe just taken. Rows: metric
``contention_<position>_<quantity>_<condition>_<unit>`` (`CONTENTION_RE`; ``adam`` in Mparams/s with conditions
``alone`` / ``beside_read`` / ``beside_write``, ``io_read`` / ``io_write`` / ``io_prep`` in GB/s with ``alone`` /
``beside``), config / placement / prefetch = the case's. A case that has them (`contention_probes`) takes, per
(quantity, condition) of `CONTENTION_FACTORS`, the MEAN over its probe positions of that value / the quantity's
``alone`` value at the same position (a position lacking either is skipped; factors as measured, not clipped:
`contention_input`) as the factors ``contention_cpu_adam_read`` / ``contention_cpu_adam_write`` /
``contention_disk_read`` / ``contention_disk_write`` / ``contention_ssd_write_prep`` of its simulation
(`simulator.workload.training`'s ``io_rates``): while the node's CPU update runs beside an SSD read (a write-back),
the update proceeds at its a-priori rate (the rule of hB3, unchanged) times the ``_read`` (``_write``) factor and
the read (each part of the write: prep, write) at its a-priori rate (hB's I/O cycle probe, unchanged) times its
factor; alone, each at its a-priori rate (a rate switch, `simulator.workload.host_share`). The diagnostic simulation
given a case's own trace rates takes no factors (the in-trace rates already contain the contention). A case without
contention probes (every run before hH, the cpu and gpu cases, a case whose probe failed: row
``contention_probe_error``) keeps its rules, unchanged. The contention rows are model inputs (used_for_fitting,
status ``not_modelled``: the simulator has no contention of its own).

A-priori rule of the lead (session 5, `results/validation/offload_step_mean_rule.md`, committed with 0eab4a0 before
its first run, implemented by task hH): for runs from `STEP_MEAN_RULE`'s commit on, each case's step time is scored
as ``step_ms_mean``: the mean duration of the case's timed steps, read from its trace's ``step`` rows (the same timed
steps over which the bench takes its ``step_ms`` median: `timed_steps`), and ``tokens_per_s_mean`` = tokens per step
(micro-batches x batch x seq) / that mean, both ``validated`` with the prediction of the median rows; the bench's
median ``step_ms`` / ``tokens_per_s`` rows of these runs are listed beside them with the same prediction and status
``derived`` (shown, not counted: `rows` passes them to ``semoe validate`` as ``derived``), so a case is scored once.
A case whose trace did not come back keeps its median rows validated. Older runs keep their rules. Outcome: in its
first run (0eab4a0) the mean scored b_over_budget ssd on +21.4% where the median scored +1.0%: the first timed step
after the engine's drain (``eng.wait()``) carries 23 SSD reads and 1 write-back instead of 24 and 24, a bench-window
transient the rule did not anticipate, so the simulated steady-state step is a median, not a mean, quantity for
I/O-bound cases. The rule stays applied to 0eab4a0 as registered and is withdrawn for later runs
(`STEP_MEAN_RULE_LAST`), which score the median rows again.

A-priori vs diagnostic (task hD2): the ``validated`` rows are predictions whose inputs are the run's probes only
(CPU AdamW: the engine probe with nothing beside the update, `ADAM_LOADS_APRIORI`; SSD: the engine's block read /
write / rewrite-prep probes where the run has them, else the plain-file and fresh-name ones). For every run with
traces (``--traces`` and its ``run_<commit>/`` subdirectories) each case is simulated once more GIVEN ITS OWN TRACE'S
PHASE RATES (`trace_rates`: CPU AdamW, SSD read, SSD write, block prep): ``step_ms`` rows of status ``diagnostic``
(this CSV only; `rows` leaves them out of ``semoe validate``), which test the scheduling / overlap model with the
rate model taken out.

Metrics: ``step_ms``, ``step_s``, ``tokens_per_s``, ``cpu_adam_ms_per_step``, ``ratio_vs_gpu`` (time),
``h2d_gb_per_step``, ``d2h_gb_per_step``, ``ssd_read_gb_per_step``, ``ssd_write_gb_per_step`` (bytes), ``peak_mem_gb`` (memory), ``hit_rate`` / ``cache_hit_rate``
(ratio, the LFU cache's hits / (hits + misses) over the measured steps); bandwidth probes (``*_GBps``) are
model inputs (status ``fitted``, compared with the simulator's bandwidth of that link), and the bench run's
own ``ssd_read_GBps`` / ``ssd_write_GBps`` / ``cpu_adam_Mparams_per_s`` / ``cpu_adam_fp32grad_Mparams_per_s`` /
``ssd_block_prep_GBps`` rows (same date, commit and device)
replace the profile's / cluster spec's rates in that run's simulations (``io_rates``); rows of placement
``-`` other than those describe the case (sizes) and are ``not_modelled``; anything else is listed as ``not_modelled``. The simulated
step is `simulator.workload.training.TrainingIteration` with ``impl="reference"`` (the reference
trainer's fp32-master / autocast / foreach-AdamW overheads) on the ``h100-single`` preset (the kernel
profile is read automatically); nothing is fitted to these rows.

Byte and counter rows (task hF): ``h2d_gb_per_step`` is the simulated copy schedule (`copy_schedule`) times the
experts the run's router sent tokens to, per counted step and layer (`trace_routing`: the cache events in the case's
trace, under ``--traces`` or a raw run folder beside it, `routing_dirs`); a case without that record shows the
a-priori value as ``not_modelled``. Counter rows of a bench whose counter window was still wrong are status
``measurement_bug`` by a rule on the run's commit (`measurement_bug`: `COUNTER_OPEN_FIX`, `PROFILE_STEP_FIX`);
`rows` passes them to ``semoe validate`` as ``not_modelled`` with the note ``measurement_bug: ...``.

Code by concept: `simulator.validate_offload_case` (the config format, the case's `Run` and its simulated step),
`simulator.validate_offload_inputs` (the a-priori input rules above: the run's probes, the engine / adjacent AdamW
probes, the contention factors, the reference code by commit, the step-mean rule), `simulator.validate_offload_traces`
(trace windows, phases and rates; the per-phase, step-mean and diagnostic rows), `simulator.validate_offload_bytes`
(the byte and counter rows) and `simulator.validate_offload_report` (the markdown tables and the plot). This module
keeps `compare`, `rows` and the CLI, and re-exports the public names of the others.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

# the public names of this module, defined by concept in its siblings (simulator.validate_offload_*)
from simulator.validate_offload_bytes import (  # noqa: F401  (public names of this module)
    ASYNC_COUNTERS,
    COUNTER_METRICS,
    COUNTER_OPEN_FIX,
    MEASUREMENT_BUG,
    PROFILE_STEP_FIX,
    PROFILED_CASES,
    ROUTED_METRICS,
    _routed,
    copy_schedule,
    measurement_bug,
    routed_h2d_gb,
    routing_dirs,
    routing_traces,
    trace_routing,
)
from simulator.validate_offload_case import (  # noqa: F401  (public names of this module)
    BYTES_METRICS,
    DTYPES,
    MEMORY_METRICS,
    PLACEMENTS,
    RATIO_METRICS,
    TIME_METRICS,
    OffloadConfig,
    _predict,
    build_run,
    config_string,
    parse_config,
    parse_placement,
    parse_prefetch,
    simulate,
)
from simulator.validate_offload_inputs import (  # noqa: F401  (public names of this module)
    AB_SUFFIX,
    ADAM_LOADS_APRIORI,
    ADJACENT_RE,
    CONTENTION_FACTORS,
    CONTENTION_RE,
    DERIVED,
    ENGINE_ADAM,
    FUSED_ADAMW_COMMIT,
    FUSED_ADAMW_DATE,
    GROUPED_CAST_COMMIT,
    GROUPED_CAST_DATE,
    INPUT_METRICS,
    IO_CYCLE,
    IO_INPUTS,
    STEP_MEAN_METRICS,
    STEP_MEAN_RULE,
    STEP_MEAN_RULE_LAST,
    THREAD_DIAGNOSTICS,
    _input,
    adam_input,
    adjacent_input,
    adjacent_probes,
    apriori_loads,
    case_io,
    commit_contains,
    contention_input,
    contention_probes,
    engine_adam_probes,
    layer_size,
    run_inputs,
    run_options,
    step_mean_rule,
)
from simulator.validate_offload_report import (  # noqa: F401  (public names of this module)
    MD_BEGIN,
    MD_END,
    markdown_tables,
    plot,
    write_markdown,
)
from simulator.validate_offload_traces import (  # noqa: F401  (public names of this module)
    DIAG_RATES,
    DIAGNOSTIC,
    TRACE_LABELS,
    TRACE_METRICS,
    _diagnostic_rows,
    _step_mean_row,
    _trace_rows,
    queued_write_gaps,
    timed_steps,
    trace_dirs,
    trace_phases,
    trace_rates,
    trace_run,
    trace_window,
    write_prep_rate,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "results" / "bench" / "offload_train.csv"
OUT = ROOT / "results" / "validation" / "offload_train.csv"
TRACES = ROOT / "results" / "bench" / "offload"  # trace_<a|b>_<placement>_<on|off>.csv + run.json of one bench run
BENCH_COLUMNS = ("date", "commit", "device", "config", "placement", "prefetch", "metric", "value")
OUT_COLUMNS = ("date", "commit", "device", "config", "placement", "prefetch", "metric", "measured", "predicted",
               "error", "used_for_fitting", "status", "note", "cpu_adam_input")


def compare(bench: Path | pd.DataFrame = BENCH, traces: Path | None = TRACES) -> pd.DataFrame:  # noqa: F821
    """One output row (`OUT_COLUMNS`) per bench row, then (``traces``: the directory of one run's traces and
    its ``run.json``) per-phase rows from the traces (``trace_*`` metrics) beside the simulated phases."""
    import pandas as pd  # here, not at import: reference.offload.bench imports `config_string` on the GPU box

    df = bench if isinstance(bench, pd.DataFrame) else pd.read_csv(bench, dtype={"date": str, "commit": str, "device": str})
    missing = set(BENCH_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"validate_offload: bench file lacks column(s) {', '.join(sorted(missing))}")
    out = []
    # measured SSD and CPU-optimizer rates of each bench run and its reference code: inputs of its simulations
    inputs = run_inputs(df)
    probes = engine_adam_probes(df)
    adjacent = adjacent_probes(df)  # task hB3: each case's own AdamW probes, before and after it
    contention = contention_probes(df)  # task hH: each ssd case's AdamW and I/O, alone and beside each other
    routed = routing_traces(traces)  # each traced case's routing record (H2D rows, `ROUTED_METRICS`)
    runs = set(zip(df["date"], df["commit"], df["device"]))
    # a run without the block-prep probe (before it existed): the same quantity measured in its own traces
    run_of_traces = trace_run(traces)
    if run_of_traces not in runs:  # traces of another run (or none): nothing to add
        run_of_traces = None
    prep_note = ""
    prep_check = None
    if run_of_traces is not None:
        got = write_prep_rate(traces)
        probe = inputs.get(run_of_traces, {}).get("ssd_write_prep")
        if got is not None and probe is None:
            inputs.setdefault(run_of_traces, {})["ssd_write_prep"] = got[0]
            prep_note = (f"; ssd_write_prep {got[0] / 1e9:.3g} GB/s from the run's traces (median of {got[1]} "
                         "queued write-to-write gaps on the I/O thread: rename over the old version + crc32)")
        elif got is not None:  # the isolated probe (the input) beside what the engine's I/O thread showed
            prep_check = (got, probe)
    for r in df.itertuples(index=False):
        base = {k: getattr(r, k) for k in ("date", "commit", "device", "config", "placement", "prefetch", "metric")}
        io = tuple(sorted(inputs.get((r.date, r.commit, r.device), {}).items()))
        measured = float(r.value)
        row = dict(base, measured=measured, predicted=float("nan"), error=float("nan"), used_for_fitting=False,
                   status="not_modelled", note="", cpu_adam_input="")
        if r.metric in INPUT_METRICS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pred = _input(r.metric)
            note = ("model input (same-run probe), used_for_fitting: predicted is the simulator's own rate of this "
                    "link (cluster preset / profile / assumption)")
            if r.metric == ENGINE_ADAM and str(r.placement) not in apriori_loads(r.device):
                row["note"] = (f"the engine's per-layer AdamW probed under the synthetic load '{r.placement}': a "
                               "diagnostic of the probe, not an input (the a-priori rule takes the first of "
                               f"{', '.join(apriori_loads(r.device))} the run has; see offload_train.md)")
                out.append(row)
                continue
            if r.metric == ENGINE_ADAM:
                note += (f"; the engine's per-layer AdamW with nothing beside it ('{r.placement}'): the simulations "
                         "of this run's cases of that layer size and gradient dtype use it (a-priori rule: the first "
                         f"of {', '.join(apriori_loads(r.device))} the run has)")
            if r.metric in IO_INPUTS:
                note += "; this run's simulations use the measured value instead (io_rates)"
            if math.isnan(pred):  # an input the simulator has no rate of its own for (charged only when measured)
                row.update(status="not_modelled", used_for_fitting=True,
                           note=note.split(", used_for_fitting")[0] + "; the simulator has no default for it (no cost "
                           "without a measurement)" + ("; this run's simulations use it (io_rates)"
                                                       if r.metric in IO_INPUTS else ""))
            else:
                row.update(predicted=pred, error=pred / measured - 1 if measured else float("nan"), status="fitted",
                           used_for_fitting=True, note=note)
            out.append(row)
            continue
        if r.metric in THREAD_DIAGNOSTICS:
            row["note"] = ("the SSD I/O thread's block rate while the engine's AdamW ran beside it (load in placement): "
                           "a diagnostic of the host threads' contention, not an input" if r.metric.startswith("ssd_")
                           else "an intra-op thread count read back inside the thread (task hB): describes the "
                           "run's thread layout")
            out.append(row)
            continue
        if ADJACENT_RE.match(str(r.metric)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pred = _input(ENGINE_ADAM)
            row.update(predicted=pred, error=pred / measured - 1 if measured else float("nan"), status="fitted",
                       used_for_fitting=True,
                       note="model input (task hB3): the engine's per-layer AdamW ('alone@worker') probed right "
                            f"{r.metric.split('_')[3]} this case, on its layer shape and gradient dtype; this case's "
                            "simulations use the mean of its adjacent probes; predicted is the simulator's own AdamW "
                            "rate (assumption)")
            out.append(row)
            continue
        m = CONTENTION_RE.match(str(r.metric))
        if m:
            what = ({"alone": "the update alone", "beside": "the update beside the SSD I/O",
                     "beside_read": "the update beside the I/O thread's reads",
                     "beside_write": "the update beside the I/O thread's write-backs"}[m[3]] if m[2] == "adam" else
                    f"the SSD I/O's {m[2].removeprefix('io_')} {'beside the update' if m[3] == 'beside' else 'alone'}")
            row.update(used_for_fitting=True, note=(
                f"model input (task hH): contention probe {m[1]} this case, {what}; this case's simulations take the "
                "mean over its probes of beside / alone per quantity as the rate factor while the update and the "
                "SSD I/O both run (the simulator has no contention of its own: no prediction)"))
            out.append(row)
            continue
        if r.metric == "contention_probe_error":
            row["note"] = "a contention probe of this case that failed (see the bench log): not an input"
            out.append(row)
            continue
        if r.metric == "adjacent_probe_error":
            row["note"] = "an adjacent AdamW probe of this case that failed (see the bench log): not an input"
            out.append(row)
            continue
        if str(r.config).split(" ", 1)[0].endswith(AB_SUFFIX):
            row["note"] = ("A/B case: the same configuration with the engine's AdamW on torch's default threads (one "
                           "per core, the engine before task hB); listed beside the case, not predicted")
            out.append(row)
            continue
        if str(r.config).startswith("cpu_adam_engine"):  # (a probe's error row: its load failed)
            row["note"] = "engine AdamW probe that did not complete under this load (see the bench log)"
            out.append(row)
            continue
        if str(r.placement).strip() in ("-", ""):
            row["note"] = "describes the bench case (sizes), not a measurement of a placement"
            out.append(row)
            continue
        try:
            cfg = parse_config(r.config)
            depth = parse_prefetch(r.prefetch, cfg.depth)
            case = (r.date, r.commit, r.device, str(r.config), str(r.placement), str(r.prefetch))
            io, adam_label = case_io(io, probes.get((r.date, r.commit, r.device), {}), cfg, r.placement, r.device,
                                     adjacent.get(case), contention.get(case))
            row["cpu_adam_input"] = adam_label
            s = simulate(cfg, r.placement, depth, io)
        except ValueError as e:
            row["note"] = str(e)
            out.append(row)
            continue
        pred = _predict(s, r.metric, cfg, r.placement, io)
        if pred is None:
            row["note"] = f"metric {r.metric!r}: no simulator model"
        elif r.metric in RATIO_METRICS and not s["cache_enabled"]:
            row["note"] = "no CPU cache in this plan (cache=0 or nothing offloaded)"
        else:
            err = pred / measured - 1 if measured and not math.isnan(pred) else float("nan")
            note = f"simulated step {s['step_time_s'] * 1e3:.1f} ms"
            if s["oom"]:
                note += f"; simulator reports OOM: {s['oom']}"
            if s["cache_enabled"]:
                note += f"; cache hit rate {s['cache_hit_rate']:.2f}"
            rates = [(k, v) for k, v in io if not k.startswith("_")]
            if rates:
                note += "; measured inputs: " + ", ".join(f"{k} x{v:.3g}" if k.startswith("contention_") else
                                                          f"{k} {v:.3g}/s" for k, v in rates)
            note += "; reference: " + ", ".join(f"{k[1:]} {v}" for k, v in io if k.startswith("_"))
            if adam_label:
                note += f"; CPU AdamW input: {adam_label}"
            status = "validated"
            if r.metric in ROUTED_METRICS:
                pred, status, why = _routed(pred, cfg, r.placement, depth, io, routed.get(
                    (r.date, r.commit, r.device, str(r.config).split(" ", 1)[0], str(r.placement), str(r.prefetch))))
                note = f"{why}; {note}"
                err = pred / measured - 1 if measured and not math.isnan(pred) else float("nan")
            bug = measurement_bug(r.commit, r.date, r.config, r.placement, r.prefetch, r.metric)
            if bug:
                status, note = MEASUREMENT_BUG, f"{bug}; {note}"
            row.update(predicted=pred, error=err, status=status, note=note)
            twin = _step_mean_row(row, cfg, routed.get((r.date, r.commit, r.device, str(r.config).split(" ", 1)[0],
                                                        str(r.placement), str(r.prefetch))))
            if twin is not None:
                out.append(row)
                row = twin
        out.append(row)
    if run_of_traces is not None:
        prep = inputs.get(run_of_traces, {}).get("ssd_write_prep")
        if prep_note and prep:
            date, commit, device = run_of_traces
            out.append({"date": date, "commit": commit, "device": device, "config": "bandwidth", "placement": "ssd",
                        "prefetch": "-", "metric": "ssd_block_prep_GBps", "measured": prep / 1e9,
                        "predicted": float("nan"), "error": float("nan"), "used_for_fitting": True,
                        "status": "not_modelled",
                        "note": "model input derived from the run's traces (no probe in that run; the simulator has "
                                "no default for it)" + prep_note})
        if prep_check is not None:
            (gap_rate, n), probe = prep_check
            date, commit, device = run_of_traces
            out.append({"date": date, "commit": commit, "device": device, "config": "bandwidth", "placement": "ssd",
                        "prefetch": "-", "metric": "trace_ssd_block_prep_GBps", "measured": gap_rate / 1e9,
                        "predicted": probe / 1e9, "error": probe / gap_rate - 1, "used_for_fitting": False,
                        "status": "validated",
                        "note": f"measured: block bytes over the median of {n} queued write-to-write gaps in the "
                                "traces (`queued_write_gaps`: rename over the old version + crc32, in place); "
                                "predicted: the run's block-prep probe that its simulations use "
                                "(ssd_block_rewrite_prep_GBps where the run has it, else ssd_block_prep_GBps, whose "
                                "renames went to fresh names: no unlink of an old version)"})
        out += _trace_rows(df, traces, run_of_traces, inputs, prep_note, probes.get(run_of_traces, {}), adjacent,
                           contention)
    for d in trace_dirs(traces):  # every run with traces: the step given its own measured phase rates
        run = trace_run(d)
        if run in runs:
            out += _diagnostic_rows(df, d, run, inputs, probes.get(run, {}), adjacent)
    res = pd.DataFrame(out, columns=list(OUT_COLUMNS))
    res["cpu_adam_input"] = res["cpu_adam_input"].fillna("")
    return res


def rows(path: Path | str = BENCH) -> list[dict]:
    """Rows for ``semoe validate`` (`paper_repro.validate._row` format, source ``offload``)."""
    from paper_repro.validate import _row

    res = []
    for r in compare(Path(path)).itertuples(index=False):
        kind = ("ratio" if r.metric in RATIO_METRICS else
                "bytes" if r.metric in BYTES_METRICS or r.metric.endswith("_gb_per_step") else
                "memory" if r.metric in MEMORY_METRICS else "time")
        run = f"{r.commit} {r.date}"
        metric = f"{r.placement} prefetch={r.prefetch} {r.metric}"
        if r.status == DIAGNOSTIC:  # inputs measured in the very run compared with: not a prediction
            continue
        if r.status in ("validated", "fitted"):
            res.append(_row("offload", run, r.config, metric, r.measured, r.predicted, note=r.note, kind=kind,
                            status=r.status, fitted=bool(r.used_for_fitting)))
        elif r.status == DERIVED:  # a median step row scored through its mean twin (`STEP_MEAN_RULE`)
            res.append(_row("offload", run, r.config, metric, r.measured, r.predicted, note=r.note, kind=kind,
                            status="derived"))
        elif r.status == MEASUREMENT_BUG:  # a bench defect fixed later (`measurement_bug`): shown, not scored
            res.append(_row("offload", run, r.config, metric, r.measured, r.predicted, status="not_modelled",
                            note=f"{MEASUREMENT_BUG}: {r.note}", kind=kind))
        else:
            res.append(_row("offload", run, r.config, metric, r.measured, status="not_modelled", note=r.note,
                            kind=kind))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", type=Path, default=BENCH)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--traces", type=Path, default=TRACES, help="one bench run's traces and run.json ('' for none)")
    p.add_argument("--png", type=Path, default=None, help="plot (default: --out with .png)")
    p.add_argument("--md", type=Path, default=None,
                   help="markdown whose generated tables are refreshed (default: --out with .md; '' for none)")
    a = p.parse_args(argv)
    if not a.bench.is_file():
        print(f"validate_offload: no bench file {a.bench} (the GPU run writes it)")
        return 1
    df = compare(a.bench, a.traces if str(a.traces) not in ("", ".") else None)
    from semoe.io import atomic_write_text

    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, df.to_csv(index=False, float_format="%.6g"))
    v = df[df["status"] == "validated"]
    print(df[["config", "placement", "prefetch", "metric", "measured", "predicted", "error"]].to_string(index=False))
    if len(v):
        print(f"{len(v)} validated rows: MAPE {v['error'].abs().mean():.1%}, max {v['error'].abs().max():.1%} -> {a.out}")
    md = a.out.with_suffix(".md") if a.md is None else a.md
    if str(md) not in ("", "."):
        write_markdown(df, md)
        print(f"tables -> {md}")
    png = a.png or a.out.with_suffix(".png")
    if plot(df, png):
        print(f"plot -> {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
