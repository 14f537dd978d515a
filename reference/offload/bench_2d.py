"""2D prefetch on one GPU: ZeRO-3 dense gathers (horizontal) + offloaded experts (vertical) in one run.

Run from the repository root on the GPU machine (about 2 minutes on an H100; ``--budget-s`` caps it)::

    PYTHONPATH=. python -m reference.offload.bench_2d --out DIR [--quick] [--budget-s 170]

Model: configuration (a) of ``reference.offload.bench`` (its ``specs()`` builder and defaults: d 1024,
F 4096, 8 experts top-2, 4 MoE layers, 48 x 2048 tokens per micro-batch, 8 micro-batches per step),
trained under ZeRO-3 at world size 1 (``reference.parallel.parallelize``: a node group of one; on CUDA
each block's "gather" is a copy on a side stream that the compute stream waits for by event, the
structure of an NCCL all-gather on its own stream). Cases: expert placement ``gpu`` (all in HBM) and
``cpu`` (``reference.offload.ExpertOffload``, pinned host, CPU AdamW), each with prefetch ``on`` (ZeRO-3
gathers one block ahead and the engine fetches one MoE layer ahead: ``prefetch_depth`` 1) and ``off``
(both on demand: depth 0).

Rows ``date,commit,device,config,placement,prefetch,metric,value`` (the columns of
``results/bench/offload_train.csv``; commit from ``semoe.io.git_commit()``) go to ``DIR/offload_2d.csv``,
flushed one at a time. Metrics per case: step_ms (median of the timed steps), tokens_per_s,
peak_mem_gb (CUDA), and from the case's trace (``DIR/trace_2d_<placement>_<on|off>.csv``, semoe.trace
schema, timed steps only): gather_ms_per_step (ZeRO-3 gathers, forward and backward re-gathers),
gather_exposed_ms_per_step (the time the compute stream waited for them), gather_hidden_frac
(1 - exposed / gather), and with offload h2d_ms_per_step (expert copies), h2d_fwd_overlap_frac (the
part of the forward's expert prefetch copies that ran while a block's forward computed) and
ratio_vs_gpu (step_ms against the gpu placement with the same prefetch setting).

On CUDA every span is a pair of CUDA events (compute spans on the compute stream, copies on their
streams); on the CPU (``--quick``: the tiny model, CI smoke test) spans are host times and the engine
and gathers run inline, so the overlap numbers only show that the code path runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from reference.offload.bench_cases import _bf16_experts
from reference.offload.bench_loop import (
    case_device,
    micro_batches,
    release,
    step_metrics,
    timed_steps,
)
from reference.offload.bench_rows import Rows, log

CASES = (("gpu", True), ("gpu", False), ("cpu", True), ("cpu", False))
GB = 1e9


class SpanLog:
    """Trace of the all-in-HBM case (no offload engine): ZeRO-3's spans and block forward spans, resolved
    like the engine's (CUDA events against a base event, else perf_counter against ``t0``)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.t0, self.step = cuda, time.perf_counter(), 0
        self.rows: list = []
        self._gpu: list = []
        if cuda:
            self._base = torch.cuda.Event(enable_timing=True)
            self._base.record()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def span(self, phase: str, layer: int, nbytes: int, start, end, resource: str = "network") -> None:
        from semoe.trace import TraceRow

        if isinstance(start, float):
            self.rows.append(TraceRow(0, layer, self.step, phase, start - self.t0, max(start, end) - self.t0,
                                      int(nbytes), 0, resource))
        else:
            self._gpu.append((phase, layer, self.step, start, end, nbytes, resource))

    def hook_blocks(self, model) -> None:
        for blk in model.blocks:
            marks: list = []
            blk.register_forward_pre_hook(lambda m, a, marks=marks: marks.append(self.mark()))
            blk.register_forward_hook(lambda m, a, o, marks=marks, b=blk.index: self.span(
                "block_forward", b, 0, marks.pop(), self.mark(), "compute"))

    def trace_rows(self) -> list:
        from semoe.trace import TraceRow

        if self._gpu:
            torch.cuda.synchronize()
            for phase, layer, step, e0, e1, nbytes, res in self._gpu:
                s, e = self._base.elapsed_time(e0) / 1e3, self._base.elapsed_time(e1) / 1e3
                self.rows.append(TraceRow(0, layer, step, phase, s, max(s, e), int(nbytes), 0, res))
            self._gpu.clear()
        return sorted(self.rows, key=lambda r: (r.start_s, r.phase))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _overlap(s: float, e: float, union: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(e, b) - max(s, a)) for a, b in union)


def summarise_trace(rows: list, steps: set[int]) -> dict:
    """Per-step gather / exposed-wait / H2D times and the forward overlap of expert prefetches, from the
    trace rows of the ``steps`` (micro_batch column = optimizer step)."""
    rows = [r for r in rows if r.micro_batch in steps]
    n = max(1, len(steps))
    dur = lambda ph: sum(r.end_s - r.start_s for r in rows if r.phase in ph)
    gather = dur(("gather_fwd", "gather_bwd"))
    exposed = dur(("gather_wait_fwd", "gather_wait_bwd"))
    out = {"gather_ms_per_step": 1e3 * gather / n, "gather_exposed_ms_per_step": 1e3 * exposed / n,
           "gather_hidden_frac": min(1.0, max(0.0, 1.0 - exposed / gather)) if gather > 0 else 0.0,
           "gathers_per_step": sum(r.phase in ("gather_fwd", "gather_bwd") for r in rows) / n}
    fetch = [r for r in rows if r.phase in ("h2d_fetch", "h2d_demand")]
    if fetch:
        out["h2d_ms_per_step"] = 1e3 * sum(r.end_s - r.start_s for r in fetch) / n
        fwd_fetch, covered = 0.0, 0.0
        for step in steps:
            blocks = [(r.start_s, r.end_s) for r in rows if r.phase == "block_forward" and r.micro_batch == step]
            if not blocks:
                continue
            union, lo, hi = _union(blocks), min(s for s, _ in blocks), max(e for _, e in blocks)
            for r in fetch:  # the forward's copies: issued while the forward ran
                if r.micro_batch == step and r.phase == "h2d_fetch" and lo <= r.start_s <= hi:
                    fwd_fetch += r.end_s - r.start_s
                    covered += _overlap(r.start_s, r.end_s, union)
        out["h2d_fwd_ms_per_step"] = 1e3 * fwd_fetch / n
        out["h2d_fwd_overlap_frac"] = covered / fwd_fetch if fwd_fetch > 0 else 0.0
    return out


def run_case(spec, batch: int, seq: int, placement: str, prefetch: bool, steps: int, warmup: int, micro: int,
             base, trace_path: Path, time_left) -> dict:
    """Train ``warmup + steps`` steps of ``micro`` micro-batches under ZeRO-3 (world size 1); returns the metrics."""
    from reference.offload.engine import ExpertOffload
    from reference.parallel.parallelize import parallelize
    from reference.train import TrainConfig, make_optimizer
    from semoe.plan_spec import OffloadPlacement, ParallelPlan
    from semoe.trace import write_csv

    cuda, device = case_device()
    depth = 1 if prefetch else 0
    off = {} if placement == "gpu" else {"offload": OffloadPlacement(expert_params=placement,
                                                                     expert_optimizer=placement)}
    plan = ParallelPlan(zero_stage=3, prefetch_depth=depth, **off)
    sinks: list = []
    model = copy.deepcopy(base)  # on the CPU: offloaded experts never occupy the GPU in fp32
    model, sync = parallelize(model, plan, on_span=lambda *a: sinks[0](*a))  # no process group: world 1
    sync.zero3.prefetch = depth  # parallelize gathers one block ahead at least; off means on demand here
    amp = torch.bfloat16 if cuda else None
    eng = None
    if placement == "gpu":
        if cuda:
            _bf16_experts(model)  # the same bf16 grouped-experts path as the offload pool's slots
        trace = SpanLog(cuda)
        trace.hook_blocks(model)
    else:
        eng = trace = ExpertOffload(model, plan, device=device, compute_dtype=amp, trace=True, compute_spans=True)
        sync.attach_offload(eng)
    sinks.append(trace.span)
    model = model.to(device)
    if any(f.shard.device.type != device.type for f in sync.zero3._flats()):  # .to() must keep the shard objects
        raise RuntimeError("bench_2d: ZeRO-3 shards did not move with the model")
    opt = make_optimizer(model, TrainConfig(steps=warmup + steps, lr=1e-4, warmup_steps=1))
    gen = torch.Generator(device=device).manual_seed(0)
    t_origin = trace.t0

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        # gradient accumulation: the expert buckets reduce once, at the end
        out = micro_batches(model, spec, batch, seq, micro, device, amp, gen,
                            before=lambda m: sync.set_sync(m == micro - 1))
        sync.finish()
        sync.clip(1.0)
        if eng is not None:
            eng.step(1e-4)
        opt.step()
        return float(out.loss.detach())  # synchronises

    def label_spans(step: int) -> None:
        if isinstance(trace, SpanLog):
            trace.step = step

    try:
        times, step_rows = timed_steps(train_step, warmup + steps, warmup, time_left, t_origin, label_spans)
        if eng is not None:
            eng.wait()
    finally:
        if eng is not None:
            eng.close()
    res = step_metrics(times, micro, batch, seq, cuda)
    rows = trace.trace_rows()
    res.update(summarise_trace(rows, set(range(warmup, warmup + len(times)))))
    if eng is not None:
        s = eng.stats()
        res["fetch_hit_rate"] = s["fetch_hit_rate"]
        res["cpu_adam_ms_per_step"] = 1e3 * s["cpu_adam_s"] / max(1, s["steps"])
    write_csv(sorted(rows + step_rows, key=lambda r: r.start_s), trace_path)
    model = opt = eng = sync = trace = None  # (not del: train_step closes over them)
    release(cuda)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference.offload.bench_2d", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU (CI smoke test)")
    p.add_argument("--budget-s", type=float, default=170.0, help="cases that do not fit what is left are skipped")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 2; quick 1)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per step (default: bench.py's --a-micro-batches, 8; quick 2)")
    p.add_argument("--a-batch", type=int, default=None, help="sequences per micro-batch (default bench.py's 48)")
    return p


def main(argv: list[str] | None = None) -> int:
    from reference.offload import bench
    from simulator.validate_offload import config_string

    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    rows = Rows(out / "offload_2d.csv", device)
    (out / "run_2d.json").write_text(json.dumps({"date": rows.date, "commit": rows.commit, "device": device}))
    a_args = bench.build_parser().parse_args(["--out", str(out)] + (["--a-batch", str(args.a_batch)]
                                                                     if args.a_batch else []))
    spec, batch, seq = bench.specs(args.quick, a_args)["a"]
    micro = args.micro_batches or (2 if args.quick else a_args.a_micro_batches)
    steps = args.steps or (2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    config = config_string(spec, batch, seq, label="a_zero3_world1", steps=steps, warmup=warmup, micro_batches=micro)
    log(f"2D prefetch bench on {device}: {config}; budget {args.budget_s:.0f} s")
    try:
        from reference.model import MoEDecoder

        t = time.perf_counter()
        base = MoEDecoder(spec, seed=0)
        log(f"model initialised on the CPU in {time.perf_counter() - t:.1f} s")
        rows.add(config, "-", "-", "tokens_per_step", micro * batch * seq)
        step_ms: dict[bool, float] = {}
        for placement, prefetch in CASES:
            pf = "on" if prefetch else "off"
            need = 5.0 if args.quick else 30.0
            left = deadline - time.monotonic()
            if left < need:
                log(f"skip {placement} {pf}: {left:.0f} s left, needs ~{need:.0f} s")
                rows.add(config, placement, pf, "skipped", 1)
                continue
            log(f"{placement} prefetch={pf}")
            try:
                res = run_case(spec, batch, seq, placement, prefetch, steps, warmup, micro, base,
                               out / f"trace_2d_{placement}_{pf}.csv", lambda: deadline - time.monotonic())
            except Exception as e:  # noqa: BLE001 - one failed case must not end the run
                with (out / "errors_2d.log").open("a") as fh:
                    fh.write(f"{placement} {pf}\n{traceback.format_exc()}\n")
                log(f"  failed: {type(e).__name__}: {str(e)[:300]}")
                rows.add(config, placement, pf, "error", 1)
                release(cuda)
                continue
            for k, v in res.items():
                rows.add(config, placement, pf, k, float(v) if isinstance(v, float) else v)
            if placement == "gpu":
                step_ms[prefetch] = res["step_ms"]
            elif prefetch in step_ms:
                rows.add(config, placement, pf, "ratio_vs_gpu", res["step_ms"] / step_ms[prefetch])
    finally:
        rows.add("run", "-", "-", "wall_s", time.monotonic() - t_start)
        rows.close()
    log(f"done: {rows.count} rows in {out / 'offload_2d.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
