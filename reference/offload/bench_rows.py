"""The offload bench's row file and log (`reference.offload.bench`): tidy rows
``date,commit,device,config,placement,prefetch,metric,value``, one flushed line each."""

from __future__ import annotations

import time
from pathlib import Path

from semoe.io import RowAppender

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
