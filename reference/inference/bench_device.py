"""The inference bench's run helpers (`reference.inference.bench`): the device it runs on, synchronised wall-clock
timing, progress logging, and the run's GPU peak memory with the adjacent probes' own engines kept out of it."""

from __future__ import annotations

import gc
import statistics
import time

import torch

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


class GcClock:
    """Seconds the cyclic garbage collector ran inside a ``with`` block, and its collections (``gc.callbacks``):
    the bench's timed repeats log them (``repeats.csv``: ``gc_s``, ``gc_n``), so a slow repeat can be checked
    against the collector's pauses."""

    def __enter__(self) -> "GcClock":
        self.s, self.n, self._t = 0.0, 0, None
        gc.callbacks.append(self._cb)
        return self

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.s += time.perf_counter() - self._t
            self.n += 1
            self._t = None

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._cb)


_PEAK = {"saved": 0}  # the run's peak allocated bytes before the last adjacent host probe (`HostProber.adjacent`)


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

