"""Build a store with random weights, one MoE block at a time (``semoe infer --init random``).

No model of the preset's size is ever materialised: the dense part (embeddings, attention, norms,
routers; ~1.6B parameters for Mixtral 8x7B) is built once, and the experts of each MoE block are drawn
and written to their own file, so peak memory is ``workers`` blocks' experts (2.8 GB bf16 each for
Mixtral) however many blocks there are.

Init follows MoEDecoder: dense as ``InferenceModel.init_random`` (GPT-2, N(0, 0.02)); experts
``w1``/``w3`` ~ N(0, 0.02), ``w2`` ~ N(0, 0.02 / sqrt(2 layers)), biases 0. Each block's experts come
from their own generator seeded with ``seed * 1_000_003 + block`` on ``gen_device`` (the GPU when
there is one: drawing 90 GB of normals on the CPU takes far longer than writing them), so a store is
reproducible per (seed, device type) and one block can be rebuilt alone.

Blocks are independent, so ``workers`` files are drawn and written at once (threads,
:meth:`StoreWriter.write_layers`; the dense file is one more task): each block's tensors stay on
``gen_device`` until its file is written, copied to the host one tensor at a time, so at most
``workers`` blocks are in GPU memory and ``workers`` tensors in host memory. The files and the manifest
do not depend on ``workers`` (each block has its own generator).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from reference.inference.model import InferenceModel
from reference.inference.store import (
    DTYPE_NAMES,
    MANIFEST,
    StoreWriter,
    default_workers,
    expert_tensor_shapes,
)
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
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a random-weight store for ``spec`` to ``root`` (reused if an identical one exists).

    ``workers``: blocks drawn and written at once (:func:`default_workers` when None; 1 = one block
    after the other, the dense file first, all on this thread)."""
    root = Path(root)
    gen_device = torch.device(gen_device or ("cuda" if torch.cuda.is_available() else "cpu"))
    origin = {"init": "random", "seed": seed, "gen_device": gen_device.type}
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"build_random_store: workers must be >= 1, got {workers}")
    if store_matches(root, spec, dtype, origin):
        if progress:
            progress(f"reusing the store at {root}")
        return root / MANIFEST
    if gen_device.type == "cuda" and gen_device.index is None:
        gen_device = torch.device("cuda", torch.cuda.current_device())  # worker threads start on device 0
    t0 = time.perf_counter()
    w = StoreWriter(root, spec, dtype, origin)

    def make_dense() -> dict[str, torch.Tensor]:
        with torch.device(gen_device):
            dense = InferenceModel(spec).to(dtype=dtype)
        dense.init_random(seed)
        return {k: v.detach() for k, v in dense.state_dict().items()}

    std = 0.02
    out_std = std / math.sqrt(2 * spec.layers)
    shapes = expert_tensor_shapes(spec)

    def draw(block: int) -> dict[str, torch.Tensor]:
        """One block's experts, on ``gen_device`` (copied to the host tensor by tensor as written)."""
        gen = torch.Generator(device=gen_device).manual_seed(seed * 1_000_003 + block)
        tensors = {}
        for name, shape in shapes.items():  # file order = draw order
            if name.startswith("b"):
                tensors[name] = torch.zeros(shape, dtype=dtype)
            else:
                t = torch.empty(shape, dtype=dtype, device=gen_device)
                tensors[name] = t.normal_(0.0, out_std if name == "w2_EFD" else std, generator=gen)
        return tensors

    blocks = [b for b in range(spec.layers) if spec.is_moe_layer(b)]
    w.write_layers(blocks, draw, dense=make_dense, workers=workers, progress=progress)
    if gen_device.type == "cuda":
        torch.cuda.empty_cache()  # the blocks drawn at once, back to the device
    path = w.finish()
    if progress:
        total = sum(f.stat().st_size for f in root.glob("*.bin"))
        progress(f"store written: {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s ({workers} workers)")
    return path
