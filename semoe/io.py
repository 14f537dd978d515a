"""Small file helpers: never leave a half-written file behind (write to a temp name, then rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, fsync, rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_commit(dirty: bool = True) -> str:
    """The commit results are labelled with: ``SEMOE_COMMIT`` when set (the GPU machine's copy of the tree
    carries a stale ``.git``, so benchmarks run there must be told), else ``git rev-parse --short HEAD`` of
    this checkout, with ``-dirty`` when tracked files are modified (``dirty=True``); ``unknown`` without git."""
    import os
    import subprocess

    if os.environ.get("SEMOE_COMMIT"):
        return os.environ["SEMOE_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                             cwd=here, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        if dirty:
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, check=False, cwd=here, timeout=10).stdout.strip()
            sha += "-dirty" if st else ""
        return sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RowAppender:
    """Appends measurement rows ``date, commit, device, *fields`` to a CSV, flushed after each one, so a killed
    benchmark loses nothing written; the header ``columns`` is written when the file is new or empty (several
    processes may append to one file). ``date`` is the appender's start (UTC), ``commit`` `git_commit` unless given."""

    def __init__(self, path: Path, columns, device: str, commit: str | None = None) -> None:
        import csv
        import datetime as dt

        self.path = Path(path)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        self.fh = self.path.open("a", newline="")
        self.w = csv.writer(self.fh)
        if new:
            self.w.writerow(columns)
        self.date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.commit, self.device = commit or git_commit(), device
        self.count = 0

    def write(self, *fields) -> str:
        """One row; a float value (the last field) as ``%.6g``. Returns the value as written."""
        *head, value = fields
        if isinstance(value, float):
            value = f"{value:.6g}"
        self.w.writerow([self.date, self.commit, self.device, *head, value])
        self.fh.flush()
        self.count += 1
        return value

    def close(self) -> None:
        self.fh.close()
