"""Host dispatch cost of back-to-back ``torch.distributed`` collective calls (issue 9):
``python -m kernels.collective_host --out DIR`` -> ``DIR/collective_host.csv``.

Why: `paper_repro.multigpu_run` times 20 back-to-back calls of a collective as one CUDA-event interval. Up to
4 MiB every collective of the 2 x H200 run took 33-41 us per call whatever its size: the GPU waits for the
host to issue the next call (c10d work object, events, stream waits, the NCCL enqueue), a cost the network
model does not contain. This probe measures that host cost alone: the same calls on tiny (1 KiB) tensors,
where the device work is a few microseconds, on ONE process by default (world 1, NCCL on a GPU, gloo on the
CPU), so it needs a single GPU. Under ``torchrun`` it runs on every rank of the launched world instead (rank 0
writes).

Calls (float32, ``--bytes`` per call as `multigpu_run` counts them: all-reduce buffer, all-gather output,
reduce-scatter input, all-to-all send buffer): ``dist.all_reduce``, ``all_gather_into_tensor``
(``all_gather_single`` where torch has it), ``reduce_scatter_tensor`` (``reduce_scatter_single``),
``all_to_all_single`` with even splits (``all_to_all``) and with explicit split lists (``all_to_all_uneven``:
`multigpu_run.uneven_splits`). Timing as `multigpu_run.Ctx.time_loop`:
``--warmup`` calls, synchronise, barrier, then ``--calls`` calls between two CUDA events (wall clock on the
CPU), divided by ``--calls``; repeated ``--reps`` times, the median kept. Beside it, the host wall time of
issuing the same ``--calls`` calls (from before the first call until the last one returns, no synchronise):
if the two agree, the interval is the host's.

Rows (the kernel profile's columns, `kernels.profile.COLUMNS`; rewritten atomically after every row):

=================== =====================================================================================
op                  ``host_call_<collective>``: seconds per call of back-to-back calls, timed as above;
                    ``host_issue_<collective>``: host wall seconds per call to issue them (no synchronise)
impl                the backend (``nccl`` / ``gloo``)
dtype               ``fp32``
m                   bytes per call (``--bytes``, rounded down to whole fp32 elements per rank)
n                   world size of the probe
k                   calls per timed interval (``--calls``)
time_s, GBps        median seconds per call over ``--reps`` intervals; ``m / time_s``
=================== =====================================================================================

`simulator.network.host_dispatch` reads ``results/profiles/collective_host_<host>.csv`` (the lead copies the
file there) and models a back-to-back sequence of collective calls as the larger of the device time and this
per-call host time. The number belongs to the host CPU the probe ran on (the H100 machine's host is not the
H200 machines' host).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import statistics
import sys
import time
from pathlib import Path

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven")
PROG = "kernels.collective_host"


def _calls(dist, torch, name: str, nbytes: int, world: int, rank: int, dev):
    """The zero-argument call of collective ``name`` on fresh fp32 buffers of ``nbytes`` (as `multigpu_run`)."""
    from paper_repro.multigpu_run import uneven_splits

    f32 = {"dtype": torch.float32, "device": dev}
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the calls multigpu_run makes
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    per = max(1, nbytes // (4 * world))
    if name == "all_reduce":
        buf = torch.ones(per * world, **f32)
        return lambda: dist.all_reduce(buf)
    if name == "all_gather":
        inp, out = torch.ones(per, **f32), torch.empty(per * world, **f32)
        return lambda: ag(out, inp)
    if name == "reduce_scatter":
        inp, out = torch.ones(per * world, **f32), torch.empty(per, **f32)
        return lambda: rs(out, inp)
    if name == "all_to_all":
        inp, out = torch.ones(per * world, **f32), torch.empty(per * world, **f32)
        return lambda: dist.all_to_all_single(out, inp)
    if name == "all_to_all_uneven":
        S = uneven_splits(world, per * world)
        send, recv = S[rank], [S[s][rank] for s in range(world)]
        inp, out = torch.ones(sum(send), **f32), torch.empty(sum(recv), **f32)
        return lambda: dist.all_to_all_single(out, inp, recv, send)
    raise ValueError(f"{PROG}: unknown collective {name!r} (choose from {', '.join(COLLECTIVES)})")


def time_calls(fn, *, cuda: bool, sync, barrier, warmup: int, calls: int) -> tuple[float, float]:
    """(seconds per call of the interval, host seconds per call to issue them) of ``calls`` back-to-back
    ``fn()`` after ``warmup`` calls, a synchronise and a barrier (`multigpu_run.Ctx.time_loop`)."""
    import torch

    for _ in range(warmup):
        fn()
    sync()
    barrier()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        issue = time.perf_counter() - t
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls, issue / calls
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    issue = time.perf_counter() - t
    return issue / calls, issue / calls


class Writer:
    """Profile rows of rank 0, the whole CSV rewritten atomically after every row."""

    def __init__(self, path: Path, gpu: str, lead: bool) -> None:
        self.path, self.gpu, self.lead, self.rows = path, gpu, lead, []

    def add(self, op: str, impl: str, *, m: int, n: int, k: int, time_s: float) -> None:
        from kernels.profile import COLUMNS
        from semoe.io import atomic_write_text

        if not self.lead:
            return
        self.rows.append(dict(gpu=self.gpu, op=op, impl=impl, dtype="fp32", batch=1, m=m, n=n, k=k, groups=1,
                              io_bytes=m, flop=0, time_s=f"{time_s:.6g}", TFLOPps="0", GBps=f"{m / time_s / 1e9:.4g}"))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for collective_host.csv")
    p.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl with a GPU, else gloo")
    p.add_argument("--collectives", default=",".join(COLLECTIVES), help="comma-separated subset")
    p.add_argument("--bytes", type=int, default=1024, help="bytes per call (default 1 KiB)")
    p.add_argument("--calls", type=int, default=20, help="back-to-back calls per timed interval (multigpu_run: 20)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls before each interval")
    p.add_argument("--reps", type=int, default=15, help="timed intervals per collective (median kept)")
    p.add_argument("--quick", action="store_true", help="3 intervals of 5 calls (a CPU test of the plumbing)")
    return p


def _init(backend: str) -> None:
    """Join the torchrun world if launched by torchrun, else a world of one on a free local port."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("LOCAL_RANK", "0")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    names = [c for c in a.collectives.split(",") if c]
    bad = [c for c in names if c not in COLLECTIVES]
    if bad:
        print(f"{PROG}: unknown collective {bad[0]!r} (choose from {', '.join(COLLECTIVES)})", file=sys.stderr)
        return 2
    if min(a.bytes, a.calls, a.reps) < 1 or a.warmup < 0:
        print(f"{PROG}: --bytes, --calls and --reps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if a.quick:
        a.reps, a.calls, a.warmup = 3, 5, 1
    import paper_repro.multigpu_run  # noqa: F401  (sets NVLink multicast off before torch and NCCL load)
    import torch
    import torch.distributed as dist

    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    cuda = backend == "nccl"
    if cuda and not torch.cuda.is_available():
        print(f"{PROG}: --backend nccl needs a GPU", file=sys.stderr)
        return 2
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    t0 = time.perf_counter()
    _init(backend)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device("cuda", local) if cuda else torch.device("cpu")
        gpu = torch.cuda.get_device_name(dev) if cuda else "cpu"
        lead = rank == 0
        out = Writer(a.out / "collective_host.csv", gpu, lead)

        def sync():
            if cuda:
                torch.cuda.synchronize(dev)

        def barrier():
            dist.barrier(device_ids=[local]) if cuda else dist.barrier()

        if lead:
            print(f"{PROG}: world {world}, backend {backend}, device {gpu}, {a.bytes} B x {a.calls} calls x "
                  f"{a.reps} reps; init {time.perf_counter() - t0:.1f} s", flush=True)
        for name in names:
            fn = _calls(dist, torch, name, a.bytes, world, rank, dev)
            per = max(1, a.bytes // (4 * world))
            m = per * world * 4
            got = [time_calls(fn, cuda=cuda, sync=sync, barrier=barrier, warmup=a.warmup, calls=a.calls)
                   for _ in range(a.reps)]
            call, issue = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)
            out.add(f"host_call_{name}", backend, m=m, n=world, k=a.calls, time_s=call)
            out.add(f"host_issue_{name}", backend, m=m, n=world, k=a.calls, time_s=issue)
            if lead:
                print(f"{name:18s} {m:>6d} B  per call {call * 1e6:7.2f} us  host issue {issue * 1e6:7.2f} us  "
                      f"(min {min(g[0] for g in got) * 1e6:.2f}, max {max(g[0] for g in got) * 1e6:.2f})", flush=True)
        if lead:
            print(f"{PROG}: wrote {out.path} ({len(out.rows)} rows, {time.perf_counter() - t0:.1f} s)", flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
