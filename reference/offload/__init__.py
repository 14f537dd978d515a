"""Hierarchical storage of expert states (GPU pool / pinned host / SSD) with 2D prefetch and a CPU AdamW.

Modules: :mod:`reference.offload.ssd` (checksummed, atomically flushed expert blocks),
:mod:`reference.offload.policy` (LFU cache with decayed hit counts, the paper's Algorithm 2),
:mod:`reference.offload.cpu_adam` (AdamW over flat fp32 views, exact or fused),
:mod:`reference.offload.engine` (:class:`ExpertOffload`; its parts in ``engine_state``, ``engine_pool`` and
``engine_update``: records and host threads, the GPU pool with its hooks, gradients and the step),
:mod:`reference.offload.bench` (the H100 benchmark). Design notes and measurements: ``NOTES.md``.
"""

from reference.offload.engine import ExpertOffload
from reference.offload.policy import ExpertCachePolicy
from reference.offload.ssd import SSDStore, SSDStoreError

__all__ = ["ExpertCachePolicy", "ExpertOffload", "SSDStore", "SSDStoreError"]
