"""Session-wide test set-up.

Triton kernels run in Triton's interpreter on machines without a GPU (CI). TRITON_INTERPRET must be
set before Triton is first imported by anything (DeepSpeed, torch.compile, the kernels), so it is set
here, in the root conftest, which pytest loads first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
