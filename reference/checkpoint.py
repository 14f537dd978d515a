"""Sharded training checkpoints: atomic, checksummed, resumable exactly, reshardable across EP sizes.

Layout (one directory per saved step, one shard per rank)::

    <dir>/step_000020/rank_00000.pt ... rank_<W-1>.pt    torch.save of a dict (below)
    <dir>/step_000020/manifest.json                      step, world, plan, per shard: bytes + sha256
    <dir>/latest                                         "step_000020" (written last)

A shard holds what only its rank knows, so nothing is stored twice:

* ``dense`` / ``optim_dense``: replicated parameters and their AdamW states, on global rank 0 only;
* ``experts`` / ``optim_experts``: the rank's expert slice ``{name: (lo, hi, tensor)}`` (global
  expert ids lo..hi-1), on the first replica of each slice only (``edp.rank == 0``);
* ``rng``: this rank's torch CPU (and CUDA) generator states; ``extra``: the caller's state
  (data-generator state, step), the same on all ranks.

Write protocol (DESIGN.md "never a half-written file"): every rank writes its shard to a temp name
inside ``.step_000020.tmp/`` and renames it; a barrier; rank 0 hashes the shards, writes the manifest
(temp + rename), renames the directory to ``step_000020`` and finally rewrites ``latest``. A crash at
any point leaves the previous complete checkpoint as ``latest``.

Load: the manifest's size and sha256 are checked for every shard before anything is read; a corrupt
or truncated shard raises :class:`CheckpointError` naming the file. Experts are reassembled by
global id from all shards and sliced to this rank's range, so a checkpoint saved at EP=4 loads at
EP=2 or EP=1 (and the reverse). Every rank reads every shard: fine for the reference's model sizes;
a production loader would read only the overlapping shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semoe.io import atomic_write_bytes, atomic_write_text

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message names the file."""


def _dist():
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return (dist if on else None), (dist.get_rank() if on else 0), (dist.get_world_size() if on else 1)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def expert_ranges(model: nn.Module) -> dict[str, range]:
    """Parameter name -> global expert ids it holds, for every routed-expert parameter."""
    from reference.moe.layer import MoELayer

    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, MoELayer):
            rng = getattr(m, "expert_range", range(m.experts.num_experts))
            for pname, _ in m.experts.named_parameters():
                out[f"{mname}.experts.{pname}" if mname else f"experts.{pname}"] = rng
    return out


def _optim_state_by_name(model: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, dict[str, Any]]:
    if opt is None:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(s) for p, s in opt.state.items() if id(p) in names}


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    opt: torch.optim.Optimizer | None = None,
    *,
    edp_rank: int = 0,
    extra: dict[str, Any] | None = None,
    plan: dict | None = None,
    zero3=None,
) -> Path:
    """Collective over all ranks: write ``root/step_<step>`` and point ``latest`` at it.

    ``zero3`` (a :class:`reference.parallel.zero3.Zero3`): dense parameters and states are gathered
    from the node's shards and stored by their original names (same format as unsharded)."""
    dist, rank, world = _dist()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    if dist is not None:
        dist.barrier()
    ranges = expert_ranges(model)
    optim = _optim_state_by_name(model, opt)
    shard: dict[str, Any] = {"version": FORMAT_VERSION, "rank": rank, "world": world, "step": step,
                             "dense": {}, "optim_dense": {}, "experts": {}, "optim_experts": {}}
    if zero3 is not None:  # collective: every rank gathers, rank 0 keeps
        zdense, zoptim = zero3.full_state(), (zero3.full_optim_state(opt) if opt is not None else {})
        if rank == 0:
            shard["dense"].update(zdense)
            shard["optim_dense"].update({n: _cpu(v) for n, v in zoptim.items()})
    for name, p in model.named_parameters():
        if zero3 is not None and name.startswith("zero3_shards."):
            continue
        if name in ranges:
            if edp_rank == 0:
                r = ranges[name]
                shard["experts"][name] = (r.start, r.stop, p.detach().cpu())
                if name in optim:
                    shard["optim_experts"][name] = (r.start, r.stop, _cpu(optim[name]))
        elif rank == 0:
            shard["dense"][name] = p.detach().cpu()
            if name in optim:
                shard["optim_dense"][name] = _cpu(optim[name])
    if rank == 0:
        shard["buffers"] = {n: b.detach().cpu() for n, b in model.named_buffers()}
    shard["rng"] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        shard["rng"]["cuda"] = torch.cuda.get_rng_state()
    shard["extra"] = extra or {}
    buf = io.BytesIO()
    torch.save(shard, buf)
    atomic_write_bytes(tmp / f"rank_{rank:05d}.pt", buf.getvalue())
    if dist is not None:
        dist.barrier()
    if rank == 0:
        files = {}
        for r in range(world):
            path = tmp / f"rank_{r:05d}.pt"
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {"version": FORMAT_VERSION, "step": step, "world": world, "plan": plan or {}, "shards": files}
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():  # a restarted run saving the same step again
            old = root / f".{step_dir_name(step)}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
    if dist is not None:
        dist.barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The directory ``latest`` names, or None when there is no complete checkpoint."""
    root = Path(root)
    f = root / LATEST
    if not f.is_file():
        return None
    d = root / f.read_text().strip()
    if not (d / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {d}: {MANIFEST} is missing (latest points at an incomplete checkpoint)")
    return d


def verify_checkpoint(path: str | Path) -> dict:
    """Check every shard's size and sha256 against the manifest; return the manifest."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} not found")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {mpath} is corrupt: {e}") from None
    for name, info in manifest["shards"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint shard {f} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint shard {f} is truncated or corrupt: {size} bytes, manifest says {info['bytes']}")
        digest = _sha256(f)
        if digest != info["sha256"]:
            raise CheckpointError(f"checkpoint shard {f} is corrupt: sha256 {digest[:12]}... != manifest {info['sha256'][:12]}...")
    return manifest


def load_checkpoint(
    path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None, *, restore_rng: bool = True,
    zero3=None,
) -> dict[str, Any]:
    """Load a (verified) checkpoint into ``model``/``opt`` at this rank's expert range; return ``extra``.

    RNG states are restored when the world size matches the saved one (exact resume); after a
    reshard they are left alone (the run continues, not bit-exactly).
    """
    _, rank, world = _dist()
    path = Path(path)
    manifest = verify_checkpoint(path)
    shards = [torch.load(path / name, map_location="cpu", weights_only=False) for name in sorted(manifest["shards"])]
    dense, optim_dense, buffers = {}, {}, {}
    pieces: dict[str, list[tuple[int, int, Any]]] = {}
    opieces: dict[str, list[tuple[int, int, Any]]] = {}
    for s in shards:
        dense.update(s["dense"])
        optim_dense.update(s["optim_dense"])
        buffers.update(s.get("buffers", {}))
        for n, piece in s["experts"].items():
            pieces.setdefault(n, []).append(piece)
        for n, piece in s["optim_experts"].items():
            opieces.setdefault(n, []).append(piece)
    ranges = expert_ranges(model)
    params = dict(model.named_parameters())
    if zero3 is not None:
        try:
            zero3.load_full(dense, optim_dense, opt)
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path}: {e.args[0]}") from None
        params = {n: p for n, p in params.items() if not n.startswith("zero3_shards.")}
    with torch.no_grad():
        for name, p in params.items():
            if name in ranges:
                r = ranges[name]
                p.copy_(_slice(pieces, name, r, path))
            else:
                if name not in dense:
                    raise CheckpointError(f"checkpoint {path}: parameter {name!r} not found")
                p.copy_(dense[name])
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    if opt is not None:
        for name, p in params.items():
            if name in ranges:
                if name not in opieces:
                    continue
                r = ranges[name]
                st = _slice_state(opieces[name], r)
            elif name in optim_dense:
                st = optim_dense[name]
            else:
                continue
            opt.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in st.items()}
    mine = shards[rank] if manifest["world"] == world and rank < len(shards) else None
    if restore_rng and mine is not None:
        torch.set_rng_state(mine["rng"]["torch"])
        if "cuda" in mine["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["rng"]["cuda"])
    return dict(shards[0]["extra"])


def _slice(pieces: dict, name: str, r: range, path: Path) -> torch.Tensor:
    if name not in pieces:
        raise CheckpointError(f"checkpoint {path}: expert parameter {name!r} not found")
    out = []
    for lo, hi, t in sorted(pieces[name], key=lambda x: x[0]):
        a, b = max(lo, r.start), min(hi, r.stop)
        if a < b:
            out.append(t[a - lo : b - lo])
    full = torch.cat(out) if out else None
    if full is None or full.shape[0] != len(r):
        raise CheckpointError(f"checkpoint {path}: experts {r.start}..{r.stop - 1} of {name!r} are not all saved")
    return full


def _slice_state(pieces: list, r: range) -> dict[str, Any]:
    pieces = sorted(pieces, key=lambda x: x[0])
    out: dict[str, Any] = {}
    for key in pieces[0][2]:
        v0 = pieces[0][2][key]
        if torch.is_tensor(v0) and v0.dim() > 0:
            parts = [st[key][max(lo, r.start) - lo : min(hi, r.stop) - lo] for lo, hi, st in pieces
                     if max(lo, r.start) < min(hi, r.stop)]
            out[key] = torch.cat(parts)
        else:
            out[key] = v0
    return out


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
