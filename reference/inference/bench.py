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
expert-aware decode: :func:`copy_bound`) get a pinned H2D probe (:class:`H2DProber`: 2 copies of 1 GiB of a block's
pinned expert buffer on a side stream, CUDA events, ~40 ms) right after each of their host probes, so one before and
after every timed repeat (rows ``h2d_adj_<phase>_GBps_before`` / ``_after``, with R > 1 ``_median`` / ``_min`` /
``_max``; every probe in ``repeats.csv`` as ``what`` = ``h2d_GBps``): the run-level ``h2d_pinned_GBps`` is one probe
at the run's start, and 41ed3d6's slow ring rows (above) ran beside a normal one. With them the ring prefill rows are
timed twice (``--ring-repeats`` 2, ~ + 6 s); the probes add ~73 x ~50 ms ~ 4 s: ~320-325 s expected on the H100.
``--skip-h2d-probe`` leaves them out; ``--h2d-probe-mb`` sets the copy size.

``--suite issue7 --quick`` runs this suite on a tiny CPU model (CI smoke test, no accelerate).
``--suite issue11`` (issue 11, :func:`suite_issue11`): eager vs compiled resident and ring, and the
bf16 ring against int8 / fp8 rings (dequantize-into-workspace and fused GEMMs) with their quality
cost; ``--quick`` runs it on a tiny CPU model (CI smoke test).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from reference.inference.build import build_random_store
from reference.inference.engine import Engine, InferConfig, random_prompts, ring_bound_s
from reference.inference.store import ModelStore
from semoe.presets import model_preset

STORE_DEFAULT = Path("/tmp/semoe_store")
COLUMNS = ("date", "commit", "device", "config", "mode", "batch", "metric", "value")
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"  # the CPU path only smoke-tests this script with a small preset


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, reps: int) -> float:
    """Median wall seconds of ``fn()`` (synchronised before and after; phases, not inner loops)."""
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def decode_tps(B: int, G: int, decode_s: float) -> float:
    """Decode tokens/s of one generate of ``G`` tokens at batch ``B`` (as ``GenerateResult.decode_tokens_per_s``)."""
    return B * (G - 1) / decode_s if decode_s > 0 and G > 1 else float("nan")


def h2d_GBps(store: ModelStore, reps: int = 5) -> float:
    src = store.layer_buffers[store.moe_blocks[0]]
    dst = torch.empty_like(src, device=DEV)
    if not CUDA:
        return src.numel() / timed(lambda: dst.copy_(src), reps) / 1e9
    s = torch.cuda.Stream()
    ts = []
    for _ in range(reps + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            a.record(s)
            dst.copy_(src, non_blocking=True)
            b.record(s)
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    del dst
    return src.numel() / statistics.median(ts[1:]) / 1e9


# issue 7's adjacent copy probes (runs from 2026-11-24 ~16:00 on): the pinned H2D bandwidth right before and after
# (interleaved with) each copy-bound row's timed passes, as the host probe does for the host
# rows <metric>_before / _after (/ _median / _min / _max with R > 1), per phase (a ring row (mode, batch) times both)
H2D_ADJ_METRICS = {"prefill": "h2d_adj_prefill_GBps", "decode": "h2d_adj_decode_GBps"}
H2D_PROBE_BYTES = 1 << 30  # bytes per probe copy (~20 ms on the H100's ~53 GB/s)
H2D_PROBE_COPIES = 2  # timed copies per probe: bandwidth = their bytes / their summed seconds


def copy_bound(row_mode: str) -> bool:
    """Rows whose timed passes are bound by the pinned H2D copies (ring prefill / decode, ring_K<k>, expert-aware
    decode, whose fallback batch runs the ring): they get an adjacent copy probe (`H2DProber`)."""
    return row_mode.startswith(("ring", "expert"))


class H2DProber:
    """The pinned H2D bandwidth at one moment of the run: ``copies`` copies of the first ``nbytes`` of one block's
    pinned expert buffer (the engine's copy source) into a device buffer on a side stream, CUDA events around
    them; GB/s = bytes / the copies' summed seconds. The device buffer is allocated per probe and dropped, its
    memory kept out of the run's ``gpu_peak_GB`` (`peak_GB`). CPU: the same copy, wall-clock timed."""

    def __init__(self, store: ModelStore, nbytes: int = H2D_PROBE_BYTES, copies: int = H2D_PROBE_COPIES) -> None:
        if nbytes < 1 or copies < 1:
            raise ValueError(f"H2DProber: nbytes and copies must be >= 1, got {nbytes}, {copies}")
        src = store.layer_buffers[store.moe_blocks[0]].view(-1)
        self.src = src[: min(src.numel(), nbytes // src.element_size())]
        self.copies = copies
        self.stream = torch.cuda.Stream() if CUDA else None

    def measure(self) -> float:
        """GB/s of ``copies`` pinned -> device copies of ``src`` now."""
        _PEAK["saved"] = max(_PEAK["saved"], torch.cuda.max_memory_allocated() if CUDA else 0)
        dst = torch.empty_like(self.src, device=DEV)
        nbytes = self.src.numel() * self.src.element_size() * self.copies
        if not CUDA:
            t = time.perf_counter()
            for _ in range(self.copies):
                dst.copy_(self.src)
            sec = time.perf_counter() - t
        else:
            self.stream.wait_stream(torch.cuda.current_stream())
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.stream):
                a.record(self.stream)
                for _ in range(self.copies):
                    dst.copy_(self.src, non_blocking=True)
                b.record(self.stream)
            b.synchronize()
            sec = a.elapsed_time(b) / 1e3
        del dst
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the run's peak so far is in _PEAK["saved"]
        return nbytes / max(sec, 1e-12) / 1e9


def h2d_rows(row, row_mode: str, B: int, phase: str, gbps: list) -> None:
    """Rows of a copy-bound row's adjacent copy probes (`H2DProber`, one per host-probe slot of `interleave`):
    ``h2d_adj_<phase>_GBps_before`` (the first), ``_after`` (the last), with more than two probes (R > 1)
    ``_median`` / ``_min`` / ``_max`` over all R + 1 of them (the median is the row's PCIe input, validate_infer's
    rule)."""
    m = H2D_ADJ_METRICS[phase]
    row(row_mode, B, f"{m}_before", gbps[0])
    row(row_mode, B, f"{m}_after", gbps[-1])
    if len(gbps) > 2:
        row(row_mode, B, f"{m}_median", statistics.median(gbps))
        row(row_mode, B, f"{m}_min", min(gbps))
        row(row_mode, B, f"{m}_max", max(gbps))


def host_op_s() -> float:
    """Host seconds per kernel launch of the reference code on this machine (kernels.profile's ``host`` probe:
    a tiny MoEDecoder forward, torch MoE backend): the simulator's host-time input for this run's rows."""
    from kernels.profile import Profile, _host_reference

    from reference.moe.layer import moe_backend_env

    prof = Profile(DEV, 1e9)
    with moe_backend_env("torch"):
        _host_reference(prof, DEV, "reference", sync)
    return float(prof.rows[-1]["time_s"])


# issue 7's host probe: the engine's own code path on a model of the same family and block count at widths
# where the device work is ~0 (head dim 128 and 4:1 GQA as Mixtral's, so attention takes the same kernels)
PROBE_WIDTHS = {"hidden": 512, "heads": 4, "kv_heads": 1, "ffn": 128, "vocab": 256}
PROBE_MODES = (("resident", "resident", False), ("ring", "ring", False), ("expert", "expert", True),
               ("expert_nopred", "expert", False))


QUICK_PROBE_WIDTHS = {"hidden": 64, "heads": 4, "kv_heads": 1, "ffn": 32, "vocab": 256}  # --quick (CPU smoke test)


def probe_spec(spec, widths: dict | None = None):
    """The probe model: ``spec``'s family, block count and routing (experts, top-k) at tiny widths."""
    return spec.replace(name=f"{spec.name}-hostprobe", **(widths or PROBE_WIDTHS))


def _probe_budget_gb(store: ModelStore, batch: int, max_len: int, tokens: int, pool_slots: int) -> float:
    """A budget giving the probe's expert-aware engine ``pool_slots`` expert slots, as the run's engine has."""
    from reference.inference.engine import plan_memory

    p = plan_memory(store, "expert", 1 << 50, batch, max_len, tokens)
    return (p.dense_bytes + p.kv_bytes + p.act_bytes + pool_slots * p.expert_bytes + p.expert_bytes // 2) / 1e9


# repeats.csv (issue 7): every timed repeat's seconds (what = timed_s: the prefill forward, the generate's decode)
# and every adjacent probe's milliseconds (probe_ms; probe i is right before repeat i, probe R after the last)
REPEAT_COLUMNS = ("mode", "batch", "phase", "repeat", "what", "value")
ADJ_METRICS = {"prefill": ("host_adj_prefill_ms", "host_adj_prefill_copies"),
               "decode": ("host_adj_decode_ms_per_step", "host_adj_decode_copies_per_step")}
# an adjacent probe's seconds rows carry these suffixes: measured right before and right after the timed passes
# (the first and the last probe of a repeated row; its ``_median`` / ``_min`` / ``_max`` rows: over all its probes)
ADJ_WHEN = ("before", "after")


class HostProber:
    """The engine host probe of one run: the engine's own passes on ``probe_spec(spec)`` (same family, block
    count, experts and top-k; tiny widths, so each kernel's device time is a few us and the wall time of a pass
    is the host's), with the ring's K and the expert pool's slots of the run's engines (``plans``: ``("ring",
    B)`` -> K, ``("expert", B)`` -> C), so the probe copies as the run does (tiny copies).

    :meth:`prefill`: the median of ``reps`` forwards after a warm-up (as the run's prefill rows); :meth:`decode`:
    the decode steps of one ``generate`` after an untimed ``generate(prompts, 2)`` (as the run's decode rows);
    both return (milliseconds, copy calls) per pass. Each measurement builds its own engine and drops it
    (no ``empty_cache``: the allocator keeps the run engine's blocks cached for its next timed pass)."""

    def __init__(self, spec, store_dir: Path, P: int, G: int, reps: int, plans: dict, row,
                 widths: dict | None = None) -> None:
        self.spec, self.P, self.G, self.reps, self.plans, self.row = probe_spec(spec, widths), P, G, reps, plans, row
        build_random_store(store_dir, self.spec, torch.bfloat16, seed=0, gen_device=DEV)
        self.store = ModelStore.load(store_dir)

    def _engine(self, mode: str, predict: bool, B: int, slots: int | None = None) -> Engine:
        kw: dict = {"gpu_budget_gb": None}
        if mode == "ring":
            kw["slots"] = slots if slots is not None else self.plans[("ring", B)]
        elif mode == "expert":
            kw["gpu_budget_gb"] = _probe_budget_gb(self.store, B, self.P + self.G, B * self.P, self.plans[("expert", B)])
        eng = Engine(self.store, InferConfig(mode=mode, device=DEV, trace=False, predict=predict, **kw), batch=B,
                     max_len=self.P + self.G, prefill_tokens=B * self.P)
        if mode == "expert" and eng.plan.pool_slots != self.plans[("expert", B)]:
            log(f"host probe: expert B={B} pool {eng.plan.pool_slots} slots, run's {self.plans[('expert', B)]}")
        return eng

    @staticmethod
    def _mode(name: str) -> tuple[str, bool]:
        """Probe mode name (``PROBE_MODES``) -> engine mode, predict."""
        return next((m, pr) for n, m, pr in PROBE_MODES if n == name)

    def prefill(self, name: str, B: int, slots: int | None = None) -> tuple[float, float]:
        mode, predict = self._mode(name)
        eng = self._engine(mode, predict, B, slots)
        idx = random_prompts(B, self.P, self.spec.vocab, seed=B).to(DEV)
        eng.forward(idx, all_logits=False)
        c0 = eng.pool.copies
        t = timed(lambda: eng.forward(idx, all_logits=False), self.reps)
        copies = (eng.pool.copies - c0) / self.reps
        eng.close()
        del eng
        return 1e3 * t, copies

    def decode(self, name: str, B: int, slots: int | None = None) -> tuple[float, float]:
        mode, predict = self._mode(name)
        eng = self._engine(mode, predict, B, slots)
        prompts = random_prompts(B, self.P, self.spec.vocab, seed=B)
        eng.generate(prompts, 2)
        calls: list[int] = []
        fwd = eng.forward

        def counted(idx_BS, *args, **kwargs):  # copy calls of each decode forward (q_len 1)
            c = eng.pool.copies
            out = fwd(idx_BS, *args, **kwargs)
            if idx_BS.shape[1] == 1:
                calls.append(eng.pool.copies - c)
            return out

        eng.forward = counted
        r = eng.generate(prompts, self.G)
        del eng.forward  # the closure refers to the engine: no cycle left behind
        eng.close()
        del eng
        steps = max(1, self.G - 1)
        return 1e3 * r.decode_s / steps, sum(calls) / steps

    def measure(self, phase: str, name: str, B: int, slots: int | None = None) -> tuple[float, float]:
        return (self.prefill if phase == "prefill" else self.decode)(name, B, slots)

    def run_probe(self, batches: list[int]) -> None:
        """The once-per-run probe (rows ``host_prefill_ms`` ...): every mode of ``PROBE_MODES`` and batch."""
        self.row("-", 0, "host_probe_moe_blocks", len(self.store.moe_blocks))
        for name, _, _ in PROBE_MODES:
            for B in batches:
                free_cuda()
                ms, copies = self.prefill(name, B)
                self.row(name, B, "host_prefill_ms", ms)
                self.row(name, B, "host_prefill_copies", copies)
                ms, copies = self.decode(name, B)
                self.row(name, B, "host_decode_ms_per_step", ms)
                self.row(name, B, "host_decode_copies_per_step", copies)
        free_cuda()

    def around(self, phase: str, row_mode: str, B: int, repeats: int, fn, name: str | None = None,
               slots: int | None = None, log_rep=None, also=None) -> list:
        """``repeats`` timed repeats ``fn(i)`` of a row interleaved with the probe of its code path (``name`` or
        ``row_mode``, ``phase``, ``B``; ``slots``: the ring's K of ring_K<k> rows): probe, fn(0), probe, fn(1), ...,
        fn(R - 1), probe (`interleave`). Returns the repeats' results. Rows (``row_mode``, ``B``):
        ``host_adj_<phase>_ms[_per_step]_before`` (the first probe) and ``_after`` (the last), with R > 1 also
        ``_median`` / ``_min`` / ``_max`` over all R + 1 probes (the median is the row's host input), and
        ``host_adj_<phase>_copies[_per_step]`` (the mean over the probes). ``log_rep(phase, i, what, value)``
        gets every probe's milliseconds (``what`` = ``probe_ms``). The probes' device memory is kept out of
        the run's ``gpu_peak_GB`` (`peak_GB`). ``also()`` (the copy probe of copy-bound rows) runs right after each
        host probe, so it is the measurement nearest to the timed pass that follows."""
        ms_metric, cp_metric = ADJ_METRICS[phase]
        name = name or row_mode
        got: list = []

        def probe() -> None:
            _PEAK["saved"] = max(_PEAK["saved"], torch.cuda.max_memory_allocated() if CUDA else 0)
            got.append(self.measure(phase, name, B, slots))
            if CUDA:  # (the probe engine is freed by reference counting: no gc.collect, ~0.2 s each)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()  # the run's peak so far is in _PEAK["saved"]
            if log_rep is not None:
                log_rep(phase, len(got) - 1, "probe_ms", got[-1][0])
            if len(got) == 1:
                self.row(row_mode, B, f"{ms_metric}_before", got[0][0])
            if also is not None:
                also()

        vals = interleave(repeats, fn, probe)
        self.row(row_mode, B, f"{ms_metric}_after", got[-1][0])
        ms = [g[0] for g in got]
        if repeats > 1:
            self.row(row_mode, B, f"{ms_metric}_median", statistics.median(ms))
            self.row(row_mode, B, f"{ms_metric}_min", min(ms))
            self.row(row_mode, B, f"{ms_metric}_max", max(ms))
        self.row(row_mode, B, cp_metric, sum(g[1] for g in got) / len(got))
        return vals


def interleave(repeats: int, fn, probe=None) -> list:
    """``probe(), fn(0), probe(), fn(1), ..., fn(repeats - 1), probe()`` (no probes when ``probe`` is None):
    each timed repeat has a host probe right before and right after it. Returns ``[fn(0), ...]``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = []
    for i in range(repeats):
        if probe is not None:
            probe()
        out.append(fn(i))
    if probe is not None:
        probe()
    return out


def host_probe(spec, store_dir: Path, batches: list[int], P: int, G: int, reps: int, plans: dict, row,
               widths: dict | None = None) -> HostProber:
    """Host time of the engine's own code path, measured in this run (the simulator's host input for it).

    For each mode of ``PROBE_MODES`` and batch of ``batches`` (`HostProber.run_probe`): rows (mode, batch)
    ``host_prefill_ms``, ``host_decode_ms_per_step`` and the copy calls of the same passes
    (``host_prefill_copies``, ``host_decode_copies_per_step``: a ring block or an expert per call), which the
    simulator counts as kernels of the probe's pass; ``-`` ``host_probe_moe_blocks``. Returns the prober,
    whose `HostProber.adjacent` probes each timed row of the run next to it."""
    prober = HostProber(spec, store_dir, P, G, reps, plans, row, widths)
    prober.run_probe(batches)
    return prober


_PEAK = {"saved": 0}  # the run's peak allocated bytes before the last adjacent host probe (`HostProber.adjacent`)


TRACE_COLUMNS = ("mode", "batch", "pool_slots", "ring_slots", "step", "block", "call", "experts", "repeat")
# the expert pool's counters of one generate (GenerateResult.stats keys), as repeats.csv names them (``pool_<name>``)
POOL_COUNTERS = (("hits", "expert_hits"), ("misses", "expert_misses"), ("prefetched", "experts_prefetched"),
                 ("prefetch_used", "prefetch_used"))
# expert-aware count rows pooled over the row's repeats (`pooled_rows`); the single-pass rows of runs before
# them (hit_rate, prefetched_used_frac, decode_GB_copied_per_step: the first repeat's pass) are no longer written
POOLED_SUFFIX = "_pooled"
POOL_PASSES_METRIC = "pool_passes"


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


def peak_GB() -> float:
    """Peak allocated GB since the last `free_cuda`, the adjacent host probes' own engines excluded."""
    return max(_PEAK["saved"], torch.cuda.max_memory_allocated()) / 1e9 if CUDA else 0.0


def free_cuda() -> None:
    _PEAK["saved"] = 0
    if CUDA:
        torch.cuda.synchronize()  # prefetches of a dropped engine must land before its pool is reused
    gc.collect()
    if not CUDA:
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


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
    p.add_argument("--ring-repeats", type=int, default=2,
                   help="issue7: timed repeats of the ring prefill rows (copy-bound: 76200c0's spread 0.3-1.7%%; "
                        "each beside its adjacent copy probes)")
    p.add_argument("--ring-decode-repeats", type=int, default=1,
                   help="issue7: timed repeats of the ring decode rows (~3.6 s each on the H100)")
    p.add_argument("--expert-repeats", type=int, default=3,
                   help="issue7: timed repeats of the expert-aware decode rows (a fresh engine and other prompts each; "
                        "the pool's count rows pooled over them); 1 at a batch that falls back to the ring")
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
    p.add_argument("--h2d-probe-mb", type=float, default=H2D_PROBE_BYTES / 2**20,
                   help=f"issue7: MiB per adjacent copy probe copy (x {H2D_PROBE_COPIES} copies; ~20 ms each on the H100)")
    p.add_argument("--compile-mode", default="reduce-overhead", help="issue11: resident decode compile mode")
    p.add_argument("--ring-slots", type=int, default=None, help="issue11: ring K (default: from --budget-gb)")
    p.add_argument("--skip-compile", action="store_true", help="issue11: skip the compiled section")
    p.add_argument("--skip-ring", action="store_true", help="issue11: skip the bf16/int8/fp8 ring section")
    a = p.parse_args(argv)
    if a.h2d_probe_mb <= 0:
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
    if a.quick:  # issue 7 on a tiny CPU model: every section's code path, no accelerate
        a.preset, a.layers, a.prompt_len, a.gen_len, a.slots = "tiny", 2, 8, 3, "1"
        a.skip_accelerate = True
        if a.store == STORE_DEFAULT:
            a.store = a.out / "store"
    if a.diagnose:
        diagnose(preset=a.preset, layers=a.layers, P=a.prompt_len, G=a.gen_len, store_dir=a.store)
        return 0
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
    build_random_store(a.store, spec, torch.bfloat16, seed=0, gen_device=DEV, progress=log)
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
    bw = h2d_GBps(store)
    row("-", 0, "h2d_pinned_GBps", bw)
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

    h2d = None if a.skip_h2d_probe else H2DProber(store, int(a.h2d_probe_mb * 2**20))
    rep_path = a.out / "repeats.csv"
    rep_path.write_text(",".join(REPEAT_COLUMNS) + "\n")

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
            with rep_path.open("a", newline="") as f:
                csv.writer(f).writerow((row_mode, batch, ph, i, what, f"{value:.6g}"))

        def timed_fn(i: int) -> float:
            sec = fn(i)
            log_rep(phase, i, "timed_s", sec)
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
               predict: bool = True) -> Engine:
        free_cuda()
        cfg = InferConfig(mode=mode, gpu_budget_gb=budget, slots=slots, device=DEV, trace=False, predict=predict)
        return Engine(store, cfg, batch=batch, max_len=P + G, prefill_tokens=batch * P)

    def forward_s(eng: Engine, idx: torch.Tensor):
        """One timed prefill forward (synchronised): a prefill repeat."""
        return lambda i: timed(lambda: eng.forward(idx, all_logits=False), 1)

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
        eng = engine("ring", Bmax, slots=K)
        idx = random_prompts(Bmax, P, spec.vocab, seed=Bmax).to(DEV)
        eng.forward(idx, all_logits=False)  # untimed warm-up
        ts = repeated("prefill", f"ring_K{K}", Bmax, a.ring_repeats, forward_s(eng, idx), "ring", slots=K)
        row(f"ring_K{K}", Bmax, "gpu_peak_GB", peak_GB())
        bound = ring_bound_s([comp[Bmax]] * L, layer_bytes, bw * 1e9)
        spread_rows(f"ring_K{K}", Bmax, "prefill_tokens_per_s", [Bmax * P / x for x in ts])
        spread_rows(f"ring_K{K}", Bmax, "prefill_frac_of_bound", [bound / x for x in ts])
        del eng
    ring_prefill = {}
    eng = engine("ring", Bmax)
    Kb = eng.plan.ring_slots
    row("ring", Bmax, "budget_K", Kb)
    for B in batches:
        idx = random_prompts(B, P, spec.vocab, seed=B).to(DEV)
        eng.forward(idx, all_logits=False)  # untimed warm-up
        ts = repeated("prefill", "ring", B, a.ring_repeats, forward_s(eng, idx))
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
        toks = []

        def ring_decode(i: int) -> float:
            r = eng.generate(prompts, G)
            toks.append(r.tokens_BG)
            return r.decode_s

        ts = repeated("decode", "ring", B, a.ring_decode_repeats, ring_decode)
        same &= all(torch.equal(t, res_dec[B]) for t in toks)
        spread_rows("ring", B, "decode_tokens_per_s", [decode_tps(B, G, x) for x in ts])
    row("ring", Bmax, "gpu_peak_GB", peak_GB())
    row("ring", 0, "tokens_equal_resident", float(same))
    del eng

    # --- expert-aware decode (budget-sized LRU pool; prefill falls back to the ring): every repeat a fresh engine
    # (a cold pool) on its own prompts (`expert_prompt_seed`); every repeat's pool calls traced, the count rows
    # pooled over the repeats (`pooled_rows`); gpu_peak_GB is the first repeat's
    for predict, mname in ((True, "expert"), (False, "expert_nopred")):
        same = True
        for B in batches:
            first: dict = {}
            stats: list = []

            def expert_decode(i: int) -> float:
                nonlocal same
                prompts = random_prompts(B, P, spec.vocab, seed=expert_prompt_seed(B, i))
                eng = engine("expert", B, predict=predict)
                calls = trace_pool_calls(eng)
                r = eng.generate(prompts, G)
                if i == 0:  # repeat 0 decodes the resident rows' prompts: the tokens must be equal
                    same &= torch.equal(r.tokens_BG, res_dec[B])
                    first.update(stats=r.stats, gpu_peak=peak_GB())
                write_pool_trace(a.out, mname, B, eng, calls, r.stats, repeat=i)
                stats.append(r.stats)
                with rep_path.open("a", newline="") as f:  # the pass's pool counters (repeats.csv)
                    csv.writer(f).writerows((mname, B, "decode", i, f"pool_{k}", r.stats[v]) for k, v in POOL_COUNTERS)
                eng.close()
                del eng
                return r.decode_s

            R = 1 if falls_back(spec, B) else a.expert_repeats
            ts = repeated("decode", mname, B, R, expert_decode)
            s = first["stats"]
            spread_rows(mname, B, "decode_tokens_per_s", [decode_tps(B, G, x) for x in ts])
            row(mname, B, "pool_slots", s["pool_slots"])
            for metric, value in pooled_rows(stats, store.expert_bytes, G).items():
                row(mname, B, metric, value)
            row(mname, B, "gpu_peak_GB", first["gpu_peak"])
        row(mname, 0, "tokens_equal_resident", float(same))

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
    log("done")
    return 0



def suite_issue11(a) -> int:
    """Issue 11 on one model, rows appended to OUT/infer_rows.csv after every measurement (module doc
    of this file for the schema). Order (a timeout loses only the tail):

    1. pinned H2D GB/s; bf16 resident eager prefill (B = max batch) and decode (each batch): the
       reference logits and tokens;
    2. ring over the same budget for bf16, int8 and fp8 experts, the quantized ones with the
       dequantize-into-workspace kernel (``ring_int8`` ...) and the fused one (``ring_int8_fused``):
       prefill and decode tokens/s, K, bytes copied per block and per forward, the copy time per block
       at the measured bandwidth, the compute time per block (the same experts resident, K = L) and,
       dequantize-into-workspace only, the dequant pass of one block alone (``dequant_ms_per_block``),
       speedup over the bf16 ring, and quality against bf16 resident (max / mean |logit diff| of the
       prefill's last position, greedy tokens equal, top-1 agreement);
    3. compiled resident (``compiled``: prefill with inductor, decode with ``--compile-mode``, CUDA
       graphs by default) vs eager in the same run, and compiled ring (``ring_compiled``).
    """
    import json

    from reference.inference import qmatmul

    quick = a.quick
    if quick:
        P, G = 8, 3
        batches = [int(b) for b in a.batches.split(",")]
        spec = model_preset("tiny").replace(layers=2, name="tiny-L2", dtype="bf16")
        how = "aot_eager"
        ring_slots = a.ring_slots or 1
    else:
        batches = [int(b) for b in a.batches.split(",")]
        P, G = a.prompt_len, a.gen_len
        spec = model_preset(a.preset).replace(layers=a.layers, name=f"{a.preset}-L{a.layers}", dtype="bf16")
        how = a.compile_mode
        ring_slots = a.ring_slots
    Bmax = max(batches)
    commit = os.environ.get("SEMOE_COMMIT", "unknown")
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    budget = None if quick else a.budget_gb
    config = f"{spec.name} bf16 budget={'K' + str(ring_slots) if budget is None else f'{budget:g}GB'} P={P} G={G}"
    rows: list[dict] = []
    a.out.mkdir(parents=True, exist_ok=True)
    out_csv = a.out / "infer_rows.csv"

    def row(mode: str, batch: int, metric: str, value: float) -> None:
        rows.append(dict(date=date, commit=commit, device=device, config=config, mode=mode, batch=batch,
                         metric=metric, value=f"{float(value):.6g}"))
        log(f"ROW {mode:18s} B={batch} {metric} = {float(value):.4g}")
        with out_csv.open("w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)

    store_dir = a.store if not quick else a.out / "store"
    log(f"building {spec.name} into {store_dir}")
    build_random_store(store_dir, spec, torch.bfloat16, seed=0, gen_device=DEV, progress=log)
    store = ModelStore.load(store_dir, progress=log)
    L, E = len(store.moe_blocks), spec.experts
    layer_bytes = store.expert_bytes * E
    bw = h2d_GBps(store)
    row("-", 0, "h2d_pinned_GBps", bw)
    row("-", 0, "host_op_us", 1e6 * host_op_s())
    row("-", 0, "expert_GB_total", L * layer_bytes / 1e9)
    row("-", 0, "moe_blocks", L)
    prompts = {B: random_prompts(B, P, spec.vocab, seed=B) for B in batches}

    def engine(mode, batch, **cfg) -> Engine:
        free_cuda()
        c = InferConfig(mode=mode, device=DEV, trace=False, **cfg)
        return Engine(store, c, batch=batch, max_len=P + G, prefill_tokens=batch * P)

    copied = {}

    def prefill_s(eng, B) -> tuple[float, torch.Tensor]:
        """Median prefill seconds after one warm-up pass; ``copied["per_forward"]``: bytes copied per
        timed pass (steady state: each of the L blocks once when K < L, none when resident)."""
        idx = prompts[B].to(DEV)
        last = eng.forward(idx, all_logits=False)[:, -1].float().cpu()
        b0 = eng.pool.bytes_copied
        t = timed(lambda: eng.forward(idx, all_logits=False), a.reps)
        copied["per_forward"] = (eng.pool.bytes_copied - b0) / a.reps
        return t, last

    # 1. bf16 resident eager: reference logits / tokens
    eng = engine("resident", Bmax)
    t, ref_last = prefill_s(eng, Bmax)
    comp_bf16 = t / L
    row("resident", Bmax, "prefill_tokens_per_s", Bmax * P / t)
    row("resident", Bmax, "block_compute_ms", 1e3 * comp_bf16)
    ref_tok = {}
    for B in batches:
        eng.generate(prompts[B], 2)
        r = eng.generate(prompts[B], G)
        ref_tok[B] = r.tokens_BG
        row("resident", B, "decode_tokens_per_s", r.decode_tokens_per_s)
        row("resident", B, "decode_ms_per_step", 1e3 * r.decode_s / max(1, G - 1))
    del eng

    # 2. ring: bf16, int8, fp8 (dequant, fused) over the same budget
    ring_tps = {}
    for quant, kern in () if a.skip_ring else ((None, "dequant"), ("int8", "dequant"), ("int8", "fused"), ("fp8", "dequant"), ("fp8", "fused")):
        name = "ring" if quant is None else f"ring_{quant}" + ("_fused" if kern == "fused" else "")
        try:
            if quant is not None:  # compute per block from resident quantized experts (K = L)
                eng = engine("resident", Bmax, quant=quant, quant_kernel=kern)
                t, _ = prefill_s(eng, Bmax)
                row(name, Bmax, "block_compute_ms", 1e3 * t / L)
                if kern == "dequant":  # the dequantize-into-workspace pass alone (one block's experts)
                    row(name, Bmax, "dequant_ms_per_block", 1e3 * timed(lambda: eng.pool.group_weights(0), a.reps))
                del eng
            else:
                row(name, Bmax, "block_compute_ms", 1e3 * comp_bf16)
            eng = engine("ring", Bmax, gpu_budget_gb=budget, slots=ring_slots, quant=quant, quant_kernel=kern)
            qb = eng.pool.expert_nbytes * E
            K = eng.plan.ring_slots
            row(name, Bmax, "ring_K", K)
            row(name, Bmax, "bytes_per_block", qb)
            row(name, Bmax, "copy_ms_per_block", 1e3 * qb / (bw * 1e9))
            t, last = prefill_s(eng, Bmax)
            row(name, Bmax, "bytes_copied_per_forward", copied["per_forward"])
            row(name, Bmax, "prefill_tokens_per_s", Bmax * P / t)
            row(name, Bmax, "prefill_ms_per_block", 1e3 * t / L)
            ring_tps[(name, "prefill")] = Bmax * P / t
            d = (last - ref_last).abs()
            row(name, Bmax, "logit_maxabs_vs_bf16_resident", float(d.max()))
            row(name, Bmax, "logit_meanabs_vs_bf16_resident", float(d.mean()))
            row(name, Bmax, "logit_rms_bf16_resident", float(ref_last.pow(2).mean().sqrt()))
            row(name, Bmax, "top1_agree_vs_bf16_resident", float((last.argmax(-1) == ref_last.argmax(-1)).float().mean()))
            same = []
            for B in batches:
                # untimed warm-up of this batch's decode shapes: the first fused int8 call at a new
                # M bucket autotunes the Triton dequant GEMM (kernels/dequant_gemm.py, key M_BUCKET);
                # without it the 344a526 run timed that autotune in ring_int8_fused B=1 (548 vs 207 ms/step)
                eng.generate(prompts[B], 2)
                r = eng.generate(prompts[B], G)
                row(name, B, "decode_tokens_per_s", r.decode_tokens_per_s)
                row(name, B, "decode_ms_per_step", 1e3 * r.decode_s / max(1, G - 1))
                ring_tps[(name, "decode", B)] = r.decode_tokens_per_s
                same.append(float((r.tokens_BG == ref_tok[B]).float().mean()))
            row(name, 0, "tokens_equal_frac_vs_bf16_resident", sum(same) / len(same))
            row(name, Bmax, "gpu_peak_GB", peak_GB())
            if quant is not None:
                row(name, Bmax, "prefill_speedup_vs_bf16_ring", ring_tps[(name, "prefill")] / ring_tps[("ring", "prefill")])
                for B in batches:
                    row(name, B, "decode_speedup_vs_bf16_ring", ring_tps[(name, "decode", B)] / ring_tps[("ring", "decode", B)])
                if kern == "fused":
                    log(f"{name}: fused implementation used: {qmatmul.IMPL_USED.get(quant)}; broken: {sorted(qmatmul._BROKEN)}")
                    (a.out / f"{name}_impl.json").write_text(json.dumps(
                        {"impl": qmatmul.IMPL_USED.get(quant), "broken": sorted(qmatmul._BROKEN)}))
            del eng
        except Exception as e:  # report, keep the other rows
            log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
            free_cuda()

    # 3. compiled vs eager (same run)
    if not a.skip_compile:
        for mode, kw, label in (("resident", {}, "compiled"), ("ring", dict(gpu_budget_gb=budget, slots=ring_slots), "ring_compiled")):
            try:
                c = how if mode == "resident" else ("default" if not quick else how)
                eng = engine(mode, Bmax, compile=c, **kw)
                B = Bmax
                tc = time.perf_counter()
                r = eng.generate(prompts[B], G)  # compiles prefill + decode
                row(label, B, "compile_s", time.perf_counter() - tc)
                r = eng.generate(prompts[B], G)
                pre = timed(lambda: eng.generate(prompts[B], 1), a.reps)
                row(label, B, "prefill_tokens_per_s", B * P / pre)
                r = eng.generate(prompts[B], G)
                row(label, B, "decode_tokens_per_s", r.decode_tokens_per_s)
                row(label, B, "decode_ms_per_step", 1e3 * r.decode_s / max(1, G - 1))
                row(label, 0, "tokens_equal_frac_vs_eager", float((r.tokens_BG == ref_tok[B]).float().mean()))
                base = "resident" if mode == "resident" else "ring"
                eager_pre = next((float(x["value"]) for x in rows if x["mode"] == base
                                  and x["metric"] == "prefill_tokens_per_s"), None)
                eager_dec = next((float(x["value"]) for x in rows if x["mode"] == base and x["batch"] == B
                                  and x["metric"] == "decode_tokens_per_s"), None)
                if eager_pre:  # the eager rows of the same run (absent with --skip-ring for the ring)
                    row(label, B, "prefill_speedup_vs_eager", (B * P / pre) / eager_pre)
                if eager_dec:
                    row(label, B, "decode_speedup_vs_eager", r.decode_tokens_per_s / eager_dec)
                del eng
            except Exception as e:
                log(f"{label} failed: {type(e).__name__}: {str(e)[:300]}")
                free_cuda()
    log(f"done: {len(rows)} rows in {out_csv}")
    return 0


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
