"""Kernel tests: Triton's interpreter on the CPU (CI), real launches on a GPU.

TRITON_INTERPRET must be set before Triton is first imported; this conftest does it when there is no
GPU. (If another package imported Triton earlier in the same session, the kernel tests skip rather
than silently compare the torch fallback with itself: see ``ktest_util.needs_kernels``.)
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # also set by tests/conftest.py, before anything imports Triton
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture
def poison(monkeypatch):
    """Fill every torch.empty / empty_like / new_empty with NaN (floats) or a sentinel (ints), so a
    kernel that leaves an output element unwritten fails the comparison."""
    orig_empty, orig_like = torch.empty, torch.empty_like
    orig_new = torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.uint8:
            t.fill_(201)
        elif t.dtype != torch.bool:
            t.fill_(-777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(orig_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(orig_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(orig_new(self, *a, **k)))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
