"""ClusterSpec: the hardware a run executes on (real, or simulated by `simulator/`).

A cluster is ``nodes`` x ``gpus_per_node`` GPUs. Inside a node GPUs talk over NVLink/NVSwitch
(``nvlink``: per-GPU bandwidth each way); each GPU reaches host memory over ``pcie``; nodes talk over
``nics_per_node`` NICs (rail-optimised: leaf switch i joins NIC i of every node) and a spine whose
bandwidth is the leaves' divided by ``spine_oversubscription``. Bandwidths are in GB/s (1e9 bytes/s)
each way, latencies in seconds, capacities in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from semoe.spec_base import Spec


@dataclass(frozen=True, kw_only=True)
class LinkSpec(Spec):
    """One link class: usable bandwidth each way and a per-message latency."""

    bandwidth_GBps: float
    latency_s: float = 0.0

    def validate(self) -> None:
        self.require_positive("bandwidth_GBps")
        self.require_non_negative("latency_s")


@dataclass(frozen=True, kw_only=True)
class GPUSpec(Spec):
    """One GPU model: memory, peak dense bf16 math and HBM bandwidth (datasheet or measured)."""

    name: str
    memory_bytes: int
    bf16_tflops: float
    hbm_GBps: float

    def validate(self) -> None:
        self.require_positive("memory_bytes", "bf16_tflops", "hbm_GBps")


@dataclass(frozen=True, kw_only=True)
class ClusterSpec(Spec):
    name: str = "custom"
    nodes: int = 1
    gpus_per_node: int
    gpu: GPUSpec
    nvlink: LinkSpec | None = None  # None: no GPU-GPU link inside the node (single GPU, or PCIe only)
    pcie: LinkSpec
    nics_per_node: int = 0
    nic: LinkSpec | None = None
    spine_oversubscription: float = 1.0
    host_memory_bytes: int
    host_memory_GBps: float = 100.0
    ssd_bytes: int
    ssd_read_GBps: float
    ssd_write_GBps: float

    def validate(self) -> None:
        self.require_positive("nodes", "gpus_per_node", "host_memory_bytes", "host_memory_GBps")
        self.require_positive("ssd_bytes", "ssd_read_GBps", "ssd_write_GBps")
        self.require_non_negative("nics_per_node")
        if self.spine_oversubscription < 1.0:
            self.fail(
                "spine_oversubscription",
                f"spine_oversubscription ({self.spine_oversubscription}) must be >= 1",
            )
        if self.gpus_per_node > 1 and self.nvlink is None:
            self.fail("nvlink", f"a node of {self.gpus_per_node} GPUs needs an nvlink link")
        if self.nodes > 1 and (self.nics_per_node == 0 or self.nic is None):
            self.fail("nics_per_node", f"{self.nodes} nodes need nics_per_node >= 1 and a nic link")
        if self.nics_per_node > self.gpus_per_node:
            self.fail(
                "nics_per_node",
                f"nics_per_node ({self.nics_per_node}) must be <= gpus_per_node ({self.gpus_per_node})",
            )
        if self.nics_per_node and self.gpus_per_node % self.nics_per_node:
            self.fail(
                "nics_per_node",
                f"gpus_per_node ({self.gpus_per_node}) must be divisible by nics_per_node "
                f"({self.nics_per_node})",
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def local_rank(self, rank: int) -> int:
        return rank % self.gpus_per_node
