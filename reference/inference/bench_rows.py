"""The inference bench's row schema and files (`reference.inference.bench`): the tidy rows' columns, repeats.csv,
and the expert-aware pool's per-pass counters pooled over a row's repeats, with its traced pool calls
(``expert_trace.csv``, ``expert_trace_stats.csv``)."""

from __future__ import annotations

import csv
from pathlib import Path

from reference.inference.engine import Engine, InferConfig

COLUMNS = ("date", "commit", "device", "config", "mode", "batch", "metric", "value")


def decode_tps(B: int, G: int, decode_s: float) -> float:
    """Decode tokens/s of one generate of ``G`` tokens at batch ``B`` (as ``GenerateResult.decode_tokens_per_s``)."""
    return B * (G - 1) / decode_s if decode_s > 0 and G > 1 else float("nan")



def pass_copies(eng: Engine, decode_only: bool = False) -> dict:
    """The expert copies of a traced engine's spans since they were last cleared (its ``Timeline``: CUDA events
    around every block's copy on the copy stream, taken after the copy stream's wait for the slot's release, so a
    span is the copy itself), the spans then cleared: ``copy_GB`` (bytes), ``copy_busy_s`` (summed copy spans),
    ``copy_GBps_in_pass`` (their ratio: the copy engine's rate inside the pass, beside the compute), ``copies``,
    ``block_copy_s`` (block -> its copies' summed spans).
    ``decode_only``: only spans of a generate's decode steps (step >= 1; its prefill is step 0, a bare forward -1)."""
    rows = [r for r in eng.timeline.rows() if r.resource == "pcie_h2d" and (not decode_only or r.micro_batch >= 1)]
    eng.timeline.spans.clear()
    busy = sum(r.end_s - r.start_s for r in rows)
    nbytes = sum(r.bytes for r in rows)
    per_block: dict = {}
    for r in rows:
        per_block[r.layer] = per_block.get(r.layer, 0.0) + r.end_s - r.start_s
    return {"copy_GB": nbytes / 1e9, "copy_busy_s": busy, "copies": len(rows),
            "copy_GBps_in_pass": nbytes / busy / 1e9 if busy > 0 else float("nan"), "block_copy_s": per_block}


# repeats.csv (issue 7): every timed repeat's seconds (what = timed_s: the prefill forward, the generate's decode)
# and every adjacent probe's milliseconds (probe_ms; probe i is right before repeat i, probe R after the last)
REPEAT_COLUMNS = ("mode", "batch", "phase", "repeat", "what", "value")
TRACE_COLUMNS = ("mode", "batch", "pool_slots", "ring_slots", "step", "block", "call", "experts", "repeat")
# the expert pool's counters of one generate (GenerateResult.stats keys), as repeats.csv names them (``pool_<name>``)
POOL_COUNTERS = (("hits", "expert_hits"), ("misses", "expert_misses"), ("prefetched", "experts_prefetched"),
                 ("prefetch_used", "prefetch_used"))
# expert-aware count rows pooled over the row's repeats (`pooled_rows`); the single-pass rows of runs before
# them (hit_rate, prefetched_used_frac, decode_GB_copied_per_step: the first repeat's pass) are no longer written
POOLED_SUFFIX = "_pooled"
POOL_PASSES_METRIC = "pool_passes"


# expert-aware passes the count rows pool, per (mode, batch): the row's timed repeats, then untimed count passes
# (fresh engines on other prompts, `suite_issue7`'s last section) up to this many. Pre-registered before the first
# run with them (2026-11-24 ~20:00) from the simulator's sd of one pass over 1024 routing seeds (bench.py module
# doc): the pooled row's sampling sd <= 10% / 3 of its value; expert_nopred B = 2 (31% a pass) capped at 48 (4.5%).
# From 2026-11-24 ~23:00 (the store built in parallel: the bench took 423 s in 2550f63, whose expert_nopred B = 8
# hit_rate_pooled, 5 passes, sat 3.0 sd from its prediction): sd <= 10% / 4, so B1 29, B4 19, B8 8 (B2 still 48)
COUNT_PASSES_DEFAULT = "expert_nopred:1=29,2=48,4=19,8=8"
COUNT_PASSES_QUICK = "expert_nopred:2=3"


def parse_count_passes(spec: str) -> dict[tuple[str, int], int]:
    """``"MODE:B=R,B=R;MODE:B=R"`` -> {(mode, batch): passes}; ``""`` or ``"none"``: {} (no count passes). Modes:
    ``expert``, ``expert_nopred``; B and R positive integers. Raises ValueError naming the bad part."""
    out: dict[tuple[str, int], int] = {}
    if spec.strip().lower() in ("", "none"):
        return out
    for part in spec.split(";"):
        mode, sep, rest = part.strip().partition(":")
        if not sep or mode not in ("expert", "expert_nopred") or not rest.strip():
            raise ValueError(f"count passes: {part.strip()!r} is not MODE:B=R,... with MODE expert or expert_nopred")
        for item in rest.split(","):
            b, sep, r = item.strip().partition("=")
            try:
                B, R = int(b), int(r)
            except ValueError:
                B = R = 0
            if not sep or B < 1 or R < 1:
                raise ValueError(f"count passes: {item.strip()!r} of {mode} is not B=R with positive integers")
            out[(mode, B)] = R
    return out


def expert_prompt_seed(batch: int, repeat: int) -> int:
    """Prompt seed of an expert-aware decode repeat: repeat 0 decodes the resident rows' prompts (seed ``batch``,
    its tokens are checked against them), repeat i > 0 other random prompts (another routing), so the pool
    counters pooled over the repeats sample R routings, not one R times."""
    return batch if repeat == 0 else 1000 * repeat + batch


def falls_back(spec, batch: int) -> bool:
    """Whether the expert-aware engine runs every decode step of ``batch`` tokens through the ring (the engine's
    rule: ``batch`` tokens are expected to touch ``fallback_frac`` of the experts): its pool counters stay 0 and
    its decode is the copy-bound ring, so one repeat suffices."""
    from reference.inference.engine import expected_distinct_experts

    return expected_distinct_experts(spec.experts, spec.top_k, batch) >= InferConfig().fallback_frac * spec.experts


def pooled_rows(stats: list, expert_bytes: int, G: int) -> dict:
    """The expert-aware count rows pooled over ``stats`` (the pool counters of R generates, each a fresh engine
    on other prompts: `expert_prompt_seed`): ``hit_rate_pooled`` = sum of hits / sum of lookups,
    ``prefetched_used_frac_pooled`` = sum of used prefetches / sum of prefetches (0 without any),
    ``decode_GB_copied_per_step_pooled`` = the copied experts' GB (misses + prefetches) per decode step, over all
    R x (G - 1) steps; ``pool_passes`` = R."""
    tot = {k: sum(s[v] for s in stats) for k, v in POOL_COUNTERS}
    steps = len(stats) * max(1, G - 1)
    return {POOL_PASSES_METRIC: len(stats),
            "hit_rate" + POOLED_SUFFIX: tot["hits"] / max(1, tot["hits"] + tot["misses"]),
            "prefetched_used_frac" + POOLED_SUFFIX: tot["prefetch_used"] / max(1, tot["prefetched"]),
            "decode_GB_copied_per_step" + POOLED_SUFFIX: (tot["misses"] + tot["prefetched"]) * expert_bytes / 1e9 / steps}


def trace_pool_calls(eng: Engine) -> list:
    """Record the expert-aware pool calls of ``eng`` (``fetch``: the routed experts of a block; ``prefetch``:
    the experts predicted one block ahead) as ``(step, block, call, experts)``: the routing the LRU pool saw,
    so the simulator's pool can be replayed on it (`simulator.workload.inference.replay_pool_trace`). A list
    append per call, outside the copies' and kernels' path."""
    calls: list = []
    pool, tl = eng.pool, eng.timeline
    fetch, prefetch = pool.fetch, pool.prefetch

    def traced_fetch(block, needed):
        calls.append((tl.micro_batch, block, "fetch", tuple(needed)))
        return fetch(block, needed)

    def traced_prefetch(block, experts):
        calls.append((tl.micro_batch, block, "prefetch", tuple(experts)))
        return prefetch(block, experts)

    pool.fetch, pool.prefetch = traced_fetch, traced_prefetch
    return calls


def write_pool_trace(out: Path, mode: str, batch: int, eng: Engine, calls: list, stats: dict, repeat: int = 0) -> None:
    """Append ``calls`` (`trace_pool_calls`) to ``out/expert_trace.csv`` and the engine's pool counters to
    ``out/expert_trace_stats.csv`` after each generate (a timeout keeps what was measured); ``repeat``: the
    row's repeat (each a fresh engine; column ``repeat`` of both files)."""
    path, spath = out / "expert_trace.csv", out / "expert_trace_stats.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(TRACE_COLUMNS)
        for step, block, call, experts in calls:
            w.writerow((mode, batch, eng.plan.pool_slots, eng.plan.ring_slots, step, block, call,
                        " ".join(str(int(e)) for e in experts), repeat))
    new = not spath.exists()
    with spath.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(("mode", "batch", "hits", "misses", "prefetched", "prefetch_used", "moe_blocks", "experts",
                        "repeat"))
        w.writerow((mode, batch, stats["expert_hits"], stats["expert_misses"], stats["experts_prefetched"],
                    stats["prefetch_used"], " ".join(str(b) for b in eng.blocks), eng.spec.experts, repeat))

