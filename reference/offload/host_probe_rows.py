"""The host probe's row file and log (`reference.offload.host_probe`): tidy rows
``date,commit,device,case,metric,value`` in ``DIR/host_probe.csv``, one flushed line each, and the ``case`` column's
``key=value`` tokens."""

from __future__ import annotations

import time
from pathlib import Path

from semoe.io import RowAppender

COLUMNS = ("date", "commit", "device", "case", "metric", "value")
CSV_NAME = "host_probe.csv"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Rows(RowAppender):
    """Appends rows to DIR/host_probe.csv, flushed after each one (children append to the same file)."""

    def __init__(self, path: Path, device: str, commit: str | None = None) -> None:
        super().__init__(path, COLUMNS, device, commit)

    def add(self, case: str, metric: str, value, quiet: bool = False) -> None:
        value = self.write(case, metric, value)
        if not quiet:
            log(f"  {case}: {metric} = {value}")


def case_name(**kv) -> str:
    """``case`` column: ``key=value`` tokens in the given order (values without spaces)."""
    for k, v in kv.items():
        if " " in str(v) or "=" in str(v):
            raise ValueError(f"host_probe: case value {k}={v!r} must not contain spaces or '='")
    return " ".join(f"{k}={v}" for k, v in kv.items())


def parse_case(case: str) -> dict[str, str]:
    """The ``key=value`` tokens of a ``case`` column back as a dict."""
    out = {}
    for tok in case.split():
        k, sep, v = tok.partition("=")
        if not sep:
            raise ValueError(f"host_probe: case token {tok!r} is not key=value")
        out[k] = v
    return out
