"""Validation of the inference workload against the H100 measurements of ``reference/inference``.

``python -m simulator.validate_infer`` reads every row of ``results/bench/infer.csv``, simulates the
same configuration (model preset and block count, GPU budget, prompt / generation length, mode, K,
batch, the engine's memory plan batch as ``reference/inference/bench.py`` makes it) on the
``h100-single`` preset (PCIe 53.5 GB/s, the profile ``results/profiles/h100_80gb_hbm3.csv``) and
writes ``results/validation/infer.csv`` (``date,mode,batch,metric,measured,predicted,error,
within_10pct,kind,note``; ``error = predicted / measured - 1``) and ``results/validation/infer.png``.

Nothing here is fitted to the measured rows: the inputs are the model spec, the cluster preset (PCIe
bandwidth, GPU), the GPU kernel profile, HARDWARE.md's ~8 us per eager op and the kernel counts of
the reference (``--count-ops``). Rows the simulator does not model (logit differences, token
equality, the accelerate baseline) are listed with ``kind = not_modelled`` and no prediction.

``python -m simulator.validate_infer --count-ops`` recounts the host program of one block
(`simulator.workload.inference.BLOCK_PROGRAM`) by running ``reference.inference`` on the CPU with a
small Mixtral-shaped model under a dispatch mode (needs torch).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import pandas as pd

from semoe import cluster_preset
from semoe.io import atomic_write_text
from semoe.presets import model_preset
from semoe.sizing import expert_params

ROOT = Path(__file__).resolve().parent.parent
MEASURED = ROOT / "results" / "bench" / "infer.csv"
OUT_CSV = ROOT / "results" / "validation" / "infer.csv"
OUT_PNG = ROOT / "results" / "validation" / "infer.png"
THROUGHPUT = ("prefill_tokens_per_s", "decode_tokens_per_s", "block_compute_ms", "bound_prefill_tokens_per_s")
NOT_MODELLED = ("maxabs_logit_diff_vs_resident", "tokens_equal_resident", "speedup_vs_accelerate")


def parse_config(config: str) -> dict:
    """'mixtral-8x7b-L8 bf16 budget=10GB P=256 G=8' -> preset, layers, budget bytes, P, G."""
    m = re.match(r"(?P<preset>.+?)-L(?P<layers>\d+) (?P<dtype>\w+) budget=(?P<budget>[\d.]+)GB P=(?P<P>\d+) G=(?P<G>\d+)", config)
    if m is None:
        raise ValueError(f"validate_infer: cannot parse config {config!r}")
    return dict(preset=m["preset"], layers=int(m["layers"]), dtype=m["dtype"], budget=float(m["budget"]) * 1e9,
                P=int(m["P"]), G=int(m["G"]))


@lru_cache(maxsize=None)
def _sim(config: str, mode: str, batch: int, slots: int | None, plan_batch: int, predict: bool, budget: bool = True):
    from simulator.workload.inference import InferConfig, simulate_inference

    c = parse_config(config)
    model = model_preset(c["preset"]).replace(layers=c["layers"], name=f"{c['preset']}-L{c['layers']}", dtype=c["dtype"])
    cfg = InferConfig(mode=mode, batch=batch, prompt_len=c["P"], gen_len=c["G"],
                      gpu_budget_bytes=c["budget"] if budget else None, slots=slots, plan_batch=plan_batch,
                      predict=predict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roofline fallbacks are listed once by `predict_all`
        _, res = simulate_inference(model, cluster_preset("h100-single"), cfg, trace=False)
    return model, res


def predict_row(r, bmax: int, predicting_runs: frozenset = frozenset()) -> tuple[float, str, str]:
    """(predicted value, kind, note) for one measured row. ``predicting_runs``: dates of the runs whose
    ``expert`` mode prefetched one block ahead (the bench wrote ``prefetched_used_frac`` rows; run 1 of
    2026-11-24 predates the predictor, so its ``expert`` rows ran without it)."""
    mode, B, metric, config = r["mode"], int(r["batch"]), r["metric"], r["config"]
    c = parse_config(config)
    nan = float("nan")
    if metric in NOT_MODELLED or mode == "accelerate":
        return nan, "not_modelled", "correctness / baseline row (accelerate cpu_offload is not simulated)"
    if mode == "-":
        m = model_preset(c["preset"]).replace(layers=c["layers"], dtype=c["dtype"])
        if metric == "expert_GB_total":
            return m.moe_layers * m.experts * expert_params(m) * m.dtype_bytes / 1e9, "size", "semoe.sizing"
        if metric == "h2d_pinned_GBps":
            return cluster_preset("h100-single").pcie.bandwidth_GBps, "input", "h100-single preset (HARDWARE.md)"
        return nan, "not_modelled", ""
    if mode == "resident":
        model, res = _sim(config, "resident", B, None, bmax, False, budget=False)
        L = model.moe_layers
        v = {"prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
             "block_compute_ms": 1e3 * res.prefill_s / L}.get(metric, nan)
        return v, "throughput", ""
    if mode.startswith("ring"):
        slots = int(mode[6:]) if mode.startswith("ring_K") else None
        if metric == "budget_K":
            _, res = _sim(config, "ring", B, None, bmax, False)
            return res.plan.ring_slots, "count", "memory plan"
        model, res = _sim(config, "ring", B, slots, bmax, False)
        if metric in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            return getattr(res, metric), "throughput", ""
        if metric == "gpu_peak_GB":
            return res.plan.peak_hbm_bytes / 1e9, "memory", ""
        _, resident = _sim(config, "resident", B, None, bmax, False, budget=False)
        L = model.moe_layers
        copy_s = model.experts * expert_params(model) * model.dtype_bytes / (cluster_preset("h100-single").pcie.bandwidth_GBps * 1e9)
        bound_s = L * max(resident.prefill_s / L, copy_s)
        if metric == "bound_prefill_tokens_per_s":
            return B * c["P"] / bound_s, "throughput", "issue 7's bound from simulated compute and the preset's PCIe"
        if metric == "prefill_frac_of_bound":
            return bound_s / res.prefill_s, "ratio", ""
        return nan, "not_modelled", ""
    if mode in ("expert", "expert_nopred"):
        predict = mode == "expert" and r["date"] in predicting_runs
        model, res = _sim(config, "expert", B, None, B, predict)
        v = {"decode_tokens_per_s": (res.decode_tokens_per_s, "throughput"),
             "pool_slots": (res.plan.pool_slots, "count"),
             "hit_rate": (res.hit_rate, "ratio"),
             "decode_GB_copied_per_step": (res.bytes_copied_decode / max(1, c["G"] - 1) / 1e9, "bytes"),
             "gpu_peak_GB": (res.plan.peak_hbm_bytes / 1e9, "memory"),
             "prefetched_used_frac": (1.0 if predict else 0.0, "ratio")}.get(metric)
        if v is None:
            return nan, "not_modelled", ""
        note = "perfect one-block-ahead prediction assumed" if predict else ""
        return v[0], v[1], note
    return nan, "not_modelled", ""


def explain(r) -> str:
    """Why a throughput row misses 10% (mechanisms the simulator leaves out; see NOTES.md)."""
    mode, metric, date = r["mode"], r["metric"], r["date"]
    if mode == "resident" and metric == "decode_tokens_per_s":
        if date.startswith("2026-11-24T04:05"):
            return "run 1: cuDNN SDPA rebuilt a plan per decode step (~205 ms/step, NOTES.md); fixed in run 2"
        return ("host-bound: ~630 eager kernels per step at HARDWARE.md's 8 us predict ~5 ms of host time; the "
                "reference measured ~26 ms/step (NOTES.md), i.e. ~35 us per op in this code path")
    if mode == "resident" and metric in ("prefill_tokens_per_s", "block_compute_ms"):
        return ("compute + host: per-op host time in the reference (~35 us/op implied by NOTES.md vs 8 us used) and "
                "eager torch dispatch/RoPE ops not in the profile; 5 host syncs per block serialise them")
    if mode.startswith("expert") and metric == "decode_tokens_per_s":
        return ("copies and host work serialised per block (the remap's bincount sync waits for the copy); ~75 "
                "kernels per block at 8 us each underestimate the host time (~35 us/op implied by NOTES.md)"
                + ("; the predictor is modelled as perfect (the reference's wasted 1-8% of prefetched bytes and "
                   "measured slower than without it)" if mode == "expert" else ""))
    if metric == "bound_prefill_tokens_per_s":
        return "bound uses the simulated resident compute; see resident prefill"
    return ""


def predict_all(measured: pd.DataFrame) -> pd.DataFrame:
    rows = []
    bmax = int(measured["batch"].max())
    predicting = frozenset(measured.loc[measured["metric"] == "prefetched_used_frac", "date"])
    for _, r in measured.iterrows():
        pred, kind, note = predict_row(r, bmax, predicting)
        meas = float(r["value"])
        if not math.isnan(pred) and meas == 0:
            err = 0.0 if pred == 0 else float("inf")
        else:
            err = pred / meas - 1 if not math.isnan(pred) else float("nan")
        within = bool(abs(err) <= 0.10) if not math.isnan(err) else None
        if within is False and kind == "throughput":
            note = "; ".join(x for x in (note, explain(r)) if x)
        rows.append(dict(date=r["date"], mode=r["mode"], batch=int(r["batch"]), metric=r["metric"], measured=meas,
                         predicted=pred, error=err, within_10pct=within, kind=kind, note=note))
    return pd.DataFrame(rows)


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


def summarise(df: pd.DataFrame) -> str:
    t = df[df["kind"] == "throughput"]
    lines = [f"throughput rows within 10%: {int(t['within_10pct'].sum())} / {len(t)}"]
    for kind in ("memory", "count", "ratio", "bytes", "size"):
        k = df[df["kind"] == kind]
        if len(k):
            lines.append(f"{kind} rows within 10%: {int(k['within_10pct'].sum())} / {len(k)}")
    lines.append(f"not modelled: {int((df['kind'] == 'not_modelled').sum())} rows")
    by = t.assign(ok=t["within_10pct"].astype(bool)).groupby(["mode", "metric"])["ok"].agg(["sum", "count"])
    lines.append(by.to_string())
    worst = t.reindex(t["error"].abs().sort_values(ascending=False).index).head(8)
    lines.append("worst throughput rows:\n" + worst[["date", "mode", "batch", "metric", "measured", "predicted", "error"]].to_string(index=False))
    return "\n".join(lines)


def count_ops() -> None:
    """Print the host program of one MoE block of reference.inference (CPU, tiny Mixtral-shaped model)."""
    import collections
    import tempfile

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from reference.inference.build import build_random_store
    from reference.inference.engine import Engine, InferConfig, random_prompts
    from reference.inference.store import ModelStore

    sync_ops = ("_local_scalar_dense", "bincount", "nonzero", "_unique2", "unique", "masked_select")
    spec = model_preset("mixtral-8x7b").replace(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=256,
                                                max_seq=512, name="tiny-mixtral")
    with tempfile.TemporaryDirectory() as d:
        build_random_store(d, spec, torch.float32, seed=0, gen_device="cpu")
        store = ModelStore.load(d)
        for mode in ("resident", "expert"):
            eng = Engine(store, InferConfig(mode=mode, device="cpu", trace=False), batch=2, max_len=64,
                         prefill_tokens=32)
            seq: list[str] = []

            class Count(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    if not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
                        seq.append(func.__name__)
                    return func(*args, **(kwargs or {}))

            cache = eng.new_cache(2)
            idx = random_prompts(2, 16, spec.vocab)
            for kind, (x, start) in (("prefill", (idx, 0)), ("decode", (idx[:, -1:], 16))):
                seq.clear()
                with Count():
                    eng.forward(x, cache, start, all_logits=False)
                segs, n = [], 0
                for name in seq:
                    n += 1
                    if name.startswith(sync_ops):
                        segs.append((n, name))
                        n = 0
                segs.append((n, "end"))
                print(f"{mode} {kind}: {len(seq)} kernels per forward of {spec.layers} blocks; segments "
                      f"(kernels, sync op): {segs}")
                print("  ", collections.Counter(seq).most_common(12))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measured", type=Path, default=MEASURED)
    ap.add_argument("--out", type=Path, default=OUT_CSV)
    ap.add_argument("--png", type=Path, default=OUT_PNG)
    ap.add_argument("--count-ops", action="store_true")
    a = ap.parse_args(argv)
    if a.count_ops:
        count_ops()
        return 0
    if not a.measured.is_file():
        print(f"validate_infer: measured file not found: {a.measured}", file=sys.stderr)
        return 2
    df = predict_all(pd.read_csv(a.measured))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, df.to_csv(index=False, float_format="%.6g"))
    plot(df, a.png)
    print(summarise(df))
    print(f"wrote {a.out} and {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
