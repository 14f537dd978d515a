"""The offload bench's probe of the engine's per-layer CPU AdamW (`reference.offload.bench`, config
``cpu_adam_engine``): alone and under the load of a training step (`_Load`), on the main thread or on a worker
thread as the engine runs it (`measure_engine_adam`)."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import torch

from reference.offload.bench_rows import GB, Rows, log

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

