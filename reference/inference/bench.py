"""Issue 7's H100 benchmark: ring vs its bound, vs accelerate's cpu_offload, expert-aware vs ring decode.

Run on the GPU machine from the repository root (``python3 -m reference.inference.bench --out DIR``);
writes tidy rows ``date,commit,device,config,mode,batch,metric,value`` to ``DIR/infer_rows.csv``
(appended to ``results/bench/infer.csv`` by the caller) and prints them.

Model: Mixtral 8x7B's block geometry (d 4096, 8 experts of SwiGLU 14336, top-2, GQA 32/8, RoPE,
RMSNorm, vocab 32000, bf16) with ``--layers`` blocks (default 8: 22.5 GB of experts), against a GPU
budget of ``--budget-gb`` (default 10 GB, so experts are 2.25x the budget). The full 32-block model
(90 GB of experts) does not fit the GPU machine's ~60 GiB disk, and its random weights would take
most of a lease to write; every per-block number below is the same for 8 or 32 blocks.

Measured in one run:
0. the simulator's host inputs for this run: ``host_op_us`` (a tiny reference forward) and the engine host
   probe (:func:`host_probe`: the engine's own prefill and decode passes, per mode and batch, on a model of
   the same family and block count at tiny widths, where a pass's wall time is the host's; ~10-20 s;
   ``--skip-host-probe``), and next to every timed repeat of 2-5 the same probe of that row's code path
   (mode, phase, batch; ring K) right before and right after it (:meth:`HostProber.around`; ~30-60 s on the H100):
   the host speed drifts within a run (the 151f5db run: 25.7 vs 17.2 ms per probe step around one row), so
   each row's prediction takes the host of its own moment (rows below);
1. pinned H2D bandwidth: one block's pinned expert buffer copied to the GPU (CUDA events, median);
2. compute time of a block: resident mode (all experts on the GPU) prefill forward / blocks;
3. bound per block = max(compute, block expert bytes / H2D); ring prefill throughput vs that bound,
   over K = 1..4 slots and batch 1..8 (prompt ``--prompt-len``);
4. accelerate ``cpu_offload`` of the same model (MoEDecoder, weights in pageable host memory) on
   the same prefill batch;
5. decode tokens/s of expert-aware vs ring mode at batch 1, 2, 4, 8 (budget-sized pool / ring), with the
   expert pool's calls (each block's routed experts, the predicted ones) in ``DIR/expert_trace.csv`` and the
   pool's counters in ``DIR/expert_trace_stats.csv`` (:func:`trace_pool_calls`: the routing the LRU pool saw,
   for ``simulator.workload.inference.replay_pool_trace``).

Repeats (issue 7, since 151f5db's single-pass rows missed by up to 47% on host-bound rows): each timed
(mode, batch) row of 2-5 is measured R times, interleaved with its adjacent probe (probe, timed, probe, ...,
timed, probe: R + 1 probes, :func:`interleave`). A prefill repeat is one forward after one untimed warm-up
forward per row; a resident decode repeat is an untimed ``generate(prompts, 2)`` then the timed
``generate(prompts, G)``; a ring decode repeat one ``generate``; an expert-aware repeat a fresh engine (a cold
pool) and one ``generate``, repeat 0 on the resident rows' prompts (its tokens are checked against them), repeat
i > 0 on other random prompts (:func:`expert_prompt_seed`: another routing). The old metric names keep their
meaning as the MEDIAN over the repeats (``prefill_tokens_per_s``, ``block_compute_ms``,
``prefill_frac_of_bound``, ``decode_tokens_per_s``); with R > 1 rows ``<metric>_min`` / ``<metric>_max`` give
the spread, ``<phase>_repeats`` the R used, and the adjacent probe adds ``host_adj_*_median`` / ``_min`` /
``_max`` over its R + 1 probes (``_before`` / ``_after`` stay the first and the last probe). Every repeat's
seconds and every probe's milliseconds are in ``DIR/repeats.csv`` (`REPEAT_COLUMNS`), and every expert-aware
pass's pool counters (``what`` = ``pool_hits``, ``pool_misses``, ``pool_prefetched``, ``pool_prefetch_used``).

Expert-aware count rows (runs from 2026-11-24 ~15:40 on): a pass's pool counts are small (76200c0's
expert_nopred B = 4: 13 hits in 309 lookups) and a function of its routing, so they are POOLED over the row's R
passes (:func:`pooled_rows`, sums over R fresh engines on R prompt sets): ``hit_rate_pooled`` (sum of hits / sum
of lookups), ``prefetched_used_frac_pooled`` (sum of used / sum of prefetched experts),
``decode_GB_copied_per_step_pooled`` (copied experts' GB per decode step over all R x (G - 1) steps) and
``pool_passes`` (R). The single-pass rows ``hit_rate``, ``prefetched_used_frac`` and
``decode_GB_copied_per_step`` of earlier runs (the first repeat's pass) are no longer written. Every pass's pool
calls go to ``DIR/expert_trace.csv`` and its counters to ``DIR/expert_trace_stats.csv`` (column ``repeat``).

R per row class (defaults since 2026-11-24 ~15:40; the 76200c0 run had 5 / 5 / 3 / 3 / 1): the sd of a
host-bound row's prediction error is ~ sqrt(s_t^2 + (h s_p)^2), with s_t = 1.25 cv_t / sqrt(R) the sd of the
timed repeats' median, s_p = 1.25 cv_p / sqrt(R + 1) that of the probes' median (a pass's noise is nearly
independent of its probes': correlation 0.11) and h the prediction's sensitivity to its host input (d log
predicted / d log host, from the simulator). From 76200c0's repeats.csv (cv per pass, mean over batches):

==========================  =====  ==========  ==========  ======  =================  ==================
row class                   flag   cv timed    cv probe    h       sd at 76200c0's R  sd at the new R
==========================  =====  ==========  ==========  ======  =================  ==================
resident decode             11     0.088       0.12        1.0     7.9% (R = 5)       5.5% (R = 11)
resident prefill B1 / B2    9      0.010/.015  0.021/.033  .83/.36 1.1% / 1.0% (5)   0.8% / 0.8% (9)
resident prefill B4-16      9      0.02-0.05   0.09-0.12   .16-.33 1.7-2.9% (5)       1.3-2.1% (9)
ring prefill (K, batch)     2      0.002-0.015 -           0.01    0.1-1.1% (3)       0.2-1.3% (2)
ring decode                 1      (1 pass)    -           0.00    copy-bound         unchanged
expert-aware decode B1-8    3      0.012-0.038 0.07-0.17   .05-.27 1-3.5% (3)         1-3.5% (3)
expert-aware at the ring    1      0.005       -           0.00    0.4% (3)           0.6% (1)
fallback batch (B = 16)
==========================  =====  ==========  ==========  ======  =================  ==================

(flags: ``--decode-repeats``, ``--repeats``, ``--repeats``, ``--ring-repeats``, ``--ring-decode-repeats``,
``--expert-repeats``). Pooled count rows, the simulator's sd of one pass over 30 routing seeds / sqrt(R), R = 4:
expert_nopred hit_rate 6% (B1), 16% (B2: ~17 hits a pass), 5% (B4), 3.5% (B8); expert hit_rate <= 1.6%;
GB copied per step <= 3.3%. Time (H100, from 76200c0's log): + 3.6 s resident prefill, + 16 s resident decode,
- 11.5 s ring prefill, + 25.6 s expert-aware B1-8, - 8.4 s expert B16, - 4.3 s accelerate (``--accelerate-reps`` 1
after its first forward): ~ + 21 s, ~ 320-325 s in all expected. The first run with them (41ed3d6, R = 4
expert-aware) took 341 s of wall time (324 s from its argument parsing; resident prefill 9 s, resident decode
31 s, ring K sweep 8 s, ring prefill 7 s, ring decode 21 s, expert 64 s, expert_nopred 46 s with B = 8 cut to one
repeat by the 290 s limit, ~59 s without, accelerate 21 s, store build and load 92 s): over the ~330 s budget, so
``--expert-repeats`` is 3 since (~ -29 s; the pooled rows' sd at R = 3: expert_nopred hit_rate 7% (B1), 18% (B2),
6% (B4), 4% (B8), GB copied per step <= 3.8%). That run also showed why single-pass ring rows are exposed: ring_K4,
ring B1 and B2 (one pass each, within ~6 s of each other) took 0.50 s a pass against 0.42-0.45 s for the other
ring passes of the run and every ring pass of 76200c0 (its resident B1 probes were 60% slower too): a slow stretch
of the machine, which repeats seconds apart would not have averaged out either. A row that starts after
``--repeat-until-s`` (290 s) of the run (from its argument parsing, ~10-17 s after the process starts) is timed
once, so a slow machine stays near ~5.5 min.

Adjacent copy probes (runs from 2026-11-24 ~16:00 on): the copy-bound rows (ring prefill and decode, ``ring_K<k>``,
expert-aware decode: :func:`copy_bound`) get a pinned H2D probe (:class:`H2DProber`: until 2026-11-24 ~22:40 2 copies
of 1 GiB of a block's pinned expert buffer, since a diagonal slice of every block, on a side stream, CUDA events, ~40-55 ms) right after each of their host probes, so one before and
after every timed repeat (rows ``h2d_adj_<phase>_GBps_before`` / ``_after``, with R > 1 ``_median`` / ``_min`` /
``_max``; every probe in ``repeats.csv`` as ``what`` = ``h2d_GBps``): the run-level ``h2d_pinned_GBps`` is one probe
at the run's start, and 41ed3d6's slow ring rows (above) ran beside a normal one. With them the ring prefill rows are
timed twice (``--ring-repeats`` 2, ~ + 6 s); the probes add ~73 x ~50 ms ~ 4 s: ~320-325 s expected on the H100.
``--skip-h2d-probe`` leaves them out; ``--h2d-probe-mb`` sets the copy size.

Count passes and the weights seed (runs from 2026-11-24 ~20:00 on). A pooled count row of R = 3 passes is not
precise enough to be judged within 10%: the simulator's sd of one pass (1024 routing seeds) is, relative to the
row, expert_nopred hit_rate 13.5% (B1), 31% (B2: ~18 hits a pass), 10.8% (B4), 7.0% (B8), decode GB copied per
step <= 5.3%; expert (one-block-ahead prediction) hit_rate <= 3.4%, prefetched_used_frac <= 4.9%, GB <= 5.2%. And
every run before decoded the same prompts with the same weights, so their pooled rows re-measured the same four
routings (B4: 12.5 experts in the two ring-left blocks at decode step 1 against 10.9 expected; the grand mean over
all blocks and steps 5.455 a block against 5.469). So: ``--weights-seed`` (row ``weights_seed``) builds another
random model, whose routings are new samples, and after the accelerate baseline the count rows' (mode, batch) in
``--count-passes`` get untimed passes (each a fresh engine on other prompts, traced like the timed ones, repeat
index continuing) until they have R passes: the default ``COUNT_PASSES_DEFAULT`` (expert_nopred B1 17, B2 48, B4
11, B8 5) makes every pooled row's sampling sd <= 10% / 3 of its value (B2: 4.5%, capped for time), the expert rows'
R = 3 already do. The passes go round-robin over the rows and none starts after ``--count-until-s`` (520 s) of the
run, so a slow machine pools fewer (``pool_passes`` gives R). Expected cost on the H100 (passes of 76200c0's log:
~2 s at B1, ~2.5 s at B2, ~3 s at B4, ~3.5 s at B8): ~ 14 x 2 + 45 x 2.5 + 8 x 3 + 2 x 3.5 ~ 170 s, ~ 450-480 s in
all. The pooled rows are now written at the end of the run (after the count passes), the expert-aware rows'
``pool_slots`` and ``gpu_peak_GB`` with their first pass; a count pass's decode seconds go to ``repeats.csv``
(``what`` = ``count_decode_s``: not a timed row, no probes beside it). The first run with them (4a49973) took 523 s
of wall time on the H100 (the 69 count passes 171 s). From 2026-11-24 ~23:00 (2550f63 took 423 s with the store
built in parallel; its expert_nopred B = 8 row, 5 passes, sat 3.0 sd from its prediction) the default asks sd <= 10%
/ 4: expert_nopred B1 29, B2 48 (capped), B4 19, B8 8 passes (~ + 23 passes, ~ + 60 s).

In-pass copies, five ring prefill repeats and the collector's pauses (runs from 2026-11-24 ~22:40 on). In the
two noisy runs 4a49973 and 037e537, 6 of the 20 ring prefill passes at K >= 2 and B = 8 / 16 took 0.46-0.54 s
against 0.42-0.45 s for the others (and for every such pass of the quiet runs 76200c0 and 39db250), each beside
copy probes at full speed; with R = 2 one slow pass moves the row's median by 5-11% (037e537's ring_K1 and ring
B = 16 rows, +12%). Pre-registered before the next run: ``--ring-repeats`` 5 (~ + 1.5 s a row, ~ + 15 s), so up to
two slow passes leave the median alone; and the ring engines of the timed ring rows are traced (`Timeline`: CUDA
events around every block's copy on the copy stream, after its wait for the slot's release), so every timed ring
pass also reports the copy engine's own rate inside the pass, beside the compute (`pass_copies`): row
``<phase>_copy_GBps_in_pass`` (median over the repeats; ``_min`` / ``_max``) and, per repeat in ``repeats.csv``,
``copy_GBps_in_pass``, ``copy_busy_s`` (summed copy spans) and ``copy_GB``. The simulator assumes the copies inside a
pass run at the row's adjacent probe rate (no slow-down from the concurrent compute); these rows check that, and
show whether a slow pass had slow copies (the machine) or idle copy time (the schedule). Every timed repeat also
logs the cyclic garbage collector's seconds and collections inside it (``repeats.csv``: ``gc_s``, ``gc_n``;
`GcClock`), to check the host-bound rows' slow repeats (037e537's resident B = 16 decode: 11 repeats 453-883
tokens/s) against its pauses. The first run with them (747d0ad) found no collection inside any resident or ring
repeat, and ring copies inside the passes 3-8% slower than the copy probe, which copied the first GiB of one block
while a full copy of that block ran at 49.8 GB/s against the probe's 53-54; so from the next run the copy probe
samples the whole store (`H2DProber`: a diagonal of every block's buffer, one block's bytes, ~55 ms), the run
starts with a chunk map of the pinned store (``h2d_chunks.csv``, `h2d_chunk_map`: every 256 MiB chunk copied alone,
twice, ~1 s) and every traced ring pass logs its per-block copy seconds (``repeats.csv``: ``copy_s_b<block>``).

``--suite issue7 --quick`` runs this suite on a tiny CPU model (CI smoke test, no accelerate).
``--suite issue11`` (issue 11, :func:`suite_issue11`): eager vs compiled resident and ring, and the
bf16 ring against int8 / fp8 rings (dequantize-into-workspace and fused GEMMs) with their quality
cost; ``--quick`` runs it on a tiny CPU model (CI smoke test).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

# the bench's pieces, re-exported: other modules and tests import these names from here
from reference.inference.bench_device import (  # noqa: F401
    _PEAK,
    CUDA,
    DEV,
    free_cuda,
    log,
    peak_GB,
    sync,
    timed,
)
from reference.inference.bench_issue7 import accelerate_prefill_s, suite_issue7  # noqa: F401
from reference.inference.bench_issue11 import suite_issue11
from reference.inference.bench_probes import (  # noqa: F401
    ADJ_METRICS,
    ADJ_WHEN,
    H2D_ADJ_METRICS,
    H2D_PROBE_COPIES,
    PROBE_MODES,
    PROBE_WIDTHS,
    QUICK_PROBE_WIDTHS,
    H2DProber,
    HostProber,
    _probe_budget_gb,
    copy_bound,
    h2d_GBps,
    h2d_rows,
    host_op_s,
    host_probe,
    interleave,
    probe_spec,
)
from reference.inference.bench_rows import (  # noqa: F401
    COLUMNS,
    COUNT_PASSES_DEFAULT,
    COUNT_PASSES_QUICK,
    POOL_COUNTERS,
    POOL_PASSES_METRIC,
    POOLED_SUFFIX,
    REPEAT_COLUMNS,
    TRACE_COLUMNS,
    decode_tps,
    expert_prompt_seed,
    falls_back,
    parse_count_passes,
    pooled_rows,
    trace_pool_calls,
    write_pool_trace,
)
from reference.inference.build import build_random_store
from reference.inference.engine import Engine, InferConfig, random_prompts
from reference.inference.store import ModelStore
from semoe.presets import model_preset

STORE_DEFAULT = Path("/tmp/semoe_store")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--store", type=Path, default=STORE_DEFAULT)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--budget-gb", type=float, default=10.0)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=8)
    p.add_argument("--batches", default=None, help="default 1,2,4,8 (issue7), 1,8 (issue11), 1,2 (--quick)")
    p.add_argument("--slots", default="1,2,3,4")
    p.add_argument("--reps", type=int, default=3, help="forwards per host-probe prefill (median); H2D copies")
    p.add_argument("--repeats", type=int, default=9,
                   help="issue7: timed repeats (median) of the resident prefill rows (partly host-bound, ~0.1 s each)")
    p.add_argument("--decode-repeats", type=int, default=11,
                   help="issue7: timed repeats of the resident decode rows (host-bound, ~0.3 s each + its probe)")
    p.add_argument("--ring-repeats", type=int, default=5,
                   help="issue7: timed repeats of the ring prefill rows (copy-bound; 5 since 2026-11-24 ~22:40: "
                        "module doc; each beside its adjacent copy probes)")
    p.add_argument("--ring-decode-repeats", type=int, default=1,
                   help="issue7: timed repeats of the ring decode rows (~3.6 s each on the H100)")
    p.add_argument("--expert-repeats", type=int, default=3,
                   help="issue7: timed repeats of the expert-aware decode rows (a fresh engine and other prompts each; "
                        "the pool's count rows pooled over them); 1 at a batch that falls back to the ring")
    p.add_argument("--count-passes", default=None,
                   help="issue7: passes the expert-aware count rows pool, 'MODE:B=R,B=R;MODE:B=R' (the timed repeats, "
                        f"then untimed passes up to R; 'none': the timed repeats only); default {COUNT_PASSES_DEFAULT} "
                        f"({COUNT_PASSES_QUICK} with --quick)")
    p.add_argument("--count-until-s", type=float, default=520.0,
                   help="issue7: no count pass starts after this many seconds of the run")
    p.add_argument("--weights-seed", type=int, default=0,
                   help="issue7: seed of the random model's weights (another seed: other routings of every prompt)")
    p.add_argument("--accelerate-reps", type=int, default=1,
                   help="issue7: timed accelerate cpu_offload forwards after its first (untimed) one (~4.3 s each)")
    p.add_argument("--repeat-until-s", type=float, default=290.0,
                   help="issue7: rows starting after this many seconds of the run are timed once")
    p.add_argument("--skip-accelerate", action="store_true")
    p.add_argument("--diagnose", action="store_true", help="decode determinism + profile, then exit")
    p.add_argument("--suite", choices=("issue7", "issue11"), default=None,
                   help="issue7 (default); issue11: eager vs compiled, bf16 vs int8 / fp8 ring (dequant and fused), "
                        "quality")
    p.add_argument("--quick", action="store_true",
                   help="a tiny CPU model (CI smoke test): issue11 unless --suite issue7 is given")
    p.add_argument("--skip-host-probe", action="store_true", help="issue7: skip the engine host probe")
    p.add_argument("--skip-h2d-probe", action="store_true",
                   help="issue7: skip the adjacent pinned H2D copy probes of the copy-bound rows")
    p.add_argument("--h2d-probe-mb", type=float, default=None,
                   help=f"issue7: MiB per adjacent copy probe, spread over every block (x {H2D_PROBE_COPIES}; default one "
                        "block's expert bytes, ~55 ms on the H100)")
    p.add_argument("--compile-mode", default="reduce-overhead", help="issue11: resident decode compile mode")
    p.add_argument("--ring-slots", type=int, default=None, help="issue11: ring K (default: from --budget-gb)")
    p.add_argument("--skip-compile", action="store_true", help="issue11: skip the compiled section")
    p.add_argument("--skip-ring", action="store_true", help="issue11: skip the bf16/int8/fp8 ring section")
    a = p.parse_args(argv)
    if a.h2d_probe_mb is not None and a.h2d_probe_mb <= 0:
        p.error(f"--h2d-probe-mb must be > 0, got {a.h2d_probe_mb}")
    t_start = time.perf_counter()  # issue 7's --repeat-until-s counts from here
    for k in ("repeats", "decode_repeats", "ring_repeats", "ring_decode_repeats", "expert_repeats", "reps",
              "accelerate_reps"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.suite == "issue11" or (a.quick and a.suite is None):
        a.batches = a.batches or ("1,2" if a.quick else "1,8")
        return suite_issue11(a)
    a.batches = a.batches or ("1,2" if a.quick else "1,2,4,8")
    a.count_passes = a.count_passes if a.count_passes is not None else (
        COUNT_PASSES_QUICK if a.quick else COUNT_PASSES_DEFAULT)
    try:
        parse_count_passes(a.count_passes)
    except ValueError as e:
        p.error(str(e))
    if a.quick:  # issue 7 on a tiny CPU model: every section's code path, no accelerate
        a.preset, a.layers, a.prompt_len, a.gen_len, a.slots = "tiny", 2, 8, 3, "1"
        a.skip_accelerate = True
        if a.store == STORE_DEFAULT:
            a.store = a.out / "store"
    if a.diagnose:
        diagnose(preset=a.preset, layers=a.layers, P=a.prompt_len, G=a.gen_len, store_dir=a.store)
        return 0
    return suite_issue7(a, t_start)


def diagnose(preset: str = "mixtral-8x7b", layers: int = 4, batches=(1, 8), P: int = 256, G: int = 8, store_dir: Path = Path("/tmp/semoe_diag")) -> None:
    """Decode determinism and a profile of resident decode steps (printed)."""
    spec = model_preset(preset).replace(layers=layers, name=f"{preset}-L{layers}", dtype="bf16")
    build_random_store(store_dir, spec, torch.bfloat16, seed=0, gen_device=DEV, progress=log)
    store = ModelStore.load(store_dir, progress=log)
    mk = lambda mode, K=None: Engine(store, InferConfig(mode=mode, slots=K, device=DEV, trace=False),  # noqa: E731
                                     batch=8, max_len=P + G, prefill_tokens=8 * P)
    res, ring = mk("resident"), mk("ring", 2)
    for B in batches:
        pr = random_prompts(B, P, spec.vocab, seed=B)
        a1 = res.generate(pr, G, keep_logits=True)
        a2 = res.generate(pr, G, keep_logits=True)
        b = ring.generate(pr, G, keep_logits=True)
        top2 = a1.logits_BGV.topk(2, -1).values
        log(f"B={B} resident run-to-run tokens equal {torch.equal(a1.tokens_BG, a2.tokens_BG)} "
            f"logits maxdiff {float((a1.logits_BGV - a2.logits_BGV).abs().max()):.3g}; ring vs resident tokens "
            f"{torch.equal(a1.tokens_BG, b.tokens_BG)} per-step logit maxdiff "
            f"{[round(float(x), 4) for x in (a1.logits_BGV - b.logits_BGV).abs().amax((0, 2))]}; min top1-top2 gap "
            f"{float((top2[..., 0] - top2[..., 1]).min()):.3g}; decode s/step resident {a1.decode_s / (G - 1):.4f} "
            f"ring {b.decode_s / (G - 1):.4f}")
    if not CUDA:
        return
    from torch.nn.attention import SDPBackend
    from torch.profiler import ProfilerActivity, profile

    import reference.inference.model as im

    pr = random_prompts(1, P, spec.vocab, seed=1)
    for name, bk in (("default", None), ("no_cudnn", im.DECODE_SDPA_BACKENDS), ("math", [SDPBackend.MATH]),
                     ("flash", [SDPBackend.FLASH_ATTENTION])):
        old, im.DECODE_SDPA_BACKENDS = im.DECODE_SDPA_BACKENDS, bk
        try:
            r = res.generate(pr, G, keep_logits=True)
            log(f"decode sdpa={name}: {r.decode_s / (G - 1) * 1e3:.2f} ms/step")
        except Exception as e:
            log(f"decode sdpa={name}: failed {type(e).__name__}: {str(e)[:200]}")
        finally:
            im.DECODE_SDPA_BACKENDS = old
    old, im.DECODE_SDPA_BACKENDS = im.DECODE_SDPA_BACKENDS, None  # profile the default choice

    pr = random_prompts(1, P, spec.vocab, seed=1).to(DEV)
    cache = res.new_cache(1)
    res.forward(pr, cache, 0, all_logits=False)
    nxt = pr[:, -1:]
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for s in range(3):
            res.forward(nxt, cache, P + s, all_logits=False)
        sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
    im.DECODE_SDPA_BACKENDS = old
    res.close()
    ring.close()


if __name__ == "__main__":
    sys.exit(main())
