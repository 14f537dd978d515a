"""ParallelPlan: how a model is spread over ranks and storage tiers.

Convention (DeepSpeed-MoE's): ``data_parallel`` is the number of ranks, each holding a replica (or a
ZeRO shard) of the dense parameters; experts are split over groups of ``expert_parallel`` ranks, and
each expert is replicated over ``data_parallel / expert_parallel`` ranks (its expert-data-parallel
group). ``gpus_per_node`` (optional) overrides the cluster's node size when building node-aware
groups, so that CPU tests can pretend to have nodes of 2 ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from semoe.spec_base import Spec

Tier = Literal["gpu", "cpu", "ssd"]
AllToAll = Literal["flat", "hetu", "rail"]


@dataclass(frozen=True, kw_only=True)
class OffloadPlacement(Spec):
    """Where each class of tensor lives between uses. 'gpu' for all means nothing is offloaded."""

    dense_params: Tier = "gpu"
    dense_optimizer: Tier = "gpu"
    expert_params: Tier = "gpu"
    expert_optimizer: Tier = "gpu"

    def validate(self) -> None:
        if self.dense_params == "ssd":
            self.fail("dense_params", "dense parameters are used every step; 'ssd' is not supported")


@dataclass(frozen=True, kw_only=True)
class ParallelPlan(Spec):
    name: str = "custom"
    data_parallel: int = 1
    expert_parallel: int = 1
    gpus_per_node: int | None = None
    alltoall: AllToAll = "flat"
    zero_stage: Literal[0, 1, 2, 3] = 0
    fusion_bucket_bytes: int = 0  # 0: one collective per tensor (unfused)
    offload: OffloadPlacement = OffloadPlacement()
    prefetch_depth: int = 0  # layers fetched ahead (2D prefetch); 0: fetch on demand
    cpu_cache_experts: int = 0  # experts whose full state the pinned CPU cache holds (per rank)
    # CPU cache policy, the paper's Algorithm 2 (LFU with decayed hit counts); the paper gives no values.
    cache_decay: float = 0.5  # beta: every hit count is multiplied by this every `cache_decay_every` steps
    cache_decay_every: int = 10  # K, in training steps
    cache_admit_hits: float = 1.0  # an expert enters the CPU cache once its decayed hit count reaches this
    ring_slots: int | None = None  # ring-memory inference slots; None: chosen from the memory budget
    embedding_partition: bool = False
    elastic: bool = False
    recompute_experts: bool = False

    def validate(self) -> None:
        self.require_positive("data_parallel", "expert_parallel", "gpus_per_node", "ring_slots")
        self.require_non_negative("fusion_bucket_bytes", "prefetch_depth", "cpu_cache_experts", "cache_admit_hits")
        self.require_positive("cache_decay_every")
        if not 0.0 < self.cache_decay <= 1.0:
            self.fail("cache_decay", f"must be in (0, 1], got {self.cache_decay}")
        if self.data_parallel % self.expert_parallel:
            self.fail(
                "expert_parallel",
                f"data_parallel ({self.data_parallel}) must be divisible by expert_parallel "
                f"({self.expert_parallel})",
            )
        if self.gpus_per_node is not None and self.data_parallel % self.gpus_per_node:
            self.fail(
                "gpus_per_node",
                f"data_parallel ({self.data_parallel}) must be divisible by gpus_per_node "
                f"({self.gpus_per_node})",
            )
        if self.alltoall != "flat" and self.gpus_per_node is not None and self.gpus_per_node < 2:
            self.fail("alltoall", f"hierarchical all-to-all '{self.alltoall}' needs gpus_per_node >= 2")
        offloaded = {self.offload.expert_params, self.offload.expert_optimizer} - {"gpu"}
        if self.cpu_cache_experts and not offloaded:
            self.fail("cpu_cache_experts", "a CPU expert cache needs expert states offloaded (offload.expert_*)")

    @property
    def world_size(self) -> int:
        return self.data_parallel

    @property
    def expert_data_parallel(self) -> int:
        return self.data_parallel // self.expert_parallel
