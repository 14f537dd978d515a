"""The command line shared by the host-program tables counted on the reference code (`simulator.op_counts`:
inference, `simulator.train_op_counts`: training): the parser's common options, the tables as CSV text,
``--check`` against the committed files or their atomic rewrite, and the rows a count on another device
differs in from the committed table.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

PROFILES = Path(__file__).resolve().parent.parent / "results" / "profiles"  # where the committed tables live


def parser(description: str, out_help: str | None, device_help: str) -> argparse.ArgumentParser:
    """``--out``, ``--check`` and ``--device`` of a table's ``python -m`` command."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path, default=None, help=out_help)
    ap.add_argument("--check", action="store_true", help="compare with the committed table, exit 1 if it differs")
    ap.add_argument("--device", default="cpu", help=device_help)
    return ap


def count_jobs(prog: str, jobs, errors: list | None) -> list[dict]:
    """The rows of every job ``(label, count)`` of ``jobs``, in order: ``count()``'s rows. With ``errors`` a list,
    a job that fails is reported there (and printed) and skipped; else its exception propagates."""
    rows: list[dict] = []
    for label, count in jobs:
        try:
            rows.extend(count())
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"{label}: {type(e).__name__}: {e}")
            print(f"{prog}: {errors[-1]}", flush=True)
    return rows


def to_csv(rows: list[dict], columns: tuple) -> str:
    """``rows`` as CSV text with a header of ``columns`` and "\\n" line ends."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def check_or_write(prog: str, files: list[tuple[Path, str]], check: bool) -> int:
    """With ``check``: exit status 1 (one line on stderr) when a committed file differs from its counted text,
    else 0; without: every file written atomically. ``files``: (path, text), the table first."""
    names = " and ".join([str(files[0][0]), *(p.name for p, _ in files[1:])])
    if check:
        for path, text in files:
            old = path.read_text() if path.is_file() else ""
            if old != text:
                print(f"{prog}: {path} differs from the reference code; rerun python -m simulator.{prog}",
                      file=sys.stderr)
                return 1
        print(f"{prog}: {names} {'matches' if len(files) == 1 else 'match'} the reference code")
        return 0
    from semoe.io import atomic_write_text

    files[0][0].parent.mkdir(parents=True, exist_ok=True)
    for path, text in files:
        atomic_write_text(path, text)
    wrote = ", ".join(f"{p if i == 0 else p.name} ({t.count(chr(10)) - 1} rows)" for i, (p, t) in enumerate(files))
    print(f"wrote {wrote}")
    return 0


def diff_rows(a: list[dict], b: list[dict], key_cols: tuple, cols: tuple, sep: str) -> list[str]:
    """Rows of table ``a`` that differ from ``b`` in ``cols`` (or that ``b`` lacks), matched on ``key_cols``
    (joined with ``sep`` in the text)."""
    def key(r):
        return tuple(r[c] for c in key_cols)

    ib = {key(r): r for r in b}
    out = []
    for r in a:
        o = ib.get(key(r))
        if o is None or any(str(r[c]) != str(o[c]) for c in cols):
            out.append(f"{sep.join(map(str, key(r)))}: {[r[c] for c in cols]} vs "
                       f"{[o[c] for c in cols] if o else 'missing'}")
    return out


def print_device_diff(prog: str, device: str, rows: list[dict], seconds: float, wrote: str, committed: Path, diff,
                      failures: str) -> None:
    """The summary line of a count on ``device`` (``rows`` in ``seconds``, written to ``wrote``), then each row
    that ``diff(rows, committed rows)`` finds different from the ``committed`` table (absent: every row), indented."""
    if committed.is_file():
        with committed.open(newline="") as f:
            old = list(csv.DictReader(f))
    else:
        old = []
    lines = diff(rows, old)
    print(f"{prog}: {device}: {len(rows)} rows in {seconds:.1f} s -> {wrote}; {len(lines)} differ from "
          f"{committed.name}; {failures}")
    for line in lines:
        print("  " + line)
