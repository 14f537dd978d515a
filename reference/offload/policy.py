"""CPU expert cache policy: a routing hit table on the GPU feeding the shared LFU cache (Algorithm 2).

The decisions are those of :class:`semoe.lfu_cache.LFUCache`, the one implementation that the
simulator uses too (``simulator/workload/offload.py``), so a measured hit rate and a predicted one
come from the same policy:

1. Hit table ``hits_LE`` (float per (MoE layer, expert)) lives on the model's device. Every forward
   of layer l adds the router's token counts: ``hits_LE[l] += tokens_per_expert_E``. The counts are
   already on the device, so this needs no host sync. Micro-batches add up.
2. Once per optimizer step, :meth:`ExpertCachePolicy.end_step` reads the table on the host (one small
   copy, at the step's end) and zeroes it. It then calls ``LFUCache.touch({(l, e): tokens})`` for the
   experts that received tokens: each one's decayed count grows by its tokens; it is a *hit* if
   cached, else a *miss*; misses are *admitted* (most frequent first) once their count reaches
   ``cache_admit_hits``, evicting the cached key with the lowest count only if that count is strictly
   lower. Then ``LFUCache.step()``: every ``cache_decay_every`` (K) steps all counts are multiplied by
   ``cache_decay`` (beta).
3. Capacity: ``cpu_cache_experts`` experts per MoE layer (x layers in all), as
   ``semoe.sizing.state_bytes_per_tier`` reserves DRAM for them.

The engine (:mod:`reference.offload.engine`) carries the decisions out in its per-layer host tasks:
states of hits come from the cache, misses from the SSD; admitted states stay in the cache (dirty);
evicted states are written back to the SSD once their layer has been updated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from semoe.lfu_cache import LFUCache, TouchResult

Key = tuple[int, int]


class ExpertCachePolicy:
    def __init__(self, layers: int, experts: int, capacity_per_layer: int, *, beta: float = 0.5, every: int = 10,
                 threshold: float = 1.0, device: torch.device | str = "cpu") -> None:
        if capacity_per_layer < 0 or layers < 1 or experts < 1:
            raise ValueError(f"ExpertCachePolicy: need capacity_per_layer >= 0, layers >= 1, experts >= 1 "
                             f"(got {capacity_per_layer}, {layers}, {experts})")
        self.layers, self.experts = layers, experts
        self.lfu = LFUCache(min(capacity_per_layer, experts) * layers, beta, every, threshold)
        self.hits_LE = torch.zeros(layers, experts, dtype=torch.float32, device=device)

    @property
    def capacity(self) -> int:
        return self.lfu.capacity

    @property
    def resident(self) -> set:
        return self.lfu.cached

    def record(self, layer: int, tokens_per_expert_E: Tensor) -> None:
        """Routing counts of one forward of ``layer`` (device tensor; no host sync)."""
        self.hits_LE[layer] += tokens_per_expert_E.detach().to(self.hits_LE.dtype)

    def end_step(self) -> tuple[TouchResult, Tensor]:
        """The step's counts (host snapshot, then zeroed) into the LFU cache; returns its decisions."""
        snap = self.hits_LE.to("cpu", copy=True)
        self.hits_LE.zero_()
        used = {(layer, e): float(snap[layer, e]) for layer, e in torch.nonzero(snap > 0).tolist()}
        res = self.lfu.touch(used)
        self.lfu.step()
        return res, snap

    def stats(self) -> dict[str, float]:
        c = self.lfu
        return {"cache_hits": c.hits, "cache_misses": c.misses, "cache_evictions": c.evictions,
                "cache_admissions": c.admissions, "cache_hit_rate": c.hit_rate}
