"""Per-rank memory footprint over time on HBM, host DRAM and SSD.

Each rank allocates and frees labelled bytes on a tier; the tracker keeps the current and peak total
per rank and tier, and a timeline for a few ranks (plots). DRAM and SSD are per node: their node
totals are the sums over the node's ranks and are compared with the node's capacity. Out-of-memory
is reported (`oom`), never hidden or clipped.
"""

from __future__ import annotations

import numpy as np

from semoe import ClusterSpec

TIERS = ("hbm", "dram", "ssd")


class MemoryTracker:
    def __init__(self, cluster: ClusterSpec, timeline_ranks: tuple[int, ...] = (0,)) -> None:
        self.cluster = cluster
        W = cluster.world_size
        self.current = np.zeros((W, 3))
        self.peak = np.zeros((W, 3))
        self.by_label: dict[tuple[int, str, str], float] = {}
        self.timeline_ranks = set(timeline_ranks)
        self.timeline: list[tuple[float, int, str, float]] = []  # (t, rank, tier, total bytes)
        self.capacity = {
            "hbm": cluster.gpu.memory_bytes,
            "dram": cluster.host_memory_bytes,
            "ssd": cluster.ssd_bytes,
        }
        self._node_peak = np.zeros((cluster.nodes, 3))

    def alloc(self, t: float, rank: int, tier: str, label: str, nbytes: float) -> None:
        if nbytes == 0:
            return
        k = TIERS.index(tier)
        self.current[rank, k] += nbytes
        key = (rank, tier, label)
        self.by_label[key] = self.by_label.get(key, 0.0) + nbytes
        if self.current[rank, k] > self.peak[rank, k]:
            self.peak[rank, k] = self.current[rank, k]
        if k > 0:
            node = rank // self.cluster.gpus_per_node
            g = self.cluster.gpus_per_node
            tot = self.current[node * g:(node + 1) * g, k].sum()
            self._node_peak[node, k] = max(self._node_peak[node, k], tot)
        if rank in self.timeline_ranks:
            self.timeline.append((t, rank, tier, float(self.current[rank, k])))

    def free(self, t: float, rank: int, tier: str, label: str, nbytes: float) -> None:
        self.alloc(t, rank, tier, label, -nbytes)

    def alloc_all(self, t: float, tier: str, label: str, per_rank_bytes) -> None:
        """Allocate on every rank at once (static states); vectorised."""
        k = TIERS.index(tier)
        b = np.broadcast_to(np.asarray(per_rank_bytes, dtype=float), (self.cluster.world_size,))
        self.current[:, k] += b
        self.peak[:, k] = np.maximum(self.peak[:, k], self.current[:, k])
        g = self.cluster.gpus_per_node
        node_tot = self.current[:, k].reshape(-1, g).sum(axis=1)
        self._node_peak[:, k] = np.maximum(self._node_peak[:, k], node_tot)
        for r in self.timeline_ranks:
            self.by_label[(r, tier, label)] = self.by_label.get((r, tier, label), 0.0) + float(b[r])
            self.timeline.append((t, r, tier, float(self.current[r, k])))

    def peak_hbm(self) -> float:
        return float(self.peak[:, 0].max())

    def peak_node(self, tier: str) -> float:
        return float(self._node_peak[:, TIERS.index(tier)].max())

    def oom(self) -> list[str]:
        """One line per tier that exceeds its capacity somewhere."""
        out = []
        if self.peak_hbm() > self.capacity["hbm"]:
            r = int(self.peak[:, 0].argmax())
            out.append(f"HBM: rank {r} peaks at {self.peak_hbm() / 1e9:.1f} GB > {self.capacity['hbm'] / 1e9:.1f} GB")
        for tier in ("dram", "ssd"):
            if self.peak_node(tier) > self.capacity[tier]:
                out.append(f"{tier.upper()}: a node peaks at {self.peak_node(tier) / 1e9:.1f} GB > {self.capacity[tier] / 1e9:.1f} GB")
        return out
