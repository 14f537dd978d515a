"""Issue 7's suite of the inference bench (`reference.inference.bench`, whose module doc describes its rows): the
resident, ring and expert-aware rows, each timed repeat beside its adjacent probes, and accelerate's cpu_offload
baseline on the same prefill batch."""

from __future__ import annotations

import csv
import datetime as dt
import os
import statistics
import time
from unittest import mock

import torch

from reference.inference.bench_device import CUDA, DEV, GcClock, free_cuda, log, peak_GB, timed
from reference.inference.bench_probes import (
    QUICK_PROBE_WIDTHS,
    H2D_CHUNK_BYTES,
    H2D_CHUNK_COLUMNS,
    H2DProber,
    copy_bound,
    h2d_chunk_map,
    h2d_GBps,
    h2d_rows,
    host_op_s,
    host_probe,
    interleave,
)
from reference.inference.bench_rows import (
    COLUMNS,
    POOL_COUNTERS,
    REPEAT_COLUMNS,
    decode_tps,
    expert_prompt_seed,
    falls_back,
    pass_copies,
    parse_count_passes,
    pooled_rows,
    trace_pool_calls,
    write_pool_trace,
)
from reference.inference.build import build_random_store
from reference.inference.engine import Engine, InferConfig, random_prompts, ring_bound_s
from reference.inference.store import ModelStore
from semoe.presets import model_preset


def accelerate_prefill_s(store: ModelStore, idx: torch.Tensor, reps: int) -> tuple[float, torch.Tensor]:
    """MoEDecoder with accelerate.cpu_offload (the usual pageable CPU state dict)."""
    from accelerate import cpu_offload

    from reference.model import MoEDecoder
    from reference.moe.experts import ExpertWeights

    spec = store.spec
    with torch.device("meta"), mock.patch.object(ExpertWeights, "reset_parameters", lambda self, seed=None: None):
        model = MoEDecoder(spec, seed=None)
    model = model.to(dtype=store.dtype).to_empty(device="cpu")
    sd = dict(store.dense_state)
    for b in store.moe_blocks:
        sd.update({f"blocks.{b}.ffn.experts.{k}": v for k, v in store.layer_views(b).items()})
    model.load_state_dict(sd, strict=True)  # copies into pageable memory
    del sd
    model.eval()
    # accelerate moves a module's weights in its own forward hook. The gate reads router.weight and the fused
    # Triton MoE path reads the experts' stacked weights without calling their modules, so the whole MoE layer
    # is loaded in the layer's hook (accelerate's preload_module_classes), else those weights stay on "meta"
    moe_cls = type(model.blocks[store.moe_blocks[0]].ffn).__name__
    cpu_offload(model, execution_device=torch.device(DEV), preload_module_classes=[moe_cls])
    x = idx.to(DEV)
    with torch.no_grad():
        out = model(x).logits_BSV[:, -1].float().cpu()
    if not torch.isfinite(out).all():
        raise RuntimeError("accelerate baseline produced non-finite logits (weights not loaded by its hooks?)")
    with torch.no_grad():
        t = timed(lambda: model(x), reps)
    del model
    free_cuda()
    return t, out


def suite_issue7(a, t_start: float) -> int:
    """Issue 7 on one model (``a``: `main`'s parsed arguments, its ``--quick`` settings applied; ``t_start``: the
    ``perf_counter`` from which ``--repeat-until-s`` counts), rows written to OUT/infer_rows.csv after every
    measurement (`reference.inference.bench`'s module doc for the rows and the order)."""
    batches = [int(b) for b in a.batches.split(",")]
    Bmax, P, G = max(batches), a.prompt_len, a.gen_len
    commit = os.environ.get("SEMOE_COMMIT", "unknown")
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    spec = model_preset(a.preset).replace(layers=a.layers, name=f"{a.preset}-L{a.layers}", dtype="bf16")
    rows: list[dict] = []
    a.out.mkdir(parents=True, exist_ok=True)

    def row(mode: str, batch: int, metric: str, value: float) -> None:
        r = dict(date=date, commit=commit, device=device, config=config, mode=mode, batch=batch, metric=metric,
                 value=f"{value:.6g}")
        rows.append(r)
        log(f"ROW {mode:9s} B={batch} {metric} = {value:.4g}")
        with (a.out / "infer_rows.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)

    log(f"building {spec.name} into {a.store}")
    build_random_store(a.store, spec, torch.bfloat16, seed=a.weights_seed, gen_device=DEV, progress=log)
    store = ModelStore.load(a.store, progress=log)
    L, E = len(store.moe_blocks), spec.experts
    if a.quick:  # a budget of 1.5 blocks' experts: ring K = 1 < L, expert-aware misses
        from reference.inference.engine import plan_memory

        pm = plan_memory(store, "ring", 1 << 50, Bmax, P + G, Bmax * P)
        a.budget_gb = round((pm.dense_bytes + pm.kv_bytes + pm.act_bytes + 1.5 * E * store.expert_bytes) / 1e9, 6)
    config = f"{spec.name} bf16 budget={a.budget_gb:g}GB P={P} G={G}"
    layer_bytes = store.expert_bytes * E
    log(f"loaded: {L} blocks x {layer_bytes / 1e9:.2f} GB experts (pinned={store.pinned}), dense {store.dense_bytes / 1e9:.2f} GB")
    row("-", 0, "expert_GB_total", L * layer_bytes / 1e9)
    row("-", 0, "weights_seed", a.weights_seed)
    bw = h2d_GBps(store)
    row("-", 0, "h2d_pinned_GBps", bw)
    chunks = h2d_chunk_map(store)  # where in the pinned store the copies are slower (h2d_chunks.csv; ~1 s)
    with (a.out / "h2d_chunks.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, H2D_CHUNK_COLUMNS)
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in c.items()} for c in chunks)
    rates = sorted(c["GBps"] for c in chunks)
    log(f"h2d chunk map: {len(chunks)} copies of {H2D_CHUNK_BYTES >> 20} MiB, GB/s min {rates[0]:.1f} median "
        f"{statistics.median(rates):.1f} max {rates[-1]:.1f}; per block median "
        + " ".join(f"{b}:{statistics.median(c['GBps'] for c in chunks if c['block'] == b):.1f}" for b in store.moe_blocks))
    row("-", 0, "host_op_us", 1e6 * host_op_s())
    prober = None
    if not a.skip_host_probe:  # the engine's own host time per pass, this run (< 30 s on the H100)
        from reference.inference.engine import plan_memory

        budget = int(a.budget_gb * 1e9)
        K = plan_memory(store, "ring", budget, Bmax, P + G, Bmax * P).ring_slots
        plans = {("ring", B): K for B in batches}
        plans.update({("expert", B): plan_memory(store, "expert", budget, B, P + G, B * P).pool_slots for B in batches})
        probe_dir = a.store.parent / f"{a.store.name}_hostprobe" if not a.quick else a.out / "probe_store"
        t0 = time.perf_counter()
        prober = host_probe(spec, probe_dir, batches, P, G, a.reps, plans, row, QUICK_PROBE_WIDTHS if a.quick else None)
        log(f"host probe: {time.perf_counter() - t0:.1f} s")

    h2d = None if a.skip_h2d_probe else H2DProber(store, None if a.h2d_probe_mb is None else int(a.h2d_probe_mb * 2**20))
    rep_path = a.out / "repeats.csv"
    rep_path.write_text(",".join(REPEAT_COLUMNS) + "\n")

    def rep_row(row_mode: str, batch: int, phase: str, i: int, what: str, value: float) -> None:
        with rep_path.open("a", newline="") as f:
            csv.writer(f).writerow((row_mode, batch, phase, i, what, f"{value:.6g}"))

    def repeated(phase: str, row_mode: str, batch: int, repeats: int, fn, name: str | None = None,
                 slots: int | None = None) -> list:
        """``fn(i)`` -> seconds of timed repeat i of row (``row_mode``, ``batch``): ``repeats`` of them (one after
        ``--repeat-until-s`` seconds of the run), interleaved with the host probe of the row's code path
        (`HostProber.around`); every repeat's seconds and probe milliseconds go to ``repeats.csv``; row
        ``<phase>_repeats``. Returns the repeats' seconds."""
        if repeats > 1 and time.perf_counter() - t_start > a.repeat_until_s:
            log(f"{row_mode} B={batch} {phase}: past --repeat-until-s {a.repeat_until_s:g} s, 1 repeat instead of {repeats}")
            repeats = 1

        def log_rep(ph: str, i: int, what: str, value: float) -> None:
            rep_row(row_mode, batch, ph, i, what, value)

        def timed_fn(i: int) -> float:
            with GcClock() as gcc:  # the collector's pauses inside the repeat (repeats.csv only)
                sec = fn(i)
            log_rep(phase, i, "timed_s", sec)
            log_rep(phase, i, "gc_s", gcc.s)
            log_rep(phase, i, "gc_n", gcc.n)
            return sec

        gbps: list = []

        def copy_probe() -> None:  # the adjacent copy probe of a copy-bound row (`H2DProber`)
            gbps.append(h2d.measure())
            log_rep(phase, len(gbps) - 1, "h2d_GBps", gbps[-1])

        also = copy_probe if copy_bound(row_mode) and h2d is not None else None
        if prober is None:
            secs = interleave(repeats, timed_fn, also)
        else:
            secs = prober.around(phase, row_mode, batch, repeats, timed_fn, name, slots, log_rep, also)
        if gbps:
            h2d_rows(row, row_mode, batch, phase, gbps)
        row(row_mode, batch, f"{phase}_repeats", repeats)
        return secs

    def spread_rows(mode: str, batch: int, metric: str, values: list) -> float:
        """Row ``metric`` = the median of the repeats' ``values``; with more than one also ``metric_min`` /
        ``metric_max`` (the noise). Returns the median."""
        med = statistics.median(values)
        row(mode, batch, metric, med)
        if len(values) > 1:
            row(mode, batch, f"{metric}_min", min(values))
            row(mode, batch, f"{metric}_max", max(values))
        return med

    def engine(mode: str, batch: int, slots: int | None = None, budget: float | None = a.budget_gb,
               predict: bool = True, trace: bool = False) -> Engine:
        free_cuda()
        cfg = InferConfig(mode=mode, gpu_budget_gb=budget, slots=slots, device=DEV, trace=trace, predict=predict)
        return Engine(store, cfg, batch=batch, max_len=P + G, prefill_tokens=batch * P)

    def forward_s(eng: Engine, idx: torch.Tensor, copies: list | None = None):
        """One timed prefill forward (synchronised): a prefill repeat; ``copies`` (a traced ring engine) gets the
        pass's `pass_copies` (read after the timed region)."""
        def run(i: int) -> float:
            if copies is not None:
                eng.timeline.spans.clear()  # the warm-up's / the last repeat's spans
            sec = timed(lambda: eng.forward(idx, all_logits=False), 1)
            if copies is not None:
                copies.append(pass_copies(eng))
            return sec
        return run

    def copy_rows(row_mode: str, batch: int, phase: str, copies: list) -> None:
        """Every traced repeat's copies in repeats.csv, and row ``<phase>_copy_GBps_in_pass`` (median, spread)."""
        for i, c in enumerate(copies):
            for what in ("copy_GBps_in_pass", "copy_busy_s", "copy_GB"):
                rep_row(row_mode, batch, phase, i, what, c[what])
            for blk, sec in sorted(c["block_copy_s"].items()):  # where the copy time went, block by block
                rep_row(row_mode, batch, phase, i, f"copy_s_b{blk}", sec)
        spread_rows(row_mode, batch, f"{phase}_copy_GBps_in_pass", [c["copy_GBps_in_pass"] for c in copies])

    # --- resident: compute time per block (all experts on the GPU; budget not applied)
    comp = {}
    eng = engine("resident", Bmax, budget=None)
    for B in batches:
        idx = random_prompts(B, P, spec.vocab, seed=B).to(DEV)
        eng.forward(idx, all_logits=False)  # untimed warm-up
        ts = repeated("prefill", "resident", B, a.repeats, forward_s(eng, idx))
        t = statistics.median(ts)
        comp[B] = t / L
        spread_rows("resident", B, "prefill_tokens_per_s", [B * P / x for x in ts])
        spread_rows("resident", B, "block_compute_ms", [1e3 * x / L for x in ts])
    ref_last = eng.forward(random_prompts(Bmax, P, spec.vocab, seed=Bmax).to(DEV), all_logits=False)[:, -1].float().cpu()
    res_dec = {}
    for B in batches:
        prompts = random_prompts(B, P, spec.vocab, seed=B)
        toks = []

        def res_decode(i: int) -> float:
            eng.generate(prompts, 2)  # untimed warm-up (first-call costs), every repeat
            r = eng.generate(prompts, G)
            toks.append(r.tokens_BG)
            return r.decode_s

        ts = repeated("decode", "resident", B, a.decode_repeats, res_decode)
        res_dec[B] = toks[0]
        spread_rows("resident", B, "decode_tokens_per_s", [decode_tps(B, G, x) for x in ts])
    del eng

    # --- ring prefill over K (batch Bmax) and over batch (budget K), against the bound
    for K in [int(k) for k in a.slots.split(",")]:
        eng = engine("ring", Bmax, slots=K, trace=True)
        idx = random_prompts(Bmax, P, spec.vocab, seed=Bmax).to(DEV)
        eng.forward(idx, all_logits=False)  # untimed warm-up
        copies: list = []
        ts = repeated("prefill", f"ring_K{K}", Bmax, a.ring_repeats, forward_s(eng, idx, copies), "ring", slots=K)
        copy_rows(f"ring_K{K}", Bmax, "prefill", copies)
        row(f"ring_K{K}", Bmax, "gpu_peak_GB", peak_GB())
        bound = ring_bound_s([comp[Bmax]] * L, layer_bytes, bw * 1e9)
        spread_rows(f"ring_K{K}", Bmax, "prefill_tokens_per_s", [Bmax * P / x for x in ts])
        spread_rows(f"ring_K{K}", Bmax, "prefill_frac_of_bound", [bound / x for x in ts])
        del eng
    ring_prefill = {}
    eng = engine("ring", Bmax, trace=True)
    Kb = eng.plan.ring_slots
    row("ring", Bmax, "budget_K", Kb)
    for B in batches:
        idx = random_prompts(B, P, spec.vocab, seed=B).to(DEV)
        eng.forward(idx, all_logits=False)  # untimed warm-up
        copies = []
        ts = repeated("prefill", "ring", B, a.ring_repeats, forward_s(eng, idx, copies))
        copy_rows("ring", B, "prefill", copies)
        ring_prefill[B] = statistics.median(ts)
        bound = ring_bound_s([comp[B]] * L, layer_bytes, bw * 1e9)
        spread_rows("ring", B, "prefill_tokens_per_s", [B * P / x for x in ts])
        row("ring", B, "bound_prefill_tokens_per_s", B * P / bound)
        spread_rows("ring", B, "prefill_frac_of_bound", [bound / x for x in ts])
    last = eng.forward(random_prompts(Bmax, P, spec.vocab, seed=Bmax).to(DEV), all_logits=False)[:, -1].float().cpu()
    row("ring", Bmax, "maxabs_logit_diff_vs_resident", float((last - ref_last).abs().max()))
    same = True
    for B in batches:
        prompts = random_prompts(B, P, spec.vocab, seed=B)
        toks, copies = [], []

        def ring_decode(i: int) -> float:
            eng.timeline.spans.clear()
            r = eng.generate(prompts, G)
            copies.append(pass_copies(eng, decode_only=True))  # after generate's timed region
            toks.append(r.tokens_BG)
            return r.decode_s

        ts = repeated("decode", "ring", B, a.ring_decode_repeats, ring_decode)
        copy_rows("ring", B, "decode", copies)
        same &= all(torch.equal(t, res_dec[B]) for t in toks)
        spread_rows("ring", B, "decode_tokens_per_s", [decode_tps(B, G, x) for x in ts])
    row("ring", Bmax, "gpu_peak_GB", peak_GB())
    row("ring", 0, "tokens_equal_resident", float(same))
    del eng

    # --- expert-aware decode (budget-sized LRU pool; prefill falls back to the ring): every repeat a fresh engine
    # (a cold pool) on its own prompts (`expert_prompt_seed`); every repeat's pool calls traced; the count rows are
    # written in the last section, pooled over the timed repeats and the untimed count passes; gpu_peak_GB is the
    # first repeat's
    pools: dict = {}  # (mode, batch) -> every pass's pool counters (timed repeats first)
    same_tokens: dict = {}
    first: dict = {}  # (mode, batch) -> pool slots and peak GPU GB of its first pass

    def expert_pass(mname: str, B: int, i: int) -> float:
        """Pass ``i`` of (``mname``, ``B``): a fresh engine, one traced generate on prompts ``expert_prompt_seed(B,
        i)``, its counters kept for the pooled rows and in repeats.csv; returns its decode seconds."""
        prompts = random_prompts(B, P, spec.vocab, seed=expert_prompt_seed(B, i))
        eng = engine("expert", B, predict=mname == "expert")
        calls = trace_pool_calls(eng)
        r = eng.generate(prompts, G)
        if i == 0:  # repeat 0 decodes the resident rows' prompts: the tokens must be equal
            same_tokens[mname] = same_tokens.get(mname, True) and torch.equal(r.tokens_BG, res_dec[B])
            first[(mname, B)] = (r.stats["pool_slots"], peak_GB())
        write_pool_trace(a.out, mname, B, eng, calls, r.stats, repeat=i)
        pools.setdefault((mname, B), []).append(r.stats)
        with rep_path.open("a", newline="") as f:  # the pass's pool counters (repeats.csv)
            csv.writer(f).writerows((mname, B, "decode", i, f"pool_{k}", r.stats[v]) for k, v in POOL_COUNTERS)
        eng.close()
        del eng
        return r.decode_s

    for mname in ("expert", "expert_nopred"):
        for B in batches:
            R = 1 if falls_back(spec, B) else a.expert_repeats
            ts = repeated("decode", mname, B, R, lambda i, m=mname, b=B: expert_pass(m, b, i))
            spread_rows(mname, B, "decode_tokens_per_s", [decode_tps(B, G, x) for x in ts])
            row(mname, B, "pool_slots", first[(mname, B)][0])
            row(mname, B, "gpu_peak_GB", first[(mname, B)][1])
        row(mname, 0, "tokens_equal_resident", float(same_tokens[mname]))

    # --- accelerate cpu_offload on the same prefill batch
    if not a.skip_accelerate:
        idx = random_prompts(Bmax, P, spec.vocab, seed=Bmax)
        try:
            t, out = accelerate_prefill_s(store, idx, a.accelerate_reps)
            row("accelerate", Bmax, "prefill_tokens_per_s", Bmax * P / t)
            row("ring", Bmax, "speedup_vs_accelerate", t / ring_prefill[Bmax])
            row("accelerate", Bmax, "maxabs_logit_diff_vs_resident", float((out - ref_last).abs().max()))
        except Exception as e:  # report, keep the other rows
            log(f"accelerate baseline failed: {type(e).__name__}: {e}")
    # --- count passes (untimed): more expert-aware passes of the rows in --count-passes, round-robin over them
    # until each has its passes or --count-until-s of the run has gone; then every (mode, batch)'s pooled rows
    def count_pass(mname: str, B: int, i: int) -> None:  # its decode seconds in repeats.csv (not a timed row)
        sec = expert_pass(mname, B, i)
        with rep_path.open("a", newline="") as f:
            csv.writer(f).writerow((mname, B, "decode", i, "count_decode_s", f"{sec:.6g}"))

    count_passes(pools, parse_count_passes(a.count_passes), count_pass, lambda: time.perf_counter() - t_start,
                 a.count_until_s, lambda B: falls_back(spec, B))
    for (mname, B), stats in pools.items():
        for metric, value in pooled_rows(stats, store.expert_bytes, G).items():
            row(mname, B, metric, value)
    log("done")
    return 0


def count_passes(pools: dict, want: dict, run_pass, elapsed, until_s: float, fallback) -> int:
    """Add passes to ``pools`` ((mode, batch) -> pass counters) until each (mode, batch) in ``want`` has ``want``
    passes, one pass per key in turn (so a stop leaves them in proportion), stopping once ``elapsed()`` exceeds
    ``until_s``; keys the run did not time and ring-fallback batches are skipped. ``run_pass(mode, batch, i)``
    appends pass ``i``. Returns the passes run."""
    todo = {k: n for k, n in want.items() if k in pools and not fallback(k[1]) and n > len(pools[k])}
    done = 0
    while todo:
        for key in list(todo):
            if elapsed() > until_s:
                log(f"count passes: past --count-until-s {until_s:g} s after {done} passes; pooled: "
                    + ", ".join(f"{m} B={b}: {len(pools[(m, b)])}" for m, b in want if (m, b) in pools))
                return done
            run_pass(*key, len(pools[key]))
            done += 1
            if len(pools[key]) >= todo[key]:
                del todo[key]
    log(f"count passes: {done} run")
    return done
