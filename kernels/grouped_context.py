"""``torch._grouped_mm`` timed under several measurement conditions: does the kernel profile's method match a step?

``python -m kernels.grouped_context --out DIR`` -> ``DIR/grouped_context.csv`` (+ ``DIR/smi.csv`` on a GPU: SM clock,
power and temperature sampled every 100 ms by ``nvidia-smi`` while it runs).

Why: the simulator prices the reference's expert GEMMs from the kernel profile's ``grouped_gemm_fwd`` torch rows
(``kernels/profile.py``: ``triton.testing.do_bench``, L2 flushed between calls, ``randn`` operands). The offload
bench's config a (E=8, D=1024, F=4096, 24576 rows per expert) runs its forward ``_grouped_mm`` at ~620 TFLOP/s inside
a training step (profile table of run 3bd5bc4) where the profile reads 523-581 at 16384 rows, and the backward (no
profile row: priced as 2x forward) at ~690. Candidate mechanisms, each a condition here:

``flushed``   the profile's method: do_bench (L2 flushed, CUDA events), ``randn`` operands;
``warm``      the same calls back to back, events around each call, no flush;
``mixed``     each call preceded by an HBM-bound copy of ``--mixed-mb`` MB (a step interleaves its GEMMs with
              memory-bound kernels: the SMs' power draw and clocks differ from a GEMM-only loop);
``data``      as ``flushed`` but with a step's operand statistics: activations ``randn`` (layer-norm output) for the
              up projection and ``gelu(randn)`` for the down projection, weights N(0, 0.02), gradients N(0, 1e-4)
              (a GEMM's power, so its clock under the power cap, depends on the operand bits).

Ops per shape (E groups of m rows, ``[E*m, K] @ [E, K, N]``, the reference's ``GroupedExperts`` layout):
``fwd`` (``_grouped_mm(a, b, offs)``), ``bwd`` (``torch.autograd.grad`` of the forward's output for both inputs:
the kernels autograd issues, dgrad + wgrad), ``dgrad`` (``_grouped_mm(g, b^T, offs)``), ``wgrad``
(``_grouped_mm(a^T, g, offs)``, output ``[E, K, N]``). Columns: ``date,commit,device,condition,op,groups,m,k,n,flop,TFLOPps,time_s``
(``date, commit, device`` as every bench CSV; ``time_s`` the median of the timed calls). ``--quick`` runs tiny shapes on the CPU (wall clock) so a CI test
exercises every condition and op.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path

import torch

from semoe.io import RowAppender

COLUMNS = ["date", "commit", "device", "condition", "op", "groups", "m", "k", "n", "flop", "TFLOPps", "time_s"]
CONDITIONS = ("flushed", "warm", "mixed", "data")
OPS = ("fwd", "bwd", "dgrad", "wgrad")
SHAPES = [(8, 1024, 4096), (8, 4096, 1024)]  # (E, K, N): config a's up and down projections
ROWS = (8192, 16384, 24576, 32768)


def operands(E: int, m: int, K: int, N: int, device, data: bool, up: bool) -> tuple:
    """``a [E*m, K]``, ``b [E, K, N]`` (both requiring grad), ``g [E*m, N]``, ``offs`` int32 cumulative rows."""
    M = E * m
    dt = torch.bfloat16
    if data:
        x = torch.randn(M, K, device=device)
        a = (x if up else torch.nn.functional.gelu(x)).to(dt)
        b = (torch.randn(E, K, N, device=device) * 0.02).to(dt)
        g = (torch.randn(M, N, device=device) * 1e-4).to(dt)
    else:
        a = torch.randn(M, K, device=device, dtype=dt)
        b = torch.randn(E, K, N, device=device, dtype=dt) / K**0.5
        g = torch.randn(M, N, device=device, dtype=dt)
    offs = torch.cumsum(torch.full((E,), m, device=device, dtype=torch.int32), 0, dtype=torch.int32)
    return a.requires_grad_(), b.requires_grad_(), g, offs


def op_fns(a, b, g, offs) -> dict:
    y = torch._grouped_mm(a, b, offs=offs)
    bt = b.detach().transpose(-2, -1)
    at = a.detach().t()
    return {
        "fwd": lambda: torch._grouped_mm(a.detach(), b.detach(), offs=offs),
        "bwd": lambda: torch.autograd.grad(y, (a, b), g, retain_graph=True),
        "dgrad": lambda: torch._grouped_mm(g, bt, offs=offs),
        "wgrad": lambda: torch._grouped_mm(at, g, offs=offs),
    }


def time_calls(fn, condition: str, device, reps: int, filler=None) -> float:
    """Median seconds of one call of ``fn`` under ``condition`` (see the module docstring)."""
    if device.type != "cuda":  # the CPU quick mode: wall clock, every condition the same
        fn()
        ts = []
        for _ in range(max(reps, 1)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    if condition in ("flushed", "data"):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) / 1e3
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        if condition == "mixed":
            filler()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in ev) / 1e3


def run(out: Path, quick: bool = False, mixed_mb: int = 1024, reps: int = 30) -> Path:
    device = torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    shapes = [(2, 16, 32)] if quick else SHAPES
    rows = (8, 16) if quick else ROWS
    reps = 2 if quick else reps
    out.mkdir(parents=True, exist_ok=True)
    path = out / "grouped_context.csv"
    smi = None
    if device.type == "cuda":
        try:
            smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                                    "--format=csv,noheader", "-lms", "100"], stdout=open(out / "smi.csv", "w"))
        except OSError as exc:
            print(f"nvidia-smi not sampled: {exc}", flush=True)
    src = dst = None
    if device.type == "cuda":
        src = torch.empty(mixed_mb << 20, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
    filler = (lambda: dst.copy_(src)) if src is not None else None
    t0 = time.time()
    rows_out = RowAppender(path, COLUMNS, gpu)
    try:
        for E, K, N in shapes:
            for m in rows:
                for cond in CONDITIONS:
                    a, b, g, offs = operands(E, m, K, N, device, data=cond == "data", up=K < N)
                    fns = op_fns(a, b, g, offs)
                    for op in OPS:
                        flop = 2 * E * m * K * N * (2 if op == "bwd" else 1)
                        t = time_calls(fns[op], cond, device, reps, filler)
                        rows_out.write(cond, op, E, m, K, N, flop, f"{flop / t / 1e12:.4g}", t)
                        print(f"{time.time() - t0:6.1f}s E{E} m{m} {K}x{N} {cond:7s} {op:5s} "
                              f"{flop / t / 1e12:7.1f} TFLOP/s", flush=True)
                    del a, b, g, fns
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        rows_out.close()
        if smi is not None:
            smi.terminate()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (a smoke test)")
    p.add_argument("--mixed-mb", type=int, default=1024, help="MB copied before each call of the mixed condition")
    p.add_argument("--reps", type=int, default=30, help="timed calls per (condition, op) for warm / mixed")
    a = p.parse_args(argv)
    print(run(a.out, a.quick, a.mixed_mb, a.reps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
