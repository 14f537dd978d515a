"""Helpers for the kernel tests (imported by the test modules; conftest.py sets TRITON_INTERPRET)."""

from __future__ import annotations

import pytest
import torch

from kernels import _common

KERNELS_RUN = _common.HAS_TRITON and (torch.cuda.is_available() or _common.INTERPRET)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN, reason="needs triton and either a GPU or TRITON_INTERPRET=1 before triton is imported"
)


def gpu(fn):
    """Mark a test ``gpu`` (real sizes, bf16; run through the device tool) and skip it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere counts as failure (inf)."""
    out, ref = out.detach().double(), ref.detach().double()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}


