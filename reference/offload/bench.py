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
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from semoe.io import RowAppender
from simulator.validate_offload import config_string  # torch- and pandas-free at import

COLUMNS = ("date", "commit", "device", "config", "placement", "prefetch", "metric", "value")
GB = 1e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Rows(RowAppender):
    """Appends rows to DIR/offload_train.csv, flushed after each one."""

    def __init__(self, path: Path, device: str) -> None:
        super().__init__(path, COLUMNS, device)

    def add(self, config: str, placement: str, prefetch: str, metric: str, value) -> None:
        value = self.write(config, placement, prefetch, metric, value)
        log(f"  {config.split()[0] if config else config} {placement} {prefetch}: {metric} = {value}")


# ---------------------------------------------------------------------------------- configurations
def specs(quick: bool, args) -> dict:
    from semoe.presets import load_model

    tiny = load_model("tiny")
    if quick:
        a = tiny.replace(name="bench_a_quick")
        b = tiny.replace(name="bench_b_quick", experts=8)
        return {"a": (a, 4, 32), "b": (b, 4, 32)}
    common = {"heads": 16, "vocab": 256, "max_seq": args.seq, "moe_every": 1, "top_k": 2, "activation": "gelu",
                  "norm": "layernorm", "position": "learned", "dtype": "bf16", "tied_embeddings": True}
    a = tiny.replace(name="bench_a_compute_bound", layers=args.a_layers, hidden=args.a_hidden, ffn=args.a_ffn,
                     experts=args.a_experts, **common)
    b = tiny.replace(name="bench_b_over_budget", layers=args.b_layers, hidden=args.b_hidden, ffn=args.b_ffn,
                     experts=args.b_experts, **common)
    return {"a": (a, args.a_batch, args.seq), "b": (b, args.b_batch, args.seq)}


AB_SUFFIX = "_torch_threads"  # label suffix of the A/B cases: the engine's AdamW on torch's default threads


def ab_label(config: str) -> str:
    """The A/B twin of a case's ``config``: its label + `AB_SUFFIX` (``ExpertOffload(adam_threads=0)``: one
    intra-op thread per core, the engine before task hB), the rest unchanged."""
    label, _, rest = config.partition(" ")
    return f"{label}{AB_SUFFIX} {rest}"


def cache_per_layer(spec, frac: float) -> int:
    """CPU cache capacity of the ``ssd`` placement in experts **per MoE layer** (``ParallelPlan.cpu_cache_experts``,
    as `reference.offload.engine` and `semoe.sizing` count it): ``frac`` of a layer's experts, at least 1."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"bench: cache fraction must be in (0, 1], got {frac}")
    return max(1, int(frac * spec.experts))


def states_bytes(spec) -> int:
    """Training states at 16 bytes per parameter (bf16 weight + grad, fp32 master, m, v)."""
    from semoe.sizing import count_params

    return 16 * count_params(spec).total


def expert_params(spec) -> int:
    mult = 3 if spec.activation == "swiglu" else 2
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.layers))
    return moe_layers * spec.experts * mult * spec.hidden * spec.ffn


# ---------------------------------------------------------------------------------- measurements
def _drop_page_cache(path: Path) -> None:
    """Drop a written (fsync'ed, so clean) file's pages, so that the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_bandwidth(rows: Rows, ssd_dir: Path, quick: bool) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        n = 256 << 20
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        for name, dst, src in (("h2d_pinned_GBps", dev, host), ("d2h_pinned_GBps", host, dev)):
            ts = []
            for _ in range(5):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                dst.copy_(src, non_blocking=True)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / 1e3)
            rows.add("bandwidth", "-", "-", name, n / statistics.median(ts[1:]) / GB)
        del host, dev
    # the CPU AdamW of the offload engine (fused, all intra-op threads) on bf16 gradients
    from reference.offload.cpu_adam import adamw_

    n_par = (1 << 20) if quick else (64 << 20)
    chunks = 16
    ps = [torch.zeros(n_par // chunks) for _ in range(chunks)]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    gs = [torch.randn(n_par // chunks).to(torch.bfloat16) for _ in range(chunks)]
    # bf16 gradients (one micro-batch per step) and fp32 ones (gradient accumulation: the engine ships
    # its fp32 accumulators), which the fused CPU AdamW does not process at the same rate
    for metric, grads in (("cpu_adam_Mparams_per_s", gs), ("cpu_adam_fp32grad_Mparams_per_s", [g.float() for g in gs])):
        ts = []
        for step in range(1, 4):
            t = time.perf_counter()
            adamw_(ps, grads, ms, vs, step=step, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01,
                   impl="fused")
            ts.append(time.perf_counter() - t)
        rows.add("bandwidth", "cpu", "-", metric, n_par / min(ts[1:]) / 1e6)
    rows.add("bandwidth", "cpu", "-", "cpu_threads", torch.get_num_threads())
    del ps, ms, vs, gs, grads
    # the engine's block write as it runs on the I/O thread: every write-back REPLACES the block's previous version,
    # so the rename after the timed write + fsync unlinks that version (on ext4 ~18 ms per cached 100 MB file,
    # measured on the development machine, vs 0.05 ms for a fresh name: the old probe, which renamed to fresh
    # names in 2 of its 3 writes, left this out and read 2.2x the in-run rate). All 4 blocks exist before the
    # timed writes. The I/O thread alternates write-backs and the next step's staged reads, so the probe does
    # too: per round, write (replace) one block, then read another one from the device (its clean pages dropped
    # first) into a freshly allocated tensor, as the engine's staged and on-demand reads do, with the crc32
    # check. Rows: ssd_block_write_GBps (SSDStore's timed part: temp file create + write + fsync),
    # ssd_block_rewrite_prep_GBps (the rest of SSDStore.write: bytes view + crc32 before, the rename over the old
    # version after: the host work between two queued write-backs in the traces) and ssd_block_read_GBps (the
    # timed SSDStore.read), each the median of the rounds after the first.
    from reference.offload.ssd import SSDStore

    ssd_dir.mkdir(parents=True, exist_ok=True)
    timed: dict[str, list[float]] = {"ssd_read": [], "ssd_write": []}
    store = SSDStore(ssd_dir / "prep_probe", on_io=lambda kind, key, nb, t0, t1: timed[kind].append(t1 - t0))
    blk = torch.randn((4 << 20) if quick else (32 << 20))
    nkeys = 4
    for i in range(nkeys):
        store.write((0, i), blk)  # the previous versions
    prep = []
    for i in range(6):
        t = time.perf_counter()
        store.write((0, i % nkeys), blk)
        prep.append(time.perf_counter() - t - timed["ssd_write"][-1])
        key = (0, (i + 2) % nkeys)
        _drop_page_cache(store.path(key))
        store.read(key, torch.empty(blk.shape))
    nbytes = blk.numel() * 4
    wr, rd = timed["ssd_write"][nkeys:], timed["ssd_read"]
    for metric, ts in (("ssd_block_write_GBps", wr), ("ssd_block_rewrite_prep_GBps", prep), ("ssd_block_read_GBps", rd)):
        rows.add("bandwidth", "ssd", "-", metric, nbytes / max(statistics.median(ts[1:]), 1e-9) / GB)
    del blk
    import shutil

    shutil.rmtree(ssd_dir / "prep_probe", ignore_errors=True)
    measure_ssd_cycle(rows, ssd_dir, quick)
    n = (8 << 20) if quick else (512 << 20)
    ssd_dir.mkdir(parents=True, exist_ok=True)
    path = ssd_dir / "bandwidth_probe.bin"
    data = os.urandom(1 << 20) * (n >> 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    rows.add("bandwidth", "ssd", "-", "ssd_write_GBps", n / (time.perf_counter() - t) / GB)
    _drop_page_cache(path)
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    rows.add("bandwidth", "ssd", "-", "ssd_read_GBps", n / (time.perf_counter() - t) / GB)
    path.unlink(missing_ok=True)


SSD_CYCLE = ("ssd_cycle_read_GBps", "ssd_cycle_write_GBps", "ssd_cycle_prep_GBps")


def measure_ssd_cycle(rows: Rows, ssd_dir: Path, quick: bool, block_numel: int | None = None, blocks: int | None = None,
                      cycles: int = 3) -> dict[str, float]:
    """The engine's SSD I/O cycle on one thread, with nothing beside it (task hB): per step the I/O thread reads
    the uncached states (each `SSDStore.read` into a freshly allocated tensor, crc32 checked) that it wrote back
    one step earlier (no page-cache drop: whatever the OS kept of them, as in the run), then writes the updated
    states back over them (`SSDStore.write`: crc32, temp file + fsync, the rename that unlinks the old version).
    ``blocks`` blocks of ``block_numel`` fp32 (default 8 of 3 x 8M: the bench's expert state, 8 uncached per step
    as in (a)), written once, then ``cycles`` x (read all, write all). Rows (config ``bandwidth``, placement
    ``ssd``): `SSD_CYCLE` = bytes over the timed reads, over the timed writes (create + write + fsync), and over
    the rest of each write call (crc32 + rename over the old version); returns them."""
    import shutil

    from reference.offload.ssd import SSDStore

    numel = block_numel or ((1 << 20) if quick else 3 * (8 << 20))
    k = blocks or (4 if quick else 8)
    root = ssd_dir / "cycle_probe"
    shutil.rmtree(root, ignore_errors=True)
    timed: dict[str, list[float]] = {"ssd_read": [], "ssd_write": []}
    store = SSDStore(root, on_io=lambda kind, key, nb, t0, t1: timed[kind].append(t1 - t0))
    src = torch.randn(numel)
    try:
        for i in range(k):
            store.write((0, i), src)
        timed["ssd_write"].clear()
        prep = []
        for _ in range(cycles):
            for i in range(k):
                store.read((0, i), torch.empty(numel))
            for i in range(k):
                t = time.perf_counter()
                store.write((0, i), src)
                prep.append(time.perf_counter() - t - timed["ssd_write"][-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    nbytes = numel * 4
    out = {}
    for metric, ts in zip(SSD_CYCLE, (timed["ssd_read"], timed["ssd_write"], prep)):
        out[metric] = nbytes * len(ts) / max(sum(ts), 1e-9) / GB
        rows.add("bandwidth", "ssd", "-", metric, out[metric])
    return out


# ------------------------------------------------------------------ the engine's CPU AdamW, alone and under load
ENGINE_ADAM_METRIC = "cpu_adam_engine_Mparams_per_s"
# what runs beside the update (the ``placement`` column of the probe's rows): ``<parts>[@worker[:t<N>|:tall]]``;
# parts joined by "+" (`_Load`: ``gpu`` a matmul loop whose host thread spin-waits in torch.cuda.synchronize,
# ``gpusleep`` the same loop waiting on a blocking-sync event (the host thread sleeps), ``pcie`` pinned copies beside
# it, ``ssd`` the I/O thread), ``alone`` for none; ``@worker``: the update runs on a worker thread
# (ThreadPoolExecutor(1), as ExpertOffload._worker runs it) while the main thread waits on its future (as the
# training thread waits on _wait_update), else on the main thread (the probe of run 0252961). The worker's intra-op
# threads (task hB): the engine's own count (`reference.offload.cpu_adam.adam_threads`: cores minus the training
# and I/O threads) by default, ``:t<N>`` N of them, ``:tall`` torch's default (one per core: the engine before hB).
# On the CPU the engine's executors are inline, so ``alone`` is its thread role there; the worker and the SSD
# thread are probed so CI runs every path.
# (task hH: the :t1 / :t2 / :t4 / :t8 sweep and the loaded :tall twins, diagnostics of task hB that runs 675640a and
# b57d4eb recorded, are no longer probed: their ~10 s pay for the contention probes of the ssd cases)
ADAM_LOADS_CUDA = ("alone", "alone@worker", "alone@worker:tall", "gpu@worker", "gpu+pcie+ssd@worker")
ADAM_LOADS_CPU = ("alone", "alone@worker", "alone@worker:t1", "ssd@worker")
# the SSD I/O thread's block reads and writes while the update runs beside it (loads with ``ssd``): diagnostics
SSD_BESIDE_ADAM = ("ssd_beside_adam_read_GBps", "ssd_beside_adam_write_GBps")


def adam_load_threads(load: str, engine: int, default: int) -> int | None:
    """The intra-op threads a probe load's update runs with: None on the main thread (its own count), else the
    worker's: ``engine`` (the engine's rule) unless ``:t<N>`` (N) or ``:tall`` (``default``, torch's) says."""
    _, _, role = load.partition("@")
    if not role:
        return None
    spec = role.partition(":")[2]
    if not spec:
        return engine
    return default if spec == "tall" else int(spec[1:])


def parse_adam_load(load: str) -> tuple[set[str], bool]:
    """``placement`` of a probe row -> (the `_Load` parts, whether the update ran on a worker thread)."""
    name, _, role = load.partition("@")
    role, _, threads = role.partition(":")
    if role not in ("", "worker") or (threads and not role):
        raise ValueError(f"bench: AdamW load {load!r}: thread role must be '@worker' or nothing")
    if threads and not (threads == "tall" or (threads[:1] == "t" and threads[1:].isdigit() and int(threads[1:]) > 0)):
        raise ValueError(f"bench: AdamW load {load!r}: worker threads must be ':t<N>' (N >= 1) or ':tall'")
    parts = set() if name == "alone" else set(name.split("+"))
    bad = parts - {"gpu", "gpusleep", "pcie", "ssd"}
    if bad:
        raise ValueError(f"bench: AdamW load {load!r}: unknown part(s) {', '.join(sorted(bad))}")
    return parts, role == "worker"


def expert_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Per-expert tensor shapes of one MoE layer of ``spec``, in `reference.offload.engine.EXPERT_TENSORS` order."""
    D, F = spec.hidden, spec.ffn
    glu = spec.activation == "swiglu"
    out = {"w1_EDF": (D, F)}
    if glu:
        out["w3_EDF"] = (D, F)
    out["w2_EFD"] = (F, D)
    if spec.bias:
        out["b1_EF"] = (F,)
        if glu:
            out["b3_EF"] = (F,)
        out["b2_ED"] = (D,)
    return out


def adam_probe_config(E: int, P: int, grad: str) -> str:
    """``config`` of a `measure_engine_adam` row: ``cpu_adam_engine E<experts> P<params per expert> grad=<dtype>``
    (`simulator.validate_offload.engine_adam_probes` reads it back)."""
    return f"cpu_adam_engine E{E} P{P} grad={grad}"


class _Load:
    """Work that runs beside the engine's optimizer thread in a training step, on background threads:

    * ``gpu``: a CUDA matmul loop (bf16 8192^2, four per round) whose host thread synchronises after every round,
      as the training loop does (``tokens_per_expert_E.tolist()`` per layer, the loss at the end): the CUDA
      driver spin-waits, so one core is busy, like the training thread's;
    * ``pcie``: per round, a pinned H2D and a D2H copy of 128 MiB each on one side stream (the engine's copy
      stream carries both directions), which also draw on host DRAM bandwidth;
    * ``ssd``: the engine's I/O thread: `SSDStore` writes (bytes view + crc32 + write + fsync + rename) and reads
      (crc32 check) of one layer-expert-sized ``[3, P]`` block, alternating.
    """

    def __init__(self, parts: set[str], ssd_dir: Path, block_numel: int, device: str | None = None) -> None:
        import threading

        self.parts, self.ssd_dir, self.block_numel = parts, ssd_dir, block_numel
        # ``device`` "cpu" runs the same loop with small CPU matmuls and unpinned copies (tests)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.stop = threading.Event()
        self.threads: list = []
        self.errors: list[str] = []
        self.rounds = {"gpu": 0, "ssd": 0}
        self.io: dict[str, list[tuple[int, float]]] = {"ssd_read": [], "ssd_write": []}  # (bytes, s) after ready

    def _gpu(self, ready) -> None:
        import contextlib

        cuda = self.device == "cuda"
        try:
            n = 8192 if cuda else 64
            a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
            b = torch.randn(n, n, device=self.device, dtype=torch.bfloat16)
            c = torch.empty(n, n, device=self.device, dtype=torch.bfloat16)
            pcie = "pcie" in self.parts
            sleep = "gpusleep" in self.parts  # wait on a blocking-sync event: the host thread sleeps, no spin
            if pcie:
                nb = (128 << 20) if cuda else (1 << 16)
                h_src = torch.empty(nb, dtype=torch.uint8, pin_memory=cuda)
                h_dst = torch.empty(nb, dtype=torch.uint8, pin_memory=cuda)
                d_src = torch.empty(nb, dtype=torch.uint8, device=self.device)
                d_dst = torch.empty(nb, dtype=torch.uint8, device=self.device)
                side = torch.cuda.Stream() if cuda else None
            if cuda:
                torch.cuda.synchronize()
            ready.set()
            while not self.stop.is_set():
                for _ in range(4):
                    torch.mm(a, b, out=c)
                if pcie:
                    with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                        d_dst.copy_(h_src, non_blocking=True)
                        h_dst.copy_(d_src, non_blocking=True)
                if cuda and sleep:
                    evs = [torch.cuda.Event(blocking=True)]
                    evs[0].record()
                    if pcie:
                        evs.append(torch.cuda.Event(blocking=True))
                        evs[1].record(side)
                    for ev in evs:
                        ev.synchronize()
                elif cuda:
                    torch.cuda.synchronize()
                self.rounds["gpu"] += 1
        except Exception as e:  # noqa: BLE001 - reported by __exit__
            self.errors.append(f"gpu load: {type(e).__name__}: {e}")
            ready.set()

    def _ssd(self, ready) -> None:
        from reference.offload.ssd import SSDStore

        try:
            live = []
            store = SSDStore(self.ssd_dir, on_io=lambda kind, key, nb, t0, t1: live and self.io[kind].append((nb, t1 - t0)))
            blk = torch.randn(self.block_numel)
            buf = torch.empty_like(blk)
            store.write((0, 0), blk)
            live.append(True)
            ready.set()
            i = 0
            while not self.stop.is_set():
                store.write((0, 1 + i % 2), blk)
                store.read((0, i % 2), buf)
                i += 1
                self.rounds["ssd"] += 1
        except Exception as e:  # noqa: BLE001 - reported by __exit__
            self.errors.append(f"ssd load: {type(e).__name__}: {e}")
            ready.set()

    def __enter__(self):  # -> _Load
        import threading

        for part, fn in (("gpu", self._gpu), ("ssd", self._ssd)):
            if part in self.parts or (part == "gpu" and "gpusleep" in self.parts):
                ready = threading.Event()
                t = threading.Thread(target=fn, args=(ready,), name=f"adam-load-{part}", daemon=True)
                t.start()
                ready.wait(60.0)
                self.threads.append(t)
        time.sleep(0.05)  # let the load reach its steady state
        return self

    def __exit__(self, *exc) -> None:
        import shutil

        self.stop.set()
        for t in self.threads:
            t.join(60.0)
        if "ssd" in self.parts:
            shutil.rmtree(self.ssd_dir, ignore_errors=True)
        if self.errors and exc[0] is None:
            raise RuntimeError("; ".join(self.errors))


def measure_engine_adam(rows: Rows, ssd_dir: Path, quick: bool, layers: dict, reps: int | None = None) -> dict:
    """The offload engine's CPU AdamW (`reference.offload.cpu_adam.adamw_layer_`: what ``ExpertOffload._adam``
    runs per MoE layer: per-expert, per-tensor slices, bf16 gradients upcast, the weight mirror refreshed) on
    layer-shaped host buffers, alone and under the load of a training step (`_Load`; loads `ADAM_LOADS_CUDA`,
    on the CPU `ADAM_LOADS_CPU`), with bf16 gradients (one micro-batch) and fp32 ones (accumulated).

    ``layers``: label -> ``(E, shapes)`` (experts per layer, `expert_shapes`). One row per (layer, gradient
    dtype, load): config `adam_probe_config`, placement = the load, metric `ENGINE_ADAM_METRIC` (E x P over the
    median time of ``reps`` calls after one warm-up call). The states are laid out as the engine's tiers hold
    them: one ``[E, 3, P]`` tensor (pinned on CUDA, tier ``cpu``), or under a load with ``ssd`` one unpinned
    ``[3, P]`` tensor per expert (tier ``ssd``). A load ending in ``@worker`` runs each call on one worker thread
    (the engine's thread role, `parse_adam_load`), timed there, with the engine's intra-op thread count unless the
    load names another (`adam_load_threads`). Also writes ``cpu_threads_worker`` (the engine-count worker's
    ``torch.get_num_threads()``, read inside it) and ``cpu_threads_main``, and for loads with ``ssd`` the I/O
    thread's own block read / write rates while the update ran beside it (`SSD_BESIDE_ADAM`, config
    ``cpu_adam_engine E<n> P<n> grad=-``). Returns ``{(config, load): Mparams/s}``."""
    from concurrent.futures import ThreadPoolExecutor

    from reference.offload.cpu_adam import adam_threads, adamw_layer_, expert_layout

    cuda = torch.cuda.is_available()
    loads = ADAM_LOADS_CUDA if cuda else ADAM_LOADS_CPU
    reps = reps or (2 if quick else 3)
    # the engine's optimizer thread: one worker, as ExpertOffload._worker, with the engine's intra-op thread count
    # set inside it (torch's OpenMP setting is per thread); the count read back there is recorded
    # (cpu_threads_worker), and one worker per other count the loads name
    main = torch.get_num_threads()
    engine_n = adam_threads()
    workers: dict[int, ThreadPoolExecutor] = {}

    def worker(n: int) -> ThreadPoolExecutor:
        if n not in workers:
            workers[n] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adam-worker",
                                            initializer=torch.set_num_threads, initargs=(n,))
            got = workers[n].submit(torch.get_num_threads).result()
            torch.set_num_threads(main)  # (set_num_threads also changes the default of threads started later)
            if got != n:  # recorded, not fatal: the rows then say what the worker really ran with
                log(f"    a worker set to {n} intra-op threads reports {got}")
                rows.add("bandwidth", "cpu", "-", f"cpu_threads_worker_set{n}", got)
        return workers[n]

    try:
        rows.add("bandwidth", "cpu", "-", "cpu_threads_worker", worker(engine_n).submit(torch.get_num_threads).result())
        rows.add("bandwidth", "cpu", "-", "cpu_threads_main", torch.get_num_threads())
        return _engine_adam_loads(rows, ssd_dir, quick, layers, reps, loads, cuda,
                                  lambda load: (None if (n := adam_load_threads(load, engine_n, main)) is None
                                                else worker(n)), adamw_layer_, expert_layout)
    finally:
        for w in workers.values():
            w.shutdown(wait=True)


def _engine_adam_loads(rows, ssd_dir, quick, layers, reps, loads, cuda, worker, adamw_layer_, expert_layout) -> dict:
    mirror_dtype = torch.bfloat16 if cuda else torch.float32  # the engine's compute dtype (autocast on CUDA)
    out = {}
    for label, (E, shapes) in layers.items():
        offsets, decay, P = expert_layout(shapes)
        state = torch.zeros(E, 3, P, pin_memory=cuda)  # tier cpu: [E, 3, P] fp32 (master, m, v), pinned on CUDA
        state[:, 0].fill_(0.02)  # (the update's time does not depend on the values)
        seed = torch.randn(1 << 16) * 1e-3
        grads = {}
        for gdt in (torch.bfloat16, torch.float32):
            g = {}
            for n, shp in shapes.items():
                t = torch.empty((E, *shp), dtype=gdt, pin_memory=cuda)  # the engine's pinned D2H targets
                flat = t.view(-1)
                for i in range(0, flat.numel(), seed.numel()):
                    flat[i : i + seed.numel()] = seed[: flat.numel() - i]
                g[n] = t
            grads["bf16" if gdt == torch.bfloat16 else "fp32"] = g
        mirror = {n: torch.empty((E, *shp), dtype=mirror_dtype, pin_memory=cuda) for n, shp in shapes.items()}
        states_cpu = [(e, state[e]) for e in range(E)]
        states_ssd = None
        step = 0
        scratch: dict = {}  # the upcast buffers of adamw_layer_ (the engine keeps one per optimizer thread)
        for load in loads:
            parts, on_worker = parse_adam_load(load)
            states = states_cpu
            if "ssd" in parts:  # tier ssd: one unpinned [3, P] buffer per expert (what the engine's reads fill)
                if states_ssd is None:
                    states_ssd = [(e, state[e].clone()) for e in range(E)]
                states = states_ssd
            got = {}
            try:
                with _Load(parts, ssd_dir / "adam_load", (1 << 18) if quick else 3 * P) as ld:
                    for gname, g in grads.items():
                        ts = []
                        for _ in range(1 + reps):
                            step += 1

                            def call(g=g, step=step, states=states, offsets=offsets, decay=decay,
                                     mirror=mirror, scratch=scratch) -> float:  # timed on the thread that runs it
                                t = time.perf_counter()
                                adamw_layer_(states, g, mirror, offsets, decay, step=step, lr=1e-4, beta1=0.9,
                                             beta2=0.95, eps=1e-8, weight_decay=0.01, impl="fused", scratch=scratch)
                                return time.perf_counter() - t

                            ts.append(worker(load).submit(call).result() if on_worker else call())
                        got[adam_probe_config(E, P, gname)] = E * P / statistics.median(ts[1:]) / 1e6
                    io = {k: list(v) for k, v in ld.io.items()}
            except Exception as e:  # noqa: BLE001 - a failed load must not cost the other loads' rows
                log(f"    engine AdamW {label} under {load} failed: {type(e).__name__}: {str(e)[:300]}")
                rows.add(adam_probe_config(E, P, "-"), load, "-", "error", 1)
                continue
            for cfg, rate in got.items():  # only once the load ran throughout
                out[(cfg, load)] = rate
                rows.add(cfg, load, "-", ENGINE_ADAM_METRIC, rate)
            for (kind, ops), metric in zip(io.items(), SSD_BESIDE_ADAM):  # the I/O thread's calls beside the update
                if ops:
                    rows.add(adam_probe_config(E, P, "-"), load, "-", metric,
                             sum(b for b, _ in ops) / max(sum(t for _, t in ops), 1e-9) / GB)
            log(f"    engine AdamW {label} (E{E} P{P}) under {load}: done")
        del state, grads, mirror, states, states_cpu, states_ssd
        gc.collect()
    return out


# ------------------------------------------------------------------ adjacent AdamW probes (task hB3, issue 6)
# the host's CPU AdamW rate drifts in time (2000 -> 1215 -> 1500-1860 Mparams/s within 60 s on one H100 lease, with
# the guest's steal time: results/bench/offload/host_probe), so one probe at the start of the run does not describe
# a case measured minutes later. Each offloaded case is bracketed by the engine probe ``alone@worker`` (the same call,
# thread role and intra-op thread count, on the case's layer shape and gradient dtype): one row per probe, config /
# placement / prefetch = the case's, metric `adjacent_metric` of its position (``before``: after the warm-up's
# updates drained, right before the counted step; ``after``: after the last timed step's updates drained).
ADJACENT_POSITIONS = ("before", "after")


def adjacent_metric(position: str) -> str:
    """Metric of an adjacent probe row: ``cpu_adam_adjacent_<position>_Mparams_per_s``
    (`simulator.validate_offload.ADJACENT_RE` reads it back)."""
    if position not in ADJACENT_POSITIONS:
        raise ValueError(f"bench: adjacent probe position must be one of {', '.join(ADJACENT_POSITIONS)}, "
                         f"got {position!r}")
    return f"cpu_adam_adjacent_{position}_Mparams_per_s"


def case_grad(micro: int) -> str:
    """Gradient dtype the engine's update reads in a case: fp32 accumulators with gradient accumulation, else bf16
    (the rule `simulator.validate_offload.adam_input` uses)."""
    return "fp32" if micro > 1 else "bf16"


class AdjacentAdam:
    """The engine probe ``alone@worker`` of `measure_engine_adam`, kept ready for one layer shape and gradient dtype
    so that it can run next to each case (~1 s: one warm-up call + ``reps`` timed ones). Host buffers as the tier
    ``cpu`` holds them (one ``[E, 3, P]`` fp32 tensor, pinned on CUDA), pinned gradients and weight mirror; on CUDA
    the calls run on one worker thread with the engine's intra-op thread count (`cpu_adam.adam_threads`), as
    ``ExpertOffload._worker`` runs them; on the CPU on the calling thread (the engine's executors are inline there,
    `simulator.validate_offload.apriori_loads`). ``measure()`` -> Mparams/s (E x P over the median timed call)."""

    def __init__(self, E: int, shapes: dict[str, tuple[int, ...]], grad: str, reps: int = 5) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from reference.offload.cpu_adam import adam_threads, adamw_layer_, expert_layout

        if grad not in ("bf16", "fp32"):
            raise ValueError(f"bench: adjacent probe gradient dtype must be bf16 or fp32, got {grad!r}")
        if reps < 1:
            raise ValueError(f"bench: adjacent probe needs reps >= 1, got {reps}")
        cuda = torch.cuda.is_available()
        self.E, self.grad, self.reps, self._adamw = E, grad, reps, adamw_layer_
        self.offsets, self.decay, self.P = expert_layout(shapes)
        self.state = torch.zeros(E, 3, self.P, pin_memory=cuda)
        self.state[:, 0].fill_(0.02)
        self.states = [(e, self.state[e]) for e in range(E)]
        seed = torch.randn(1 << 16) * 1e-3
        gdt = torch.bfloat16 if grad == "bf16" else torch.float32
        self.grads = {}
        for n, shp in shapes.items():
            t = torch.empty((E, *shp), dtype=gdt, pin_memory=cuda)
            flat, k = t.view(-1), seed.numel()  # the seed tiled, as the run-level probe fills its gradients
            full = flat.numel() // k * k
            flat[:full].view(-1, k).copy_(seed)
            flat[full:].copy_(seed[: flat.numel() - full])
            self.grads[n] = t
        mirror_dtype = torch.bfloat16 if cuda else torch.float32
        self.mirror = {n: torch.empty((E, *shp), dtype=mirror_dtype, pin_memory=cuda) for n, shp in shapes.items()}
        self.scratch: dict = {}
        self.step = 0
        self.threads = adam_threads() if cuda else torch.get_num_threads()
        self.worker = None
        if cuda:
            main = torch.get_num_threads()
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adam-adjacent",
                                             initializer=torch.set_num_threads, initargs=(self.threads,))
            self.threads = self.worker.submit(torch.get_num_threads).result()
            torch.set_num_threads(main)

    def _call(self) -> float:
        self.step += 1
        t = time.perf_counter()
        self._adamw(self.states, self.grads, self.mirror, self.offsets, self.decay, step=self.step, lr=1e-4,
                    beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01, impl="fused", scratch=self.scratch)
        return time.perf_counter() - t

    def measure(self) -> float:
        ts = [self.worker.submit(self._call).result() if self.worker else self._call() for _ in range(1 + self.reps)]
        return self.E * self.P / statistics.median(ts[1:]) / 1e6

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True)
            self.worker = None
        self.state = self.states = self.grads = self.mirror = self.scratch = None


def adjacent_recorder(rows: Rows, probe: AdjacentAdam | None, config: str, placement: str, prefetch: str,
                      contention=None):
    """The ``adjacent`` callback of `run_case` for one case: ``position`` -> one flushed row (`adjacent_metric`);
    a failed probe becomes a row ``adjacent_probe_error`` and a log line, never the case's failure. None when
    there is no probe (the case then runs without adjacent probes). ``contention`` (a `ContentionProbe`, task hH:
    the ssd cases): after the idle probe, the update beside the I/O cycle and the cycle beside the update, one row
    per `contention_metric`; its failure becomes a row ``contention_probe_error``."""
    if probe is None:
        return None

    def record(position: str) -> None:
        t = time.perf_counter()
        rate = None
        try:
            rate = probe.measure()
        except Exception as e:  # noqa: BLE001 - the case's own rows matter more than its probe
            log(f"    adjacent AdamW probe ({position}) failed: {type(e).__name__}: {str(e)[:300]}")
            rows.add(config, placement, prefetch, "adjacent_probe_error", 1)
        else:
            rows.add(config, placement, prefetch, adjacent_metric(position), rate)
            log(f"    adjacent AdamW probe {position}: E{probe.E} P{probe.P} grad={probe.grad}, {probe.threads} "
                f"threads, {time.perf_counter() - t:.2f} s")
        if contention is None:
            return
        t = time.perf_counter()
        try:
            got = contention.measure(rate)  # the idle probe just taken is its "alone" AdamW
        except Exception as e:  # noqa: BLE001 - as above
            log(f"    contention probe ({position}) failed: {type(e).__name__}: {str(e)[:300]}")
            rows.add(config, placement, prefetch, "contention_probe_error", 1)
            return
        for (quantity, condition), v in sorted(got.items()):
            rows.add(config, placement, prefetch, contention_metric(position, quantity, condition), v)
        log(f"    contention probe {position}: {time.perf_counter() - t:.2f} s")

    return record


# ------------------------------------------------------------------ AdamW beside the SSD I/O (task hH, issue 6)
# In b ssd on (run b57d4eb) the engine's update ran at 1025 Mparams/s while its adjacent idle probes read 1642: there
# the update runs beside the busy SSD I/O thread (crc32, serialisation, file I/O, page-cache copies), which an idle
# probe cannot see. `ContentionProbe` measures that beside each ssd case: the case's AdamW call (`AdjacentAdam`, the
# engine's ``alone@worker`` call) alone; the engine's I/O cycle (`measure_ssd_cycle`'s code path: blocks read back
# into fresh tensors, then written back over their old versions, on one thread with one intra-op thread as the
# engine's I/O executor) alone; then the update beside the I/O thread's reads, and beside its write-backs. Rows
# (config / placement / prefetch = the case's): `contention_metric` (position, quantity, condition).
CONTENTION_QUANTITIES = ("adam", "io_read", "io_write", "io_prep")
# (quantity, condition) pairs measured: the update alone, beside a read loop, beside a write-back loop; each I/O part
# alone (one cycle) and beside the update
CONTENTION_PAIRS = (("adam", "alone"), ("adam", "beside_read"), ("adam", "beside_write"), ("io_read", "alone"),
                    ("io_read", "beside"), ("io_write", "alone"), ("io_write", "beside"), ("io_prep", "alone"),
                    ("io_prep", "beside"))


def contention_metric(position: str, quantity: str, condition: str) -> str:
    """Metric of a contention probe row: ``contention_<position>_<quantity>_<condition>_<unit>``, unit
    ``Mparams_per_s`` for ``adam``, ``GBps`` for the I/O parts (`simulator.validate_offload.CONTENTION_RE` reads it
    back); (quantity, condition) one of `CONTENTION_PAIRS` (``beside_read`` / ``beside_write``: the update beside the
    I/O thread's reads / write-backs; ``beside``: an I/O part beside the update)."""
    if position not in ADJACENT_POSITIONS:
        raise ValueError(f"bench: contention probe position must be one of {', '.join(ADJACENT_POSITIONS)}, "
                         f"got {position!r}")
    if (quantity, condition) not in CONTENTION_PAIRS:
        raise ValueError(f"bench: contention probe (quantity, condition) must be one of {CONTENTION_PAIRS}, got "
                         f"({quantity!r}, {condition!r})")
    unit = "Mparams_per_s" if quantity == "adam" else "GBps"
    return f"contention_{position}_{quantity}_{condition}_{unit}"


class ContentionProbe:
    """The engine's AdamW call and its SSD I/O, alone and at the same time (task hH), for one case.

    ``adam``: the case's `AdjacentAdam` (its layer shape and gradient dtype; its calls on the engine's optimizer
    thread role). The I/O: ``blocks`` blocks of ``block_numel`` fp32 (an expert's ``[3, P]`` state) in an
    `SSDStore` under ``ssd_dir``, written once (their previous versions), then on one I/O thread
    (``ThreadPoolExecutor(1)`` with one intra-op thread, as `reference.offload.engine.host_executors`' I/O worker)
    read into freshly allocated tensors (crc32 checked; no page-cache drop, as in the run, which reads back what it
    wrote one step earlier) and written back over their old versions (crc32, temp file + fsync, the rename that
    unlinks the old version). `measure` -> `CONTENTION_PAIRS`:

    * ``alone``: ``adam`` = ``adam.measure()`` with nothing beside it (or ``adam_alone``: the case's adjacent idle
      probe, taken right before by the caller: the same call); ``io_*`` = one cycle (every block read, then every
      block written) with nothing beside it: bytes over the timed reads, the timed writes (create + write + fsync),
      the rest of each write call (crc32 + rename);
    * ``beside_read`` / ``beside_write``: the I/O thread reads (writes) the blocks in a loop while AdamW calls run
      back to back for at least ``window_s`` and ``reps`` calls (one warm-up call first, not counted): ``adam`` = E x
      P over the median call; ``io_read`` (``io_write``, ``io_prep``) ``beside`` = the I/O operations that ran
      entirely inside the AdamW window (else those whose midpoint did).
    """

    def __init__(self, adam, ssd_dir: Path, block_numel: int, blocks: int = 4, window_s: float = 0.6,
                 reps: int = 3) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from reference.offload.ssd import SSDStore

        if blocks < 1 or block_numel < 1:
            raise ValueError(f"bench: contention probe needs blocks >= 1 and block_numel >= 1, got {blocks}, "
                             f"{block_numel}")
        if window_s <= 0 or reps < 1:
            raise ValueError(f"bench: contention probe needs window_s > 0 and reps >= 1, got {window_s}, {reps}")
        self.adam, self.root, self.k, self.numel = adam, Path(ssd_dir), blocks, block_numel
        self.window_s, self.reps = window_s, reps
        self.ops: list[tuple[str, int, float, float]] = []  # (kind, bytes, start, end) on the host clock
        self.store = SSDStore(self.root, on_io=self._on_io)
        self.src = torch.randn(block_numel)
        for i in range(blocks):
            self.store.write((0, i), self.src)  # the previous versions, which the write-backs replace
        self.ops.clear()
        main = torch.get_num_threads()
        self.io = ThreadPoolExecutor(1, thread_name_prefix="contention-ssd", initializer=torch.set_num_threads,
                                     initargs=(1,))
        self.io_threads = self.io.submit(torch.get_num_threads).result()
        torch.set_num_threads(main)

    def _on_io(self, kind: str, key, nbytes: int, t0: float, t1: float) -> None:
        self.ops.append(("read" if kind == "ssd_read" else "write", nbytes, t0, t1))

    def _read(self, i: int) -> None:
        self.store.read((0, i), torch.empty(self.numel))

    def _write(self, i: int) -> None:
        t = time.perf_counter()
        self.store.write((0, i), self.src)
        t1 = time.perf_counter()
        w = self.ops[-1]
        # the rest of the call (crc32 before the timed write, the rename over the old version after)
        self.ops.append(("prep", w[1], t, t + max(t1 - t - (w[3] - w[2]), 0.0)))

    def _cycle(self) -> None:
        """One I/O cycle: every block read, then every block written back (on the I/O thread)."""
        for i in range(self.k):
            self._read(i)
        for i in range(self.k):
            self._write(i)

    def _loop(self, op, stop) -> None:
        """``op`` over the blocks in turn until ``stop`` is set (on the I/O thread)."""
        i = 0
        while not stop.is_set():
            op(i % self.k)
            i += 1

    @staticmethod
    def _rates(ops: list, t0: float = -math.inf, t1: float = math.inf) -> dict[str, float]:
        out = {}
        for kind in ("read", "write", "prep"):
            sel = [(b, e - s) for k, b, s, e in ops if k == kind and s >= t0 and e <= t1]
            if not sel:  # an operation longer than the window: those whose midpoint fell in it
                sel = [(b, e - s) for k, b, s, e in ops if k == kind and t0 <= (s + e) / 2 <= t1]
            if sel:
                out[f"io_{kind}"] = sum(b for b, _ in sel) / max(sum(d for _, d in sel), 1e-9) / GB
        return out

    def _adam_call(self) -> float:
        a = self.adam
        return a.worker.submit(a._call).result() if a.worker else a._call()

    def _beside(self, op) -> tuple[float, dict[str, float]]:
        """AdamW calls back to back while the I/O thread loops ``op``: (Mparams/s, the I/O rates in the window)."""
        import threading

        a = self.adam
        self.ops.clear()
        stop = threading.Event()
        fut = self.io.submit(self._loop, op, stop)
        try:
            while not self.ops and not fut.done():  # the I/O thread is at work before the update starts
                time.sleep(0.001)
            self._adam_call()  # warm-up call (as AdjacentAdam.measure), beside the I/O already
            ts, w0 = [], time.perf_counter()
            while len(ts) < self.reps or time.perf_counter() - w0 < self.window_s:
                ts.append(self._adam_call())
            w1 = time.perf_counter()
        finally:
            stop.set()
            fut.result()
        return a.E * a.P / statistics.median(ts) / 1e6, self._rates(self.ops, w0, w1)

    def measure(self, adam_alone: float | None = None) -> dict[tuple[str, str], float]:
        """``{(quantity, condition): rate}`` (Mparams/s for adam, GB/s for io_*), see the class docstring."""
        out = {("adam", "alone"): adam_alone if adam_alone is not None else self.adam.measure()}
        self.ops.clear()
        self.io.submit(self._cycle).result()
        out.update({(q, "alone"): v for q, v in self._rates(self.ops).items()})
        for kind, op in (("read", self._read), ("write", self._write)):
            rate, io = self._beside(op)
            out[("adam", f"beside_{kind}")] = rate
            out.update({(q, "beside"): v for q, v in io.items()})
        return out

    def close(self) -> None:
        import shutil

        self.io.shutdown(wait=True)
        shutil.rmtree(self.root, ignore_errors=True)
        self.src = self.store = None


def _bf16_experts(model) -> None:
    """All-in-HBM baseline: run the experts on bf16 copies of the fp32 weights (what autocast would do),
    so it takes the same torch._grouped_mm path as the offload pool's bf16 slots."""
    from torch.nn.utils.stateless import _reparametrize_module

    for layer in model.moe_layers():
        layer.backend = "torch"  # the same dispatch + grouped experts path as the offload engine's
        ex = layer.experts
        orig = type(ex).forward

        def fwd(x, counts=None, ex=ex, orig=orig):
            params = {n: p.to(torch.bfloat16) for n, p in ex.named_parameters(recurse=False)}
            with _reparametrize_module(ex, params):
                return orig(ex, x.to(torch.bfloat16), counts)

        ex.forward = fwd


def run_case(spec, batch: int, seq: int, placement: str, depth: int, cache: int, steps: int, warmup: int,
             ssd_dir: Path, trace_path: Path | None, time_left, micro: int = 1, base=None,
             profile_path: Path | None = None, adam_threads: int | None = None, adjacent=None) -> dict:
    """Train ``steps`` (after ``warmup``) steps of ``micro`` micro-batches of ``batch`` x ``seq`` tokens
    (gradients accumulated); returns the metrics. ``base``: an initialised CPU model to copy (initialising
    a large MoEDecoder draws its weights in fp64 and takes seconds). ``adam_threads``: the engine's (None: its
    rule; 0: torch's default, the engine before task hB); the thread counts the engine read back inside its
    threads are returned as ``threads_main`` / ``threads_adam`` / ``threads_io``. ``adjacent``: called with
    ``"before"`` once the warm-up's updates drained (right before the counted step) and ``"after"`` once the last
    timed step's updates drained (before a ``profile_path`` step), with the engine idle (`adjacent_recorder`);
    only for an offloaded placement."""
    from reference.model import MoEDecoder
    from reference.offload.engine import ExpertOffload
    from reference.train import TrainConfig, make_optimizer
    from semoe.plan_spec import OffloadPlacement, ParallelPlan
    from semoe.trace import TraceRow, write_csv

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    # on the CPU: offloaded experts never occupy the GPU in fp32
    model = copy.deepcopy(base) if base is not None else MoEDecoder(spec, seed=0)
    amp = torch.bfloat16 if cuda else None
    eng = None
    if placement == "gpu":
        if cuda:
            _bf16_experts(model)
    else:
        plan = ParallelPlan(offload=OffloadPlacement(expert_params=placement, expert_optimizer=placement),
                            prefetch_depth=depth, cpu_cache_experts=cache if placement == "ssd" else 0)
        eng = ExpertOffload(model, plan, device=device, compute_dtype=amp, ssd_dir=ssd_dir,
                            trace=trace_path is not None, adam_threads=adam_threads)
    model = model.to(device)
    cfg = TrainConfig(steps=warmup + steps, lr=1e-4, warmup_steps=1)
    opt = make_optimizer(model, cfg)
    build_s = time.perf_counter() - t_build
    gen = torch.Generator(device=device).manual_seed(0)
    times, step_rows = [], []

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        for _ in range(micro):
            x = torch.randint(0, spec.vocab, (batch, seq + 1), device=device, generator=gen)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(x[:, :-1], x[:, 1:])
            (out.loss / micro).backward()
        if eng is not None:
            eng.clip_grad_norm_(model, 1.0)
            eng.step(1e-4)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(out.loss.detach())  # synchronises

    t_origin = eng.t0 if eng is not None else time.perf_counter()
    before = None
    # counters: over steps warmup .. warmup + steps (steps + 1 of them), opened after eng.wait() so that the
    # last warm-up step's host updates and SSD I/O (asynchronous) are not counted in the window; the times
    # are those of the steps after that first counted one (each overlaps its predecessor's updates)
    try:
        for step in range(warmup + 1 + steps):
            if step == warmup and eng is not None:
                eng.wait()
                if adjacent is not None:
                    adjacent("before")
                before = dict(eng.stats())
            if step > warmup and time_left() < 0:
                break
            t0 = time.perf_counter()
            loss = train_step()
            t1 = time.perf_counter()
            if step > warmup:
                times.append(t1 - t0)
            step_rows.append(TraceRow(0, -1, step, "step", t0 - t_origin, t1 - t_origin, 0, 0, "compute"))
            log(f"    step {step}: {1e3 * (t1 - t0):.1f} ms, loss {loss:.4f}")
        after = None
        if eng is not None:
            eng.wait()
            after = dict(eng.stats())  # the counter window ends here: the profiled step below stays out of it
            if adjacent is not None and times:
                adjacent("after")
        if profile_path is not None:  # one more (untimed) step under torch.profiler: where the time goes
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                train_step()
                if eng is not None:
                    eng.wait()
                # its own phase, so that trace readers keep its rows out of the measured steps' windows
                step_rows.append(TraceRow(0, -1, warmup + 1 + steps, "profile_step", t0 - t_origin,
                                          time.perf_counter() - t_origin, 0, 0, "compute"))
            key = "cuda_time_total" if cuda else "cpu_time_total"
            profile_path.write_text(prof.key_averages().table(sort_by=key, row_limit=60))
            log(f"    profile of one step -> {profile_path}")
    finally:
        if eng is not None:
            eng.close()
    if not times:
        raise RuntimeError("no step measured within the time budget")
    med = statistics.median(times)
    res = {"step_ms": 1e3 * med, "tokens_per_s": micro * batch * seq / med, "build_s": build_s,
           "steps": len(times), "micro_batches": micro}
    if cuda:
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / GB
    if eng is not None:
        s, n = after, len(times) + 1  # the counted steps (see above)
        b = before or {k: 0 for k in s}
        d = {k: s[k] - b.get(k, 0) for k in ("h2d_bytes", "d2h_bytes", "cpu_adam_s", "host_wait_s", "fetch_hits",
                                             "fetch_misses", "cache_hits", "cache_misses")}
        res.update({f"threads_{k}": v for k, v in eng.threads.items()})
        res["h2d_gb_per_step"] = d["h2d_bytes"] / n / GB
        res["d2h_gb_per_step"] = d["d2h_bytes"] / n / GB
        res["counted_steps"] = n
        res["cpu_adam_ms_per_step"] = 1e3 * d["cpu_adam_s"] / n
        res["host_wait_ms_per_step"] = 1e3 * d["host_wait_s"] / n
        fetched = d["fetch_hits"] + d["fetch_misses"]
        res["fetch_hit_rate"] = d["fetch_hits"] / fetched if fetched else 0.0
        if placement == "ssd":
            looked = d["cache_hits"] + d["cache_misses"]
            res["cache_hit_rate"] = d["cache_hits"] / looked if looked else 0.0
            res["cache_experts_per_layer"] = cache
            res["ssd_read_gb_per_step"] = (s.get("ssd_read_bytes", 0) - b.get("ssd_read_bytes", 0)) / n / GB
            res["ssd_write_gb_per_step"] = (s.get("ssd_write_bytes", 0) - b.get("ssd_write_bytes", 0)) / n / GB
        if trace_path is not None:
            write_csv(sorted(eng.trace_rows() + step_rows, key=lambda r: r.start_s), trace_path)
    elif trace_path is not None:
        write_csv(step_rows, trace_path)
    model = opt = eng = None  # (not del: train_step closes over them)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def _record(rows: Rows, config: str, placement: str, prefetch: str, res: dict) -> None:
    for k, v in res.items():
        rows.add(config, placement, prefetch, k, float(v) if isinstance(v, float) else v)


# ---------------------------------------------------------------------------------- DeepSpeed child
DS_CHILD = r'''
import json, os, sys, threading, time, statistics
import torch
spec_d, batch, seq, steps, frac = json.loads(sys.argv[1])
T0 = time.perf_counter()
def progress(msg):
    print(f"[child {time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)
progress(f"start: torch {torch.__version__}, cuda {torch.cuda.is_available()}")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("DS_PORT", "29517"), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.ops.op_builder import CPUAdamBuilder
progress(f"deepspeed {deepspeed.__version__} imported; building/loading the CPUAdam op (ninja JIT on first use)")
t = time.perf_counter()
done = threading.Event()
def heartbeat():
    while not done.wait(10.0):
        progress(f"  CPUAdam build still running ({time.perf_counter() - t:.0f} s)")
threading.Thread(target=heartbeat, daemon=True).start()
CPUAdamBuilder().load(verbose=True)
done.set()
progress(f"CPUAdam op ready in {time.perf_counter() - t:.1f} s")
print(json.dumps({"metric": "cpu_adam_build_s", "value": time.perf_counter() - t}), flush=True)
if frac:
    torch.cuda.set_per_process_memory_fraction(frac)
from semoe.model_spec import ModelSpec
from reference.model import MoEDecoder
spec = ModelSpec.from_dict(spec_d)
deepspeed.init_distributed(dist_backend="nccl")
model = MoEDecoder(spec, seed=0).cuda()
cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
       "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                 "weight_decay": 0.01}}}
progress("model built; deepspeed.initialize")
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
progress("initialised; training")
times = []
for step in range(2 + steps):
    x = torch.randint(0, spec.vocab, (batch, seq + 1), device="cuda")
    t0 = time.perf_counter()
    out = engine(x[:, :-1], x[:, 1:])
    engine.backward(out.loss)
    engine.step()
    float(out.loss)
    if step >= 2:
        times.append(time.perf_counter() - t0)
    progress(f"step {step}: {1e3 * (time.perf_counter() - t0):.1f} ms")
med = statistics.median(times)
for k, v in (("step_ms", 1e3 * med), ("tokens_per_s", batch * seq / med),
             ("peak_mem_gb", torch.cuda.max_memory_allocated() / 1e9)):
    print(json.dumps({"metric": k, "value": v}), flush=True)
'''


def run_deepspeed(rows: Rows, spec, batch: int, seq: int, steps: int, frac: float | None, cap_s: float,
                  out: Path, config: str = "c_deepspeed") -> str | None:
    """DeepSpeed ZeRO-Offload in a child process; returns why it failed (None if it ran). The child's
    stdout (JSON metric lines) and stderr (progress, the JIT build's compiler output) go to
    ``out/deepspeed_child.log`` as they are written, so a run cut short still shows how far it got."""
    log_path = out / "deepspeed_child.log"
    cmd = [sys.executable, "-u", "-c", DS_CHILD, json.dumps([spec.to_dict(), batch, seq, steps, frac])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))  # ninja's parallelism for the CPUAdam build
    with log_path.open("w") as fh:
        fh.write(f"cap {cap_s:.0f} s; command: {' '.join(cmd[:3])} <DS_CHILD> ...\n")
        fh.flush()
        # its own session, so that a timeout also ends the compilers its JIT build started
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = "timeout"
            fh.write(f"\ntimed out after {cap_s:.0f} s\n")
        fh.write(f"rc={rc}\n")
    text = log_path.read_text(errors="replace")
    got = 0
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "metric" in rec:
            rows.add(config, "zero_offload_cpu", "-", rec["metric"], float(rec["value"]))
            got += 1
    if rc != 0:
        tail = [ln for ln in text.strip().splitlines() if not ln.startswith("rc=")]
        reason = f"timed out after {cap_s:.0f} s" if rc == "timeout" else (tail or ["no output"])[-1][:200]
        last = next((ln for ln in reversed(tail) if ln.startswith("[child")), None)
        if rc == "timeout" and last:
            reason += f"; last progress: {last[:150]}"
        log(f"  DeepSpeed ZeRO-Offload failed ({rc}): {reason} (see {log_path})")
        rows.add(config, "zero_offload_cpu", "-", "deepspeed_failed", 1)
        return f"rc={rc}: {reason}"
    return None


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
