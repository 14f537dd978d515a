"""The report of `simulator.validate_infer`: the notes of a row (why a throughput row misses 10%, its host and
PCIe inputs, its repeats' spread, a pooled row's sampling noise, the pool replay of its run's trace), the summary
table and text, and the plot."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from semoe import cluster_preset
from simulator import validate_infer_inputs as inputs
from simulator.validate_infer_inputs import (
    ADJ_MEDIAN,
    H2D_METRICS,
    POOL_METRICS,
    POOL_PASSES_METRIC,
    POOLED_SUFFIX,
    REPEATS_SUFFIX,
    _row_values,
    parse_mode,
)
from simulator.validate_infer_predict import (
    POOL_SEEDS,
    _sync_split,
    pool_replays,
    pooled_prediction,
)
from simulator.workload.inference_host import PROBE_METRICS


def _replay_note(r) -> str:
    """The pool replay of a run's traced routing for an expert-aware pool row (`pool_replays`), when the trace
    is of this run (its engine counters give the row's measured hit rate); else ''."""
    if r["metric"] not in POOL_METRICS or not str(r["mode"]).startswith("expert"):
        return ""
    got = pool_replays(str(r["commit"])).get((r["mode"], int(r["batch"])))
    if got is None:
        return ""
    rep, eng = got
    look = eng["hits"] + eng["misses"]
    if look == 0 or (r["metric"] in ("hit_rate", "hit_rate" + POOLED_SUFFIX)
                     and abs(eng["hits"] / look - float(r["value"])) > 1e-4):
        return ""
    same = "equal" if rep == eng else "NOT equal"
    return (f"pool replay on this run's traced routing (results/bench/infer_trace): hits {rep['hits']}, misses "
            f"{rep['misses']}, prefetched {rep['prefetched']}, used {rep['prefetch_used']}, {same} to the engine's "
            f"({eng['hits']}, {eng['misses']}, {eng['prefetched']}, {eng['prefetch_used']}): the simulated pool is the "
            "engine's, the prediction's error is its sampled routing (uniform, independent top-k per token and step)"
            + (" and predictor" if r["mode"] == "expert" else ""))


def explain(r, probed: bool = False, adjacent: tuple | None = None, pcie: float | None = None) -> str:
    """Why a throughput row misses 10% (mechanisms the simulator leaves out; see NOTES.md). ``probed``: the
    row's host time came from its run's engine probe; ``adjacent``: (before, after) ms of the adjacent probe the
    row's simulation took its host from; ``pcie``: the GB/s of the row's copy probes its simulation took."""
    mode, metric, date = r["mode"], r["metric"], r["date"]
    host = "the run's engine probe's seconds per kernel of this path" if probed else _host_note()
    if adjacent is not None and len(adjacent) > 2:
        host = ("the seconds per kernel of this path probed around the row's repeats (median "
                f"{adjacent[2]:.1f} ms per probe pass, {adjacent[3]:.1f}-{adjacent[4]:.1f})")
    elif adjacent is not None:
        host = ("the seconds per kernel of this path probed right before and after the row "
                f"({adjacent[0]:.1f} / {adjacent[1]:.1f} ms per probe pass)")
    if _autotune_bug(r):
        return ("first ring decode of the run: Triton autotuned the int8 dequant GEMM for the decode M bucket "
                "inside the timed generate (3 configs x 2 shapes; B = 8 reused the bucket and matches)")
    if mode == "resident" and metric == "decode_tokens_per_s":
        if date.startswith(RUN1_DATE):
            return "run 1: cuDNN SDPA rebuilt a plan per decode step (~205 ms/step, NOTES.md); fixed in run 2"
        if adjacent is not None:
            return (f"host-bound: the counted kernels per step x {host} plus the device's tails at the host syncs; "
                    "the timed steps ran at another host speed than the probe passes around them")
        if probed:
            return (f"host-bound: the counted kernels per step x {host} (the probe's step time at tiny widths, "
                    "median over its batches) plus the device's tails at the host syncs; the run's resident steps "
                    "(21.6-23.0 ms at B = 1-16) ran faster than every probed decode step of the same program "
                    "(22.8-25.6 ms)")
        return (f"host-bound: the counted kernels per step (results/profiles/op_counts.csv) x {host}; the reference "
                "measured ~26 ms/step (NOTES.md), i.e. ~35 us per kernel in this code path")
    if mode == "resident" and metric in ("prefill_tokens_per_s", "block_compute_ms"):
        split = ("each sync's latency (the sync probe's share) serial" if _sync_split()
                 else "sync latencies spread evenly")
        return (f"compute + host: ~70 counted kernels per block x {host} ({split}) and 4 host syncs per block; "
                "expert GEMMs at the profile's grouped_gemm_fwd_routed rows (64-2048 rows per expert), started "
                "after the dispatch lead's host time (5 kernels); every other kernel at its price + 2.44 us "
                "(inference_costs.KERNEL_DEVICE_S, results/bench/infer_diag); with the sync split B >= 4 lean 3-7% "
                "slow (the split adds ~0.2 ms of serial sync latency per block at every batch; the sync probe's B = 8 "
                "chain is slower still, so the rest of the block is priced slow there); the same batch's block time "
                "varies 2.3-3.6 ms (B = 1) across runs")
    if mode.startswith("expert") and metric == "decode_tokens_per_s":
        return ("copies and host work serialised per block (the remap's bincount sync waits for the copy; "
                "a prefetched block's compute waits for its prefetch, which starts after the previous block's "
                f"compute); ~75 counted kernels per block x {host}; measured minus copy time (bytes / the run's "
                "pinned H2D) is 1.5-2.6 ms per block above the probe's host time, unexplained "
                "(simulator/workload/inference_diag.py measures per-expert copies and the engine's timeline)"
                + ("; the predictor is modelled as perfect (the reference's wasted 1-8% of prefetched bytes and "
                   "its mispredicted experts, fetched serially, are not)" if mode == "expert" else ""))
    if metric in ("block_compute_ms", "dequant_ms_per_block") and parse_mode(mode)[2]:
        quant, path = parse_mode(mode)[2], parse_mode(mode)[3]
        ip = _infer_profile()
        if path == "fused":
            if any(r["op"] == "qgemm_fwd" and r["dtype"] == quant for r in ip.rows):
                return "fused quantised GEMMs at the profile's qgemm_fwd rate (equal groups; uneven routing not applied)"
            return ("fused quantised GEMMs (int8 Triton dequant GEMM, fp8 _scaled_grouped_mm with per-row activation "
                    "quantisation): no qgemm_fwd row in the profile yet (kernels/profile.py --sweeps infer), so the "
                    "bf16 rate (int8) / datasheet fp8 ratio is assumed; copy-bound ring rows are unaffected")
        if any(r["op"] == "dequant" and r["dtype"] == quant for r in ip.rows):
            return "workspace dequant at the profile's dequant rows (the reference's dequantize_into call)"
        return ("workspace dequant: the reference's dequantize_into is copy_ from the k-major (transposed) 1-byte view "
                "into the bf16 workspace, a strided copy, then mul_ by the scales (~7 bytes per weight); no dequant "
                "row in the profile yet (kernels/profile.py --sweeps infer), so one contiguous memory-bound pass "
                "(3 bytes per weight) is charged; copy-bound ring rows are unaffected")
    if metric == "bound_prefill_tokens_per_s":
        return "bound uses the simulated resident compute; see resident prefill"
    if parse_mode(mode)[0] == "ring" and metric in ("prefill_tokens_per_s", "prefill_frac_of_bound", "prefill_ms_per_block"):
        if pcie is not None:
            return (f"copy-bound: every block's experts over PCIe at the {pcie:.2f} GB/s of the row's own copy probes, "
                    "the host hidden under the copies; a miss is a copy path the 1 GiB probe copies do not see (the "
                    "ring's per-block copies on the engine's copy stream beside its compute)")
        return ("copy-bound: every block's experts over PCIe at the preset's 53.5 GB/s (~0.42 s a pass of 8 blocks), "
                "the host hidden under the copies; a miss is a slow stretch of the machine's copies (the 41ed3d6 run: "
                "ring_K4, ring B1 and B2, one pass each within ~6 s, at 0.50 s a pass against 0.42-0.45 s for its "
                "other ring passes and every ring pass of 76200c0)")
    return ""


def _infer_profile():
    from simulator.cost import CostModel
    from simulator.workload.inference_profile import InferProfile

    return InferProfile.of(CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True))


def _host_note() -> str:
    if inputs.HOST_OP_S is not None:
        return f"{inputs.HOST_OP_S * 1e6:.1f} us per kernel (--host-op-us what-if)"
    from simulator.cost import CostModel

    cm = CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True)
    src = "the profile's host_op row" if cm.profile is not None and cm.profile.host_op else "HARDWARE.md's 8 us"
    return f"{cm.host_op_s * 1e6:.1f} us per kernel ({src})"


def _h2d_note(measured: pd.DataFrame, r, bw: float) -> str:
    """Where a row's PCIe bandwidth came from (its copy probes, `_h2d_used`)."""
    phase = "decode" if r["metric"].startswith("decode") else "prefill"
    v = _row_values(measured, r)
    m = H2D_METRICS[phase]
    if f"{m}_{ADJ_MEDIAN}" in v:
        return (f"PCIe: {bw:.2f} GB/s, the median of this row's {phase} copy probes interleaved with its repeats "
                f"({v.get(m + '_min', float('nan')):.2f}-{v.get(m + '_max', float('nan')):.2f})")
    return (f"PCIe: {bw:.2f} GB/s, the mean of this row's {phase} copy probes right before and after it "
            f"({v.get(m + '_before', float('nan')):.2f} / {v.get(m + '_after', float('nan')):.2f})")


RUN1_DATE = "2026-11-24T04:05"  # bench run 1: cuDNN SDPA rebuilt a plan per decode step (NOTES.md)
# issue-11 run at 344a526: the first ring decode (B = 1) of ring_int8_fused autotuned the Triton
# dequant GEMM for the decode M bucket inside the timed generate (bench.py now warms decode up first)
AUTOTUNE_RUN_DATE = "2026-11-24T06:34"


def _autotune_bug(r) -> bool:
    return (str(r["date"]).startswith(AUTOTUNE_RUN_DATE) and r["mode"] == "ring_int8_fused" and int(r["batch"]) == 1
            and r["metric"].startswith("decode"))


def spread_note(measured: pd.DataFrame, r, pred: float) -> str:
    """A repeated row's repeats and spread (its ``_min`` / ``_max`` rows) and whether ``pred`` lies in it; ''
    for a single-pass row."""
    v = _row_values(measured, r)
    lo, hi = v.get(f"{r['metric']}_min"), v.get(f"{r['metric']}_max")
    if lo is None or hi is None:
        return ""
    phase = "decode" if r["metric"].startswith("decode") else "prefill"
    n = v.get(f"{phase}{REPEATS_SUFFIX}")
    reps = f"median of {n:.0f} repeats" if n is not None else "median of the repeats"
    inside = "" if math.isnan(pred) else (", prediction inside it" if lo <= pred <= hi else ", prediction outside it")
    return f"{reps}: min {lo:.4g}, max {hi:.4g} ({(hi - lo) / float(r['value']):.1%} of the median{inside})"


def pooled_noise_note(measured: pd.DataFrame, r, pred: float, predict: bool, persist: float = 0.0,
                      seeds: int = POOL_SEEDS) -> str:
    """A pooled count row's sampling noise: its R passes (row ``pool_passes``), the sd of an R-pass pool ~ one
    simulated pass's sd over the routing seeds / sqrt(R) (`pooled_prediction`), and how many of those the
    measured value lies from the prediction ('' without a ``pool_passes`` row or a spread)."""
    n = _row_values(measured, r).get(POOL_PASSES_METRIC)
    if not n or parse_mode(r["mode"])[2] is not None:
        return ""
    _, sd = pooled_prediction(r["config"], int(r["batch"]), predict, seeds=seeds, persist=persist)[r["metric"]]
    if not sd > 0:
        return ""
    sd_r = sd / math.sqrt(n)
    rel = f" ({sd_r / pred:.1%} of the prediction)" if pred else ""
    passes = f"{n:.0f} measured pass" + ("es" if n != 1 else "")
    return (f"pooled over {passes} (other prompts each): sampling sd ~ {sd_r:.3g}{rel}, measured "
            f"{abs(float(r['value']) - pred) / sd_r:.1f} sd away")


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from simulator.report import _save_png

    d = df[(df["kind"] == "throughput") & df["metric"].isin(["prefill_tokens_per_s", "decode_tokens_per_s"])]
    modes = sorted(d["mode"].unique())
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(modes)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric in zip(axes, ["prefill_tokens_per_s", "decode_tokens_per_s"]):
        dd = d[d["metric"] == metric]
        lo = min(dd["measured"].min(), dd["predicted"].min()) * 0.7
        hi = max(dd["measured"].max(), dd["predicted"].max()) * 1.4
        x = np.geomspace(lo, hi, 50)
        ax.fill_between(x, 0.9 * x, 1.1 * x, color="0.85", label="±10%", zorder=0)
        ax.plot(x, x, "k-", lw=0.8, zorder=1)
        for mode, g in dd.groupby("mode"):
            ax.scatter(g["measured"], g["predicted"], label=mode, s=20, color=colors[mode], zorder=3,
                       marker="o" if mode.startswith(("ring", "resident")) else "^")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured (H100, results/bench/infer.csv)")
        ax.set_ylabel("simulated")
        ax.set_title(metric.replace("_", " "))
        ax.legend(fontsize=7)
    fig.suptitle("inference workload: simulated vs measured tokens/s (mixtral-8x7b-L8, 10 GB budget)")
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(fig, path)
    plt.close(fig)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Validated throughput rows per (mode, metric): rows, within 10%, median and max |error|."""
    t = df[(df["kind"] == "throughput") & (df["status"] == "validated")]
    t = t.assign(ok=t["within_10pct"].astype(bool), abs_err=t["error"].abs())
    return t.groupby(["mode", "metric"]).agg(rows=("ok", "size"), within_10pct=("ok", "sum"),
                                             median_abs_err=("abs_err", "median"), max_abs_err=("abs_err", "max")).round(3)


def summarise(df: pd.DataFrame) -> str:
    t = df[df["kind"] == "throughput"]
    v = t[t["status"] == "validated"] if "status" in t else t
    probed = sorted(df.loc[df["metric"].isin(list(PROBE_METRICS)), "date"].unique())
    lines = [f"host time: {_host_note()}; engine host probe (bf16 rows of its run): "
             + (", ".join(probed) if probed and inputs.HOST_OP_S is None else "none"),
             (f"throughput rows within 10%: {int(t['within_10pct'].sum())} / {len(t)} "
             f"(validated rows: {int(v['within_10pct'].sum())} / {len(v)})")]
    for kind in ("memory", "count", "ratio", "bytes", "size", "bandwidth"):
        k = df[df["kind"] == kind]
        if len(k):
            lines.append(f"{kind} rows within 10%: {int(k['within_10pct'].sum())} / {len(k)}")
    lines.append(f"not modelled: {int((df['kind'] == 'not_modelled').sum())} rows")
    val = df[(df["status"] == "validated") & df["within_10pct"].notna()] if "status" in df else df.iloc[:0]
    for date in sorted(val["date"].unique())[-3:]:  # the latest runs
        g = val[val["date"] == date]
        gt = g[g["kind"] == "throughput"]
        lines.append(f"run {date}: validated rows within 10%: {int(g['within_10pct'].astype(bool).sum())} / {len(g)} "
                     f"(throughput {int(gt['within_10pct'].astype(bool).sum())} / {len(gt)})")
    rep = t[t["note"].fillna("").str.contains("repeats: min")]
    if len(rep):
        lines.append(f"repeated throughput rows (median of the repeats): {len(rep)}, prediction inside the repeats' "
                     f"min-max: {int(rep['note'].str.contains('prediction inside it').sum())}; spread rows: "
                     f"{int((df['kind'] == 'spread').sum())}")
    lines.append("validated throughput rows per mode / metric (error = predicted / measured - 1):")
    lines.append(table(df).to_string())
    worst = t.reindex(t["error"].abs().sort_values(ascending=False).index).head(8)
    lines.append("worst throughput rows:\n" + worst[["date", "mode", "batch", "metric", "measured", "predicted", "error"]].to_string(index=False))
    return "\n".join(lines)
