"""Helpers shared by the kernel modules: when to launch Triton, device facts, input checks.

A kernel launches when its tensors are on a CUDA device, or on the CPU when ``TRITON_INTERPRET=1`` was
set before Triton was imported (the CI path: the Triton interpreter runs the same kernel code through
NumPy). Otherwise every public op falls back to its torch reference in :mod:`kernels.reference`, so the
package imports and works on a machine without Triton or without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional: CPU users without it get the torch references.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors should go through the Triton kernels."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)


@functools.lru_cache(maxsize=None)
def num_programs_persistent(device_index: int | None) -> int:
    """Programs for a persistent grid: one per SM on a GPU, a few in the interpreter (fast tests)."""
    if device_index is None:
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_index(t: torch.Tensor) -> int | None:
    return t.device.index if t.is_cuda and t.device.index is not None else (0 if t.is_cuda else None)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def check(cond: bool, msg: str) -> None:
    """Input checks raise ValueError with one line that names the argument."""
    if not cond:
        raise ValueError(msg)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied exactly ("ieee"); 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"
