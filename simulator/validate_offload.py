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
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "results" / "bench" / "offload_train.csv"
OUT = ROOT / "results" / "validation" / "offload_train.csv"
BENCH_COLUMNS = ("date", "commit", "device", "config", "placement", "prefetch", "metric", "value")
OUT_COLUMNS = ("date", "commit", "device", "config", "placement", "prefetch", "metric", "measured", "predicted",
               "error", "used_for_fitting", "status", "note", "cpu_adam_input")
TIME_METRICS = ("step_ms", "step_s", "tokens_per_s", "cpu_adam_ms_per_step", "ratio_vs_gpu")
RATIO_METRICS = ("hit_rate", "cache_hit_rate")
BYTES_METRICS = ("h2d_gb_per_step", "d2h_gb_per_step", "ssd_read_gb_per_step", "ssd_write_gb_per_step")
MEMORY_METRICS = ("peak_mem_gb",)
INPUT_METRICS = ("h2d_pinned_GBps", "d2h_pinned_GBps", "ssd_read_GBps", "ssd_write_GBps", "cpu_adam_Mparams_per_s",
                 "cpu_adam_fp32grad_Mparams_per_s", "ssd_block_prep_GBps", "cpu_adam_engine_Mparams_per_s",
                 "ssd_block_read_GBps", "ssd_block_write_GBps", "ssd_block_rewrite_prep_GBps", "ssd_cycle_read_GBps",
                 "ssd_cycle_write_GBps", "ssd_cycle_prep_GBps")
# task hB: the engine's I/O cycle probe (reference.offload.bench.measure_ssd_cycle) wins over the block probes, which
# win over the plain-file ones: io_rates key of the probe -> the key the simulation reads
IO_CYCLE = {"disk_read_cycle": "disk_read", "disk_write_cycle": "disk_write", "ssd_write_prep_cycle": "ssd_write_prep"}
# diagnostics of the engine's host threads (task hB), listed with a note: the SSD I/O thread's rates while the update
# ran beside it (bench.SSD_BESIDE_ADAM), the thread counts the engine read back inside its threads
THREAD_DIAGNOSTICS = ("ssd_beside_adam_read_GBps", "ssd_beside_adam_write_GBps", "threads_main", "threads_adam",
                      "threads_io", "cpu_threads_main", "cpu_threads_worker", "cpu_threads")
AB_SUFFIX = "_torch_threads"  # reference.offload.bench.AB_SUFFIX: A/B cases with the engine's AdamW on torch's threads
# the engine's per-layer CPU AdamW (reference.offload.bench.measure_engine_adam): config ``cpu_adam_engine E<n>
# P<n> grad=<bf16|fp32>``, placement = the load it ran under; `adam_input` picks one per simulated case
ENGINE_ADAM = "cpu_adam_engine_Mparams_per_s"
# The a-priori rule (fixed in task hD2 before any step-time error was looked at, see offload_train.md): a case's
# CPU AdamW input is its run's engine probe with NOTHING beside the update, on the engine's own thread role when
# the run has it (``alone@worker``: the update on a worker thread, as ``ExpertOffload._worker`` runs it), else on
# the main thread (``alone``). The probes under synthetic loads (``gpu``, ``gpu+pcie``, ...) measured 10x below
# the engine's in-run rate in run 0252961, so they are diagnostics of the probe, never inputs.
ADAM_LOADS_APRIORI = ("alone@worker", "alone")


def apriori_loads(device: str) -> tuple[str, ...]:
    """`ADAM_LOADS_APRIORI`, or ``("alone",)`` for a run on the CPU (its engine runs updates inline, on the main
    thread)."""
    return ("alone",) if str(device).strip().lower() == "cpu" else ADAM_LOADS_APRIORI
# bench rows of the same run (date, commit, device) that the simulation takes as inputs: metric -> io_rates key
IO_INPUTS = {"ssd_read_GBps": ("disk_read", 1e9), "ssd_write_GBps": ("disk_write", 1e9),
             "cpu_adam_Mparams_per_s": ("cpu_adam", 1e6), "cpu_adam_fp32grad_Mparams_per_s": ("cpu_adam_fp32grad", 1e6),
             "ssd_block_prep_GBps": ("ssd_write_prep", 1e9),
             # the engine's own timed block read (fresh buffer + crc32 check): replaces ssd_read_GBps where a run has it
             "ssd_block_read_GBps": ("disk_read_block", 1e9),
             # the engine's timed block write (SSDStore's temp file: create + write + fsync) and the host work
             # between two write-backs when each replaces the block's previous version (crc32 + the rename that
             # unlinks the old file): what every engine write-back does; they replace ssd_write_GBps /
             # ssd_block_prep_GBps (whose probe renamed to fresh names) where a run has them
             "ssd_block_write_GBps": ("disk_write_block", 1e9),
             "ssd_block_rewrite_prep_GBps": ("ssd_write_prep_rewrite", 1e9),
             # task hB: the engine's I/O cycle (reads of the blocks written one cycle before, then write-backs over
             # them, one thread): wins over the block probes where a run has it (`IO_CYCLE`)
             "ssd_cycle_read_GBps": ("disk_read_cycle", 1e9), "ssd_cycle_write_GBps": ("disk_write_cycle", 1e9),
             "ssd_cycle_prep_GBps": ("ssd_write_prep_cycle", 1e9)}
# a run's own rates taken from its traces for the diagnostic simulation (`trace_rates`): io_rates key -> label
DIAG_RATES = {"cpu_adam": "CPU AdamW", "disk_read": "SSD read", "disk_write": "SSD write",
              "ssd_write_prep": "block prep"}
TRACES = ROOT / "results" / "bench" / "offload"  # trace_<a|b>_<placement>_<on|off>.csv + run.json of one bench run
TRACE_LABELS = {"a": "a_compute_bound", "b": "b_over_budget"}
PLACEMENTS = {"gpu": "gpu", "hbm": "gpu", "all-in-hbm": "gpu", "none": "gpu", "cpu": "cpu", "cpu-offload": "cpu",
              "dram": "cpu", "ssd": "ssd", "ssd-offload": "ssd", "nvme": "ssd", "disk": "ssd"}
_LETTERS = {"L": "layers", "D": "hidden", "F": "ffn", "E": "experts", "k": "top_k", "B": "batch", "S": "seq",
            "H": "heads", "V": "vocab"}
_KEYS = {"layers", "hidden", "ffn", "experts", "top_k", "batch", "seq", "heads", "vocab", "steps", "params",
         "cache", "depth", "budget", "beta", "K", "admit", "skew", "preset", "warmup", "micro_batches"}
_KEY_ALIASES = {"k": "top_k", "topk": "top_k", "b": "batch", "s": "seq", "l": "layers", "d": "hidden", "f": "ffn",
                "e": "experts", "h": "heads", "v": "vocab", "cache_experts": "cache", "prefetch_depth": "depth",
                "budget_gb": "budget", "decay": "beta", "decay_every": "K", "admit_hits": "admit",
                "mb": "micro_batches", "accum": "micro_batches", "microbatches": "micro_batches"}
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class OffloadConfig:
    preset: str = "paper-13.9b"
    layers: int | None = None
    hidden: int | None = None
    ffn: int | None = None
    experts: int | None = None
    top_k: int | None = None
    heads: int | None = None
    vocab: int | None = None
    dtype: str | None = None
    batch: int = 8
    seq: int = 1024
    steps: int = 20
    params: int | None = None
    cache: int = 0
    depth: int | None = None
    budget_gb: float | None = None
    beta: float | None = None
    decay_every: int | None = None
    admit: float | None = None
    skew: float | None = None
    warmup: int = 0
    micro_batches: int = 1  # gradient-accumulation micro-batches per optimizer step (of ``batch`` sequences)
    spec: tuple = ()  # other ModelSpec fields: ((name, value), ...)


def parse_config(config: str) -> OffloadConfig:
    """The config string of a bench row -> `OffloadConfig` (format in the module docstring)."""
    import dataclasses

    from semoe.model_spec import ModelSpec

    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"name"}
    vals: dict = {}
    spec: dict = {}
    name = None
    for tok in str(config).replace(",", " ").split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            if k not in _KEYS:
                k = _KEY_ALIASES.get(k, _KEY_ALIASES.get(k.lower(), k))
            if k in _KEYS:
                vals[k] = v
            elif k in spec_fields:
                spec[k] = _value(v)
        elif tok in DTYPES:
            vals["dtype"] = tok
        elif (m := re.fullmatch(r"(steps|params|warmup)(\d+)", tok)):
            vals[m[1]] = m[2]
        elif (m := re.fullmatch(r"([LDFEkBSHV])(\d+)", tok)):
            vals[_LETTERS[m[1]]] = m[2]
        elif name is None and re.fullmatch(r"[A-Za-z][\w.\-]*", tok) and not re.fullmatch(r"(lr|world|ep|bucket|zero)\S*", tok):
            name = tok
    from semoe.presets import MODEL_PRESETS

    base = name.removesuffix("-scaled") if name else None
    if "preset" in vals:
        base = vals.pop("preset").removesuffix("-scaled")
    elif base not in MODEL_PRESETS:
        sized = {"layers", "hidden", "ffn", "experts"} & set(vals)
        if name is not None and not sized and not spec:
            raise ValueError(f"validate_offload: config {config!r} names no model preset and no model sizes "
                             "(write it with simulator.validate_offload.config_string)")
        base = "paper-13.9b"
    out: dict = {"preset": base, "spec": tuple(sorted(spec.items()))}
    ints = ("layers", "hidden", "ffn", "experts", "top_k", "heads", "vocab", "batch", "seq", "steps", "params",
            "cache", "depth", "warmup", "micro_batches")
    try:
        for k in ints:
            if k in vals:
                out[k] = int(float(vals[k]))
        if "budget" in vals:
            out["budget_gb"] = float(vals["budget"].removesuffix("GB").removesuffix("G"))
        for k, field in (("beta", "beta"), ("admit", "admit"), ("skew", "skew")):
            if k in vals:
                out[field] = float(vals[k])
        if "K" in vals:
            out["decay_every"] = int(vals["K"])
    except ValueError as e:
        raise ValueError(f"validate_offload: bad value in config {config!r}: {e}") from None
    if "dtype" in vals:
        out["dtype"] = vals["dtype"]
    return OffloadConfig(**out)


def _value(v: str):
    low = v.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    return v


def config_string(spec, batch: int, seq: int, *, label: str | None = None, base: str = "tiny", steps: int = 0,
                  warmup: int = 0, cache: int = 0, budget_gb: float | None = None, micro_batches: int = 1) -> str:
    """A bench ``config`` for ``spec`` that `parse_config` reads back exactly: ``label`` (default the spec's
    name), ``preset=<base>``, the compact sizes, then every other field that differs from the base preset."""
    import dataclasses

    from semoe.presets import model_preset

    ref = model_preset(base)
    toks = [label or spec.name, f"preset={base}", f"L{spec.layers}", f"D{spec.hidden}", f"F{spec.ffn}",
            f"E{spec.experts}", f"k{spec.top_k}", f"H{spec.heads}", f"V{spec.vocab}", spec.dtype, f"B{batch}",
            f"S{seq}"]
    done = {"name", "layers", "hidden", "ffn", "experts", "top_k", "heads", "vocab", "dtype"}
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if f.name not in done and v != getattr(ref, f.name):
            toks.append(f"{f.name}={v}")
    for key, val in (("steps", steps), ("warmup", warmup), ("cache", cache),
                     ("micro_batches", micro_batches if micro_batches > 1 else 0)):
        if val:
            toks.append(f"{key}={val}")
    if budget_gb is not None:
        toks.append(f"budget={budget_gb:g}")
    return " ".join(toks)


def parse_placement(placement: str) -> str:
    key = str(placement).strip().lower()
    if key not in PLACEMENTS:
        raise ValueError(f"validate_offload: unknown placement {placement!r}; one of {', '.join(sorted(PLACEMENTS))}")
    return PLACEMENTS[key]


def parse_prefetch(prefetch, depth: int | None) -> int:
    s = str(prefetch).strip().lower()
    if s in ("-", ""):
        return 0
    if s in ("on", "true", "yes", "y"):
        return depth if depth else 1
    if s in ("off", "false", "no", "n", "none"):
        return 0
    try:
        return max(0, int(float(s)))
    except ValueError:
        raise ValueError(f"validate_offload: prefetch must be on/off or a depth, got {prefetch!r}") from None


def build_run(cfg: OffloadConfig, placement: str, depth: int):
    from semoe import Run, Workload, cluster_preset, sizing
    from semoe.plan_spec import OffloadPlacement, ParallelPlan
    from semoe.presets import GB, model_preset

    try:
        m = model_preset(cfg.preset)
    except Exception as e:  # noqa: BLE001  (SpecError: unknown preset)
        raise ValueError(f"validate_offload: {e}") from None
    over = {k: getattr(cfg, k) for k in ("layers", "hidden", "ffn", "experts", "top_k", "vocab", "dtype", "heads")
            if getattr(cfg, k) is not None}
    over.update(dict(cfg.spec))
    if over:
        if "heads" not in over and "hidden" in over:
            over["heads"] = max(1, over["hidden"] // 128)
        try:
            m = m.replace(**over, name=f"{m.name}-scaled")
        except Exception as e:  # noqa: BLE001  (SpecError: an inconsistent model)
            raise ValueError(f"validate_offload: {e}") from None
    if cfg.params is not None and sizing.count_params(m).total != cfg.params:
        raise ValueError(f"validate_offload: rebuilt model has {sizing.count_params(m).total} parameters, "
                         f"the config says {cfg.params}")
    tier = parse_placement(placement)
    pol = {k: v for k, v in (("cache_decay", cfg.beta), ("cache_decay_every", cfg.decay_every),
                             ("cache_admit_hits", cfg.admit)) if v is not None}
    off = OffloadPlacement() if tier == "gpu" else OffloadPlacement(expert_params=tier, expert_optimizer=tier)
    # the CPU cache sits in front of the SSD: only the ssd placement has one (as reference.offload.bench)
    plan = ParallelPlan(offload=off, prefetch_depth=depth, cpu_cache_experts=cfg.cache if tier == "ssd" else 0, **pol)
    cluster = cluster_preset("h100-single")
    if cfg.budget_gb is not None:
        cluster = cluster.replace(gpu=cluster.gpu.replace(memory_bytes=int(cfg.budget_gb * GB)))
    wl = {"routing": "lognormal", "routing_skew": cfg.skew} if cfg.skew else {}
    return Run(model=m, cluster=cluster, plan=plan, workload=Workload(
        micro_batch=cfg.batch, seq_len=cfg.seq, micro_batches=max(cfg.micro_batches, 1),
        steps=max(cfg.steps, 1) + cfg.warmup, **wl))


_SIM_CACHE: dict = {}
FUSED_ADAMW_COMMIT = "42307ef"  # reference.train.make_optimizer: fused AdamW on CUDA from this commit on
FUSED_ADAMW_DATE = "2026-11-24T06:40:00Z"  # fallback without git: its first bench rows (4efec81) are later
GROUPED_CAST_COMMIT = "676c520"  # GroupedExperts casts to the autocast dtype (torch._grouped_mm, not the loop)
GROUPED_CAST_DATE = "2026-11-24T06:50:00Z"  # fallback without git: 676c520's first bench rows are later


def commit_contains(ancestor: str, commit: str, date: str, fallback_date: str) -> bool:
    """Whether ``commit`` (a bench row's, ``+wip`` / ``-dirty`` suffixes ignored) contains ``ancestor``: git
    ancestry when the repository knows both, else the row's date against ``fallback_date`` (ISO strings)."""
    import re
    import subprocess

    c = re.split(r"[+-]", str(commit))[0]
    try:
        r = subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, c], cwd=Path(__file__).resolve().parent,
                           capture_output=True, timeout=10, check=False)
        if r.returncode in (0, 1):
            return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        pass
    return str(date) >= fallback_date


def run_options(commit: str, date: str) -> dict:
    """`TrainingIteration` options of the reference code a bench run executed: ``_ref_optimizer`` (fused AdamW
    from `FUSED_ADAMW_COMMIT`, else foreach) and ``_expert_impl`` (GPU-resident experts: torch._grouped_mm from
    `GROUPED_CAST_COMMIT`, else the fp32 loop fallback); keys start with ``_`` to keep them apart from rates."""
    fused = commit_contains(FUSED_ADAMW_COMMIT, commit, date, FUSED_ADAMW_DATE)
    grouped = commit_contains(GROUPED_CAST_COMMIT, commit, date, GROUPED_CAST_DATE)
    return {"_ref_optimizer": "fused" if fused else "foreach", "_expert_impl": "grouped" if grouped else "loop"}


def engine_adam_probes(df) -> dict[tuple, dict[tuple, float]]:
    """``(date, commit, device) -> {(E, P, grad, load): Mparams/s}`` from a bench frame's `ENGINE_ADAM` rows."""
    out: dict[tuple, dict[tuple, float]] = {}
    for r in df[df["metric"] == ENGINE_ADAM].itertuples(index=False):
        m = re.search(r"\bE(\d+)\s+P(\d+)\s+grad=(\w+)", str(r.config))
        if m:
            out.setdefault((r.date, r.commit, r.device), {})[(int(m[1]), int(m[2]), m[3], str(r.placement))] = float(
                r.value)
    return out


# task hB3: the engine probe ``alone@worker`` run right before / after one case (reference.offload.bench.adjacent_metric)
ADJACENT_RE = re.compile(r"^cpu_adam_adjacent_([a-z0-9]+)_Mparams_per_s$")


def adjacent_probes(df) -> dict[tuple, dict[str, float]]:
    """``(date, commit, device, config, placement, prefetch) -> {position: Mparams/s}`` from a bench frame's adjacent
    probe rows (`ADJACENT_RE`); a position probed twice keeps its mean."""
    got: dict[tuple, dict[str, list[float]]] = {}
    for r in df.itertuples(index=False):
        m = ADJACENT_RE.match(str(r.metric))
        if m:
            key = (r.date, r.commit, r.device, str(r.config), str(r.placement), str(r.prefetch))
            got.setdefault(key, {}).setdefault(m[1], []).append(float(r.value))
    return {k: {pos: sum(v) / len(v) for pos, v in d.items()} for k, d in got.items()}


def adjacent_input(adjacent: dict[str, float] | None) -> tuple[float, str] | None:
    """Task hB3's a-priori CPU AdamW input of a case with adjacent probes: the mean of them (parameters/s), and a
    label; None without any (positive) probe."""
    vals = {k: v for k, v in (adjacent or {}).items() if v > 0 and math.isfinite(v)}
    if not vals:
        return None
    mean = sum(vals.values()) / len(vals)
    parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(vals.items(), key=lambda kv: (kv[0] != "before", kv[0])))
    return mean * 1e6, f"adjacent probes of this case (mean of {parts}): {mean:.0f} Mparams/s"


# task hH: the case's AdamW and SSD I/O, alone and beside each other (reference.offload.bench.contention_metric)
CONTENTION_RE = re.compile(r"^contention_([a-z0-9]+)_(adam|io_read|io_write|io_prep)_(alone|beside(?:_read|_write)?)_"
                           r"(?:Mparams_per_s|GBps)$")
# (quantity, condition) of a contention row over its quantity's ``alone`` -> the simulation's io_rates factor
# (simulator.workload.training.CONTENTION_KEYS): the update beside the I/O thread's reads / write-backs (or beside
# either), each I/O part beside the update
CONTENTION_FACTORS = {("adam", "beside_read"): "contention_cpu_adam_read",
                      ("adam", "beside_write"): "contention_cpu_adam_write", ("adam", "beside"): "contention_cpu_adam",
                      ("io_read", "beside"): "contention_disk_read", ("io_write", "beside"): "contention_disk_write",
                      ("io_prep", "beside"): "contention_ssd_write_prep"}


def contention_probes(df) -> dict[tuple, dict[tuple[str, str, str], float]]:
    """``(date, commit, device, config, placement, prefetch) -> {(position, quantity, condition): value}`` from a
    bench frame's contention rows (`CONTENTION_RE`); a row repeated keeps the mean."""
    got: dict[tuple, dict[tuple, list[float]]] = {}
    for r in df.itertuples(index=False):
        m = CONTENTION_RE.match(str(r.metric))
        if m:
            key = (r.date, r.commit, r.device, str(r.config), str(r.placement), str(r.prefetch))
            got.setdefault(key, {}).setdefault((m[1], m[2], m[3]), []).append(float(r.value))
    return {k: {q: sum(v) / len(v) for q, v in d.items()} for k, d in got.items()}


def contention_input(probes: dict[tuple[str, str, str], float] | None) -> tuple[dict[str, float], str] | None:
    """Task hH's a-priori contention factors of a case: per (quantity, condition) of `CONTENTION_FACTORS`, the mean
    over its probe positions of that value / the quantity's ``alone`` value at the same position (positions lacking
    either, or with a non-positive / non-finite value, skipped) -> ``({io_rates key: factor}, label)``; None
    without any."""
    probes = probes or {}
    ratios: dict[tuple[str, str], list[float]] = {}
    for (pos, q, cond), v in sorted(probes.items()):
        if (q, cond) not in CONTENTION_FACTORS:
            continue
        alone = probes.get((pos, q, "alone"))
        if alone and alone > 0 and v > 0 and math.isfinite(alone) and math.isfinite(v):
            ratios.setdefault((q, cond), []).append(v / alone)
    if not ratios:
        return None
    order = list(CONTENTION_FACTORS)
    ratios = dict(sorted(ratios.items(), key=lambda kv: order.index(kv[0])))
    factors = {CONTENTION_FACTORS[k]: sum(v) / len(v) for k, v in ratios.items()}
    label = "contention (beside / alone, mean of " + ", ".join(
        f"{q} {cond} x{sum(v) / len(v):.2f} over {len(v)}" for (q, cond), v in ratios.items()) + ")"
    return factors, label


def layer_size(cfg: OffloadConfig) -> tuple[int, int]:
    """``(E, P)``: experts per MoE layer and parameters per expert of the configuration's model (the engine's
    per-expert flat vector: w1, w3 with SwiGLU, w2, and the biases when the model has them)."""
    m = build_run(cfg, "gpu", 0).model
    glu = m.activation == "swiglu"
    P = (3 if glu else 2) * m.hidden * m.ffn
    if m.bias:
        P += (2 if glu else 1) * m.ffn + m.hidden
    return m.experts, P


def adam_input(probes: dict[tuple, float], cfg: OffloadConfig, placement: str, device: str) -> tuple[float, str] | None:
    """The CPU AdamW rate (parameters/s) a simulated case takes from its run's engine probes, and a label saying
    which probe: the gradient dtype of the case (fp32 accumulators with ``micro_batches > 1``, else bf16), the
    first load of `ADAM_LOADS_APRIORI` the run probed (nothing beside the update), the probe's layer size nearest
    the case's (E x P; exact for the bench's own configurations). None: not offloaded, or no such probe."""
    tier = parse_placement(placement)
    if tier == "gpu" or not probes:
        return None
    grad = "fp32" if cfg.micro_batches > 1 else "bf16"
    for load in apriori_loads(device):
        cands = {k: v for k, v in probes.items() if k[2] == grad and k[3] == load}
        if cands:
            break
    else:
        return None
    E, P = layer_size(cfg)
    key = min(cands, key=lambda k: (abs(math.log(k[0] * k[1] / (E * P))), k))
    label = f"engine probe '{load}', E{key[0]} P{key[1]} grad={grad}: {cands[key]:.0f} Mparams/s"
    if key[:2] != (E, P):
        label += f" (nearest layer size to E{E} P{P})"
    return cands[key] * 1e6, label


def case_io(io: tuple, probes: dict[tuple, float], cfg: OffloadConfig, placement: str, device: str,
            adjacent: dict[str, float] | None = None, contention: dict | None = None) -> tuple[tuple, str]:
    """A case's simulation inputs: its run's ``io`` with the CPU AdamW rates (``cpu_adam`` and
    ``cpu_adam_fp32grad``) replaced by the mean of the case's own adjacent probes (``adjacent``, task hB3:
    `adjacent_input`) where it has them, else by `adam_input`'s when the run has engine probes; plus, where the case
    has contention probes (``contention``, task hH: `contention_input`), the host contention factors; and which AdamW
    input the case uses (a label; '' for a placement without a CPU optimizer)."""
    try:
        tier = parse_placement(placement)
    except ValueError:
        return io, ""
    if tier == "gpu":
        return io, ""
    got = adjacent_input(adjacent) or adam_input(probes, cfg, placement, device)
    rates = dict(io)
    con = contention_input(contention)
    if con is not None:
        rates.update(con[0])
    extra = f"; {con[1]}" if con else ""
    if got is not None:
        rates["cpu_adam"] = rates["cpu_adam_fp32grad"] = got[0]
        return tuple(sorted(rates.items())), got[1] + extra
    if con is not None:
        io = tuple(sorted(rates.items()))
    key = "cpu_adam_fp32grad" if cfg.micro_batches > 1 and rates.get("cpu_adam_fp32grad") else "cpu_adam"
    if rates.get(key):
        name = "cpu_adam_fp32grad_Mparams_per_s" if key == "cpu_adam_fp32grad" else "cpu_adam_Mparams_per_s"
        return io, (f"isolated probe {name}: {rates[key] / 1e6:.0f} Mparams/s (older run: no engine AdamW "
                    "probe)") + extra
    return io, "the simulator's assumption (profile / host DRAM bandwidth): no probe in this run" + extra


def simulate(cfg: OffloadConfig, placement: str, depth: int, io: tuple = ()) -> dict:
    """The reference-trainer step of the configuration (cached per arguments); ``io``: ``((key, rate), ..)``
    measured host-side rates (`TrainingIteration` ``io_rates``)."""
    key = (cfg, placement, depth, io)
    if key not in _SIM_CACHE:
        _SIM_CACHE[key] = _iteration(cfg, placement, depth, io, trace=False)[0]
    return _SIM_CACHE[key]


def _iteration(cfg: OffloadConfig, placement: str, depth: int, io: tuple, trace: bool):
    """Run the reference-trainer step of the configuration: ``(summary, iteration, sim)`` (`simulate`)."""
    from simulator.engine import Sim
    from simulator.train_host import train_program
    from simulator.workload.training import TrainingIteration

    opts = {k[1:]: v for k, v in io if k.startswith("_")}
    io = tuple((k, v) for k, v in io if not k.startswith("_"))
    run = build_run(cfg, placement, depth)
    # the trainer's host program (kernels per segment, host syncs); None for an uncounted structure
    prog = train_program(run.model, opts.get("ref_optimizer", "foreach"), "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # profile fallbacks (roofline / borrowed curves)
        sim = Sim(run.cluster, seed=run.workload.seed, trace=trace)
        it = TrainingIteration(run, sim, impl="reference", measured_steps=max(cfg.steps, 1), io_rates=dict(io),
                               expert_kernels="torch", host_program=prog, **opts)
        return it.run(), it, sim


# ---------------------------------------------------------------------------------- byte and counter rows (task hF)
# The H2D bytes of a step are the engine's copy schedule times the experts each copy moves: `ExpertOffload._acquire`
# / `_prefetch` / the step's layer-ahead fetch copy only the experts of a layer that received tokens (``needed``,
# ``L.used``), so the bytes follow the trained router. The bench feeds uniform random tokens and its router
# collapses over the run (config a's last MoE layer: 8 experts used in step 0, 2 by step 5 of run 675640a), which
# the simulator's routing draw (every expert receives some of the ~98k tokens) cannot know. The H2D rows are
# therefore predicted as the simulator's copy schedule (`copy_schedule`: copies per layer per step, slots, prefetch,
# micro-batches) times the run's routed experts per (counted step, layer) (`trace_routing`: the engine's cache
# events, one per (layer, expert) that received tokens in the step, recorded by the LFU policy for every offloaded
# placement, not by the copies; with prefetch the first copy of a layer in a step follows the previous step's,
# `routed_h2d_gb`). A case without such a record keeps the a-priori value, shown, not scored.
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
_CONTAINS: dict = {}


# the lead's rule (results/validation/offload_step_mean_rule.md): step time scored as the mean of the timed steps from
# this commit on (fallback date without git: its commit time)
STEP_MEAN_RULE = ("0eab4a0", "2026-11-24T14:45:27Z")
# the rule is withdrawn after its first run (0eab4a0, 2026-11-24T14:46:04Z): the mean of the timed steps includes the
# first timed step's bench-window transient (results/validation/offload_step_mean_rule.md); later runs score the median
STEP_MEAN_RULE_LAST = "2026-11-24T14:46:04Z"
STEP_MEAN_METRICS = {"step_ms": "step_ms_mean", "tokens_per_s": "tokens_per_s_mean"}
DERIVED = "derived"  # status: a median row scored through its mean twin (`STEP_MEAN_RULE`); shown, not counted


def step_mean_rule(commit: str, date: str) -> bool:
    """Whether the lead's rule (`STEP_MEAN_RULE`) applies to a run: its date is an ISO date (a placeholder such as a
    test's ``d`` never qualifies), its commit contains the rule's (git), else that date is from the rule's on, and it
    is not later than `STEP_MEAN_RULE_LAST` (the rule's only run: withdrawn after it)."""
    return (bool(re.match(r"\d{4}-\d\d-\d\d", str(date))) and _contains(STEP_MEAN_RULE, commit, date)
            and str(date) <= STEP_MEAN_RULE_LAST)


def timed_steps(path: Path, warmup: int, counted: int) -> list[float]:
    """Durations (s) of a bench trace's timed steps: its ``step`` rows after the warm-up and the counted step
    (`reference.offload.bench.run_case`: ``warmup`` steps, one counted step, then the timed ones; ``counted`` =
    the config's ``steps``, i.e. timed + 1), in order."""
    from semoe.trace import read_csv

    steps = sorted((r for r in read_csv(path) if r.phase == "step"), key=lambda r: r.start_s)
    return [r.end_s - r.start_s for r in steps[warmup + 1 : warmup + max(counted, 1)]]


def _contains(fix: tuple[str, str], commit: str, date: str) -> bool:
    key = (fix, str(commit), str(date))
    if key not in _CONTAINS:
        _CONTAINS[key] = commit_contains(fix[0], commit, date, fix[1])
    return _CONTAINS[key]


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


def _predict(s: dict, metric: str, cfg: OffloadConfig, placement: str, io: tuple = ()) -> float | None:
    if metric == "step_ms":
        return s["step_time_s"] * 1e3
    if metric == "step_s":
        return s["step_time_s"]
    if metric == "tokens_per_s":
        return s["tokens_per_s"]
    if metric in RATIO_METRICS:
        return s["cache_hit_rate_measured"]
    if metric == "h2d_gb_per_step":
        return (s["bytes"].get("h2d_prefetch", 0.0) + s["bytes"].get("h2d_params", 0.0)) / 1e9
    if metric == "d2h_gb_per_step":
        return s["bytes"].get("d2h_grads", 0.0) / 1e9
    if metric == "ssd_read_gb_per_step":
        return s["bytes"].get("ssd_read", 0.0) / 1e9
    if metric == "ssd_write_gb_per_step":
        return (s["bytes"].get("ssd_write", 0.0) + s["bytes"].get("ssd_writeback", 0.0)) / 1e9
    if metric == "cpu_adam_ms_per_step":
        return s["busy_s"].get("cpu_adam", 0.0) * 1e3
    if metric == "peak_mem_gb":
        # the bench loop's peak (zero_grad, then the micro-batches): simulator.train_memory at the simulated
        # routing (the largest rows any rank's experts receive per layer); the run's AdamW (io's options)
        from simulator.train_memory import run_peak

        opts = {k[1:]: v for k, v in io if str(k).startswith("_")}
        try:
            pk = run_peak(build_run(cfg, placement, 1), tokens_in=s.get("routed_rows"), trainer="bench",
                          optimizer=opts.get("ref_optimizer", "foreach"))
        except (ValueError, FileNotFoundError):  # a structure the model does not cover: the workload's own peak
            return s["peak_hbm_bytes"] / 1e9
        return pk.peak / 1e9
    if metric == "ratio_vs_gpu":
        return s["step_time_s"] / simulate(cfg, "gpu", 0, io)["step_time_s"]
    return None


def _input(metric: str) -> float:
    """The simulator's bandwidth (GB/s) of the link a bandwidth probe measures."""
    from semoe import cluster_preset
    from simulator.cost import CostModel

    c = cluster_preset("h100-single")
    if metric in ("h2d_pinned_GBps", "d2h_pinned_GBps"):
        return c.pcie.bandwidth_GBps
    if metric in ("ssd_block_prep_GBps", "ssd_block_rewrite_prep_GBps", "ssd_cycle_prep_GBps"):
        return float("nan")  # no default: without a measurement the simulator charges nothing
    if metric in ("cpu_adam_Mparams_per_s", "cpu_adam_fp32grad_Mparams_per_s", ENGINE_ADAM):  # the assumption
        from simulator.workload.training import CPU_ADAM_BYTES_PER_PARAM

        return c.host_memory_GBps * 1e9 / CPU_ADAM_BYTES_PER_PARAM / 1e6
    cm = CostModel.auto(c.gpu)
    read = metric in ("ssd_read_GBps", "ssd_block_read_GBps", "ssd_cycle_read_GBps")
    op, bw = ("disk_read", c.ssd_read_GBps) if read else ("disk_write", c.ssd_write_GBps)
    n = 512 * 2**20
    return n / cm.transfer_time(op, n, bw) / 1e9


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


def compare(bench: Path | pd.DataFrame = BENCH, traces: Path | None = TRACES) -> pd.DataFrame:  # noqa: F821
    """One output row (`OUT_COLUMNS`) per bench row, then (``traces``: the directory of one run's traces and
    its ``run.json``) per-phase rows from the traces (``trace_*`` metrics) beside the simulated phases."""
    import pandas as pd  # here, not at import: reference.offload.bench imports `config_string` on the GPU box

    df = bench if isinstance(bench, pd.DataFrame) else pd.read_csv(bench, dtype={"date": str, "commit": str, "device": str})
    missing = set(BENCH_COLUMNS) - set(df.columns)
    if missing:
        raise ValueError(f"validate_offload: bench file lacks column(s) {', '.join(sorted(missing))}")
    out = []
    # measured SSD and CPU-optimizer rates of each bench run: inputs of that run's simulations
    inputs: dict[tuple, dict] = {}
    for r in df.itertuples(index=False):
        if r.metric in IO_INPUTS:
            k, scale = IO_INPUTS[r.metric]
            inputs.setdefault((r.date, r.commit, r.device), {})[k] = float(r.value) * scale
    for d in inputs.values():  # the engine's own block calls win over the plain-file / fresh-name probes
        for block, plain in (("disk_read_block", "disk_read"), ("disk_write_block", "disk_write"),
                             ("ssd_write_prep_rewrite", "ssd_write_prep")):
            if block in d:
                d[plain] = d.pop(block)
        for cycle, plain in IO_CYCLE.items():  # task hB: the engine's I/O cycle wins over both
            if cycle in d:
                d[plain] = d.pop(cycle)
    probes = engine_adam_probes(df)
    adjacent = adjacent_probes(df)  # task hB3: each case's own AdamW probes, before and after it
    contention = contention_probes(df)  # task hH: each ssd case's AdamW and I/O, alone and beside each other
    routed = routing_traces(traces)  # each traced case's routing record (H2D rows, `ROUTED_METRICS`)
    runs = set(zip(df["date"], df["commit"], df["device"]))
    for run in runs:  # the reference code each run executed (its GPU AdamW and expert GEMM path)
        inputs.setdefault(run, {}).update(run_options(run[1], run[0]))
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


MD_BEGIN = "<!-- generated by python -m simulator.validate_offload: begin -->"
MD_END = "<!-- generated by python -m simulator.validate_offload: end -->"


def _pct(x) -> str:
    return "" if math.isnan(x) else f"{x:+.1%}"


def markdown_tables(df) -> str:
    """The generated part of ``offload_train.md``: per run, the step times and the per-phase (trace) rows,
    measured vs simulated, each with the CPU AdamW input its simulation used; then the engine AdamW probes."""
    lab = df["config"].astype(str).str.split().str[0]
    d = df.assign(label=lab, run=df["commit"].astype(str) + " " + df["date"].astype(str))
    out = [MD_BEGIN, "", "## Generated tables (`python -m simulator.validate_offload`)", ""]
    runs = list(dict.fromkeys(d["run"]))[::-1]  # newest (last appended) first
    for run in runs:
        r = d[d["run"] == run]
        st = r[r["metric"].isin(["step_ms", "step_ms_mean"]) & (r["status"] == "validated")]
        med = {(x.label, x.placement, x.prefetch): x for x in r[(r["metric"] == "step_ms") & (r["status"] == DERIVED)]
               .itertuples(index=False)}
        ph = r[r["metric"].str.startswith("trace_") & (r["status"] == "validated")]
        dg = r[(r["metric"] == "step_ms") & (r["status"] == DIAGNOSTIC)]
        if st.empty and ph.empty and not r["metric"].isin(COUNTER_METRICS).any():
            continue
        out += [f"### Run {run} ({r['device'].iloc[0]})", ""]
        if not st.empty:
            out += [("Step time (ms), a-priori (inputs: the run's probes only; CPU AdamW: the engine probe with "
                     "nothing beside the update); scored: the median of the timed steps, or from the lead's rule "
                     "(`STEP_MEAN_RULE`) their mean, with the median's error beside it:"), "",
                    ("| config | placement | prefetch | scored | measured | simulated | error | median: measured, error | "
                    "CPU AdamW input |"), "|---|---|---|---|---|---|---|---|---|"]
            for x in st.itertuples(index=False):
                m = med.get((x.label, x.placement, x.prefetch))
                mc = f"{m.measured:.0f}, {_pct(m.error)}" if m is not None else "-"
                out.append(f"| {x.label} | {x.placement} | {x.prefetch} | "
                           f"{'mean' if x.metric == 'step_ms_mean' else 'median'} | {x.measured:.0f} | "
                           f"{x.predicted:.0f} | {_pct(x.error)} | {mc} | {x.cpu_adam_input or '-'} |")
            out.append("")
        adj = r[r["metric"].str.match(ADJACENT_RE.pattern)]
        if not adj.empty:
            out += [("Adjacent AdamW probes (task hB3: the engine probe 'alone@worker' right before and after each case, "
                     "on its layer shape and gradient dtype; their mean is the case's a-priori input) beside the "
                     "case's own in-trace AdamW rate (the diagnostic's input) and the run-level probe (the older "
                     "rule), Mparams/s:"), "",
                    "| config | placement | prefetch | before | after | mean (input) | in the trace | run-level probe |",
                    "|---|---|---|---|---|---|---|---|"]
            for (label, placement, prefetch), g in adj.groupby(["label", "placement", "prefetch"], sort=False):
                pos = {ADJACENT_RE.match(m)[1]: v for m, v in zip(g["metric"], g["measured"])}
                mean = sum(pos.values()) / len(pos)
                sel = (r["label"] == label) & (r["placement"] == placement) & (r["prefetch"] == prefetch) & (
                    r["metric"] == "step_ms")
                tr = r[sel & (r["status"] == DIAGNOSTIC)]["cpu_adam_input"]
                tr = tr.iloc[0].split(": ", 1)[-1].removesuffix(" Mparams/s") if len(tr) and "trace" in tr.iloc[0] else "-"
                runlevel = "-"
                pr_ = r[(r["metric"] == ENGINE_ADAM) & (r["placement"] == apriori_loads(r["device"].iloc[0])[0])]
                grad = "fp32" if "micro_batches=" in str(g["config"].iloc[0]) and parse_config(
                    g["config"].iloc[0]).micro_batches > 1 else "bf16"
                for x in pr_.itertuples(index=False):
                    E = parse_config(g["config"].iloc[0]).experts
                    if f"E{E} " in x.config and x.config.endswith(f"grad={grad}"):
                        runlevel = f"{x.measured:.0f}"
                c = ["-" if k not in pos else f"{pos[k]:.0f}" for k in ("before", "after")]
                out.append(f"| {label} | {placement} | {prefetch} | {c[0]} | {c[1]} | {mean:.0f} | {tr} | {runlevel} |")
            out.append("")
        con = r[r["metric"].str.match(CONTENTION_RE.pattern)]
        if not con.empty:
            out += [("Contention probes (task hH: right after each adjacent probe of an ssd case; the update alone = that "
                     "adjacent probe): the update alone / beside the SSD I/O thread's reads / beside its write-backs "
                     "(Mparams/s), the I/O parts alone / beside the update (GB/s); the factors row is what the case's "
                     "simulation takes (`contention_input`: mean over positions of beside / alone):"), "",
                    ("| config | placement | prefetch | position | AdamW alone | beside reads | beside writes | read "
                     "alone / beside | write alone / beside | prep alone / beside |"),
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for (label, placement, prefetch), g in con.groupby(["label", "placement", "prefetch"], sort=False):
                vals = {}
                for m, v in zip(g["metric"], g["measured"]):
                    mm = CONTENTION_RE.match(m)
                    vals[(mm[1], mm[2], mm[3])] = float(v)

                def cell(pos, q, cond, fmt, vals=vals):
                    v = vals.get((pos, q, cond))
                    return "-" if v is None else format(v, fmt)

                for pos in sorted({k[0] for k in vals}, key=lambda p_: (p_ != "before", p_)):
                    io = [f"{cell(pos, q, 'alone', '.3g')} / {cell(pos, q, 'beside', '.3g')}"
                          for q in ("io_read", "io_write", "io_prep")]
                    out.append(f"| {label} | {placement} | {prefetch} | {pos} | {cell(pos, 'adam', 'alone', '.0f')} | "
                               f"{cell(pos, 'adam', 'beside_read', '.0f')} | {cell(pos, 'adam', 'beside_write', '.0f')} | "
                               f"{' | '.join(io)} |")
                got = contention_input(vals)
                if got is not None:
                    f = {k: f"x{v:.2f}" for k, v in got[0].items()}
                    out.append(f"| {label} | {placement} | {prefetch} | factors | - | "
                               f"{f.get('contention_cpu_adam_read', '-')} | {f.get('contention_cpu_adam_write', '-')} | "
                               f"{f.get('contention_disk_read', '-')} | {f.get('contention_disk_write', '-')} | "
                               f"{f.get('contention_ssd_write_prep', '-')} |")
            out.append("")
        if not ph.empty:
            out += [("Per phase, per counted step, from the run's traces (`trace_window`: each step's asynchronous "
                     "update and write-backs included):"), "",
                    "| config | placement | prefetch | phase | measured | simulated | error | CPU AdamW input |",
                    "|---|---|---|---|---|---|---|---|"]
            for x in ph.sort_values(["label", "placement", "prefetch", "metric"]).itertuples(index=False):
                unit = "GB" if x.metric.endswith("_gb_per_step") else ("GB/s" if x.metric.endswith("GBps") else "ms")
                phase = x.metric.removeprefix("trace_").removesuffix("_per_step")
                out.append(f"| {x.label} | {x.placement} | {x.prefetch} | {phase} ({unit}) | {x.measured:.4g} | "
                           f"{x.predicted:.4g} | {_pct(x.error)} | {x.cpu_adam_input or '-'} |")
            out.append("")
        bc = r[r["metric"].isin(COUNTER_METRICS) & ~r["label"].str.endswith(AB_SUFFIX)
               & r["status"].isin(("validated", MEASUREMENT_BUG, "not_modelled")) & r["predicted"].notna()]
        if not bc.empty:
            out += [("Bytes and counters per counted step (the bench's engine counters; H2D: the simulated copy "
                     "schedule x the run's routed experts from the case's trace, `ROUTED_METRICS`; "
                     "`measurement_bug`: a counter window the bench fixed later, by the run's commit):"), "",
                    "| config | placement | prefetch | metric | measured | simulated | error | status |",
                    "|---|---|---|---|---|---|---|---|"]
            for x in bc.sort_values(["label", "placement", "prefetch", "metric"]).itertuples(index=False):
                out.append(f"| {x.label} | {x.placement} | {x.prefetch} | {x.metric} | {x.measured:.4g} | "
                           f"{x.predicted:.4g} | {_pct(x.error)} | {x.status} |")
            out.append("")
        if not dg.empty:
            pri = {(x.label, x.placement, x.prefetch): x.error for x in st.itertuples(index=False)}
            out += [("Diagnostic, not a prediction: step time (ms) GIVEN THIS RUN'S MEASURED PHASE RATES (CPU AdamW, "
                     "SSD read, SSD write and block prep taken from each case's own trace, `trace_rates`; status "
                     "`diagnostic`, kept out of `semoe validate`): the scheduling / overlap model with the rate "
                     "model taken out:"), "",
                    "| config | placement | prefetch | measured | simulated | error | a-priori error | rates from the trace |",
                    "|---|---|---|---|---|---|---|---|"]
            for x in dg.itertuples(index=False):
                used = x.note.split("phase rates from ", 1)[-1].split("); the a-priori", 1)[0]
                used = used.split(" (", 1)[-1] if " (" in used else used
                out.append(f"| {x.label} | {x.placement} | {x.prefetch} | {x.measured:.0f} | {x.predicted:.0f} | "
                           f"{_pct(x.error)} | {_pct(pri.get((x.label, x.placement, x.prefetch), float('nan')))} | "
                           f"{used} |")
            out.append("")
        ab = r[r["label"].str.endswith(AB_SUFFIX) & (r["metric"] == "step_ms")]
        if not ab.empty:
            out += [("Thread A/B (task hB): the same case with the engine's AdamW on torch's default threads (one per "
                     "core, the engine before hB) beside the engine's rule (cores minus the training and I/O threads); "
                     "measured in the same run:"), "",
                    ("| config | placement | prefetch | step ms (rule) | step ms (torch) | CPU AdamW ms/step (rule) | "
                     "CPU AdamW ms/step (torch) | AdamW threads (rule / torch) |"), "|---|---|---|---|---|---|---|---|"]

            def val(label, x, metric, r=r):
                v = r[(r["label"] == label) & (r["placement"] == x.placement) & (r["prefetch"] == x.prefetch)
                      & (r["metric"] == metric)]["measured"]
                return float(v.iloc[0]) if len(v) else float("nan")

            for x in ab.itertuples(index=False):
                main = x.label.removesuffix(AB_SUFFIX)
                cells = [val(lab, x, m) for m in ("step_ms", "cpu_adam_ms_per_step", "threads_adam")
                         for lab in (main, x.label)]
                c = ["-" if math.isnan(v) else f"{v:.0f}" for v in cells]  # "-": that arm did not run (skipped)
                out.append(f"| {main} | {x.placement} | {x.prefetch} | {c[0]} | {c[1]} | {c[2]} | {c[3]} | "
                           f"{c[4]} / {c[5]} |")
            out.append("")
        pr = r[r["metric"] == ENGINE_ADAM]
        if not pr.empty:
            out += [("Engine AdamW probes (`cpu_adam_engine_Mparams_per_s`; the load is what ran beside the update, "
                     "`@worker`: the update on a worker thread as the engine runs it; inputs: the first of "
                     + ", ".join(f"'{k}'" for k in ADAM_LOADS_APRIORI) + " the run has, the others are diagnostics):"),
                    "", "| layer | load | Mparams/s | input |", "|---|---|---|---|"]
            for x in pr.itertuples(index=False):
                out.append(f"| {x.config.removeprefix('cpu_adam_engine ')} | {x.placement} | {x.measured:.0f} | "
                           f"{'yes' if x.status == 'fitted' else 'no'} |")
            out.append("")
    out.append(MD_END)
    return "\n".join(out) + "\n"


def write_markdown(df, path: Path) -> None:
    """Put `markdown_tables` into ``path`` between `MD_BEGIN` / `MD_END` (the narrative around them is kept;
    appended when the markers are missing)."""
    from semoe.io import atomic_write_text

    text = path.read_text() if path.is_file() else "# Offloaded training (issue 6): simulator vs the H100 bench\n\n"
    tables = markdown_tables(df)
    if MD_BEGIN in text and MD_END in text:
        head, rest = text.split(MD_BEGIN, 1)
        text = head + tables.rstrip("\n") + rest.split(MD_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + tables
    atomic_write_text(path, text)


def plot(df, path: Path) -> bool:
    """Measured vs predicted step time per configuration (bars) and the error (text); False without matplotlib
    or step_ms rows."""
    st = df[df["metric"].isin(["step_ms", "step_ms_mean"]) & (df["status"] == "validated")]  # (mean: STEP_MEAN_RULE)
    if st.empty:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = [f"{str(c).split()[0].split('_')[0]}: {pl}" + ("" if pf == "-" else f" pf {pf}")
              for c, pl, pf in zip(st["config"], st["placement"], st["prefetch"])]
    x = range(len(st))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(st)), 4))
    ax.bar([i - 0.2 for i in x], st["measured"], 0.4, label="measured (H100)")
    ax.bar([i + 0.2 for i in x], st["predicted"], 0.4, label="simulated")
    for i, (m, e) in enumerate(zip(st["measured"], st["error"])):
        ax.text(i, m * 1.02, f"{e:+.0%}", ha="center", fontsize=8, color="red" if abs(e) > 0.1 else "black")
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("step time (ms)")
    ax.set_yscale("log")
    ax.set_title("Offloaded training (issue 6): step time, measured vs simulated")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
