"""Single-process training loop for the reference model (the distributed loop builds on it later).

AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with linear warm-up and cosine decay,
global-norm gradient clipping, fp32 on the CPU and bf16 autocast on the GPU, seeded data and init.
Each step appends one row to ``out/metrics.csv`` (flushed, so a killed run keeps what it logged):
``step,loss,lm_loss,aux_loss,grad_norm,lr,tokens_per_s,elapsed_s``.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from reference.data import ByteCorpus, SyntheticTokens
from reference.model import MoEDecoder, ModelOutput
from semoe.model_spec import ModelSpec

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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} ({getattr(self, name)}) must be >= 1")
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
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def after_step(model: MoEDecoder, out: ModelOutput, cfg: TrainConfig) -> None:
    """Per-step gate maintenance: the auxiliary-loss-free expert bias (DeepSeek-V3, sec. 2.1.2) moves
    towards balance from the last step's per-expert counts."""
    for layer, aux in zip(model.moe_layers(), out.aux):
        update = getattr(layer.gate, "update_bias", None)
        counts = aux.get("tokens_per_expert")
        if update is not None and counts is not None:
            update(counts.detach(), cfg.bias_update_rate)


def train(spec: ModelSpec, cfg: TrainConfig) -> TrainResult:
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
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)

    metrics_path = None
    writer = fh = None
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        spec.to_yaml(cfg.out / "model.yaml")
        metrics_path = cfg.out / "metrics.csv"
        fh = metrics_path.open("w", newline="")
        writer = csv.writer(fh)
        writer.writerow(METRIC_COLUMNS)

    losses: list[float] = []
    tokens_done, t_start = 0, time.perf_counter()
    progress = _progress(cfg)
    try:
        task = progress.add_task(f"train {spec.name}", total=cfg.steps) if progress else None
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            x, y = data.batch(cfg.batch_size, cfg.seq_len, gen)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(x, y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            after_step(model, out, cfg)
            loss = float(out.loss)  # synchronises the device: the step time below is real
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}")
            dt = time.perf_counter() - t0
            tokens_done += x.numel()
            losses.append(loss)
            if writer is not None:
                writer.writerow(
                    [step, f"{loss:.6f}", f"{float(out.lm_loss):.6f}", f"{float(out.aux_loss):.6f}",
                     f"{float(grad_norm):.6f}", f"{opt.param_groups[0]['lr']:.6g}",
                     f"{x.numel() / dt:.1f}", f"{time.perf_counter() - t_start:.4f}"]
                )
                fh.flush()
            if progress:
                progress.update(task, advance=1, description=f"train {spec.name} loss {loss:.3f}")
    finally:
        if progress:
            progress.stop()
        if fh is not None:
            fh.close()
    tokens_per_s = tokens_done / (time.perf_counter() - t_start)
    return TrainResult(losses=losses, tokens_per_s=tokens_per_s, metrics_path=metrics_path)


def _progress(cfg: TrainConfig):
    if not cfg.progress:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    p.start()
    return p
