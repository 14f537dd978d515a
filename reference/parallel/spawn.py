"""A pool of gloo (or NCCL) worker processes for tests and notebooks: start N ranks once, run many jobs.

Data flow::

    RankPool(world_size) --spawn--> N processes: init_process_group(backend, tcp://127.0.0.1:<free port>)
    pool.run(fn, *args)  --queue--> every rank calls fn(*args) (fn importable: module-level function)
                         <--queue-- [result of rank 0, ..., result of rank N-1]  (picklable values)

Importing torch costs seconds per process on a loaded 2-core CI machine, so one pool per world size
is started per test session and reused (``tests/reference/parallel/conftest.py``). A job that raises
on any rank re-raises here with that rank's traceback (the other ranks get 2 s, then are killed: they may wait in a collective); a job that does not finish within ``timeout_s``
(a mismatched collective hangs gloo) kills the pool and raises ``TimeoutError``; the next ``run``
starts a fresh pool. Workers run with one intra-op thread (``torch.set_num_threads(1)``) and see
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` as under torchrun.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (bound then released; a race with other processes is unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, pg_timeout_s: float, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=pg_timeout_s))
        results.put((rank, "ready", None))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id, fn, args, kwargs = job
        try:
            out = fn(*args, **kwargs)
            results.put((rank, job_id, ("ok", out)))
        except BaseException:
            results.put((rank, job_id, ("error", traceback.format_exc())))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` long-lived worker processes joined in one process group."""

    def __init__(self, world_size: int, *, backend: str = "gloo", timeout_s: float = 60.0,
                 start_timeout_s: float = 120.0) -> None:
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"RankPool: world_size must be a positive int, got {world_size!r}")
        self.world_size, self.backend = world_size, backend
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._procs: list = []
        self._job_id = 0

    # ------------------------------------------------------------------------------ life cycle
    def start(self) -> "RankPool":
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = free_port()
        self._results = ctx.Queue()
        self._jobs = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            ctx.Process(target=_worker, daemon=True,
                        args=(r, self.world_size, port, self.backend, self.timeout_s, self._jobs[r], self._results))
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()
        self._collect("ready", self.start_timeout_s)
        return self

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def close(self, force: bool = False) -> None:
        """Stop the workers: politely (finish the job loop), or with ``force`` kill them at once."""
        for q, p in zip(getattr(self, "_jobs", []), self._procs):
            if force and p.is_alive():
                p.kill()
            elif p.is_alive():
                try:
                    q.put(None)
                except Exception:  # noqa: BLE001 - the queue may be broken after a crash
                    pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> "RankPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------- jobs
    def run(self, fn: Callable[..., Any], *args, timeout_s: float | None = None, **kwargs) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order."""
        if not self.alive:
            self.close()
            self.start()
        self._job_id += 1
        for q in self._jobs:
            q.put((self._job_id, fn, args, kwargs))
        return self._collect(self._job_id, timeout_s or self.timeout_s)

    def _collect(self, key, timeout_s: float) -> list[Any]:
        import time

        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        first_error: float | None = None
        while len(out) + len(errors) < self.world_size:
            left = deadline - time.monotonic()
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in out and r not in errors]
            if left <= 0 or dead:
                self.close(force=True)
                if errors:
                    detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                    raise RuntimeError(f"RankPool({self.world_size}) job {key!r} failed on ranks {sorted(errors)} "
                                       f"(the others were stopped):{detail}")
                what = f"rank(s) {dead} died" if dead else f"no result within {timeout_s:.0f} s"
                missing = sorted(set(range(self.world_size)) - set(out) - set(errors))
                detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                raise TimeoutError(f"RankPool({self.world_size}) job {key!r}: {what}; waiting for ranks {missing}{detail}")
            if errors and first_error is not None:  # other ranks may hang in a collective: short grace
                deadline = min(deadline, first_error + 2.0)
            try:
                rank, got_key, payload = self._results.get(timeout=max(0.01, min(left, 1.0)))
            except queue.Empty:
                continue
            if got_key == "error":  # init_process_group failed
                errors[rank] = payload
            elif got_key == key == "ready":
                out[rank] = None
            elif got_key == key:
                status, value = payload
                if status == "error":
                    errors[rank] = value
                    first_error = first_error or time.monotonic()
                else:
                    out[rank] = value
        if errors:
            if key == "ready":
                self.close(force=True)
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RuntimeError(f"RankPool({self.world_size}) job {key!r} failed on ranks {sorted(errors)}:{detail}")
        return [out[r] for r in range(self.world_size)]


_SHARED: dict[tuple[int, str], RankPool] = {}


def shared_pool(world_size: int, backend: str = "gloo", timeout_s: float = 60.0) -> RankPool:
    """One started pool per (world size, backend) per process, closed at interpreter exit (tests)."""
    import atexit

    key = (world_size, backend)
    pool = _SHARED.get(key)
    if pool is None:
        pool = _SHARED[key] = RankPool(world_size, backend=backend, timeout_s=timeout_s)
        atexit.register(pool.close)
    if not pool.alive:
        pool.close()
        pool.start()
    return pool
