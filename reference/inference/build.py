"""Build a store with random weights, one MoE block at a time (``semoe infer --init random``).

No model of the preset's size is ever materialised: the dense part (embeddings, attention, norms,
routers; ~1.6B parameters for Mixtral 8x7B) is built once, and the experts of each MoE block are drawn
and written to their own file before the next block's are drawn, so peak host memory is one block's
experts (2.8 GB bf16 for Mixtral) however many blocks there are.

Init follows MoEDecoder: dense as ``InferenceModel.init_random`` (GPT-2, N(0, 0.02)); experts
``w1``/``w3`` ~ N(0, 0.02), ``w2`` ~ N(0, 0.02 / sqrt(2 layers)), biases 0. Each block's experts come
from their own generator seeded with ``seed * 1_000_003 + block`` on ``gen_device`` (the GPU when
there is one: drawing 90 GB of normals on the CPU takes far longer than writing them), so a store is
reproducible per (seed, device type) and one block can be rebuilt alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from reference.inference.model import InferenceModel
from reference.inference.store import DTYPE_NAMES, MANIFEST, StoreWriter, expert_tensor_shapes
from semoe.model_spec import ModelSpec


def store_matches(root: Path, spec: ModelSpec, dtype: torch.dtype, origin: dict) -> bool:
    """A complete store for exactly this spec, dtype and origin already exists at ``root``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return m.get("spec") == spec.to_dict() and m.get("dtype") == DTYPE_NAMES[dtype] and m.get("origin") == origin


def build_random_store(
    root: str | Path,
    spec: ModelSpec,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    gen_device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a random-weight store for ``spec`` to ``root`` (reused if an identical one exists)."""
    root = Path(root)
    gen_device = torch.device(gen_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    origin = {"init": "random", "seed": seed, "gen_device": gen_device.type}
    if store_matches(root, spec, dtype, origin):
        if progress:
            progress(f"reusing the store at {root}")
        return root / MANIFEST
    w = StoreWriter(root, spec, dtype, origin)
    with torch.device(gen_device):
        dense = InferenceModel(spec).to(dtype=dtype)
    dense.init_random(seed)
    w.write_dense({k: v.detach() for k, v in dense.state_dict().items()})
    del dense
    if progress:
        progress(f"dense weights written ({(root / 'dense.bin').stat().st_size / 1e9:.2f} GB)")
    std = 0.02
    out_std = std / math.sqrt(2 * spec.layers)
    shapes = expert_tensor_shapes(spec)
    for block in range(spec.layers):
        if not spec.is_moe_layer(block):
            continue
        gen = torch.Generator(device=gen_device).manual_seed(seed * 1_000_003 + block)
        tensors = {}
        for name, shape in shapes.items():
            if name.startswith("b"):
                tensors[name] = torch.zeros(shape, dtype=dtype)
            else:
                t = torch.empty(shape, dtype=dtype, device=gen_device)
                t.normal_(0.0, out_std if name == "w2_EFD" else std, generator=gen)
                tensors[name] = t.cpu()
        w.write_layer(block, tensors)
        del tensors
        if progress:
            progress(f"block {block}: experts written")
    return w.finish()
