"""Multi-GPU measurement run (issue 10): collective sweeps, expert-parallel MoE layer, DP x EP training.

One torchrun call measures everything a multi-GPU host can tell the simulator, rank 0 writing tidy CSV::

    torchrun --standalone --nproc-per-node N -m paper_repro.multigpu_run --out DIR \\
        [--quick] [--backend nccl|gloo] [--parts collectives,moe,train] [--node-sizes 2,4]

Parts (each writes ``DIR/<part>.csv``, rewritten atomically after every measurement, so a run killed
at its time limit keeps everything measured so far):

``collectives``  nccl-tests-style sweeps (NVIDIA/nccl-tests, doc/PERFORMANCE.md) with torch.distributed:
    all_reduce, all_gather, reduce_scatter, all_to_all (even splits) and all_to_all_uneven
    (``all_to_all_single`` with splits ``w[s, d] = 1 + (s + d) mod n``: every pair differs, every
    rank sends ``size`` bytes), float32, 1 KiB .. 1 GiB by factors of 2. ``size`` is nccl-tests'
    size: the all-reduce buffer, the all-gather output, the reduce-scatter input, the all-to-all send
    buffer of one rank. Warm-up, then ``iters`` back-to-back calls timed as one interval (CUDA events
    on the GPU, wall clock on the CPU), time = mean over ranks (nccl-tests' default ``-a 1``);
    ``algbw = size / time`` and ``busbw = algbw x factor``, factor ``2(n-1)/n`` for all-reduce and
    ``(n-1)/n`` for the others. Each collective's result is checked once (``check_ok``).
``moe``  the reference :class:`~reference.moe.layer.MoELayer` forward + backward with expert
    parallelism over EP = world size, and 2, 4 where they divide it, through the
    :class:`~reference.parallel.ep_dispatcher.EPDispatcher` with every all-to-all of
    :mod:`reference.comm.alltoall`: ``flat``, ``hetu_p<p>`` and ``rail_p<p>`` with the host cut into
    fake nodes of ``p`` ranks (``--node-sizes``; ``p`` must divide EP; ``rail`` with ``p = EP`` is
    exactly ``flat`` and is skipped). Configs are the kernels issue's (``kernels/bench/moe_layer.py``)
    with their token count *per rank* (weak scaling: each GPU's expert GEMMs equal the single-GPU
    benchmark at every EP; global tokens = tokens x world). Before timing, every variant's output,
    input gradient and parameter gradients are compared with ``flat`` on the same input
    (``max_rel_diff_vs_flat``, ``agree_with_flat``). Metrics: fwd+bwd time (mean/max over ranks),
    tokens/s (global tokens / slowest rank), routed TFLOP/s per rank (12 T k H F, kernels-bench
    convention), received-rows imbalance.
``train``  :func:`reference.train.train` of the paper's GPT-MoE family scaled to fit (``paper-13.9b``
    with L4 D2048 F8192 E8, the one-GPU rows of ``results/bench/train.csv``), DP = world x EP
    (default EP = world: one expert per GPU as in the paper), ZeRO-3 dense sharding and fused gradient
    buckets each on and off: tokens/s (median of steps after warm-up), MFU, peak memory per rank,
    losses (and their distance to the plain run); then a short traced run of each variant
    (:mod:`reference.parallel.trace_hooks`: every phase boundary synchronises, so its tokens/s is
    reported apart) whose per-rank phase rows go to ``train_trace.csv`` and whose per-step phase
    means go to ``train.csv``.

Files under ``--out`` (flat, at most 5, so the device tool returns them all): ``collectives.csv``,
``moe.csv``, ``train.csv`` with columns :data:`COLUMNS`; ``train_trace.csv`` (run labels + the
:mod:`semoe.trace` schema); ``run_info.json`` (versions, devices, topology, environment, what ran and
what was skipped). NVLink multicast stays off in every process: :data:`NO_MULTICAST_ENV` is set at
import, before torch loads and before any communicator exists (the device README says why).
``--quick`` uses tiny shapes and few iterations (the gloo test, a first smoke call on the GPUs).
``--print-device-command`` prints the device-tool call for a later session (results/multigpu/README.md).
"""

from __future__ import annotations

import os

# Set before torch is imported and before any process group exists, in every rank (torchrun starts each
# worker as a fresh interpreter that runs this module's top first).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST_ENV)

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import dataclasses  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from semoe.moe_layer_configs import MOE_LAYER_CONFIGS, MoELayerConfig  # noqa: E402

COLUMNS = ("date", "commit", "device", "backend", "world", "part", "config", "impl", "size_bytes", "tokens",
           "rank", "metric", "value")
PARTS = ("collectives", "moe", "train")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven")
KiB, MiB, GiB = 1024, 1024**2, 1024**3
PROG = "multigpu_run"


class RunError(Exception):
    """A configuration that cannot run (printed as one line, exit status 2)."""


def bus_factor(collective: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor: all-reduce 2(n-1)/n, all-gather / reduce-scatter / all-to-all (n-1)/n."""
    return (2.0 if collective == "all_reduce" else 1.0) * (n - 1) / n


def uneven_splits(n: int, elems: int) -> list[list[int]]:
    """``splits[s][d]`` elements rank s sends to rank d: proportional to ``1 + (s + d) mod n`` (every pair
    differs, every row and column has the same weights), each row summing to exactly ``elems``."""
    W = n * (n + 1) // 2
    out = []
    for s in range(n):
        row = [elems * (1 + (s + d) % n) // W for d in range(n)]
        row[s] += elems - sum(row)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ configs
MoEConfig = MoELayerConfig  # the kernels issue's layers (semoe/moe_layer_configs.py); tokens per rank
MOE_CONFIGS = MOE_LAYER_CONFIGS


def quick_moe(c: MoEConfig) -> MoEConfig:
    return dataclasses.replace(c, hidden=32, ffn=64, tokens=64)


@dataclass(frozen=True)
class Settings:
    """Everything the run does, fixed before the process group exists (same on every rank)."""

    out: Path
    quick: bool
    backend: str
    parts: tuple[str, ...]
    world: int
    sizes: tuple[int, ...]
    coll_warmup: int
    coll_iters: int
    collectives: tuple[str, ...]
    moe_configs: tuple[MoEConfig, ...]
    moe_eps: tuple[int, ...]
    node_sizes: tuple[int, ...]
    moe_warmup: int
    moe_iters: int
    train_spec: object  # semoe.model_spec.ModelSpec
    train_ep: int
    train_a2a: str
    train_gpus_per_node: int | None
    train_batch_per_rank: int
    train_seq: int
    train_steps: int
    train_skip: int
    trace_steps: int
    bucket_bytes: int
    time_budget_s: float
    pg_timeout_s: int


def moe_impls(ep: int, node_sizes: tuple[int, ...]) -> list[tuple[str, str, int | None]]:
    """(label, algorithm, fake node size) for one EP size: flat, then hetu/rail per node size dividing EP."""
    impls: list[tuple[str, str, int | None]] = [("flat", "flat", None)]
    for p in node_sizes:
        if p > ep or ep % p:
            continue
        impls.append((f"hetu_p{p}", "hetu", p))
        if p < ep:  # rail inside one node is the flat all-to-all (the same code path)
            impls.append((f"rail_p{p}", "rail", p))
    return impls


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise RunError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise RunError(f"{what}: values must be >= 1, got {text!r}")
    return vals


def make_settings(a: argparse.Namespace, world: int) -> Settings:
    """Validate the arguments against the world size; raise :class:`RunError` with one clear line."""
    from semoe.presets import load_model

    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise RunError(f"--parts: {','.join(bad) or repr(a.parts)} not among {','.join(PARTS)}")
    if a.backend not in ("nccl", "gloo"):
        raise RunError(f"--backend: {a.backend!r} is not nccl or gloo")
    colls = tuple(c.strip() for c in a.collectives.split(",") if c.strip())
    bad = [c for c in colls if c not in COLLECTIVES]
    if bad:
        raise RunError(f"--collectives: {','.join(bad)} not among {','.join(COLLECTIVES)}")
    q = a.quick
    lo, hi = (1 * KiB, 256 * KiB) if q else (a.min_bytes, a.max_bytes)
    factor = 16 if q else 2
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= factor
    names = [n.strip() for n in a.moe_configs.split(",") if n.strip()]
    bad = [n for n in names if n not in MOE_CONFIGS]
    if bad:
        raise RunError(f"--moe-configs: {','.join(bad)} not among {','.join(MOE_CONFIGS)}")
    configs = tuple(quick_moe(MOE_CONFIGS[n]) if q else MOE_CONFIGS[n] for n in names)
    if a.moe_tokens:
        configs = tuple(dataclasses.replace(c, tokens=a.moe_tokens) for c in configs)
    node_sizes = _int_list(a.node_sizes, "--node-sizes")
    if any(p < 2 for p in node_sizes):
        raise RunError(f"--node-sizes: a fake node holds at least 2 ranks, got {a.node_sizes!r}")
    eps = tuple(sorted({world} | {g for g in (2, 4) if g < world and world % g == 0}, reverse=True))
    if "moe" in parts:
        for c in configs:
            if c.experts % world:
                raise RunError(
                    f"world size {world} does not fit moe config {c.name}: its {c.experts} experts must be divisible "
                    f"by the expert-parallel size (= world size {world}); use 1, 2, 4 or 8 ranks, "
                    f"or leave moe out of --parts")
    base = load_model("paper-13.9b")
    if q:
        spec = base.replace(name="paper-13.9b-quick", layers=2, hidden=64, heads=4, ffn=128, experts=a.train_experts,
                            vocab=512, max_seq=64, dtype="fp32")
    else:
        spec = base.replace(name="paper-13.9b-scaled", layers=a.train_layers, hidden=2048, heads=16, ffn=8192,
                            experts=a.train_experts)
    train_ep = a.train_ep or world
    if "train" in parts:
        if world % train_ep:
            raise RunError(f"--train-ep ({train_ep}) must divide the world size ({world})")
        if spec.experts % train_ep:
            raise RunError(
                f"world size {world} does not fit the train config: its {spec.experts} experts must be divisible "
                f"by the expert-parallel size ({train_ep}); set --train-experts or --train-ep, or leave train out of "
                f"--parts")
        p = a.train_gpus_per_node
        if p is not None and (world % p or (train_ep % p and p % train_ep)):
            raise RunError(f"--train-gpus-per-node ({p}) must divide the world size ({world}) and divide or be a "
                           f"multiple of the expert-parallel size ({train_ep})")
        if a.train_a2a != "flat" and world > 1 and (p or world) < 2:
            raise RunError(f"--train-a2a {a.train_a2a} needs nodes of >= 2 ranks")
    seq = 16 if q else a.train_seq
    if seq > spec.max_seq:
        raise RunError(f"--train-seq ({seq}) exceeds the model's max_seq ({spec.max_seq})")
    steps = a.train_steps or (3 if q else 12)
    return Settings(
        out=a.out, quick=q, backend=a.backend, parts=parts, world=world, sizes=tuple(sizes),
        coll_warmup=a.warmup or (1 if q else 5), coll_iters=a.iters or (3 if q else 20), collectives=colls,
        moe_configs=configs, moe_eps=eps, node_sizes=node_sizes, moe_warmup=a.warmup or (1 if q else 3),
        moe_iters=a.iters or (2 if q else 10), train_spec=spec, train_ep=train_ep, train_a2a=a.train_a2a,
        train_gpus_per_node=a.train_gpus_per_node, train_batch_per_rank=1 if q else a.train_batch_per_rank,
        train_seq=seq, train_steps=steps, train_skip=min(steps - 1, 1 if q else 4),
        trace_steps=a.trace_steps if a.trace_steps is not None else (2 if q else 4),
        bucket_bytes=64 * KiB if q else a.bucket_bytes, time_budget_s=a.time_budget_s, pg_timeout_s=a.pg_timeout_s,
    )


# --------------------------------------------------------------------------------------- run context
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


# -------------------------------------------------------------------------------------- collectives
def _collective_op(c: Ctx, name: str, size: int):
    """(fn, actual size in bytes, check) for one collective of nominal ``size`` bytes (float32)."""
    torch, dist, n, r = c.torch, c.dist, c.world, c.rank
    ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    f32 = dict(dtype=torch.float32, device=c.dev)
    if name == "all_reduce":
        count = size // 4
        if count < 1:
            return None
        buf = torch.full((count,), float(r + 1), **f32)
        return (lambda: dist.all_reduce(buf)), count * 4, None
    per = size // (4 * n)
    if per < 1:
        return None
    if name == "all_gather":
        inp, out = torch.full((per,), float(r), **f32), torch.empty(per * n, **f32)

        def check():
            ag(out, inp)
            return bool((out.view(n, per) == torch.arange(n, **f32).view(n, 1)).all())

        return (lambda: ag(out, inp)), per * n * 4, check
    if name == "reduce_scatter":
        inp, out = torch.full((per * n,), float(r + 1), **f32), torch.empty(per, **f32)

        def check():
            rs(out, inp)
            return bool((out == n * (n + 1) / 2).all())

        return (lambda: rs(out, inp)), per * n * 4, check
    if name == "all_to_all":
        inp, out = torch.empty(per * n, **f32), torch.empty(per * n, **f32)
        inp.view(n, per).copy_((r * n + torch.arange(n, **f32)).view(n, 1))

        def check():
            dist.all_to_all_single(out, inp)
            return bool((out.view(n, per) == (torch.arange(n, **f32) * n + r).view(n, 1)).all())

        return (lambda: dist.all_to_all_single(out, inp)), per * n * 4, check
    if name == "all_to_all_uneven":
        S = uneven_splits(n, per * n)
        send, recv = S[r], [S[s][r] for s in range(n)]
        inp, out = torch.empty(sum(send), **f32), torch.empty(sum(recv), **f32)
        inp.copy_(torch.repeat_interleave(r * n + torch.arange(n, **f32), torch.tensor(send, device=c.dev)))

        def check():
            dist.all_to_all_single(out, inp, recv, send)
            want = torch.repeat_interleave(torch.arange(n, **f32) * n + r, torch.tensor(recv, device=c.dev))
            return bool((out == want).all())

        return (lambda: dist.all_to_all_single(out, inp, recv, send)), per * n * 4, check
    raise ValueError(name)


def run_collectives(c: Ctx) -> None:
    st, n = c.st, c.world
    for name in st.collectives:
        checked = False
        for size in st.sizes:
            if c.over_budget(f"collectives {name} {size} B and larger", need_s=5.0 if size >= 256 * MiB else 1.0):
                break
            op = _collective_op(c, name, size)
            if op is None:
                continue
            fn, nbytes, check = op
            if not checked:
                if name == "all_reduce":  # in place: check on a fresh buffer of the first size
                    buf = c.torch.full((nbytes // 4,), float(c.rank + 1), dtype=c.torch.float32, device=c.dev)
                    c.dist.all_reduce(buf)
                    ok = bool((buf == n * (n + 1) / 2).all())
                else:
                    ok = check()
                ok = c.all_max(0.0 if ok else 1.0) == 0.0
                c.add("collectives", name, st.backend, "check_ok", int(ok), size_bytes=nbytes)
                checked = True
                if not ok:
                    c.log(f"WARNING: {name} gave a wrong result at {nbytes} B")
            iters = st.coll_iters if nbytes <= 256 * MiB else max(5, st.coll_iters // 2)
            t = c.gather_floats([c.time_loop(fn, st.coll_warmup, iters)])[:, 0]
            mean, tmax = float(t.mean()), float(t.max())
            algbw = nbytes / mean / 1e9
            busbw = algbw * bus_factor(name, n)
            for metric, v in (("time_us", mean * 1e6), ("time_us_max", tmax * 1e6), ("algbw_GBps", algbw),
                              ("busbw_GBps", busbw), ("iters", iters)):
                c.add("collectives", name, st.backend, metric, float(v) if metric != "iters" else v, size_bytes=nbytes)
            c.flush("collectives")
            c.log(f"{name:18s} {nbytes:>12d} B  {mean * 1e6:10.1f} us  algbw {algbw:8.2f} GB/s  busbw {busbw:8.2f} GB/s")
            del fn, op
        c.free()


# ---------------------------------------------------------------------------------------- MoE layer
def _local_experts_layer(c: Ctx, cfg: MoEConfig, local: range, dtype):
    """A :class:`MoELayer` of ``cfg`` whose routed experts are only ``local``, initialised on the device
    (a full layer is drawn on the CPU in fp64: seconds per GiB, too slow for the big configs)."""
    import torch

    from reference.moe.dispatcher import LocalDispatcher
    from reference.moe.experts import GroupedExperts
    from reference.moe.layer import MoELayer
    from semoe.model_spec import ModelSpec

    class DeviceInitExperts(GroupedExperts):
        @torch.no_grad()
        def reset_parameters(self, seed=None):
            g = torch.Generator(device=self.w1_EDF.device).manual_seed(self.seed if seed is None else seed)
            out_std = self.init_std / math.sqrt(2 * self.num_layers)
            for p, std in ((self.w1_EDF, self.init_std), (self.w3_EDF, self.init_std), (self.w2_EFD, out_std)):
                if p is not None:
                    p.normal_(0.0, std, generator=g)

    class Layer(MoELayer):
        def _build_backend(self, backend, experts_impl, grouped_impl, layout, seed):
            s = self.spec
            experts = DeviceInitExperts(len(local), s.hidden, s.ffn, activation=s.activation, num_layers=1,
                                        seed=seed + local.start, dtype=dtype, device=c.dev)
            return LocalDispatcher(s.experts, layout="contiguous"), experts

    spec = ModelSpec(name=cfg.name, layers=1, hidden=cfg.hidden, heads=1, vocab=256, ffn=cfg.ffn,
                     experts=cfg.experts, top_k=cfg.top_k, gate=cfg.gate, capacity_factor=None,
                     renormalize=cfg.renormalize, activation="gelu", dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    return Layer(spec, seed=0, dtype=dtype, device=c.dev, backend="torch")  # EPDispatcher: the torch path


def _max_rel_diff(c: Ctx, a: dict, b: dict) -> float:
    worst = 0.0
    for k in b:
        ref, got = b[k].float(), a[k].float()
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        diff = float((got - ref).abs().max()) if ref.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return c.all_max(worst)


def run_moe(c: Ctx) -> None:
    import torch

    from reference.comm.alltoall import AllToAll
    from reference.parallel.ep_dispatcher import EPDispatcher
    from reference.parallel.groups import build_groups
    from semoe.plan_spec import ParallelPlan

    st, W = c.st, c.world
    dtype = torch.bfloat16 if c.cuda else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    dname = "bf16" if dtype == torch.bfloat16 else "fp32"
    for cfg in st.moe_configs:
        for G in st.moe_eps:
            if cfg.experts % G:
                continue
            config = f"{cfg.label(dname)} ep{G}"
            if c.over_budget(f"moe {config}", need_s=20.0):
                continue
            plan = lambda p, alg: ParallelPlan(data_parallel=W, expert_parallel=G, gpus_per_node=p, alltoall=alg)  # noqa: E731
            g_flat = build_groups(plan(W, "flat"))
            layer = _local_experts_layer(c, cfg, g_flat.local_experts(cfg.experts), dtype)
            gen = torch.Generator(device=c.dev).manual_seed(1000 + c.rank)
            x = torch.randn(cfg.tokens, cfg.hidden, generator=gen, device=c.dev, dtype=dtype).requires_grad_(True)
            dy = torch.randn(cfg.tokens, cfg.hidden, generator=gen, device=c.dev, dtype=dtype)
            impls = [(label, alg, g_flat if p is None else build_groups(plan(p, alg)))
                     for label, alg, p in moe_impls(G, st.node_sizes)]

            def step(stats: dict | None = None):
                x.grad = None
                layer.zero_grad(set_to_none=True)
                y, aux = layer(x)
                y.backward(dy)
                if stats is not None:
                    stats["y"] = y.detach().clone()
                    stats["counts"] = aux["tokens_per_expert"].detach().clone()
                return y

            # equality: every variant against flat, same input, same gate noise, before any timing
            ref = None
            for label, alg, groups in impls:
                layer.dispatcher = EPDispatcher(cfg.experts, AllToAll.from_groups(alg, groups))
                torch.manual_seed(7 + c.rank)
                stats: dict = {}
                step(stats)
                got = {"y": stats["y"], "x.grad": x.grad.clone()}
                got.update({f"{k}.grad": p.grad.clone() for k, p in layer.named_parameters() if p.grad is not None})
                if ref is None:
                    ref = got
                    counts = stats["counts"].to(torch.int64)
                    if G > 1:
                        c.dist.all_reduce(counts, group=g_flat.ep.pg)
                    L = cfg.experts // G
                    recv = c.gather_floats([float(counts[g_flat.ep.rank * L:(g_flat.ep.rank + 1) * L].sum())])[:, 0]
                    c.add("moe", config, "flat", "recv_rows_max_over_mean", float(recv.max() / recv.mean()),
                          tokens=cfg.tokens)
                    continue
                rel = _max_rel_diff(c, got, ref)
                c.add("moe", config, label, "max_rel_diff_vs_flat", rel, tokens=cfg.tokens)
                c.add("moe", config, label, "agree_with_flat", int(rel <= tol), tokens=cfg.tokens)
                if rel > tol:
                    c.log(f"WARNING: {config} {label} differs from flat: max relative difference {rel:.3g}")
                del got
            del ref
            c.free()
            for label, alg, groups in impls:
                if c.over_budget(f"moe {config} {label}", need_s=10.0):
                    continue
                layer.dispatcher = EPDispatcher(cfg.experts, AllToAll.from_groups(alg, groups))
                t = c.gather_floats([c.time_loop(step, st.moe_warmup, st.moe_iters)])[:, 0]
                mean, tmax = float(t.mean()), float(t.max())
                tps = cfg.tokens * W / tmax
                for metric, v in (("fwd_bwd_ms", mean * 1e3), ("fwd_bwd_ms_max", tmax * 1e3), ("tokens_per_s", tps),
                                  ("tflops_per_rank", cfg.flops("fwd_bwd") / mean / 1e12)):
                    c.add("moe", config, label, metric, v, tokens=cfg.tokens)
                c.flush("moe")
                c.log(f"moe {config:60s} {label:8s} {mean * 1e3:9.2f} ms  {tps:12,.0f} tokens/s")
            c.flush("moe")
            del layer, x, dy, impls
            c.free()


# ----------------------------------------------------------------------------------------- training
def _peak_memory(c: Ctx) -> tuple[float, float]:
    if c.cuda:
        return float(c.torch.cuda.max_memory_allocated(c.dev)), float(c.torch.cuda.max_memory_reserved(c.dev))
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    return rss, rss


def run_train(c: Ctx) -> None:
    from reference.parallel.bench import peak_tflops
    from semoe import sizing

    st, W, spec = c.st, c.world, c.st.train_spec
    variants = [(0, 0), (0, st.bucket_bytes), (3, 0), (3, st.bucket_bytes)] if W > 1 else [(0, 0)]
    base = (f"{spec.name} L{spec.layers} D{spec.hidden} E{spec.experts} k{spec.top_k} F{spec.ffn} {spec.dtype} "
            f"B{st.train_batch_per_rank * W} S{st.train_seq} ep{st.train_ep} {st.train_a2a} "
            f"gpn{st.train_gpus_per_node or 'host'} params{sizing.count_params(spec).total}")
    tokens_step = st.train_batch_per_rank * W * st.train_seq
    flops_tok = sizing.training_flops_per_token(spec, st.train_seq)
    peak = peak_tflops(c.device_name)
    first_losses: list[list[float]] = []
    scratch = Path(tempfile.mkdtemp(prefix=f"semoe_mg_r{c.rank}_"))
    # timed runs first; traced runs last, the SE-MoE-like variant (ZeRO-3 + fused buckets) and the plain one
    # first among them, so that a tight time budget drops the least useful runs
    order = {(3, st.bucket_bytes): 0, (0, 0): 1}
    traced_variants = sorted(variants, key=lambda v: order.get(v, 2)) if st.trace_steps else []
    if st.quick:  # the CPU test: one traced run (ZeRO-3 + buckets shows every phase)
        traced_variants = traced_variants[:1]
    runs = [(z, b, False) for z, b in variants] + [(z, b, True) for z, b in traced_variants]
    try:
        for zero, bucket, traced in runs:
            _train_one(c, zero, bucket, traced, base, scratch, peak, flops_tok, tokens_step, first_losses)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _train_one(c: Ctx, zero: int, bucket: int, traced: bool, base: str, scratch: Path, peak, flops_tok: int,
               tokens_step: int, first_losses: list) -> None:
    """One train() call (timed or traced) and its rows; ``first_losses`` holds the plain run's losses."""
    from reference.train import TrainConfig, train
    from semoe.plan_spec import ParallelPlan
    from semoe.trace import read_csv

    st, W, spec = c.st, c.world, c.st.train_spec
    impl = f"zero{zero}_bucket{bucket}"
    steps = st.trace_steps if traced else st.train_steps
    config = f"{base} steps{steps}" + (" traced" if traced else "")
    if c.over_budget(f"train {impl}{' traced' if traced else ''}", need_s=45.0 if not st.quick else 0.0):
        return
    plan = ParallelPlan(data_parallel=W, expert_parallel=st.train_ep, alltoall=st.train_a2a,
                        gpus_per_node=st.train_gpus_per_node, fusion_bucket_bytes=bucket, zero_stage=zero)
    out = scratch / f"{impl}_{'traced' if traced else 'timed'}"
    cfg = TrainConfig(plan=plan, steps=steps, batch_size=st.train_batch_per_rank * W, seq_len=st.train_seq,
                      synthetic=True, out=out, progress=False, device="auto" if c.cuda else "cpu",
                      lr=3e-4, warmup_steps=min(5, steps), trace=traced)
    if c.cuda:
        c.torch.cuda.reset_peak_memory_stats(c.dev)
    c.barrier()
    t0 = time.perf_counter()
    result = train(spec, cfg)
    wall = time.perf_counter() - t0
    alloc, reserved = _peak_memory(c)
    mem = c.gather_floats([alloc, reserved])
    tokens = tokens_step * steps
    if not traced:
        if c.lead:
            with (out / "metrics.csv").open(newline="") as f:
                rows = list(csv.DictReader(f))
            per_step = [float(r["tokens_per_s"]) for r in rows[st.train_skip:]] or [result.tokens_per_s]
            tps = statistics.median(per_step)
            c.add("train", config, impl, "tokens_per_s", tps, tokens=tokens)
            c.add("train", config, impl, "step_s", tokens_step / tps, tokens=tokens)
            if peak is not None:
                c.add("train", config, impl, "mfu", tps * flops_tok / (W * peak * 1e12), tokens=tokens)
            c.add("train", config, impl, "first_loss", result.first_loss, tokens=tokens)
            c.add("train", config, impl, "final_loss", result.last_loss, tokens=tokens)
            if not first_losses:
                first_losses.append(result.losses)
            else:
                diff = max(abs(a - b) for a, b in zip(result.losses, first_losses[0]))
                c.add("train", config, impl, "max_abs_loss_diff_vs_zero0_bucket0", diff, tokens=tokens)
            c.add("train", config, impl, "wall_s_with_build", wall, tokens=tokens)
            c.log(f"train {impl:22s} {tps:12,.0f} tokens/s  loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
                  f"  peak {mem[:, 0].max() / GiB:.2f} GiB/rank  ({wall:.1f} s with build)")
        kind = "peak_mem_allocated_bytes" if c.cuda else "peak_rss_bytes"
        for r in range(W):
            c.add("train", config, impl, kind, float(mem[r, 0]), tokens=tokens, rank=r)
            if c.cuda:
                c.add("train", config, impl, "peak_mem_reserved_bytes", float(mem[r, 1]), tokens=tokens, rank=r)
        c.add("train", config, impl, kind + "_max", float(mem[:, 0].max()), tokens=tokens)
    else:
        mine = [[getattr(t, k) for k in ("rank", "layer", "micro_batch", "phase", "start_s", "end_s", "bytes",
                                         "flops", "resource")] for t in read_csv(out / f"trace_rank{c.rank}.csv")]
        everyone: list | None = [None] * W if c.lead else None
        c.dist.gather_object(mine, everyone, dst=0)
        if c.lead:
            rows = [row for per_rank in everyone for row in per_rank]
            c.trace_rows.extend([config, impl, *row] for row in rows)
            # per-step phase time, mean over ranks; step 0 (allocator and communicator warm-up) left out
            kept = [r for r in rows if r[2] >= 1] or rows
            nsteps = max(1, len({r[2] for r in kept}))
            totals: dict[str, float] = {}
            for r in kept:
                totals[r[3]] = totals.get(r[3], 0.0) + (r[5] - r[4])
            for phase, total in sorted(totals.items()):
                c.add("train", config, impl, f"phase_{phase}_s_per_step", total / nsteps / W, tokens=tokens)
            c.add("train", config, impl, "traced_tokens_per_s", result.tokens_per_s, tokens=tokens)
            c.flush_traces()
            c.log(f"train {impl:22s} traced: {len(rows)} phase rows, {len(totals)} phases")
    c.flush("train")
    del result
    c.free()


# --------------------------------------------------------------------------------------------- main
def _environment_info(c: Ctx) -> dict:
    torch = c.torch
    env = {k: os.environ.get(k) for k in (*NO_MULTICAST_ENV, "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS")}
    mine = {"rank": c.rank, "host": socket.gethostname(), "device": c.device_name, "env": env}
    everyone: list | None = [None] * c.world if c.lead else None
    c.dist.gather_object(mine, everyone, dst=0)
    info = {"date": c.date, "commit": c.commit, "world": c.world, "backend": c.st.backend, "quick": c.st.quick,
            "argv": sys.argv, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "ranks": everyone,
            "settings": {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None), tuple)) else v)
                         for k, v in vars(c.st).items()}}
    if c.cuda:
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as e:  # noqa: BLE001 - informational only
            info["nccl"] = f"unknown ({e})"
        if c.lead:
            try:
                info["nvidia_smi_topo"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                                         timeout=30).stdout
            except (OSError, subprocess.SubprocessError) as e:
                info["nvidia_smi_topo"] = f"unavailable: {e}"
    return info


def device_command(kind: str, commit: str, quick: bool = False) -> dict:
    """The device-tool ``run`` call that performs this measurement on ``kind`` (one torchrun, < 10 min)."""
    flags = " --quick --time-budget-s 240" if quick else " --time-budget-s 530"
    env = " ".join(f"{k}={v}" for k, v in NO_MULTICAST_ENV.items())
    cmd = (f"export {env} PYTHONUNBUFFERED=1 SEMOE_COMMIT={commit}; set -o pipefail; "
           "N=$(python3 -c 'import torch; print(torch.cuda.device_count())'); "
           f"timeout -k 10 {280 if quick else 575} python3 -m torch.distributed.run --standalone --nproc-per-node $N "
           f"-m paper_repro.multigpu_run --out $OUT --backend nccl{flags} 2>&1 | tee $OUT/log.txt")
    return {"kind": kind, "timeout_s": 300 if quick else 600, "command": cmd}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"torchrun --nproc-per-node N -m paper_repro.{PROG}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for the CSVs (flat; at most 5 files)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few sizes and iterations")
    p.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo (CPU tensors)")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--collectives", default=",".join(COLLECTIVES))
    p.add_argument("--min-bytes", type=int, default=1 * KiB)
    p.add_argument("--max-bytes", type=int, default=1 * GiB)
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5 collectives, 3 moe)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 20 collectives, 10 moe)")
    p.add_argument("--moe-configs", default=",".join(MOE_CONFIGS))
    p.add_argument("--moe-tokens", type=int, default=None, help="tokens per rank (default: the config's)")
    p.add_argument("--node-sizes", default="2,4", help="fake node sizes for hetu/rail")
    p.add_argument("--train-layers", type=int, default=4)
    p.add_argument("--train-experts", type=int, default=8)
    p.add_argument("--train-ep", type=int, default=None, help="expert-parallel size (default: world)")
    p.add_argument("--train-a2a", default="flat", choices=("flat", "hetu", "rail"))
    p.add_argument("--train-gpus-per-node", type=int, default=None, help="ZeRO-3 node size (default: the host)")
    p.add_argument("--train-batch-per-rank", type=int, default=8, help="sequences per rank and step")
    p.add_argument("--train-seq", type=int, default=1024)
    p.add_argument("--train-steps", type=int, default=None, help="timed run steps (default 12; quick 3)")
    p.add_argument("--trace-steps", type=int, default=None, help="traced run steps (default 4; quick 2; 0: none)")
    p.add_argument("--bucket-bytes", type=int, default=25 * MiB, help="fused bucket size of the 'on' runs")
    p.add_argument("--time-budget-s", type=float, default=float("inf"),
                   help="skip what would start after this many seconds (collectively decided)")
    p.add_argument("--pg-timeout-s", type=int, default=300)
    p.add_argument("--print-device-command", metavar="KIND", nargs="?", const="nvidia-h200-x8", default=None,
                   help="print the device-tool call for KIND (default nvidia-h200-x8) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.print_device_command:
        from reference.parallel.bench import git_commit

        for quick in (True, False):
            print(json.dumps(device_command(a.print_device_command, git_commit(), quick)))
        return 0
    if a.out is None:
        print(f"{PROG}: error: --out DIR is required", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:  # plain `python -m`: a one-process job
        from reference.parallel.spawn import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    import torch

    if a.backend is None:
        a.backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        st = make_settings(a, world)
        if st.backend == "nccl":
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if have < local:
                raise RunError(f"--backend nccl needs one CUDA GPU per local rank: {local} ranks, {have} GPUs "
                               "(use --backend gloo on the CPU)")
    except RunError as e:
        if rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a bad spec value: one line
        if rank == 0:
            print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        st.out.mkdir(parents=True, exist_ok=True)
    import datetime

    import torch.distributed as dist

    if st.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        threads = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        torch.set_num_threads(min(16, threads))  # torchrun's OMP_NUM_THREADS=1 makes CPU-side init slow
    dist.init_process_group(st.backend, timeout=datetime.timedelta(seconds=st.pg_timeout_s))
    c = Ctx(st)
    try:
        c.info = _environment_info(c)
        c.log(f"{PROG}: world {c.world}, backend {st.backend}, device {c.device_name}, parts {','.join(st.parts)}"
              f"{', quick' if st.quick else ''}; writing {st.out}")
        c.write_info("running")
        for part in st.parts:
            t = time.perf_counter()
            c.log(f"--- {part}")
            {"collectives": run_collectives, "moe": run_moe, "train": run_train}[part](c)
            c.flush(part)
            c.part_s[part] = round(time.perf_counter() - t, 2)
            c.write_info(f"running (done: {','.join(c.part_s)})")
        c.write_info("complete")
        c.log(f"done in {time.perf_counter() - c.t0:.1f} s; skipped: {c.skipped or 'nothing'}")
    except BaseException as e:
        for part in PARTS:
            c.flush(part)
        c.flush_traces()
        c.info["error"] = f"rank {c.rank}: {type(e).__name__}: {e}"
        c.write_info("failed")
        raise
    finally:
        from reference.parallel.groups import _PG_CACHE

        _PG_CACHE.clear()
        gc.collect()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
