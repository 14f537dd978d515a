"""The running job of the multi-GPU run (`paper_repro.multigpu_run`): `Ctx` holds the rank, the device, the
tidy output rows (`COLUMNS`; rank 0 writes each part's CSV atomically after every measurement), the traces,
``run_info.json``, the time budget (decided collectively) and the timing loop every part uses.
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import io
import json
import math
import os
import time

from paper_repro.multigpu_settings import PARTS, Settings

COLUMNS = ("date", "commit", "device", "backend", "world", "part", "config", "impl", "size_bytes", "tokens",
           "rank", "metric", "value")


class Ctx:
    """The running job: rank, device, output rows (rank 0 writes), time budget, progress."""

    def __init__(self, st: Settings) -> None:
        import torch
        import torch.distributed as dist

        from reference.parallel.bench import git_commit

        self.st, self.torch, self.dist = st, torch, dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.lead = self.rank == 0
        self.cuda = st.backend == "nccl"
        self.dev = torch.device("cuda", self.local_rank) if self.cuda else torch.device("cpu")
        self.device_name = torch.cuda.get_device_name(self.dev) if self.cuda else "cpu"
        self.t0 = time.perf_counter()
        self.date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.commit = git_commit()
        self.rows: dict[str, list[dict]] = {p: [] for p in PARTS}
        self.trace_rows: list[list] = []
        self.skipped: list[str] = []
        self.part_s: dict[str, float] = {}
        self.info: dict = {}

    # -------------------------------------------------------------------------------- output
    def log(self, msg: str) -> None:
        if self.lead:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

    def add(self, part: str, config: str, impl: str, metric: str, value, *, size_bytes="", tokens="", rank="all"):
        if not self.lead:
            return
        if isinstance(value, float):
            value = f"{value:.6g}" if math.isfinite(value) else str(value)
        self.rows[part].append({"date": self.date, "commit": self.commit, "device": self.device_name,
                                "backend": self.st.backend, "world": self.world, "part": part, "config": config,
                                "impl": impl, "size_bytes": size_bytes, "tokens": tokens, "rank": rank,
                                "metric": metric, "value": value})

    def flush(self, part: str) -> None:
        if not self.lead or not self.rows[part]:
            return
        from semoe.io import atomic_write_text

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows[part])
        atomic_write_text(self.st.out / f"{part}.csv", buf.getvalue())

    def flush_traces(self) -> None:
        if not self.lead or not self.trace_rows:
            return
        from semoe.io import atomic_write_text
        from semoe.trace import TRACE_COLUMNS

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(("config", "impl", *TRACE_COLUMNS))
        w.writerows(self.trace_rows)
        atomic_write_text(self.st.out / "train_trace.csv", buf.getvalue())

    def write_info(self, status: str) -> None:
        if not self.lead:
            return
        from semoe.io import atomic_write_text

        info = {**self.info, "status": status, "elapsed_s": round(time.perf_counter() - self.t0, 2),
                "part_s": self.part_s, "skipped": self.skipped}
        atomic_write_text(self.st.out / "run_info.json", json.dumps(info, indent=1, default=str) + "\n")

    # ---------------------------------------------------------------------------- collectives
    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def barrier(self) -> None:
        if self.cuda:
            self.dist.barrier(device_ids=[self.local_rank])
        else:
            self.dist.barrier()

    def gather_floats(self, values: list[float]):
        """[world, len(values)] float64 on the CPU: every rank's values."""
        t = self.torch.tensor(values, dtype=self.torch.float64, device=self.dev)
        out = [self.torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(out, t)
        return self.torch.stack(out).cpu()

    def all_max(self, value: float) -> float:
        t = self.torch.tensor([value], dtype=self.torch.float64, device=self.dev)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t)

    def over_budget(self, what: str, need_s: float = 0.0) -> bool:
        """Collective decision (rank 0's clock): skip ``what`` when less than ``need_s`` is left."""
        left = self.st.time_budget_s - (time.perf_counter() - self.t0)
        stop = self.all_max(1.0 if left < need_s else 0.0) > 0
        if stop:
            self.skipped.append(what)
            self.log(f"time budget: skipping {what} ({left:.0f} s left)")
        return stop

    def time_loop(self, fn, warmup: int, iters: int) -> float:
        """Seconds per call of ``fn`` on this rank: warm-up, barrier, ``iters`` calls timed as one interval."""
        torch = self.torch
        for _ in range(warmup):
            fn()
        self.sync()
        self.barrier()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
