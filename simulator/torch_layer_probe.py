"""GPU probe of the torch-backend MoE layer's slow kernels at the layer's own dtype (bf16) and duplication.

`simulator.torch_moe_layer` prices the layer's memory passes at `simulator.train_op_counts.time_mem_classes`'
class rates, which were measured on the trainer's kernels: an fp32 ``index_add_`` with every target row twice,
an fp32 ``index_select``. The torch layer runs them in bf16 with ``k`` (up to 8) routed rows per token, and
gathers with ``x[idx]`` (``aten.index``) and scatters back with ``index_put_(accumulate=True)`` (the backward of
``aten.index``). This probe times those kernels on the GPU at one size apart from the validated configs
(`ROWS` routed rows of `WIDTH`; `DUPS` rows per target), one CSV row per kernel:

``device, op, dtype, rows, width, dup, time_s, elems_per_s, bytes_per_s`` (``elems`` = source elements;
``bytes`` counted as the recorder counts them: inputs read, outputs written). `torch_moe_layer` reads the file
(`load`) when it is committed as ``results/profiles/torch_layer_rates_<gpu>.csv``.

``python -m simulator.torch_layer_probe --out DIR [--quick]`` (``--quick``: tiny sizes on any device, for the CI
test). On an H100 it takes under a minute.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

ROWS = 65536  # routed rows per call (none of the validated configs' T k: 32768, 131072)
WIDTH = 2048  # the trainer probe's width (`train_op_counts.MEM_PROBE_WIDTH`)
DUPS = (1, 2, 4, 8)  # routed rows per target token (top-k)
COLUMNS = ("device", "op", "dtype", "rows", "width", "dup", "time_s", "elems_per_s", "bytes_per_s")
PROFILES = Path(__file__).resolve().parent.parent / "results" / "profiles"


def _ops(R: int, W: int, dup: int, dev, dtype):
    """(name, fn, source elements, bytes) of each probed kernel for ``R`` routed rows, ``dup`` per target."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    T = R // dup
    es = torch.tensor([], dtype=dtype).element_size()
    src = torch.randn(R, W, generator=g).to(dev, dtype)
    x = torch.randn(T, W, generator=g).to(dev, dtype)
    tok = (torch.arange(R) // dup)[torch.randperm(R, generator=g)].to(dev)
    acc = torch.zeros(T, W, device=dev, dtype=dtype)
    io_rw = R * W * es + 2 * T * W * es + R * 8
    return [
        ("index_add", lambda: acc.index_add_(0, tok, src), R * W, io_rw),
        ("index_gather", lambda: x[tok], R * W, T * W * es + R * W * es + R * 8),
        ("index_put_acc", lambda: acc.index_put_((tok,), src, accumulate=True), R * W, io_rw),
        ("sort", lambda: torch.sort(tok, stable=True), R, 3 * R * 8),
    ]


def probe(device: str = "cuda", rows: int = ROWS, width: int = WIDTH, dups=DUPS, reps: int = 10,
          out: Path | None = None) -> list[dict]:
    """Time each kernel of `_ops` (median of 5 x ``reps`` back-to-back calls); rows appended to ``out`` as they
    are measured (flushed: a timeout loses nothing)."""
    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    res = []
    f = None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        f = out.open("w", newline="")
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
    try:
        for dup in dups:
            for op, fn, elems, nbytes in _ops(rows, width, dup, dev, torch.bfloat16):
                if op == "index_gather" and dup not in (1, dups[-1]):
                    continue
                fn()
                sync()
                ts = []
                for _ in range(5):
                    t = time.perf_counter()
                    for _ in range(reps):
                        fn()
                    sync()
                    ts.append((time.perf_counter() - t) / reps)
                sec = statistics.median(ts)
                row = {"device": name, "op": op, "dtype": "int64" if op == "sort" else "bf16", "rows": rows, "width": width if op != "sort" else 1,
                       "dup": dup, "time_s": f"{sec:.6g}", "elems_per_s": f"{elems / sec:.6g}",
                       "bytes_per_s": f"{nbytes / sec:.6g}"}
                res.append(row)
                print(f"{op:14s} dup {dup}: {sec * 1e6:9.1f} us {elems / sec / 1e9:8.2f} Gelem/s "
                      f"{nbytes / sec / 1e9:8.1f} GB/s", flush=True)
                if f is not None:
                    w.writerow(row)
                    f.flush()
    finally:
        if f is not None:
            f.close()
    return res


def path_for(gpu_name: str) -> Path:
    """``results/profiles/torch_layer_rates_<family>.csv`` for a GPU name (``h100`` / ``h200`` / ...)."""
    from simulator.network.host_dispatch import gpu_family

    return PROFILES / f"torch_layer_rates_{gpu_family(gpu_name).lower()}.csv"


def load(gpu_name: str, path: str | Path | None = None) -> dict | None:
    """``{(op, dup): (elems_per_s, bytes_per_s, time_s, rows)}`` of the GPU's committed probe, None without one."""
    p = Path(path) if path is not None else path_for(gpu_name)
    if not p.is_file():
        return None
    with p.open(newline="") as f:
        return {(r["op"], int(r["dup"])): (float(r["elems_per_s"]), float(r["bytes_per_s"]), float(r["time_s"]),
                                           int(r["rows"])) for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for torch_layer_rates_<gpu>.csv")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI, any device)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    import torch

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "cpu"
    out = a.out / (path_for(name).name if dev.startswith("cuda") else "torch_layer_rates_cpu.csv")
    kw = {"rows": 512, "width": 64, "reps": 2} if a.quick else {}
    t = time.perf_counter()
    probe(dev, out=out, **kw)
    print(f"wrote {out} in {time.perf_counter() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
