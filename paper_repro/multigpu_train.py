"""The training part of the multi-GPU run (`paper_repro.multigpu_run`): `reference.train.train` of the scaled
paper model with DP x EP, ZeRO-3 and fused gradient buckets each on and off (tokens/s, MFU, peak memory, losses),
then short traced runs whose per-rank phase rows go to ``train_trace.csv``.
"""

from __future__ import annotations

import csv
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from paper_repro.multigpu_context import Ctx
from paper_repro.multigpu_settings import GiB


def _peak_memory(c: Ctx) -> tuple[float, float]:
    if c.cuda:
        return float(c.torch.cuda.max_memory_allocated(c.dev)), float(c.torch.cuda.max_memory_reserved(c.dev))
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    return rss, rss


def run_train(c: Ctx) -> None:
    from reference.parallel.bench import peak_tflops
    from semoe import sizing

    st, W, spec = c.st, c.world, c.st.train_spec
    variants = [(0, 0), (0, st.bucket_bytes), (3, 0), (3, st.bucket_bytes)] if W > 1 else [(0, 0)]
    base = (f"{spec.name} L{spec.layers} D{spec.hidden} E{spec.experts} k{spec.top_k} F{spec.ffn} {spec.dtype} "
            f"B{st.train_batch_per_rank * W} S{st.train_seq} ep{st.train_ep} {st.train_a2a} "
            f"gpn{st.train_gpus_per_node or 'host'} params{sizing.count_params(spec).total}")
    tokens_step = st.train_batch_per_rank * W * st.train_seq
    flops_tok = sizing.training_flops_per_token(spec, st.train_seq)
    peak = peak_tflops(c.device_name)
    first_losses: list[list[float]] = []
    scratch = Path(tempfile.mkdtemp(prefix=f"semoe_mg_r{c.rank}_"))
    # timed runs first; traced runs last, the SE-MoE-like variant (ZeRO-3 + fused buckets) and the plain one
    # first among them, so that a tight time budget drops the least useful runs
    order = {(3, st.bucket_bytes): 0, (0, 0): 1}
    traced_variants = sorted(variants, key=lambda v: order.get(v, 2)) if st.trace_steps else []
    if st.quick:  # the CPU test: one traced run (ZeRO-3 + buckets shows every phase)
        traced_variants = traced_variants[:1]
    runs = [(z, b, False) for z, b in variants] + [(z, b, True) for z, b in traced_variants]
    try:
        for zero, bucket, traced in runs:
            _train_one(c, zero, bucket, traced, base, scratch, peak, flops_tok, tokens_step, first_losses)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_one(c: Ctx, zero: int, bucket: int, traced: bool, base: str, scratch: Path, peak, flops_tok: int,
               tokens_step: int, first_losses: list) -> None:
    """One train() call (timed or traced) and its rows; ``first_losses`` holds the plain run's losses."""
    from reference.train import TrainConfig, train
    from semoe.plan_spec import ParallelPlan
    from semoe.trace import read_csv

    st, W, spec = c.st, c.world, c.st.train_spec
    impl = f"zero{zero}_bucket{bucket}"
    steps = st.trace_steps if traced else st.train_steps
    config = f"{base} steps{steps}" + (" traced" if traced else "")
    if c.over_budget(f"train {impl}{' traced' if traced else ''}", need_s=45.0 if not st.quick else 0.0):
        return
    plan = ParallelPlan(data_parallel=W, expert_parallel=st.train_ep, alltoall=st.train_a2a,
                        gpus_per_node=st.train_gpus_per_node, fusion_bucket_bytes=bucket, zero_stage=zero)
    out = scratch / f"{impl}_{'traced' if traced else 'timed'}"
    cfg = TrainConfig(plan=plan, steps=steps, batch_size=st.train_batch_per_rank * W, seq_len=st.train_seq,
                      synthetic=True, out=out, progress=False, device="auto" if c.cuda else "cpu",
                      lr=3e-4, warmup_steps=min(5, steps), trace=traced)
    if c.cuda:
        c.torch.cuda.reset_peak_memory_stats(c.dev)
    c.barrier()
    t0 = time.perf_counter()
    result = train(spec, cfg)
    wall = time.perf_counter() - t0
    alloc, reserved = _peak_memory(c)
    mem = c.gather_floats([alloc, reserved])
    tokens = tokens_step * steps
    if not traced:
        if c.lead:
            with (out / "metrics.csv").open(newline="") as f:
                rows = list(csv.DictReader(f))
            per_step = [float(r["tokens_per_s"]) for r in rows[st.train_skip:]] or [result.tokens_per_s]
            tps = statistics.median(per_step)
            c.add("train", config, impl, "tokens_per_s", tps, tokens=tokens)
            c.add("train", config, impl, "step_s", tokens_step / tps, tokens=tokens)
            if peak is not None:
                c.add("train", config, impl, "mfu", tps * flops_tok / (W * peak * 1e12), tokens=tokens)
            c.add("train", config, impl, "first_loss", result.first_loss, tokens=tokens)
            c.add("train", config, impl, "final_loss", result.last_loss, tokens=tokens)
            if not first_losses:
                first_losses.append(result.losses)
            else:
                diff = max(abs(a - b) for a, b in zip(result.losses, first_losses[0]))
                c.add("train", config, impl, "max_abs_loss_diff_vs_zero0_bucket0", diff, tokens=tokens)
            c.add("train", config, impl, "wall_s_with_build", wall, tokens=tokens)
            c.log(f"train {impl:22s} {tps:12,.0f} tokens/s  loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
                  f"  peak {mem[:, 0].max() / GiB:.2f} GiB/rank  ({wall:.1f} s with build)")
        kind = "peak_mem_allocated_bytes" if c.cuda else "peak_rss_bytes"
        for r in range(W):
            c.add("train", config, impl, kind, float(mem[r, 0]), tokens=tokens, rank=r)
            if c.cuda:
                c.add("train", config, impl, "peak_mem_reserved_bytes", float(mem[r, 1]), tokens=tokens, rank=r)
        c.add("train", config, impl, kind + "_max", float(mem[:, 0].max()), tokens=tokens)
    else:
        mine = [[getattr(t, k) for k in ("rank", "layer", "micro_batch", "phase", "start_s", "end_s", "bytes",
                                         "flops", "resource")] for t in read_csv(out / f"trace_rank{c.rank}.csv")]
        everyone: list | None = [None] * W if c.lead else None
        c.dist.gather_object(mine, everyone, dst=0)
        if c.lead:
            rows = [row for per_rank in everyone for row in per_rank]
            c.trace_rows.extend([config, impl, *row] for row in rows)
            # per-step phase time, mean over ranks; step 0 (allocator and communicator warm-up) left out
            kept = [r for r in rows if r[2] >= 1] or rows
            nsteps = max(1, len({r[2] for r in kept}))
            totals: dict[str, float] = {}
            for r in kept:
                totals[r[3]] = totals.get(r[3], 0.0) + (r[5] - r[4])
            for phase, total in sorted(totals.items()):
                c.add("train", config, impl, f"phase_{phase}_s_per_step", total / nsteps / W, tokens=tokens)
            c.add("train", config, impl, "traced_tokens_per_s", result.tokens_per_s, tokens=tokens)
            c.flush_traces()
            c.log(f"train {impl:22s} traced: {len(rows)} phase rows, {len(totals)} phases")
    c.flush("train")
    del result
    c.free()
