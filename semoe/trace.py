"""The one trace-row schema shared by the reference (measured) and the simulator (predicted).

A row is one interval of one phase on one resource of one rank:
``rank, layer, micro_batch, phase, start_s, end_s, bytes, flops, resource``. ``layer`` and
``micro_batch`` are -1 where they do not apply. Rows export to CSV (tidy, one row per interval) and to
Chrome-trace JSON that Perfetto (ui.perfetto.dev) and chrome://tracing open: one process per rank,
one thread per resource.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from semoe.io import atomic_write_text
from semoe.spec_base import SpecError

TRACE_COLUMNS: tuple[str, ...] = (
    "rank",
    "layer",
    "micro_batch",
    "phase",
    "start_s",
    "end_s",
    "bytes",
    "flops",
    "resource",
)


@dataclass(frozen=True, slots=True)
class TraceRow:
    rank: int
    layer: int
    micro_batch: int
    phase: str  # e.g. "attention_fwd", "dispatch_a2a", "experts_bwd", "h2d_prefetch", "optimizer"
    start_s: float
    end_s: float
    bytes: int = 0
    flops: int = 0
    resource: str = "compute"  # e.g. "compute", "nvlink", "nic", "pcie_h2d", "ssd", "cpu"

    def __post_init__(self) -> None:
        if self.end_s < self.start_s:
            raise SpecError(f"TraceRow.end_s: end_s ({self.end_s}) must be >= start_s ({self.start_s})")

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def rows_to_csv(rows: Iterable[TraceRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(TRACE_COLUMNS)
    for r in rows:
        w.writerow([getattr(r, c) for c in TRACE_COLUMNS])
    return buf.getvalue()


def write_csv(rows: Iterable[TraceRow], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, rows_to_csv(rows))
    return path


def read_csv(path: str | Path) -> list[TraceRow]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"trace file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != TRACE_COLUMNS:
            raise SpecError(f"{path}: columns {reader.fieldnames} are not the trace schema {TRACE_COLUMNS}")
        types = {f.name: f.type for f in fields(TraceRow)}
        conv = {"int": int, "float": float, "str": str}
        return [TraceRow(**{k: conv[types[k]](v) for k, v in rec.items()}) for rec in reader]


def to_chrome_trace(rows: Iterable[TraceRow]) -> dict:
    """Chrome trace-event JSON (complete events, microseconds): pid = rank, tid = resource."""
    events = []
    tids: dict[tuple[int, str], int] = {}
    for r in rows:
        key = (r.rank, r.resource)
        if key not in tids:
            tids[key] = len([k for k in tids if k[0] == r.rank])
            events.append(
                {"ph": "M", "name": "thread_name", "pid": r.rank, "tid": tids[key], "args": {"name": r.resource}}
            )
        args = asdict(r)
        events.append(
            {
                "ph": "X",
                "name": r.phase,
                "cat": r.resource,
                "pid": r.rank,
                "tid": tids[key],
                "ts": r.start_s * 1e6,
                "dur": r.duration_s * 1e6,
                "args": {k: args[k] for k in ("layer", "micro_batch", "bytes", "flops")},
            }
        )
    for rank in sorted({k[0] for k in tids}):
        events.append({"ph": "M", "name": "process_name", "pid": rank, "args": {"name": f"rank {rank}"}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(rows: Iterable[TraceRow], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(to_chrome_trace(rows)))
    return path
