"""The inference bench's probes (`reference.inference.bench`, issue 7): the run-level pinned H2D bandwidth and
host op time, the engine host probe (`HostProber`: the engine's own passes at tiny widths) and the adjacent probes
beside each timed repeat (`HostProber.around`, `interleave`; the pinned H2D copy probe `H2DProber` of the
copy-bound rows), with the rows they write."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from reference.inference.bench_device import (
    _PEAK,
    CUDA,
    DEV,
    free_cuda,
    log,
    sync,
    timed,
)
from reference.inference.build import build_random_store
from reference.inference.engine import Engine, InferConfig, random_prompts
from reference.inference.store import ModelStore


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
H2D_PROBE_COPIES = 1  # rounds over the store's diagonal per probe (`H2DProber`; 2 x 1 GiB of one block before ~22:40)


def copy_bound(row_mode: str) -> bool:
    """Rows whose timed passes are bound by the pinned H2D copies (ring prefill / decode, ring_K<k>, expert-aware
    decode, whose fallback batch runs the ring): they get an adjacent copy probe (`H2DProber`)."""
    return row_mode.startswith(("ring", "expert"))


class H2DProber:
    """The pinned H2D bandwidth at one moment of the run, sampled over the whole store (runs from 2026-11-24 ~22:40
    on): one slice of every block's pinned expert buffer, block i's (of L) at offset i / L of its buffer (a diagonal:
    every block and every offset fraction once), ``nbytes`` in all (default: one block's expert bytes), copied
    ``copies`` times into a device buffer on a side stream, CUDA events around them; GB/s = bytes / their seconds.
    Runs before copied the first 1 GiB of one block twice: in 747d0ad that read 53-54 GB/s while a full copy of
    the same block read 49.8 and the ring passes' own copies 47.7-54.5 (median ~50), so the probe had sampled a
    faster part of the store than the passes copy. The device buffer is allocated per probe and dropped, its memory
    kept out of the run's ``gpu_peak_GB`` (`peak_GB`). CPU: the same copies, wall-clock timed."""

    def __init__(self, store: ModelStore, nbytes: int | None = None, copies: int = H2D_PROBE_COPIES) -> None:
        if (nbytes is not None and nbytes < 1) or copies < 1:
            raise ValueError(f"H2DProber: nbytes and copies must be >= 1, got {nbytes}, {copies}")
        bufs = [store.layer_buffers[b].view(-1).view(torch.uint8) for b in store.moe_blocks]
        L = len(bufs)
        stride = min(buf.numel() for buf in bufs) // L
        size = stride if nbytes is None else max(1, min(stride, nbytes // L))
        self.srcs = [buf[i * stride : i * stride + size] for i, buf in enumerate(bufs)]
        self.nbytes = size * L
        self.copies = copies
        self.stream = torch.cuda.Stream() if CUDA else None

    def measure(self) -> float:
        """GB/s of ``copies`` rounds of the pinned -> device copies of every slice, now."""
        _PEAK["saved"] = max(_PEAK["saved"], torch.cuda.max_memory_allocated() if CUDA else 0)
        dst = torch.empty(self.srcs[0].numel(), dtype=torch.uint8, device=DEV)
        nbytes = self.nbytes * self.copies
        if not CUDA:
            t = time.perf_counter()
            for _ in range(self.copies):
                for src in self.srcs:
                    dst.copy_(src)
            sec = time.perf_counter() - t
        else:
            self.stream.wait_stream(torch.cuda.current_stream())
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.stream):
                a.record(self.stream)
                for _ in range(self.copies):
                    for src in self.srcs:
                        dst.copy_(src, non_blocking=True)
                b.record(self.stream)
            b.synchronize()
            sec = a.elapsed_time(b) / 1e3
        del dst
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the run's peak so far is in _PEAK["saved"]
        return nbytes / max(sec, 1e-12) / 1e9


H2D_CHUNK_BYTES = 256 << 20  # the chunk map's copy size (~5 ms on the H100)
H2D_CHUNK_COLUMNS = ("round", "block", "chunk", "offset_GB", "GB", "GBps")


def h2d_chunk_map(store: ModelStore, chunk_bytes: int = H2D_CHUNK_BYTES, rounds: int = 2) -> list[dict]:
    """The pinned H2D rate of every ``chunk_bytes`` chunk of every block's pinned expert buffer, ``rounds`` times
    over the whole store (one copy per chunk on a side stream, CUDA events around each; CPU: wall clock): whether
    the copy rate depends on where the bytes live (the pinned pages' memory node), which a probe of one region
    cannot show. Rows ``H2D_CHUNK_COLUMNS`` (``offset_GB``: the chunk's offset in its block's buffer)."""
    if chunk_bytes < 1 or rounds < 1:
        raise ValueError(f"h2d_chunk_map: chunk_bytes and rounds must be >= 1, got {chunk_bytes}, {rounds}")
    dst = torch.empty(chunk_bytes, dtype=torch.uint8, device=DEV)
    stream = torch.cuda.Stream() if CUDA else None
    if CUDA:
        stream.wait_stream(torch.cuda.current_stream())
    out = []
    for r in range(rounds):
        pending = []
        for b in store.moe_blocks:
            buf = store.layer_buffers[b].view(-1).view(torch.uint8)
            for c, off in enumerate(range(0, buf.numel(), chunk_bytes)):
                src = buf[off : off + chunk_bytes]
                if CUDA:
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    with torch.cuda.stream(stream):
                        e0.record(stream)
                        dst[: src.numel()].copy_(src, non_blocking=True)
                        e1.record(stream)
                    pending.append((b, c, off, src.numel(), e0, e1))
                else:
                    t = time.perf_counter()
                    dst[: src.numel()].copy_(src)
                    pending.append((b, c, off, src.numel(), t, time.perf_counter()))
        if CUDA:
            stream.synchronize()
        for b, c, off, n, e0, e1 in pending:
            sec = e0.elapsed_time(e1) / 1e3 if CUDA else e1 - e0
            out.append({"round": r, "block": b, "chunk": c, "offset_GB": off / 1e9, "GB": n / 1e9,
                        "GBps": n / max(sec, 1e-12) / 1e9})
    del dst
    return out


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


# the adjacent host probe's rows per phase: (milliseconds metric, copy calls metric)
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

