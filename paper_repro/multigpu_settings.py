"""The multi-GPU run's settings (`paper_repro.multigpu_run`): the parts and collectives it knows, the MoE layer
configs, and the command-line arguments validated against the world size into one frozen `Settings` (the same on
every rank, fixed before the process group exists); a bad value is a `RunError` of one line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from semoe.moe_layer_configs import MOE_LAYER_CONFIGS, MoELayerConfig

PARTS = ("collectives", "moe", "train")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven")
KiB, MiB, GiB = 1024, 1024**2, 1024**3


class RunError(Exception):
    """A configuration that cannot run (printed as one line, exit status 2)."""



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
