"""The probes that bracket each offloaded case of the offload bench (`reference.offload.bench`): the engine's
AdamW alone right before and after the case (`AdjacentAdam`, task hB3) and, around the ssd cases, that AdamW and the
engine's SSD I/O cycle alone and beside each other (`ContentionProbe`, task hH)."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from reference.offload.bench_rows import GB, Rows, log

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

