"""The inputs of `simulator.validate_infer` (its module doc gives the rules): a row's configuration and mode, the
metric families of infer.csv, the what-if settings, and what a bench run measured of its own machine -- its engine
host probe, the adjacent host probes and the adjacent copy probes of its rows -- as the simulations take them."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pandas as pd

from semoe import cluster_preset
from semoe.presets import model_preset
from simulator.workload.inference_host import (
    PROBE_BLOCKS_METRIC,
    PROBE_METRICS,
    HostProbe,
)

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "results" / "bench" / "infer.csv"
THROUGHPUT = ("prefill_tokens_per_s", "decode_tokens_per_s", "block_compute_ms", "bound_prefill_tokens_per_s",
              "prefill_ms_per_block", "decode_ms_per_step")
NOT_MODELLED = ("maxabs_logit_diff_vs_resident", "tokens_equal_resident", "speedup_vs_accelerate", "compile_s")
NOT_MODELLED_PREFIXES = ("logit_", "top1_agree", "tokens_equal", "maxabs_logit")
COMPILED = ("compiled", "ring_compiled")  # torch.compile runs: a compiled step's host program is not counted


def parse_config(config: str) -> dict:
    """'mixtral-8x7b-L8 bf16 budget=10GB P=256 G=8' -> preset, layers, budget bytes, P, G (``budget=K1``:
    no budget, ring slots K given)."""
    m = re.match(r"(?P<preset>.+?)-L(?P<layers>\d+) (?P<dtype>\w+) budget=(?:(?P<budget>[\d.]+)GB|K(?P<K>\d+)) "
                 r"P=(?P<P>\d+) G=(?P<G>\d+)", config)
    if m is None:
        raise ValueError(f"validate_infer: cannot parse config {config!r}")
    return {"preset": m["preset"], "layers": int(m["layers"]), "dtype": m["dtype"],
            "budget": float(m["budget"]) * 1e9 if m["budget"] else None, "slots": int(m["K"]) if m["K"] else None,
            "P": int(m["P"]), "G": int(m["G"])}


MODE_RE = re.compile(r"^(?P<base>ring|expert_nopred|expert|resident)(?:_K(?P<K>\d+))?(?:_(?P<quant>int8|fp8))?"
                     r"(?P<fused>_fused)?$")
DIAG = ROOT / "results" / "bench" / "infer_diag"


@cache
def predict_accuracy(diag: Path = DIAG) -> float:
    """The one-block-ahead predictor's accuracy, measured in the engine diagnostic (``results/bench/infer_diag``,
    `simulator.workload.inference_diag`: H100, the bench's model at 4 blocks, not a row of infer.csv): its
    ``expert`` (predicting) and ``expert_nopred`` runs at B = 1 decode the same prompts greedily with the
    same weights, so they route identically and the predicting run's extra copied bytes are its wasted
    prefetches; accuracy = 1 - wasted / prefetched (the prefetches' bytes from its timeline). 1.0 (a
    perfect predictor) when the diagnostic is absent."""
    try:
        steps = pd.read_csv(diag / "steps.csv")
        tl = pd.read_csv(diag / "timeline.csv")
    except FileNotFoundError:
        return 1.0
    b1 = steps[steps["batch"] == 1].set_index("case")["bytes_copied"]
    pre = float(tl.loc[(tl["case"] == "expert") & (tl["phase"] == "h2d_prefetch"), "bytes"].sum())
    if "expert" not in b1 or "expert_nopred" not in b1 or pre <= 0:
        return 1.0
    wasted = max(0.0, float(b1["expert"]) - float(b1["expert_nopred"]))
    return max(0.0, 1.0 - wasted / pre)


# the what-if settings read here (HOST_OP_S, USE_H2D) are set through simulator.validate_infer (its `main`)
HOST_OP_S: float | None = None  # None: CostModel.host_op_s (the profile's host_op row, else 8 us); --host-op-us
# a run's own host probe (mode "-", microseconds per kernel of the reference's eager forward, measured in the
# bench run like h2d_pinned_GBps): a model input of that run's simulations, as the PCIe bandwidth is
RUN_HOST_METRIC = "host_op_us"
# the adjacent host probes (reference/inference/bench.py HostProber.adjacent): the engine probe of a timed row's
# (mode, phase, batch) right before and right after its timed passes (rule: module doc)
ADJ_PREFIX = "host_adj_"
ADJ_METRICS = {"prefill": ("host_adj_prefill_ms", "host_adj_prefill_copies"),
               "decode": ("host_adj_decode_ms_per_step", "host_adj_decode_copies_per_step")}
ADJ_WHEN = ("before", "after")
ADJ_MEDIAN = "median"  # repeated rows: the median of all the row's adjacent probes (its host input)
# the adjacent copy probes (reference/inference/bench.py H2DProber): the pinned H2D bandwidth next to each host probe
# of a copy-bound row (rule: module doc, "Adjacent copy probes")
H2D_PREFIX = "h2d_adj_"
USE_H2D = True  # False: --no-copy-probes what-if (the preset's PCIe for every row)
H2D_METRICS = {"prefill": "h2d_adj_prefill_GBps", "decode": "h2d_adj_decode_GBps"}
# the metrics whose simulated pass takes the row's copy probes (the bound's bandwidth stays the preset's)
H2D_THROUGHPUT = ("prefill_tokens_per_s", "prefill_ms_per_block", "prefill_frac_of_bound", "decode_tokens_per_s",
                  "decode_ms_per_step")
# the spread of a repeated row (bench --repeats): min / max of its timed repeats and the repeats run
SPREAD_SUFFIXES = ("_min", "_max")
REPEATS_SUFFIX = "_repeats"


# the bench's expert-aware count rows pooled over the row's repeats (reference/inference/bench.py pooled_rows)
POOLED_SUFFIX = "_pooled"
POOLED_METRICS = tuple(m + POOLED_SUFFIX for m in ("hit_rate", "prefetched_used_frac", "decode_GB_copied_per_step"))
POOL_PASSES_METRIC = "pool_passes"
POOL_METRICS = ("hit_rate", "prefetched_used_frac", "decode_GB_copied_per_step", *POOLED_METRICS)


def parse_mode(mode: str) -> tuple[str, int | None, str | None, str]:
    """'ring_K2' -> ('ring', 2, None, 'workspace'); 'ring_int8_fused' -> ('ring', None, 'int8', 'fused')."""
    m = MODE_RE.match(mode)
    if m is None:
        return mode, None, None, "workspace"
    return m["base"], int(m["K"]) if m["K"] else None, m["quant"], "fused" if m["fused"] else "workspace"


def _model(c: dict):
    return model_preset(c["preset"]).replace(layers=c["layers"], name=f"{c['preset']}-L{c['layers']}", dtype=c["dtype"])


def _cluster(pcie_GBps: float | None = None):
    """The ``h100-single`` preset, its PCIe bandwidth replaced by ``pcie_GBps`` when given (a row's copy probes)."""
    c = cluster_preset("h100-single")
    if pcie_GBps is None:
        return c
    if not pcie_GBps > 0:
        raise ValueError(f"validate_infer: pcie_GBps must be > 0, got {pcie_GBps}")
    return c.replace(pcie=c.pcie.replace(bandwidth_GBps=float(pcie_GBps)))


def _host_op_s() -> float:
    if HOST_OP_S is not None:
        return HOST_OP_S
    from simulator.cost import CostModel

    return CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True).host_op_s


def is_spread(metric: str) -> bool:
    """A repeated row's spread row (``decode_tokens_per_s_min``, ``prefill_repeats``), not an adjacent probe row."""
    return metric == POOL_PASSES_METRIC or (not metric.startswith((ADJ_PREFIX, H2D_PREFIX)) and (
        metric.endswith(SPREAD_SUFFIXES) or metric.endswith(REPEATS_SUFFIX)))


_ADJ_WHEN_TEXT = {"before": "right before the timed passes", "after": "right after the timed passes",
                  "median": "the median of the probes around the timed repeats",
                  "min": "the fastest probe around the timed repeats", "max": "the slowest probe around the timed repeats"}


def adjacent_metric(metric: str) -> tuple[str, str]:
    """``host_adj_decode_ms_per_step_before`` -> ("decode", "ms"); ``host_adj_prefill_copies`` -> ("prefill",
    "copies")."""
    phase = "prefill" if metric.startswith(ADJ_PREFIX + "prefill") else "decode"
    return phase, "copies" if "_copies" in metric else "ms"


# the run's engine host probe (reference/inference/bench.py host_probe): seconds and copy calls per pass of the
# engine's own code path at tiny widths, per mode and batch; the simulations of that run's bf16 rows take
# their host seconds per kernel from it (`simulator.workload.inference_host.HostProbe`)
def run_probes(measured: pd.DataFrame) -> dict:
    """date -> the run's engine host probe (`HostProbe` from its ``host_*`` rows); none under ``--host-op-us``."""
    from simulator.workload.inference_host import HostProbe

    if HOST_OP_S is not None:
        return {}
    keep = measured[measured["metric"].isin(list(PROBE_METRICS) + [PROBE_BLOCKS_METRIC])]
    out = {}
    for date, g in keep.groupby("date"):
        p = HostProbe.from_rows(zip(g["mode"], g["batch"], g["metric"], g["value"]))
        if p is not None:
            out[date] = p
    return out


def run_adjacent(measured: pd.DataFrame) -> dict:
    """date -> {(row mode, phase, batch): (seconds, copies)}: the run's adjacent host probes (bench
    ``HostProber.around``), seconds the median of the probes around a repeated row's timed repeats
    (``host_adj_*_median``), else the mean of the probe right before and right after the row's timed passes
    (the rule in the module doc); none under ``--host-op-us``."""
    if HOST_OP_S is not None:
        return {}
    keep = measured[measured["metric"].str.startswith(ADJ_PREFIX)]
    out: dict = {}
    for (date, mode, batch), g in keep.groupby(["date", "mode", "batch"]):
        vals = dict(zip(g["metric"], g["value"].astype(float)))
        for phase, (ms_metric, cp_metric) in ADJ_METRICS.items():
            ms = adjacent_value(vals, ms_metric)
            if ms is not None:
                out.setdefault(date, {})[(mode, phase, int(batch))] = (1e-3 * ms, vals.get(cp_metric, 0.0))
    return out


def adjacent_value(vals: dict, metric: str) -> float | None:
    """A row's adjacent probe value of ``metric`` from its run's rows ``vals`` (metric -> value): the median of a
    repeated row's probes (``<metric>_median``), else the mean of the probes right before and right after its timed
    passes; None when it has none or one is not positive."""
    med = vals.get(f"{metric}_{ADJ_MEDIAN}")
    v = [med] if med is not None else [vals[f"{metric}_{w}"] for w in ADJ_WHEN if f"{metric}_{w}" in vals]
    return sum(v) / len(v) if v and all(x > 0 for x in v) else None


def with_adjacent(probe, adj: dict | None, key: str, probe_mode: str, batch: int):
    """``probe`` (the run's `HostProbe`) with its ``probe_mode`` points of each phase that row mode ``key`` has
    an adjacent probe for at ``batch`` replaced by that one point (so `HostProbe.rate` is its rate alone);
    ``probe`` itself where there is none (older runs, quantised rows: ``probe`` None)."""
    if probe is None or not adj:
        return probe
    got = {ph: adj[(key, ph, batch)] for ph in ("prefill", "decode") if (key, ph, batch) in adj}
    if not got:
        return probe
    pts = tuple(p for p in probe.points if not (p[0] == probe_mode and p[1] in got))
    pts += tuple((probe_mode, ph, batch, sec, cp) for ph, (sec, cp) in sorted(got.items()))
    return HostProbe(probe.blocks, pts)


def run_h2d(measured: pd.DataFrame) -> dict:
    """date -> {(row mode, phase, batch): GB/s}: the run's adjacent copy probes (bench ``H2DProber``), the median of
    a repeated row's R + 1 probes (``h2d_adj_<phase>_GBps_median``), else the mean of its before and after probes
    (the rule in the module doc); none under ``--no-copy-probes``."""
    if not USE_H2D:
        return {}
    keep = measured[measured["metric"].str.startswith(H2D_PREFIX)]
    out: dict = {}
    for (date, mode, batch), g in keep.groupby(["date", "mode", "batch"]):
        vals = dict(zip(g["metric"], g["value"].astype(float)))
        for phase, m in H2D_METRICS.items():
            v = adjacent_value(vals, m)
            if v is not None:
                out.setdefault(date, {})[(mode, phase, int(batch))] = v
    return out


def _h2d_used(r, h2d: dict | None) -> float | None:
    """The PCIe GB/s a row's own simulation takes from its copy probes (`run_h2d`; None: the preset's)."""
    if r["metric"] not in H2D_THROUGHPUT:
        return None
    return h2d_for(r["mode"], "decode" if r["metric"].startswith("decode") else "prefill", int(r["batch"]), h2d)


def h2d_for(mode: str, phase: str, batch: int, h2d: dict | None) -> float | None:
    """The copy probes' GB/s of a (row mode, phase, batch) pass (`run_h2d`), for bf16 ring and expert-aware modes;
    None: the preset's."""
    base, _, quant, _ = parse_mode(mode)
    if not h2d or quant is not None or base not in ("ring", "expert", "expert_nopred"):
        return None
    return h2d.get((mode, phase, batch))


COPY_IN_PASS = "_copy_GBps_in_pass"  # the bench's traced ring passes: the copy engine's rate inside the pass


def copy_rate_assumed(r, h2d: dict | None) -> tuple[float, str]:
    """(GB/s, source) the simulation of a ring row's ``<phase>`` pass copies at: the row's adjacent copy probes
    (`h2d_for`: the ones `_h2d_used` gives its throughput rows), else the ``h100-single`` preset's; a row
    ``<phase>_copy_GBps_in_pass`` is predicted by it (the module doc's rule for in-pass copies)."""
    phase = r["metric"].split("_", 1)[0]
    probe = h2d_for(r["mode"], phase, int(r["batch"]), h2d)
    if probe is not None:
        return probe, f"the {phase} copy probes interleaved with the row's repeats (the rate its pass is simulated at)"
    return cluster_preset("h100-single").pcie.bandwidth_GBps, "the h100-single preset's pinned H2D bandwidth"


def _row_values(measured: pd.DataFrame, r) -> dict:
    """metric -> value of the rows of ``r``'s run, mode and batch."""
    g = measured[(measured["date"] == r["date"]) & (measured["mode"] == r["mode"]) & (measured["batch"] == r["batch"])]
    return dict(zip(g["metric"], g["value"].astype(float)))


def _adjacent_ms(measured: pd.DataFrame, r, phase: str | None) -> tuple | None:
    """(before, after) ms of the adjacent probe of row ``r``'s ``phase``, then (median, min, max) when the row was
    repeated (None: no adjacent probe used)."""
    if not phase:
        return None
    ms = ADJ_METRICS[phase][0]
    v = _row_values(measured, r)
    out = tuple(v.get(f"{ms}_{w}", float("nan")) for w in ADJ_WHEN)
    if f"{ms}_{ADJ_MEDIAN}" in v:
        out += tuple(v.get(f"{ms}_{w}", float("nan")) for w in (ADJ_MEDIAN, "min", "max"))
    return out


def _adjacent_used(r, adj: dict | None) -> str | None:
    """The phase whose adjacent probe a throughput row's own simulation uses (None: none)."""
    if not adj:
        return None
    base, _, quant, _ = parse_mode(r["mode"])
    if quant is not None or base not in ("resident", "ring", "expert", "expert_nopred"):
        return None
    phase = "decode" if r["metric"].startswith("decode") else "prefill"
    return phase if (r["mode"], phase, int(r["batch"])) in adj else None


def _probed(r) -> bool:
    """Rows whose simulation takes its host time from the run's engine probe (bf16 engine modes)."""
    base, _, quant, _ = parse_mode(r["mode"])
    return quant is None and base in ("resident", "ring", "expert", "expert_nopred") and r["metric"] not in PROBE_METRICS
