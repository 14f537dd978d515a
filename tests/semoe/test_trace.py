"""Trace rows: schema, CSV round trip, Chrome-trace export."""

from __future__ import annotations

import json

import pytest

from semoe import SpecError, TraceRow
from semoe.trace import TRACE_COLUMNS, read_csv, to_chrome_trace, write_chrome_trace, write_csv

ROWS = [
    TraceRow(rank=0, layer=0, micro_batch=0, phase="attention_fwd", start_s=0.0, end_s=1e-3, flops=10),
    TraceRow(rank=0, layer=0, micro_batch=0, phase="dispatch_a2a", start_s=1e-3, end_s=3e-3, bytes=4096, resource="nvlink"),
    TraceRow(rank=1, layer=-1, micro_batch=-1, phase="optimizer", start_s=0.5e-3, end_s=2e-3),
]


def test_csv_round_trip(tmp_path):
    path = write_csv(ROWS, tmp_path / "t.csv")
    assert path.read_text().splitlines()[0] == ",".join(TRACE_COLUMNS)
    assert read_csv(path) == ROWS


def test_chrome_trace_has_one_complete_event_per_row_in_microseconds(tmp_path):
    doc = to_chrome_trace(ROWS)
    events = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(events) == 3
    assert events[1]["ts"] == pytest.approx(1000.0) and events[1]["dur"] == pytest.approx(2000.0)
    assert events[1]["args"]["bytes"] == 4096
    # resources of one rank get distinct threads, named by metadata events
    assert events[0]["tid"] != events[1]["tid"] and events[0]["pid"] == events[1]["pid"] == 0
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert names[(0, events[1]["tid"])] == "nvlink"
    path = write_chrome_trace(ROWS, tmp_path / "t.json")
    assert json.loads(path.read_text()) == doc


def test_bad_rows_and_files(tmp_path):
    with pytest.raises(SpecError, match=r"TraceRow.end_s: end_s \(0.0\) must be >= start_s \(1.0\)"):
        TraceRow(rank=0, layer=0, micro_batch=0, phase="x", start_s=1.0, end_s=0.0)
    with pytest.raises(SpecError, match="trace file not found"):
        read_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SpecError, match="not the trace schema"):
        read_csv(bad)
