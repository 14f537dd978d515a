"""What the inference and training workloads share about the host side of eager PyTorch: a host program
is a sequence of segments (kernels the host issues, ending or not with a host synchronisation), read from a
table counted on the reference code (`simulator.op_counts`, `simulator.train_op_counts`), preferring the
table measured on a CUDA GPU and falling back, per code path and whole, to the one counted on the CPU.

The timing rule both workloads apply (the inference workload through its compute stream's ``min_end``, the
training workload through `HostClock`, which does not need a stream process because its device side is the
rank's own process): the host issues a segment of ``n`` kernels in
``n x host_op_s`` seconds, one segment after the other, and waits for nothing but host syncs; the device
runs a segment no earlier than the host starts issuing it, and cannot finish it before its last kernel is
issued. So between two syncs a stretch takes ``max(device time, host time)``, and after a sync the device
idles while the host issues the next kernels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from semoe import SpecError


@dataclass(frozen=True)
class Segment:
    name: str
    kernels: int
    sync: bool  # the host waits for the device at the end of the segment
    marker: str = ""  # an engine call right after it (inference: acquire, release, fetch), or ""


@cache
def read_table(path: str, key_cols: tuple[str, ...], required: bool = True) -> dict:
    """Rows of the CSV at ``path`` grouped by the values of ``key_cols`` (program order kept); ``{}`` when
    the file is missing and not ``required``."""
    p = Path(path)
    if not p.is_file():
        if not required:
            return {}
        raise SpecError(f"host program: {p} not found")
    out: dict = {}
    with p.open(newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(tuple(r[c] for c in key_cols), []).append(r)
    return out


def first_rows(key: tuple, key_cols: tuple[str, ...], tables: list[tuple[Path, bool]]) -> tuple[list, Path] | None:
    """The rows of ``key`` in the first of ``tables`` (``(path, required)``) that holds it, and that path."""
    for p, required in tables:
        rows = read_table(str(p), key_cols, required).get(key)
        if rows:
            return rows, p
    return None


class HostClock:
    """The host thread of one GPU: ``t`` is when it has issued everything so far.

    ``issue(n, op_s, not_before)`` issues ``n`` kernels after the previous ones: returns ``(start, end)``
    of the issue; ``sync(device_now)`` makes the host wait until the device has drained (a host sync)."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.kernels = 0
        self.busy_s = 0.0
        self.syncs = 0
        self.sync_wait_s = 0.0

    def issue(self, n: int, op_s: float) -> tuple[float, float]:
        start = self.t
        self.t = start + max(0, n) * op_s
        self.kernels += max(0, n)
        self.busy_s += self.t - start
        return start, self.t

    def sync(self, device_now: float) -> None:
        self.syncs += 1
        if device_now > self.t:
            self.sync_wait_s += device_now - self.t
            self.t = device_now
