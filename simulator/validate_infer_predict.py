"""The predictions of `simulator.validate_infer` (its module doc gives the rules): the simulation of a row's
configuration (`_sim`), one measured row's prediction (`predict_row`) per mode -- resident, ring, expert-aware,
compiled, and the run's probe rows --, the pooled count rows over `POOL_SEEDS` routing seeds, the pool replays of a
run's traced routing and the calibrated routing persistence."""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

from semoe import cluster_preset
from semoe.presets import model_preset
from semoe.sizing import expert_params
from simulator import validate_infer_inputs as inputs
from simulator.validate_infer_inputs import (
    _ADJ_WHEN_TEXT,
    ADJ_PREFIX,
    COMPILED,
    COPY_IN_PASS,
    H2D_PREFIX,
    NOT_MODELLED,
    NOT_MODELLED_PREFIXES,
    POOL_METRICS,
    POOLED_METRICS,
    POOLED_SUFFIX,
    ROOT,
    RUN_HOST_METRIC,
    _cluster,
    _h2d_used,
    _host_op_s,
    _model,
    adjacent_metric,
    copy_rate_assumed,
    is_spread,
    parse_config,
    parse_mode,
    predict_accuracy,
    with_adjacent,
)
from simulator.workload.inference_host import PROBE_BLOCKS_METRIC, PROBE_METRICS


# the decode probe's host factor on the expert-aware decode (`inference_aftercopy`): adopted by the rule of
# validate_infer's module doc (held-out check 2026-11-24 ~20:45); False: --no-after-copy, the what-if without it
AFTER_COPY = True


@cache
def _after_copy_calibration():
    """`inference_aftercopy.calibrate` of the decode probe run (apart from every bench run), read once."""
    from simulator.workload.inference_aftercopy import calibrate

    return calibrate()


def after_copy_note() -> str:
    """The decode probe's host factor, for the notes of the rows that take it."""
    return _after_copy_calibration().note()


def _after_copy(quant: str | None, probe) -> tuple:
    """``InferConfig.host_after_copy`` of an expert-aware simulation: the calibration's (a, b) for bf16 rows with an
    engine probe (the probe's tiny-width host rate is what it scales), else ()."""
    if not (AFTER_COPY and quant is None and probe is not None and inputs.HOST_OP_S is None):
        return ()
    c = _after_copy_calibration()
    return (c.a, c.b)


@cache
def _sim(config: str, mode: str, batch: int, slots: int | None, plan_batch: int, predict: bool, budget: bool = True,
         quant: str | None = None, dequant: str = "workspace", launch_s: float | None = None, probe=None,
         seed: int | None = None, sync_split: tuple = (), pcie_GBps: float | None = None, persist: float = 0.0):
    """One simulated run of a row's configuration (``seed``: the routing seed, `semoe.Workload.seed`; None: the
    default workload's; ``pcie_GBps``: the pinned H2D bandwidth in place of the preset's, a row's adjacent copy
    probes (`run_h2d`); ``persist``: the decode routing's persistence, `InferConfig.route_persist`)."""
    from semoe import Workload
    from simulator.workload.inference import InferConfig, simulate_inference

    c = parse_config(config)
    model = _model(c)
    cfg = InferConfig(mode=mode, batch=batch, prompt_len=c["P"], gen_len=c["G"],
                      gpu_budget_bytes=c["budget"] if budget else None, slots=slots if slots else c["slots"],
                      plan_batch=plan_batch, predict=predict, quant=quant, dequant=dequant,
                      predict_accuracy=predict_accuracy() if predict else 1.0,
                      launch_s=inputs.HOST_OP_S if launch_s is None else launch_s,
                      host_probe=probe if inputs.HOST_OP_S is None else None,
                      sync_split=sync_split if inputs.HOST_OP_S is None and probe is not None else (),
                      route_persist=persist,
                      host_after_copy=_after_copy(quant, probe) if mode == "expert" else ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roofline fallbacks are listed once by `predict_all`
        wl = None if seed is None else Workload(kind="infer", seq_len=c["P"], gen_len=c["G"], seed=seed)
        _, res = simulate_inference(model, _cluster(pcie_GBps), cfg, workload=wl, trace=False)
    return model, res


SYNC_SPLIT = True  # False: --no-sync-split what-if (the probe's host seconds spread evenly over the kernels)


@cache
def _sync_split() -> tuple:
    """The resident prefill's host-sync shares (`simulator.workload.inference_syncprobe.sync_shares`: the H100
    sync probe b57d4eb at tiny widths), () under ``--no-sync-split``."""
    from simulator.workload.inference_syncprobe import sync_shares

    return sync_shares() if SYNC_SPLIT else ()


POOL_SEEDS = 32  # routing seeds of a pooled count row's prediction (`pooled_prediction`)
# routing seeds of the pooled rows of runs with a weights-seed row (the bench's count passes and --weights-seed,
# from 2026-11-24 ~20:00): their rows pool up to 48 passes, so the prediction's own Monte-Carlo sd must be well
# below theirs (one pass's sd / sqrt(1024): <= 1% of every row)
POOL_SEEDS_SAMPLED = 1024
WEIGHTS_SEED_METRIC = "weights_seed"


@cache
def pooled_prediction(config: str, batch: int, predict: bool, quant: str | None = None,
                      seeds: int = POOL_SEEDS, persist: float = 0.0, des: bool = False) -> dict:
    """metric -> (pooled value, sd of one pass's value) of the expert-aware count rows: the simulator's pool over
    ``seeds`` generates with routing seeds 0 .. seeds - 1 (the row's configuration; counts do not depend on the
    host's speed, so the default host), pooled as the bench pools its repeats (ratios of sums:
    `POOLED_METRICS`); the sd over the seeds of the single-pass values gives the sampling noise of a pooled row
    of R passes, ~ sd / sqrt(R). Each generate's counters come from its bookkeeping alone
    (`inference_poolcounts.count_pool`, the same counters as the timed simulation's, bit for bit); ``des``: from the
    timed simulation (`_sim`, the check)."""
    import numpy as np

    from semoe import Workload
    from simulator.workload.inference import InferConfig
    from simulator.workload.inference_poolcounts import count_pool

    c = parse_config(config)
    G = c["G"]
    # `_sim`'s configuration of the row's expert-aware run, its fields that the pool's counters read
    cfg = InferConfig(mode="expert", batch=batch, prompt_len=c["P"], gen_len=G, gpu_budget_bytes=c["budget"],
                      slots=c["slots"], plan_batch=batch, predict=predict, quant=quant,
                      predict_accuracy=predict_accuracy() if predict else 1.0, route_persist=persist)
    model, cluster = _model(c), _cluster(None)

    def one(s: int):
        if des:
            return _sim(config, "expert", batch, None, batch, predict, quant=quant, seed=s, persist=persist)[1]
        return count_pool(model, cluster, cfg, Workload(kind="infer", seq_len=c["P"], gen_len=G, seed=s))

    tot = {"hits": 0, "misses": 0, "prefetched": 0, "used": 0, "fetch": 0.0}
    per: dict = {m: [] for m in POOLED_METRICS}
    for s in range(seeds):
        res = one(s)
        pre = res.prefetched if predict else 0
        used = res.prefetch_used if predict else 0
        for k, v in (("hits", res.hits), ("misses", res.misses), ("prefetched", pre), ("used", used),
                     ("fetch", res.fetch_bytes_decode)):
            tot[k] += v
        per["hit_rate" + POOLED_SUFFIX].append(res.hit_rate)
        per["prefetched_used_frac" + POOLED_SUFFIX].append(used / pre if pre else 0.0)
        per["decode_GB_copied_per_step" + POOLED_SUFFIX].append(res.fetch_bytes_decode / max(1, G - 1) / 1e9)
    pooled = {"hit_rate" + POOLED_SUFFIX: tot["hits"] / max(1, tot["hits"] + tot["misses"]),
              "prefetched_used_frac" + POOLED_SUFFIX: tot["used"] / tot["prefetched"] if tot["prefetched"] else 0.0,
              "decode_GB_copied_per_step" + POOLED_SUFFIX: tot["fetch"] / (seeds * max(1, G - 1)) / 1e9}
    return {m: (pooled[m], float(np.std(per[m], ddof=1)) if seeds > 1 else float("nan")) for m in POOLED_METRICS}


def _timing(metric: str, res, B: int, P: int, G: int, L: int):
    """Throughput / time metrics every mode reports, from one simulated run (None: not one of them)."""
    return {"prefill_tokens_per_s": res.prefill_tokens_per_s, "decode_tokens_per_s": res.decode_tokens_per_s,
            "prefill_ms_per_block": 1e3 * res.prefill_s / L,
            "decode_ms_per_step": 1e3 * res.decode_s / max(1, G - 1)}.get(metric)


def predict_row(r, bmax: int, predicting_runs: frozenset = frozenset(), host_s: float | None = None,
                probe=None, adj: dict | None = None, h2d: dict | None = None,
                persist: float = 0.0, pool_seeds: int = POOL_SEEDS) -> tuple[float, str, str]:
    """(predicted value, kind, note) for one measured row. ``predicting_runs``: dates of the runs whose
    ``expert`` mode prefetched one block ahead (the bench wrote ``prefetched_used_frac`` rows; run 1 of
    2026-11-24 predates the predictor, so its ``expert`` rows ran without it). ``host_s``: the run's own
    host seconds per kernel (its ``host_op_us`` probe row, `RUN_HOST_METRIC`), else the profile's.
    ``probe``: the run's engine host probe (`HostProbe`, its ``host_*`` rows): bf16 resident, ring and
    expert-aware rows take their host seconds per kernel from it. ``adj``: the run's adjacent probes
    (`run_adjacent`): where the row's (mode, batch) has one, it replaces ``probe`` for that pass
    (`with_adjacent`, the rule in the module doc). ``h2d``: the run's adjacent copy probes (`run_h2d`): where the
    row's (mode, phase, batch) has them, its simulated pass takes their bandwidth (`_h2d_used`). ``persist``: the
    decode routing's persistence of the expert-aware simulations (`routing_persistence`; 0: independent draws).
    ``pool_seeds``: routing seeds of the pooled count rows' prediction (`pooled_prediction`)."""
    mode, B, metric, config = r["mode"], int(r["batch"]), r["metric"], r["config"]
    c = parse_config(config)
    P, G = c["P"], c["G"]
    nan = float("nan")
    if metric in NOT_MODELLED or metric.startswith(NOT_MODELLED_PREFIXES) or metric.endswith("_vs_eager"):
        return nan, "not_modelled", "correctness / quality / baseline row (not simulated)"
    if is_spread(metric):
        return nan, "spread", "the spread of the row's timed repeats (bench --repeats), not simulated"
    if mode == "accelerate":
        return nan, "not_modelled", "accelerate cpu_offload is not simulated"
    if mode in COMPILED:
        return _predict_compiled(r, mode, B, metric, config, bmax, host_s)
    if mode == "-":
        m = _model(c)
        if metric == "expert_GB_total":
            return m.moe_layers * m.experts * expert_params(m) * m.dtype_bytes / 1e9, "size", "semoe.sizing"
        if metric == "h2d_pinned_GBps":
            return cluster_preset("h100-single").pcie.bandwidth_GBps, "input", "h100-single preset (HARDWARE.md)"
        if metric == "moe_blocks":
            return m.moe_layers, "count", "ModelSpec"
        if metric == RUN_HOST_METRIC:
            return _host_op_s() * 1e6, "input", "the profile's host_op row (this run's probe replaces it for the run)"
        if metric == PROBE_BLOCKS_METRIC:
            return m.moe_layers, "input", "the host probe's MoE blocks (the run's)"
        if metric == WEIGHTS_SEED_METRIC:
            return nan, "not_modelled", "the random model's weights seed (which routings the run sampled)"
        return nan, "not_modelled", ""
    if metric in PROBE_METRICS:
        return _predict_probe_row(r, c, probe, host_s)
    if metric.startswith(ADJ_PREFIX):
        return _predict_adjacent_row(r, c, probe, adj or {}, host_s)
    if metric.startswith(H2D_PREFIX):
        return _predict_h2d_row(r)
    if metric.endswith(COPY_IN_PASS) and parse_mode(mode)[0] == "ring":
        bw, src = copy_rate_assumed(r, h2d)
        return bw, "bandwidth", f"the copy engine's rate inside the timed passes against {src}"
    pcie = _h2d_used(r, h2d)
    base, slots, quant, dequant = parse_mode(mode)
    qnote = (f"{quant} experts ({'fused GEMMs' if dequant == 'fused' else 'dequantised into a workspace'})"
             if quant else "")
    probe = probe if quant is None else None  # the probe runs bf16 experts
    res_probe = with_adjacent(probe, adj, "resident", "resident", B)  # the resident simulation's host
    probe = with_adjacent(probe, adj, mode, base, B)  # this row's own (mode, batch) pass
    if base == "resident" or (base == "ring" and metric == "block_compute_ms"):
        # ring rows' block_compute_ms: the bench times the same experts resident (K = L)
        model, res = _sim(config, "resident", B, None, bmax, False, budget=False, quant=quant, dequant=dequant,
                          launch_s=host_s, probe=res_probe, sync_split=_sync_split())
        L = model.moe_layers
        if metric == "block_compute_ms":
            return 1e3 * res.prefill_s / L, "throughput", qnote
        v = _timing(metric, res, B, P, G, L)
        return (nan, "not_modelled", "") if v is None else (v, "throughput", qnote)
    if base == "ring":
        model, res = _sim(config, "ring", B, slots, bmax, False, quant=quant, dequant=dequant, launch_s=host_s,
                          probe=probe, pcie_GBps=pcie)
        L, E, eb = model.moe_layers, model.experts, res.plan.expert_bytes
        bw = cluster_preset("h100-single").pcie.bandwidth_GBps * 1e9
        if metric in ("budget_K", "ring_K"):
            return res.plan.ring_slots, "count", "memory plan"
        v = _timing(metric, res, B, P, G, L)
        if v is not None:
            return v, "throughput", qnote
        if metric == "gpu_peak_GB":
            return res.plan.peak_hbm_bytes / 1e9, "memory", qnote
        if metric == "bytes_per_block":
            return E * eb, "bytes", qnote
        if metric == "dequant_ms_per_block" and quant:  # the dequant pass alone, as the simulator charges it
            from simulator.workload.inference_host import host_program

            n = host_program(quant, "ring", "prefill").unit("dequant_block")
            return 1e3 * _dequant_s(model, quant, n), "throughput", "one block's experts, memory-bound pass"
        if metric == "copy_ms_per_block":
            return 1e3 * E * eb / bw, "throughput", "the block's bytes over the preset's pinned H2D bandwidth"
        if metric == "bytes_copied_per_forward":
            return (L if res.plan.ring_slots < L else 0) * E * eb, "bytes", "every block once per pass when K < L"
        if metric == "decode_GB_copied_per_step":
            return res.bytes_copied_decode / max(1, G - 1) / 1e9, "bytes", qnote
        if "speedup_vs" in metric and quant:  # the quantised ring over the bf16 ring, same batch and slots
            _, bf = _sim(config, "ring", B, slots, bmax, False, launch_s=host_s)
            which = "decode" if "decode" in metric else "prefill"
            v = getattr(res, f"{which}_tokens_per_s") / getattr(bf, f"{which}_tokens_per_s")
            return v, "ratio", f"{which} tokens/s of the {quant} ring over the simulated bf16 ring"
        _, resident = _sim(config, "resident", B, None, bmax, False, budget=False, quant=quant, dequant=dequant,
                           launch_s=host_s, probe=res_probe, sync_split=_sync_split())
        bound_s = L * max(resident.prefill_s / L, E * eb / bw)
        if metric == "bound_prefill_tokens_per_s":
            return B * P / bound_s, "throughput", "issue 7's bound from simulated compute and the preset's PCIe"
        if metric == "prefill_frac_of_bound":
            return bound_s / res.prefill_s, "ratio", ""
        return nan, "not_modelled", ""
    if base in ("expert", "expert_nopred"):
        predict = base == "expert" and r["date"] in predicting_runs
        model, res = _sim(config, "expert", B, None, B, predict, quant=quant, dequant=dequant, launch_s=host_s,
                          probe=probe, pcie_GBps=pcie, persist=persist)
        v = _timing(metric, res, B, P, G, model.moe_layers)
        pooled_note = ""
        if metric in POOLED_METRICS:
            val, sd = pooled_prediction(config, B, predict, quant, seeds=pool_seeds, persist=persist)[metric]
            v = (val, "bytes" if metric.startswith("decode_GB") else "ratio")
            pooled_note = (f"the simulated pool over {pool_seeds} routing seeds, pooled as the bench pools its repeats "
                           f"(ratio of sums); one pass's sd over the seeds {sd:.3g}")
        elif v is not None and metric.startswith("decode"):
            v = (v, "throughput")
        else:
            # the bench's pool statistics: expert-aware fetches and prefetches only (a ring pass copies
            # through the ring, which they do not count)
            v = {"pool_slots": (res.plan.pool_slots, "count"),
                 "hit_rate": (res.hit_rate, "ratio"),
                 "decode_GB_copied_per_step": (res.fetch_bytes_decode / max(1, G - 1) / 1e9, "bytes"),
                 "gpu_peak_GB": (res.plan.peak_hbm_bytes / 1e9, "memory"),
                 "prefetched_used_frac": (res.prefetch_used / res.prefetched if predict and res.prefetched else 0.0,
                                          "ratio")}.get(metric)
        if v is None:
            return nan, "not_modelled", ""
        note = (f"one-block-ahead prediction at the diagnostic's measured accuracy {predict_accuracy():.3f} "
                "(results/bench/infer_diag, B = 1: wasted prefetch bytes / prefetched bytes)") if predict else ""
        if res.passes.get("expert", 0) == 0 and metric in ("decode_tokens_per_s", "decode_ms_per_step", "hit_rate",
                                                            "prefetched_used_frac", "decode_GB_copied_per_step",
                                                            *POOLED_METRICS):
            note = (f"ring fallback: {B} tokens per step are expected to touch >= {_fallback_frac():g} of the experts, so every "
                    "pass runs the ring (pool statistics stay 0; the ring's copies are not in them)")
            pooled_note = ""
        elif v[1] == "throughput" and metric.startswith("decode") and _after_copy(quant, probe):
            note = "; ".join(x for x in (note, after_copy_note()) if x)
        return v[0], v[1], "; ".join(x for x in (note, pooled_note, qnote) if x)
    return nan, "not_modelled", ""


def _fallback_frac() -> float:
    from simulator.workload.inference import InferConfig

    return InferConfig().fallback_frac


def _probe_run(config: str, mode: str, batch: int, probe):
    """An unrun `InferenceRun` of the probe's (``mode``, ``batch``) pass structure (the counted program,
    the fallback rule, the ring's K), for `InferenceRun.probe_pass_kernels`."""
    from simulator.engine import Sim
    from simulator.workload.inference import InferConfig, InferenceRun

    c = parse_config(config)
    base = "expert" if mode.startswith("expert") else mode
    cfg = InferConfig(mode=base, batch=batch, prompt_len=c["P"], gen_len=c["G"], predict=mode == "expert",
                      gpu_budget_bytes=c["budget"] if base != "resident" else None, slots=c["slots"], host_probe=probe)
    return InferenceRun(_model(c), cfg, Sim(cluster_preset("h100-single"), profile=None, trace=False))


def _predict_probe_row(r, c: dict, probe, host_s: float | None) -> tuple[float, str, str]:
    """A host probe row (an input of its run): ``host_*_ms`` rows are predicted as the per-kernel model would
    (the probe pass's counted kernels x the run's ``host_op_us``, else the profile's host seconds per kernel),
    so their error is what the probe corrects; copy counts are not predicted."""
    nan = float("nan")
    phase, what = PROBE_METRICS[r["metric"]]
    if what != "ms" or probe is None:
        return nan, "input", "the host probe's copy calls per pass (ring blocks or experts)"
    B = int(r["batch"])
    copies = next((cp for m, ph, b, _, cp in probe.points if m == r["mode"] and ph == phase and b == B), 0.0)
    n = _probe_run(r["config"], r["mode"], B, probe).probe_pass_kernels(phase, B, copies)
    h = host_s if host_s is not None else _host_op_s()
    return 1e3 * n * h, "input", (f"engine host probe (tiny widths, this run); predicted: {n:.0f} counted kernels x "
                                  f"{h * 1e6:.1f} us per kernel")


def _adjacent_kernels(config: str, mode: str, phase: str, B: int, probe, copies: float) -> float:
    """Counted kernels of an adjacent probe pass of row mode ``mode`` (``ring_K<k>``: the ring with K = k)."""
    base, slots, _, _ = parse_mode(mode)
    c = parse_config(config)
    cfg_mode = "expert" if base.startswith("expert") else base
    from simulator.engine import Sim
    from simulator.workload.inference import InferConfig, InferenceRun

    cfg = InferConfig(mode=cfg_mode, batch=B, prompt_len=c["P"], gen_len=c["G"], predict=base == "expert",
                      gpu_budget_bytes=c["budget"] if cfg_mode != "resident" else None, slots=slots or c["slots"],
                      host_probe=probe)
    run = InferenceRun(_model(c), cfg, Sim(cluster_preset("h100-single"), profile=None, trace=False))
    return run.probe_pass_kernels(phase, B, copies)


def _predict_adjacent_row(r, c: dict, probe, adj: dict, host_s: float | None) -> tuple[float, str, str]:
    """An adjacent host probe row (an input of its run, `ADJ_METRICS`): ``*_ms*`` rows are predicted as the
    run's once-per-run probe would have it (its host seconds per kernel of that code path, the median over its
    batches, x the counted kernels of this pass), so their error shows what measuring next to the row
    changes; copy counts are not predicted."""
    nan = float("nan")
    phase, what = adjacent_metric(r["metric"])
    B, mode = int(r["batch"]), r["mode"]
    if what != "ms" or probe is None or (mode, phase, B) not in adj:
        return nan, "input", "the adjacent host probe's copy calls per pass (ring blocks or experts)"
    base = parse_mode(mode)[0]
    n = _adjacent_kernels(r["config"], mode, phase, B, probe, adj[(mode, phase, B)][1])
    run = _probe_run(r["config"], base, B, probe)  # the once-per-run probe's rate of this code path
    q = c["P"] if phase == "prefill" else 1
    mech = run._mode_of(B * q)
    rate = probe.rate(base, phase, B, lambda b, cp: run.probe_pass_kernels(phase, b, cp),
                      keep=lambda b: run._mode_of(b * q) == mech)
    if rate is None:
        return nan, "input", "adjacent host probe (no once-per-run probe of this path)"
    when = _ADJ_WHEN_TEXT.get(r["metric"].rsplit("_", 1)[1], "")
    return 1e3 * n * rate, "input", (f"adjacent host probe (tiny widths, {when}); predicted: {n:.0f} counted kernels x the run's once-per-run "
                                     f"probe, {rate * 1e6:.1f} us per kernel")


def _predict_compiled(r, mode: str, B: int, metric: str, config: str, bmax: int, host_s: float | None = None
                      ) -> tuple[float, str, str]:
    """``compiled`` (resident, `reference/inference/static.py`): decode replays one CUDA graph per step,
    so its host cost is one graph launch (``host_op_s``) per step and its device time is the eager
    step's (the same GEMMs, attention and dispatch); prefill runs inductor's fused kernels without CUDA
    graphs, whose kernel count is not counted: not modelled. ``ring_compiled``: copy-bound over PCIe in
    both phases, so the (uncounted) compiled host program stays hidden under the copies: the eager
    ring's simulation."""
    nan = float("nan")
    c = parse_config(config)
    G = c["G"]
    if mode == "compiled":
        if metric not in ("decode_tokens_per_s", "decode_ms_per_step"):
            return nan, "not_modelled", "compiled prefill: inductor's fused kernels are not counted"
        model, res = _sim(config, "resident", B, None, bmax, False, budget=False, launch_s=0.0)
        step_s = res.decode_s / max(1, G - 1) + (host_s if host_s is not None else _host_op_s())  # + one graph launch
        v = B / step_s if metric == "decode_tokens_per_s" else 1e3 * step_s
        return v, "throughput", "CUDA-graph decode: eager device time + one graph launch per step"
    model, res = _sim(config, "ring", B, None, bmax, False, launch_s=host_s)
    v = _timing(metric, res, B, c["P"], G, model.moe_layers)
    if v is None:
        return nan, "not_modelled", ""
    return v, "throughput", "copy-bound: the eager ring's simulation (compiled host program hidden under copies)"


def _dequant_s(model, quant: str, kernels: int) -> float:
    from simulator.cost import CostModel
    from simulator.workload.inference_costs import BlockCosts

    cm = CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True)
    return BlockCosts(model, cm, quant).dequant(model.experts, max(1, kernels))


def _predict_h2d_row(r) -> tuple[float, str, str]:
    """An adjacent copy probe row (an input of its run): predicted as the preset's bandwidth, so its error shows the
    drift of the machine's copies from it."""
    bw = cluster_preset("h100-single").pcie.bandwidth_GBps
    when = r["metric"].rsplit("_", 1)[-1]
    return bw, "input", (f"pinned H2D copy probe next to the row's timed passes ({_ADJ_WHEN_TEXT.get(when, when)}); "
                         "predicted: the h100-single preset's bandwidth")


TRACES = ROOT / "results" / "bench" / "infer_trace"


@cache
def pool_replays(commit: str, traces: Path | None = None) -> dict:
    """(mode, batch) -> (replayed, engine) pool counters (hits, misses, prefetched, prefetch_used) of the bench
    run at ``commit`` whose expert pool calls were traced (``<traces>/*_<commit>_expert_trace.csv`` and
    ``..._expert_trace_stats.csv``: ``reference/inference/bench.py`` ``trace_pool_calls``): the simulator's pool
    (`simulator.workload.inference.replay_pool_trace`) on the routing the engine saw. Traces with a ``repeat``
    column (the bench's pooled repeats, each a fresh engine) are replayed per repeat and summed over them, as
    the pooled rows sum the engine's counters. A diagnostic of the hit-rate rows (the LRU mechanism apart from the
    routing), never a prediction's input."""
    import csv
    from collections import defaultdict

    from simulator.workload.inference import replay_pool_trace

    out: dict = {}
    for path in sorted((traces or TRACES).glob(f"*_{commit}_expert_trace.csv")):
        spath = path.with_name(path.name.replace("_expert_trace.csv", "_expert_trace_stats.csv"))
        if not spath.is_file():
            continue
        calls, shape = defaultdict(list), {}
        with path.open() as f:
            for r in csv.DictReader(f):
                k = (r["mode"], int(r["batch"]), int(r.get("repeat") or 0))
                calls[k].append((int(r["step"]), int(r["block"]), r["call"], tuple(int(e) for e in r["experts"].split())))
                shape[k] = (int(r["pool_slots"]), int(r["ring_slots"]))
        names = ("hits", "misses", "prefetched", "prefetch_used")
        with spath.open() as f:
            for s in csv.DictReader(f):
                k = (s["mode"], int(s["batch"]), int(s.get("repeat") or 0))
                engine = {m: int(s[m]) for m in names}
                blocks = [int(b) for b in s["moe_blocks"].split()]
                if k in shape:
                    rep = replay_pool_trace(calls[k], shape[k][0], int(s["experts"]), blocks, shape[k][1])
                elif sum(engine.values()) == 0:  # a pass that never called the pool (ring fallback): no trace rows
                    rep = dict.fromkeys(names, 0)
                else:
                    continue
                old = out.get(k[:2], (dict.fromkeys(names, 0), dict.fromkeys(names, 0)))
                out[k[:2]] = ({m: old[0][m] + rep[m] for m in names}, {m: old[1][m] + engine[m] for m in names})
    return out


# routing persistence of the expert-aware decode (`simulator.workload.inference_persist`): measured on ONE run's
# traced B = 1 routing (the calibration run), applied to the expert-aware simulations of the runs with pooled count
# rows (from 41ed3d6 on: R passes on other prompts each); earlier runs decode the calibration run's prompts with
# the same weights (the same routing), so they keep independent draws (rule: module doc)
PERSIST_COMMIT = "76200c0"


@cache
def routing_persistence(traces: Path | None = None, commit: str = PERSIST_COMMIT):
    """The calibration run's routing persistence (`inference_persist.Persistence`) from its expert trace; None
    when the trace is absent."""
    from simulator.workload.inference_persist import routing_persistence as estimate

    path = (traces or TRACES) / f"2026-11-24_{commit}_expert_trace.csv"
    if not path.is_file():
        return None
    m = model_preset("mixtral-8x7b")
    return estimate(path, m.experts, m.top_k)


def _persist_for(r, pers, pooled_runs: frozenset) -> float:
    """The decode routing persistence a row's expert-aware simulation takes: the calibration's ``q`` for runs with
    pooled rows (held out), else 0."""
    if pers is None or r["date"] not in pooled_runs or str(r.get("commit", "")) == PERSIST_COMMIT:
        return 0.0
    return pers.q if parse_mode(r["mode"])[0] in ("expert", "expert_nopred") else 0.0


def _calibration_row(r, kind: str) -> bool:
    return (str(r.get("commit", "")) == PERSIST_COMMIT and str(r["mode"]).startswith("expert")
            and r["metric"] in POOL_METRICS and kind != "spread")
