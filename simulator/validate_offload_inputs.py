"""The a-priori inputs of the offload validation's simulations (the rules of `simulator.validate_offload`'s
docstring, by task): the bench run's own probes as ``io_rates`` (`run_inputs`: the engine's I/O cycle over its block
calls over the plain-file probes, and the reference code the run executed, `run_options`), a case's CPU AdamW input
(the engine probe, hD2 / hB: `adam_input`; the case's adjacent probes, hB3: `adjacent_input`) and its host contention
factors (hH: `contention_input`), bundled per case by `case_io`; the simulator's own rate of each probed link
(`_input`); and the lead's step-mean rule (`step_mean_rule`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from simulator.validate_offload_case import OffloadConfig, build_run, parse_placement

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


def run_inputs(df) -> dict[tuple, dict]:
    """``(date, commit, device) -> io_rates`` of each run of a bench frame: its measured SSD and CPU-optimizer
    rates (`IO_INPUTS`; the engine's own block calls win over the plain-file / fresh-name probes, its I/O cycle,
    `IO_CYCLE`, over both) and the reference code it executed (`run_options`)."""
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
    runs = set(zip(df["date"], df["commit"], df["device"]))
    for run in runs:  # the reference code each run executed (its GPU AdamW and expert GEMM path)
        inputs.setdefault(run, {}).update(run_options(run[1], run[0]))
    return inputs


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


_CONTAINS: dict = {}


def _contains(fix: tuple[str, str], commit: str, date: str) -> bool:
    """`commit_contains` of a ``(commit, fallback date)`` rule, cached per run."""
    key = (fix, str(commit), str(date))
    if key not in _CONTAINS:
        _CONTAINS[key] = commit_contains(fix[0], commit, date, fix[1])
    return _CONTAINS[key]


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
