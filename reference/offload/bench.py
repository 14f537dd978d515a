"""Issue 6's H100 benchmark: training with expert states on gpu / cpu / ssd, prefetch on / off.

Run from the repository root on the GPU machine::

    PYTHONPATH=. python -m reference.offload.bench --out DIR [--quick] [--budget-s 240] [--ssd-dir DIR]

Appends tidy rows ``date,commit,device,config,placement,prefetch,metric,value`` to
``DIR/offload_train.csv`` (one row at a time, flushed: a killed run keeps what it measured), a trace CSV
per measured case (``DIR/trace_<config>_<placement>_<prefetch>.csv``, semoe.trace schema: the offload
engine's copies / SSD I/O / CPU Adam / cache events plus one ``step`` row per step) and a log.

1. ``bandwidth``: pinned H2D and D2H (256 MiB, CUDA events) and the SSD directory's write (fsync'ed)
   and read (after ``posix_fadvise(DONTNEED)``) bandwidth of a 512 MiB file; the engine's own block calls, write-backs
   and reads alternating as on its I/O thread: ``ssd_block_read_GBps`` (`SSDStore.read` into a fresh tensor +
   crc32, from the device), ``ssd_block_write_GBps`` (the timed temp-file create + write + fsync) and
   ``ssd_block_rewrite_prep_GBps`` (crc32 + the rename that replaces, and so unlinks, the block's old version);
   the engine's I/O cycle (`measure_ssd_cycle`, task hB: 8 expert-state blocks read back one cycle after they were
   written, then written back over their old versions, 3 cycles: ``ssd_cycle_{read,write,prep}_GBps``); the
   isolated fused AdamW (``cpu_adam_*Mparams_per_s``); then
   ``cpu_adam_engine``: the engine's per-layer AdamW (`reference.offload.cpu_adam.adamw_layer_`, what
   ``ExpertOffload._adam`` runs) on the layer shapes of (a) and (b), bf16 and fp32 gradients, alone and under
   the load of a training step (`_Load`: a CUDA matmul loop whose host thread spin-waits or sleeps, pinned H2D +
   D2H copies on a side stream, the SSD I/O thread), on the main thread or on a worker thread as the engine runs
   it, with the engine's intra-op thread count or the one the load names (``:t<N>``, ``:tall``: torch's default)
   (`ADAM_LOADS_CUDA`), one ``cpu_adam_engine_Mparams_per_s`` row per (layer, gradient dtype, load) with the
   load in the ``placement`` column, and the I/O thread's block rates beside the update (`SSD_BESIDE_ADAM`)
   (`measure_engine_adam`, about 30 s). ``--configs bandwidth`` alone: < 90 s.
2. ``a_compute_bound``: a GPT-MoE that fits in HBM (see NOTES.md for why it is compute-bound): all
   in HBM (``gpu``), then ``cpu`` and ``ssd`` placements with prefetch depth 1 (on) and 0 (off).
   Metrics: step_ms (median over the timed steps), tokens_per_s, peak_mem_gb, h2d_gb_per_step,
   d2h_gb_per_step, fetch_hit_rate, cache_hit_rate (ssd), cpu_adam_ms_per_step, host_wait_ms_per_step,
   ratio_vs_gpu, threads_main / threads_adam / threads_io (the engine's intra-op thread counts, read inside its
   threads).
   Thread A/B (task hB, ``--no-thread-ab`` to skip): (a) ssd on and (b) cpu on once more with the engine's AdamW on
   torch's default threads (``ExpertOffload(adam_threads=0)``, the engine before hB), label ``<label>_torch_threads``,
   traces ``ab_trace_*.csv``; they run after (b), so a short budget skips them first.
3. ``b_over_budget``: a model whose total training states (16 bytes per parameter) are >= 3x a GPU
   memory budget enforced with ``torch.cuda.set_per_process_memory_fraction``; ssd placement with an
   LFU CPU cache, and cpu placement. tokens_per_s, cache_hit_rate, states_gb, budget_gb.
4. ``c_deepspeed``: DeepSpeed ZeRO-Offload (stage 2, optimizer on the CPU, its CPUAdam op) on model (b)
   in a child process with its own time cap; a failed build or run becomes a row
   (``deepspeed_failed``) and a log line.
   ``--configs c`` runs it alone (model (b) is built from the same arguments), e.g.
   ``--configs c --ds-cap-s 200``: its CPUAdam op is compiled by ninja on first use (1-2 min); the
   child writes its progress (build heartbeat, each step) to ``DIR/deepspeed_child.log`` as it goes.

Per case: ``warmup`` steps, then one counted step that opens the engine's counter window (after
``eng.wait()``: the warm-up's asynchronous host updates and SSD I/O stay out of it), then ``steps`` timed
steps; the ``*_per_step`` counters are over the counted + timed steps (row ``counted_steps``), ``step_ms``
over the timed ones; the counters close after the last timed step's updates drained, before the ``--profile``
step (which the traces mark with a ``profile_step`` row). ``DIR/run.json`` names the run (date, commit,
device) that the traces belong to.

Adjacent AdamW probes (task hB3, issue 6; ``--no-adjacent`` to skip): the host's CPU AdamW rate drifts in time, so
every offloaded case of (a) and (b) (not the gpu placement, not the A/B twins) is bracketed by the engine probe
``alone@worker`` on the case's layer shape and gradient dtype (`AdjacentAdam`, ~0.3-1 s each): ``before`` (the
warm-up's updates drained, right before the counted step) and ``after`` (the last timed step's updates drained),
rows ``cpu_adam_adjacent_{before,after}_Mparams_per_s`` with the case's config / placement / prefetch
(`adjacent_metric`); `simulator.validate_offload` takes their mean as that case's a-priori AdamW input.

Contention probes (task hH, issue 6; ``--no-contention`` to skip): in b ssd on the update ran beside the busy SSD I/O
thread at 0.62x its idle adjacent probes (run b57d4eb), which no idle probe can see. Every ssd case of (a) and (b) is
therefore also bracketed, right after each adjacent probe, by `ContentionProbe` (~2-3 s): the engine's SSD I/O cycle
(3 expert-state blocks read back, then written back over their old versions, on one I/O thread) alone, then the same
AdamW call beside the I/O thread's reads and beside its write-backs, and those reads / writes beside the update (the
"alone" AdamW is the adjacent probe just taken); rows `contention_metric` (``contention_<before|after>_<quantity>_
<condition>_<Mparams_per_s|GBps>``, `CONTENTION_PAIRS`) with the case's config / placement / prefetch.
`simulator.validate_offload` takes the beside / alone ratios as the slowdown of the update and of the I/O while both
run (`simulator.workload.host_share`). To pay for them, the engine-AdamW sweep no longer probes the ``:t<N>`` thread
counts and the loaded ``:tall`` twins (``ADAM_LOADS_CUDA``).

``config``: `simulator.validate_offload.config_string` of the case (label first, e.g. ``a_compute_bound
preset=tiny L4 D1024 ... steps=3 warmup=2 cache=6 micro_batches=8``), so that every row can be
simulated as it is (``python -m simulator.validate_offload``). ``cache=`` is the CPU cache capacity in
experts **per MoE layer** (``ParallelPlan.cpu_cache_experts``, as the engine and `semoe.sizing` count
it); only the ``ssd`` placement has a cache (the ``cpu`` placement holds every state in DRAM), and its
rows also say ``cache_experts_per_layer``.
Everything is under ``--budget-s`` (default 240 s): a case that does not fit what is left is skipped
and recorded (metric ``skipped``). ``--quick`` runs the tiny model on the CPU (CI smoke test).

This module is the CLI and the case loop (`main`, budgets, notes); the rest lives beside it and is re-exported
here: `reference.offload.bench_rows` (the row file, `log`), `bench_probes` (``bandwidth``: PCIe, fused AdamW, SSD
file / block / cycle probes), `bench_adam` (``cpu_adam_engine``: the engine's AdamW alone and under load),
`bench_adjacent` (the adjacent and contention probes around each case), `bench_cases` (configs (a) / (b),
`run_case`, the DeepSpeed child of (c)).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from reference.offload.bench_adam import (
    ADAM_LOADS_CPU,
    ADAM_LOADS_CUDA,
    ENGINE_ADAM_METRIC,
    SSD_BESIDE_ADAM,
    _Load,
    adam_load_threads,
    adam_probe_config,
    measure_engine_adam,
    parse_adam_load,
)
from reference.offload.bench_adjacent import (
    ADJACENT_POSITIONS,
    CONTENTION_PAIRS,
    CONTENTION_QUANTITIES,
    AdjacentAdam,
    ContentionProbe,
    adjacent_metric,
    adjacent_recorder,
    case_grad,
    contention_metric,
)
from reference.offload.bench_cases import (
    AB_SUFFIX,
    DS_CHILD,
    _bf16_experts,
    ab_label,
    cache_per_layer,
    expert_params,
    expert_shapes,
    run_case,
    run_deepspeed,
    specs,
    states_bytes,
)
from reference.offload.bench_probes import (
    SSD_CYCLE,
    measure_bandwidth,
    measure_ssd_cycle,
)
from reference.offload.bench_rows import COLUMNS, GB, Rows, log
from simulator.validate_offload import config_string  # torch- and pandas-free at import

# the names other modules and tests import from here (their homes: bench_rows, bench_probes, bench_adam,
# bench_adjacent, bench_cases)
__all__ = [
    "AB_SUFFIX", "ADAM_LOADS_CPU", "ADAM_LOADS_CUDA", "ADJACENT_POSITIONS", "COLUMNS", "CONTENTION_PAIRS",
    "CONTENTION_QUANTITIES", "DS_CHILD", "ENGINE_ADAM_METRIC", "GB", "SSD_BESIDE_ADAM", "SSD_CYCLE", "AdjacentAdam",
    "ContentionProbe", "Rows", "_Load", "_bf16_experts", "ab_label", "adam_load_threads", "adam_probe_config",
    "adjacent_metric", "adjacent_recorder", "build_parser", "cache_per_layer", "case_grad", "config_string",
    "contention_metric", "expert_params", "expert_shapes", "log", "main", "measure_bandwidth",
    "measure_engine_adam", "measure_ssd_cycle", "parse_adam_load", "run_case", "run_deepspeed", "specs",
    "states_bytes",
]


def _record(rows: Rows, config: str, placement: str, prefetch: str, res: dict) -> None:
    for k, v in res.items():
        rows.add(config, placement, prefetch, k, float(v) if isinstance(v, float) else v)


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference.offload.bench", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU (CI smoke test)")
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--ssd-dir", type=Path, default=None, help="SSD tier directory (default: a temp dir in /tmp)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per case (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 2; quick 1)")
    p.add_argument("--configs", default="bandwidth,a,b,c", help="comma list of bandwidth,a,b,c")
    p.add_argument("--profile", action="store_true",
                   help="(a) gpu, cpu on, ssd on: one more step under torch.profiler -> DIR/profile_a_<placement>.txt")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--a-layers", type=int, default=4)
    p.add_argument("--a-hidden", type=int, default=1024)
    p.add_argument("--a-ffn", type=int, default=4096)
    p.add_argument("--a-experts", type=int, default=8)
    p.add_argument("--a-batch", type=int, default=48, help="sequences per micro-batch")
    p.add_argument("--a-micro-batches", type=int, default=8,
                   help="micro-batches per optimizer step (amortises the CPU AdamW; see NOTES.md)")
    p.add_argument("--b-layers", type=int, default=6)
    p.add_argument("--b-hidden", type=int, default=1024)
    p.add_argument("--b-ffn", type=int, default=4096)
    p.add_argument("--b-experts", type=int, default=16)
    p.add_argument("--b-batch", type=int, default=1)
    p.add_argument("--b-cache-frac", type=float, default=0.75,
                   help="ssd placement's CPU cache: this fraction of each MoE layer's experts (per layer)")
    p.add_argument("--no-thread-ab", dest="thread_ab", action="store_false",
                   help="skip the A/B cases (a ssd on, b cpu on) with the engine's AdamW on torch's default threads")
    p.add_argument("--no-adjacent", dest="adjacent", action="store_false",
                   help="skip the adjacent AdamW probes before and after each offloaded case (task hB3)")
    p.add_argument("--no-contention", dest="contention", action="store_false",
                   help="skip the contention probes (AdamW beside the SSD I/O cycle) around the ssd cases (task hH)")
    p.add_argument("--ds-cap-s", type=float, default=200.0,
                   help="time cap of the DeepSpeed child (its CPUAdam JIT build takes 1-2 min the first time)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    rows = Rows(out / "offload_train.csv", device)
    (out / "run.json").write_text(json.dumps({"date": rows.date, "commit": rows.commit, "device": device}))
    tmp = None
    if args.ssd_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="semoe_offload_ssd_")
        ssd_root = Path(tmp.name)
    else:
        ssd_root = args.ssd_dir
    steps = args.steps or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    log(f"offload bench on {device}: configs {configs}, budget {args.budget_s:.0f} s, ssd dir {ssd_root}")

    def left() -> float:
        return deadline - time.monotonic()

    notes: list[dict] = []  # why something was skipped or failed (offload_bench_notes.json)

    def note(config: str, placement: str, prefetch: str, what: str, why: str) -> None:
        notes.append({"config": config, "placement": placement, "prefetch": prefetch, "what": what, "why": why})
        (out / "offload_bench_notes.json").write_text(json.dumps(notes, indent=1))

    def contention_probe(adj: AdjacentAdam | None, spec, name: str) -> ContentionProbe | None:
        """The ssd cases' contention probe (task hH) on the model's adjacent probe; None (logged, noted) if it
        cannot be built. Blocks: one expert's ``[3, P]`` fp32 state each (quick: small), 3 of them (quick 2)."""
        if adj is None or not args.contention:
            return None
        try:
            t = time.perf_counter()
            numel = (1 << 16) if args.quick else 3 * adj.P
            probe = ContentionProbe(adj, ssd_root / f"contention_{name}", numel, blocks=2 if args.quick else 3,
                                    window_s=0.05 if args.quick else 0.6)
            log(f"contention probe {name}: {probe.k} blocks of {numel * 4 / GB:.3g} GB ready in "
                f"{time.perf_counter() - t:.1f} s")
            return probe
        except Exception as e:  # noqa: BLE001 - the cases run without it
            log(f"contention probe not built: {type(e).__name__}: {str(e)[:300]}")
            note(spec.name, "ssd", "-", "contention_probe_error", f"{type(e).__name__}: {str(e)[:500]}")
            return None

    def adjacent_probe(spec, micro: int) -> AdjacentAdam | None:
        """The case's adjacent AdamW probe (`AdjacentAdam`) for a model; None (logged, noted) if it cannot be built."""
        try:
            t = time.perf_counter()
            probe = AdjacentAdam(spec.experts, expert_shapes(spec), case_grad(micro))
            log(f"adjacent AdamW probe E{probe.E} P{probe.P} grad={probe.grad} ready in {time.perf_counter() - t:.1f} s")
            return probe
        except Exception as e:  # noqa: BLE001 - the cases run without it
            log(f"adjacent AdamW probe not built: {type(e).__name__}: {str(e)[:300]}")
            note(spec.name, "-", "-", "adjacent_probe_error", f"{type(e).__name__}: {str(e)[:500]}")
            return None

    def attempt(config: str, placement: str, prefetch: str, need_s: float, fn) -> dict | None:
        if left() < need_s:
            log(f"skip {config} {placement} {prefetch}: {left():.0f} s left, needs ~{need_s:.0f} s")
            rows.add(config, placement, prefetch, "skipped", 1)
            note(config, placement, prefetch, "skipped", f"time budget: {left():.0f} s left, needs ~{need_s:.0f} s")
            return None
        log(f"{config} {placement} prefetch={prefetch}")
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - one failed case must not end the run
            (out / "errors.log").open("a").write(f"{config} {placement} {prefetch}\n{traceback.format_exc()}\n")
            log(f"  failed: {type(e).__name__}: {str(e)[:300]}")
            rows.add(config, placement, prefetch, "error", 1)
            note(config, placement, prefetch, "error", f"{type(e).__name__}: {str(e)[:500]}")
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
            return None
        _record(rows, config, placement, prefetch, res)
        return res

    try:
        sp = specs(args.quick, args)
        if "bandwidth" in configs:
            attempt("bandwidth", "-", "-", 5.0, lambda: measure_bandwidth(rows, ssd_root, args.quick) or {})
            # the engine's per-layer CPU AdamW on the layer shapes of (a) and (b), alone and under load
            layers = {k: (sp[k][0].experts, expert_shapes(sp[k][0])) for k in ("a", "b")}
            attempt("cpu_adam_engine", "-", "-", 5.0 if args.quick else 30.0,
                    lambda: measure_engine_adam(rows, ssd_root, args.quick, layers) and {})

        if "a" in configs:
            spec, batch, seq = sp["a"]
            micro_a = 2 if args.quick else args.a_micro_batches
            cache_a = cache_per_layer(spec, 0.75)  # ssd placement: CPU cache, experts per MoE layer
            # steps=: the steps the engine's counters cover (run_case: one more than the timed ones)
            cfg_a = config_string(spec, batch, seq, label="a_compute_bound", steps=steps + 1, warmup=warmup,
                                  cache=cache_a, micro_batches=micro_a)
            rows.add(cfg_a, "-", "-", "expert_params", expert_params(spec))
            rows.add(cfg_a, "-", "-", "tokens_per_step", micro_a * batch * seq)
            from reference.model import MoEDecoder

            t = time.perf_counter()
            base_a = MoEDecoder(spec, seed=0)
            log(f"a: model initialised on the CPU in {time.perf_counter() - t:.1f} s")
            base = None
            adj_a = adjacent_probe(spec, micro_a) if args.adjacent else None
            con_a = None
            try:
                con_a = contention_probe(adj_a, spec, "a")
                for placement, depth in (("gpu", 0), ("cpu", 1), ("cpu", 0), ("ssd", 1), ("ssd", 0)):
                    pf = "-" if placement == "gpu" else ("on" if depth else "off")
                    need = 8.0 if args.quick else (25.0 if placement != "ssd" else 40.0)
                    prof = out / f"profile_a_{placement}.txt" if args.profile and depth == (placement != "gpu") else None
                    adj = adjacent_recorder(rows, adj_a if placement != "gpu" else None, cfg_a, placement, pf,
                                            con_a if placement == "ssd" else None)
                    res = attempt(cfg_a, placement, pf, need, lambda placement=placement, depth=depth, prof=prof, adj=adj:
                                  run_case(spec, batch, seq, placement, depth, cache_a, steps, warmup,
                                           ssd_root / f"a_{placement}_{depth}",
                                           out / f"trace_a_{placement}_{'on' if depth else 'off'}.csv", left, micro_a,
                                           base_a, prof, adjacent=adj))
                    if res is not None and placement == "gpu":
                        base = res["step_ms"]
                    elif res is not None and base:
                        rows.add(cfg_a, placement, pf, "ratio_vs_gpu", res["step_ms"] / base)
            finally:
                if con_a is not None:
                    con_a.close()
                if adj_a is not None:
                    adj_a.close()
                adj_a = con_a = None

        def ab_a() -> None:  # the engine before task hB (torch's default threads): after (b), so it never costs (b)
            spec, batch, seq = sp["a"]
            attempt(ab_label(cfg_a), "ssd", "on", 8.0 if args.quick else 30.0, lambda: run_case(
                spec, batch, seq, "ssd", 1, cache_a, steps, warmup, ssd_root / "a_ssd_ab",
                out / "ab_trace_a_ssd_on.csv", left, micro_a, base_a, adam_threads=0))

        spec, batch, seq = sp["b"]
        total = states_bytes(spec)
        budget = total / 3.0
        cache_b = cache_per_layer(spec, args.b_cache_frac)  # ssd placement: CPU cache, experts per MoE layer
        cfg_b = config_string(spec, batch, seq, label="b_over_budget", steps=steps + 1, warmup=warmup, cache=cache_b,
                              budget_gb=float(f"{budget / GB:.6g}"))
        if "b" in configs:
            rows.add(cfg_b, "-", "-", "states_gb", total / GB)
            rows.add(cfg_b, "-", "-", "budget_gb", budget / GB)
            frac = None
            if cuda:
                frac = min(1.0, budget / torch.cuda.get_device_properties(0).total_memory)
                torch.cuda.set_per_process_memory_fraction(frac)
            from reference.model import MoEDecoder

            if "a" in configs and not args.thread_ab:
                del base_a
                gc.collect()
            t = time.perf_counter()
            base_b = MoEDecoder(spec, seed=0)
            log(f"b: model initialised on the CPU in {time.perf_counter() - t:.1f} s")
            adj_b = adjacent_probe(spec, 1) if args.adjacent else None
            con_b = None
            try:
                con_b = contention_probe(adj_b, spec, "b")
                done_b = {}
                for placement in ("ssd", "cpu"):
                    # the H100 run 675640a: b ssd 63 s, b cpu 11 s (b cpu was skipped at 45 s while its A/B ran);
                    # b57d4eb: b ssd 70 s, b cpu 14 s with its adjacent probes (task hH: b cpu needs 16 s, not 20)
                    need = 8.0 if args.quick else (60.0 if placement == "ssd" else 16.0)
                    adj = adjacent_recorder(rows, adj_b, cfg_b, placement, "on", con_b if placement == "ssd" else None)
                    done_b[placement] = attempt(cfg_b, placement, "on", need, lambda placement=placement, adj=adj:
                                                run_case(spec, batch, seq, placement, 1, cache_b, steps, warmup,
                                                         ssd_root / f"b_{placement}", out / f"trace_b_{placement}_on.csv",
                                                         left, 1, base_b, adjacent=adj))
                if con_b is not None:
                    con_b.close()
                    con_b = None
                if adj_b is not None:  # (the A/B twin runs without adjacent probes: listed, not predicted)
                    adj_b.close()
                    adj_b = None
                # b cpu is the update chain alone: the thread layout's effect on the step (only beside its twin)
                if args.thread_ab and done_b["cpu"] is not None:
                    attempt(ab_label(cfg_b), "cpu", "on", 8.0 if args.quick else 20.0, lambda: run_case(
                        spec, batch, seq, "cpu", 1, cache_b, steps, warmup, ssd_root / "b_cpu_ab",
                        out / "ab_trace_b_cpu_on.csv", left, 1, base_b, adam_threads=0))
            finally:
                if con_b is not None:
                    con_b.close()
                if adj_b is not None:
                    adj_b.close()
                if cuda:
                    torch.cuda.set_per_process_memory_fraction(1.0)
                    gc.collect()
                    torch.cuda.empty_cache()
        if "a" in configs and args.thread_ab:
            ab_a()
            del base_a
            gc.collect()

        # DeepSpeed's own loop: 2 warm-up steps, ``steps`` measured, no memory cap, no CPU cache
        cfg_c = config_string(spec, batch, seq, label="c_deepspeed", steps=steps, warmup=2)
        if "c" in configs:
            if not cuda:
                log("skip c_deepspeed: needs CUDA")
                rows.add(cfg_c, "zero_offload_cpu", "-", "skipped", 1)
                note(cfg_c, "zero_offload_cpu", "-", "skipped", "needs CUDA")
            else:
                cap = min(args.ds_cap_s, left() - 5)
                if cap < 30:
                    log(f"skip c_deepspeed: {left():.0f} s left")
                    rows.add(cfg_c, "zero_offload_cpu", "-", "skipped", 1)
                    note(cfg_c, "zero_offload_cpu", "-", "skipped", f"time budget: {left():.0f} s left")
                else:
                    log(f"c_deepspeed: ZeRO-Offload child, cap {cap:.0f} s")
                    # no memory cap: ZeRO-Offload keeps every bf16 weight and gradient on the GPU, which
                    # does not fit the budget above; its peak_mem_gb row shows what it needed
                    why = run_deepspeed(rows, spec, batch, seq, steps, None, cap, out, cfg_c)
                    if why:
                        note(cfg_c, "zero_offload_cpu", "-", "deepspeed_failed", why)
    finally:
        rows.add("run", "-", "-", "wall_s", time.monotonic() - t_start)
        rows.close()
        if tmp is not None:
            tmp.cleanup()
    log(f"done: {rows.count} rows in {out / 'offload_train.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
