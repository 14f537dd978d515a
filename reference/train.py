"""Training loop of the reference model: one process, or data x expert parallel under torchrun.

AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with linear warm-up and cosine decay,
global-norm gradient clipping, fp32 on the CPU and bf16 autocast on the GPU, seeded data and init.
Each step appends one row to ``out/metrics.csv`` (flushed, so a killed run keeps what it logged):
``step,loss,lm_loss,aux_loss,grad_norm,lr,tokens_per_s,elapsed_s``.

Distributed (``torchrun -m reference.train ...`` or ``semoe train --nproc N``; also used directly
by tests inside an initialised gloo group)::

    every rank: same seed -> same full model -> parallelize(model, plan): experts sharded over EP,
                gradient buckets (dense over DP, experts over EDP); plan.zero_stage 3: dense
                parameters sharded inside the node with the next block's gather prefetched
    step:       the global batch (cfg.batch_size sequences) is drawn identically on every rank from
                the shared data generator; rank r trains on rows [r*b/W, (r+1)*b/W)
                forward -> backward (buckets launch) -> sync.finish() -> MoE-aware clip -> AdamW
                logged losses are means over ranks (equal token counts: the global mean)
    offload:    plan.offload moves expert states to cpu / ssd (reference.offload.ExpertOffload): built after
                parallelize on this rank's local experts; sync.finish() reduces its gradient accumulators
                over EDP, sync.clip() takes them into the global norm, then engine.step(lr) (2D prefetch
                with zero_stage 3; out/offload_{stats,trace}_rank<r>.*, SSD tier in ssd_dir/rank<r>);
                zero_stage 3 also shards at world size 1 (a node group of one)
    checkpoint: every cfg.checkpoint_every steps (reference.checkpoint: sharded, atomic, manifest);
                cfg.resume continues from the latest complete one exactly (same world size), or
                reshards the experts (other EP sizes)

Losses are the same for every EP size at a fixed world size (routing is per token; fp64 exactly up
to summation order). Fault injection for the restart test: ``SEMOE_KILL_RANK_AT_STEP=r:s`` makes
rank r SIGKILL itself at step s on the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0).
Per-rank phase traces (``cfg.trace``): ``out/trace_rank<r>.csv`` and ``.json`` (Chrome / Perfetto).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from reference.data import ByteCorpus, SyntheticTokens
from reference.model import MoEDecoder, ModelOutput
from semoe.model_spec import ModelSpec
from semoe.plan_spec import ParallelPlan

METRIC_COLUMNS = ("step", "loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s", "elapsed_s")
TORCH_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 50
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bias_update_rate: float = 1e-3  # sigmoid_bias gate: expert-bias step per update (DeepSeek-V3)
    data: Path | None = None
    synthetic: bool = False
    device: str = "auto"
    seed: int = 0
    out: Path | None = None
    progress: bool = True
    plan: ParallelPlan | None = None  # None: data_parallel = world size, expert_parallel 1, flat
    backend: str = "auto"  # process-group backend under torchrun: gloo, nccl, auto (nccl iff CUDA)
    checkpoint_every: int = 0  # 0: never
    checkpoint_dir: Path | None = None  # default out/checkpoints
    resume: bool = False  # continue from the latest complete checkpoint (if any)
    trace: bool = False  # per-rank phase traces (CSV + Chrome JSON in out/)
    ssd_dir: Path | None = None  # expert states on 'ssd' (plan.offload): default out/ssd

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} ({getattr(self, name)}) must be >= 1")
        if self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every ({self.checkpoint_every}) must be >= 0")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"TrainConfig.backend ({self.backend!r}) must be auto, gloo or nccl")
        if (self.checkpoint_every or self.resume) and self.checkpoint_dir is None and self.out is None:
            raise ValueError("TrainConfig.checkpoint_every/resume need out or checkpoint_dir")
        if self.lr < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.lr and grad_clip must be >= 0")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"TrainConfig.device ({self.device!r}) must be auto, cpu or cuda[:N]")


@dataclass(frozen=True)
class TrainResult:
    losses: list[float]
    tokens_per_s: float
    metrics_path: Path | None

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' 1-D params (GPT-2 / nanoGPT practice)."""
    def decays(p) -> bool:  # ZeRO-3 flat shards carry the flag of the parameters they hold
        return getattr(p, "zero3_decay", p.dim() >= 2)

    decay = [p for p in model.parameters() if p.requires_grad and decays(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not decays(p)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    # fused (one kernel per group, fp32 math): on a CUDA GPU the foreach AdamW took 79 ms of a 145 ms step of a
    # 1.25B-parameter model (results/profiles/train_profile_h100.csv); the CPU keeps the default implementation
    fused = bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def after_step(model: MoEDecoder, out: ModelOutput, cfg: TrainConfig, dp_group=None) -> None:
    """Per-step gate maintenance: the auxiliary-loss-free expert bias (DeepSeek-V3, sec. 2.1.2) moves
    towards balance from the last step's per-expert counts (summed over the data-parallel group, so
    that every replica applies the same update)."""
    for layer, aux in zip(model.moe_layers(), out.aux):
        update = getattr(layer.gate, "update_bias", None)
        counts = aux.get("tokens_per_expert")
        if update is not None and counts is not None:
            counts = counts.detach()
            if dp_group is not None and dp_group.size > 1:
                import torch.distributed as dist

                counts = counts.clone()
                dist.all_reduce(counts, group=dp_group.pg)
            update(counts, cfg.bias_update_rate)


@dataclass(frozen=True)
class _World:
    rank: int
    world: int
    local_rank: int
    owns_group: bool  # this call initialised the process group (and destroys it at the end)


def _setup_distributed(cfg: TrainConfig) -> _World:
    """Join the torchrun job (env WORLD_SIZE > 1) or use an already initialised group (tests)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not (cfg.backend == "nccl" and "RANK" in os.environ):
        return _World(0, 1, 0, False)  # one process: no process group (torchrun --backend nccl makes one)
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=int(os.environ.get("SEMOE_PG_TIMEOUT_S", "300")))
    # torchrun keeps one TCPStore across restarts: without a per-attempt prefix a restarted gloo group
    # reads the dead attempt's addresses ("connectFullMesh ... Connection refused")
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(f"semoe/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return _World(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _maybe_kill(rank: int, step: int) -> None:
    spec = os.environ.get("SEMOE_KILL_RANK_AT_STEP")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    r, s = (int(v) for v in spec.split(":"))
    if r == rank and s == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _open_metrics(path: Path, start_step: int):
    """Open metrics.csv for writing; on resume keep the rows of steps already done (< start_step)."""
    kept: list[list[str]] = []
    if start_step > 0 and path.is_file():
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < start_step]
    fh = path.open("w", newline="")
    writer = csv.writer(fh)
    writer.writerow(METRIC_COLUMNS)
    writer.writerows(kept)
    fh.flush()
    return fh, writer


def train(spec: ModelSpec, cfg: TrainConfig) -> TrainResult:
    """Train ``spec``; single process, or one rank of a data x expert parallel job (see module doc)."""
    w = _setup_distributed(cfg)
    try:
        return _train(spec, cfg, w)
    finally:
        if w.owns_group:
            import gc

            import torch.distributed as dist

            from reference.parallel.groups import _PG_CACHE

            _PG_CACHE.clear()  # drop our references so every group dies with the process group
            gc.collect()
            dist.destroy_process_group()


def _train(spec: ModelSpec, cfg: TrainConfig, w: _World) -> TrainResult:
    plan = cfg.plan or ParallelPlan(data_parallel=w.world)
    if plan.data_parallel != w.world:
        raise ValueError(f"ParallelPlan.data_parallel ({plan.data_parallel}) must equal the world size ({w.world})")
    if cfg.batch_size % w.world:
        raise ValueError(f"TrainConfig.batch_size ({cfg.batch_size}) must be divisible by the world size ({w.world})")
    distributed = w.world > 1 or w.owns_group
    parallel = distributed or plan.zero_stage == 3  # ZeRO-3 at world size 1: groups of one, still sharded
    if distributed and _backend_name() == "nccl":
        device = torch.device("cuda", w.local_rank)
    else:
        device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    data = SyntheticTokens(spec.vocab) if cfg.synthetic else ByteCorpus(cfg.data)
    if data.vocab > spec.vocab:
        raise ValueError(f"the data has {data.vocab} symbols but the model's vocab is {spec.vocab}")
    if spec.position == "learned" and cfg.seq_len > spec.max_seq:
        raise ValueError(f"seq_len ({cfg.seq_len}) must be <= the model's max_seq ({spec.max_seq})")

    model = MoEDecoder(spec, seed=cfg.seed)
    param_dtype = torch.float64 if spec.dtype == "fp64" else torch.float32
    model = model.to(device=device, dtype=param_dtype)
    autocast_dtype = TORCH_DTYPES[spec.dtype] if device.type == "cuda" and spec.dtype in ("bf16", "fp16") else None

    tracer = None
    if cfg.trace:
        from reference.parallel.trace_hooks import Tracer, instrument_moe

        tracer = Tracer(w.rank, cuda=device.type == "cuda")
    sync = groups = None
    span_sinks: list = []  # ZeRO-3 gather spans -> the offload engine's trace (one timeline with its copies)
    if parallel:
        from reference.parallel.parallelize import parallelize

        model, sync = parallelize(model, plan, on_bucket=tracer.bucket_hook if tracer else None,
                                  on_gather=tracer.gather_hook if tracer else None,
                                  on_span=(lambda *a: [f(*a) for f in span_sinks]) if tracer else None)
        groups = sync.groups
        if plan.embedding_partition:  # SE-MoE embedding partition: rank k keeps hidden columns k/N
            from reference.parallel.embedding import partition_embedding

            sync = partition_embedding(model, groups, sync)
    if tracer is not None:
        instrument_moe(model, tracer)
    offload = _make_offload(model, plan, cfg, device, autocast_dtype, w.rank if parallel else None)
    if offload is not None and sync is not None:
        sync.attach_offload(offload)  # expert grads: reduced over EDP and clipped from the engine's accumulators
        if cfg.trace:
            span_sinks.append(offload.span)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)

    ckpt_dir = cfg.checkpoint_dir or (cfg.out / "checkpoints" if cfg.out is not None else None)
    start_step = 0
    if cfg.resume and ckpt_dir is not None:
        from reference.checkpoint import latest_checkpoint, load_checkpoint

        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            extra = load_checkpoint(latest, model, opt, zero3=sync.zero3 if sync is not None else None)
            gen.set_state(extra["data_gen"])
            start_step = int(extra["next_step"])

    lead = w.rank == 0
    metrics_path = None
    writer = fh = None
    if cfg.out is not None and lead:
        cfg.out.mkdir(parents=True, exist_ok=True)
        spec.to_yaml(cfg.out / "model.yaml")
        if distributed or cfg.plan is not None:
            plan.to_yaml(cfg.out / "plan.yaml")
        metrics_path = cfg.out / "metrics.csv"
        fh, writer = _open_metrics(metrics_path, start_step)

    losses: list[float] = []
    tokens_done, t_start = 0, time.perf_counter()
    progress = _progress(cfg) if lead else None
    per_rank = cfg.batch_size // w.world
    try:
        task = progress.add_task(f"train {spec.name}", total=cfg.steps, completed=start_step) if progress else None
        for step in range(start_step, cfg.steps):
            _maybe_kill(w.rank, step)
            t0 = time.perf_counter()
            if tracer is not None:
                tracer.micro_batch = step
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x, y = data.batch(cfg.batch_size, cfg.seq_len, gen)  # the global batch, same on every rank
            if distributed:
                x, y = x[w.rank * per_rank : (w.rank + 1) * per_rank], y[w.rank * per_rank : (w.rank + 1) * per_rank]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            tf = tracer.now() if tracer else 0.0
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(x, y)
            opt.zero_grad(set_to_none=True)
            if tracer:
                tb = tracer.now()
                tracer.add("forward", tf, tb)
            out.loss.backward()
            if sync is not None:
                sync.finish()
                grad_norm = sync.clip(cfg.grad_clip or float("inf"))
                if offload is not None:
                    offload.step(lr_at(step, cfg))
            elif offload is not None:  # dense and expert gradients clipped together, then the CPU update queued
                grad_norm = offload.clip_grad_norm_(model, cfg.grad_clip or float("inf"))
                offload.step(lr_at(step, cfg))
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            if tracer:
                to = tracer.now()
                tracer.add("backward", tb, to)
            opt.step()
            after_step(model, out, cfg, groups.dp if groups is not None else None)
            if tracer:
                tracer.add("optimizer", to, tracer.now())
            stats = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).double()
            if distributed:
                import torch.distributed as dist

                dist.all_reduce(stats, group=groups.dp.pg)
                stats /= w.world
            loss, lm_loss, aux_loss = (float(v) for v in stats)  # synchronises: the step time is real
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}")
            dt = time.perf_counter() - t0
            tokens_done += x.numel() * w.world
            losses.append(loss)
            if writer is not None:
                writer.writerow(
                    [step, repr(loss), f"{lm_loss:.6f}", f"{aux_loss:.6f}",
                     f"{float(grad_norm):.6f}", f"{opt.param_groups[0]['lr']:.6g}",
                     f"{x.numel() * w.world / dt:.1f}", f"{time.perf_counter() - t_start:.4f}"]
                )
                fh.flush()
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and ckpt_dir is not None:
                from reference.checkpoint import save_checkpoint

                save_checkpoint(ckpt_dir, step + 1, model, opt, edp_rank=groups.edp.rank if groups else 0,
                                extra={"next_step": step + 1, "data_gen": gen.get_state()},
                                plan=plan.to_dict(), zero3=sync.zero3 if sync is not None else None)
            if progress:
                progress.update(task, advance=1, description=f"train {spec.name} loss {loss:.3f}")
    finally:
        if progress:
            progress.stop()
        if fh is not None:
            fh.close()
        if offload is not None:
            offload.close()
    if offload is not None:
        _finish_offload(offload, cfg, w.rank if parallel else None)
    if tracer is not None and cfg.out is not None:
        from semoe.trace import write_chrome_trace, write_csv

        write_csv(tracer.rows, cfg.out / f"trace_rank{w.rank}.csv")
        write_chrome_trace(tracer.rows, cfg.out / f"trace_rank{w.rank}.json")
    tokens_per_s = tokens_done / (time.perf_counter() - t_start)
    return TrainResult(losses=losses, tokens_per_s=tokens_per_s, metrics_path=metrics_path)


def _make_offload(model, plan: ParallelPlan, cfg: TrainConfig, device, autocast_dtype, rank: int | None):
    """The expert offload engine when plan.offload moves expert states off the GPU (else None).

    ``rank`` is None for a plain single process; in a parallelized run (``parallelize`` already applied:
    this rank's local experts, ZeRO-3 shards) it is the global rank: the engine takes this rank's experts
    and its SSD tier lives in ``ssd_dir/rank<r>``."""
    if {plan.offload.expert_params, plan.offload.expert_optimizer} == {"gpu"}:
        return None
    if cfg.checkpoint_every or cfg.resume:
        raise ValueError("checkpointing is not supported together with expert offload")
    if plan.embedding_partition:
        raise ValueError("expert offload is not combined with embedding_partition (use one or the other)")
    from reference.offload import ExpertOffload

    ssd_dir = cfg.ssd_dir or (cfg.out / "ssd" if cfg.out is not None else None)
    if rank is not None and ssd_dir is not None:
        ssd_dir = Path(ssd_dir) / f"rank{rank}"  # block names are per local expert: one directory per rank
    return ExpertOffload(model, plan, device=device, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay,
                         compute_dtype=autocast_dtype, ssd_dir=ssd_dir, trace=cfg.trace, rank=rank or 0,
                         compute_spans=rank is not None)


def _finish_offload(offload, cfg: TrainConfig, rank: int | None = None) -> None:
    """Flush the SSD tier; write offload_stats.json (and offload_trace.csv with cfg.trace: the engine's copies,
    SSD I/O, CPU AdamW and compute spans, plus the ZeRO-3 gathers) into out/ (``_rank<r>`` suffix when
    parallelized)."""
    offload.flush()
    if cfg.out is None:
        return
    import json

    from semoe.io import atomic_write_text
    from semoe.trace import write_csv

    sfx = "" if rank is None else f"_rank{rank}"
    atomic_write_text(cfg.out / f"offload_stats{sfx}.json", json.dumps(offload.stats(), indent=1, sort_keys=True))
    if cfg.trace:
        write_csv(offload.trace_rows(), cfg.out / f"offload_trace{sfx}.csv")


def _backend_name() -> str:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else ""


def _progress(cfg: TrainConfig):
    if not cfg.progress:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    p.start()
    return p


# ------------------------------------------------------------------------------ torchrun entry
def override_spec(spec: ModelSpec, **changes) -> ModelSpec:
    """The spec with the given fields replaced at once (None: keep), so that e.g. gate=switch and
    top_k=1 are validated together."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return spec.replace(**changes) if changes else spec


def offload_plan_fields(experts: str, prefetch_depth: int, cpu_cache_experts: int) -> dict:
    """ParallelPlan fields of ``--offload-experts/--prefetch-depth/--cpu-cache-experts`` (empty for gpu)."""
    if experts not in ("gpu", "cpu", "ssd"):
        raise ValueError(f"--offload-experts: {experts!r} is not one of gpu, cpu, ssd")
    if experts == "gpu":
        return {}
    from semoe.plan_spec import OffloadPlacement

    return {"offload": OffloadPlacement(expert_params=experts, expert_optimizer=experts),
            "prefetch_depth": prefetch_depth, "cpu_cache_experts": cpu_cache_experts if experts == "ssd" else 0}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference.train", description="Train the reference model "
                                "(one process, or one rank of a torchrun job).")
    p.add_argument("--preset", "--model", default="tiny", help="model preset name or YAML file")
    p.add_argument("--gate", default=None)
    p.add_argument("--top-k", type=int, default=None, help="override the model's top-k")
    p.add_argument("--dtype", default=None, help="override the model dtype (fp32, fp64, bf16, fp16)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/train"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: the world size)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--a2a", default="flat", choices=("flat", "hetu", "rail"))
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--bucket-bytes", type=int, default=0)
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 3), help="3: dense params sharded in the node")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--trace", action="store_true")
    p.add_argument("--embedding-partition", action="store_true", help="split the embedding's columns over DP")
    p.add_argument("--offload-experts", default="gpu", choices=("gpu", "cpu", "ssd"),
                   help="where expert weights and optimizer states live (reference.offload)")
    p.add_argument("--prefetch-depth", type=int, default=1, help="MoE layers fetched ahead (0: on demand)")
    p.add_argument("--cpu-cache-experts", type=int, default=0, help="full expert states per MoE layer in the CPU cache (ssd)")
    p.add_argument("--ssd-dir", type=Path, default=None, help="directory of the SSD tier (default OUT/ssd)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m reference.train ...`` (or ``python -m reference.train``)."""
    args = build_arg_parser().parse_args(argv)
    from semoe.presets import load_model
    from semoe.spec_base import SpecError

    try:
        spec = override_spec(load_model(args.preset), gate=args.gate, top_k=args.top_k, dtype=args.dtype)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        plan = ParallelPlan(data_parallel=args.dp or world, expert_parallel=args.ep, alltoall=args.a2a,
                            gpus_per_node=args.gpus_per_node, fusion_bucket_bytes=args.bucket_bytes,
                            zero_stage=args.zero_stage, embedding_partition=args.embedding_partition,
                            **offload_plan_fields(args.offload_experts, args.prefetch_depth, args.cpu_cache_experts))
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                          data=args.data, synthetic=args.synthetic, device=args.device, seed=args.seed,
                          out=args.out, progress=not args.quiet, plan=plan, backend=args.backend,
                          checkpoint_every=args.checkpoint_every, resume=args.resume, trace=args.trace,
                          ssd_dir=args.ssd_dir)
        result = train(spec, cfg)
    except (SpecError, ValueError, FileNotFoundError) as e:
        print(f"reference.train: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {spec.name} for {args.steps} steps on {plan.data_parallel} rank(s) (EP {plan.expert_parallel}, "
              f"{plan.alltoall}): loss {result.first_loss:.4f} -> {result.last_loss:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s; metrics in {result.metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
