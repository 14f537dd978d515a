"""The cluster as a set of directed links with capacities, built from `semoe.ClusterSpec`.

Links (one id each; capacities in bytes/s, latency in seconds):

* ``nvlink_out[g]``, ``nvlink_in[g]``: GPU g's port into / out of the NVSwitch fabric (achievable
  NVLink bandwidth each way, `hardware.nvlink_effective_GBps`). NVSwitch itself is non-blocking, so a
  GPU-to-GPU transfer inside a node crosses ``nvlink_out[src]`` then ``nvlink_in[dst]``.
* ``nic_out[n, r]``, ``nic_in[n, r]``: NIC r of node n (``ClusterSpec.nic``). GPU l of a node uses NIC
  ``l // (gpus_per_node / nics_per_node)``: its rail. GPUDirect RDMA: the PCIe hop GPU->NIC is not a
  bottleneck and is not modelled.
* ``spine_up[r]``, ``spine_down[r]``: rail-optimised fabric. Leaf r joins NIC r of every node (one
  logical leaf per rail); same-rail traffic stays on the leaf, cross-rail traffic climbs to the spine.
  Each leaf's uplink carries ``nodes * nic_bw / spine_oversubscription``. NCCL's PXN (forwarding over
  NVLink to the right rail first) is not applied implicitly: the rail-aligned all-to-all does that
  explicitly.
* ``pcie_h2d[g]``, ``pcie_d2h[g]``: the copy engines of GPU g (run concurrently, one each way).
* ``dram[n]``, ``ssd_read[n]``, ``ssd_write[n]``: host memory and SSD bandwidth of node n.

Latency sits on the first link of a route (``nvlink_out`` or ``nic_out``), so a route's latency is one
hop of that class.
"""

from __future__ import annotations

import numpy as np

from semoe import ClusterSpec
from simulator.hardware import GB, nvlink_effective_GBps

MAX_HOPS = 4  # nic_out, spine_up, spine_down, nic_in


class Topology:
    def __init__(self, cluster: ClusterSpec) -> None:
        c = cluster
        self.cluster = c
        self.world = W = c.world_size
        self.nodes = N = c.nodes
        self.gpn = G = c.gpus_per_node
        self.nics = R = c.nics_per_node
        self._names: list[str] = []
        caps: list[float] = []
        lats: list[float] = []

        def add(kind: str, n: int, bw_Bps: float, lat: float) -> int:
            first = len(caps)
            for i in range(n):
                self._names.append(f"{kind}[{i}]")
                caps.append(bw_Bps)
                lats.append(lat)
            return first

        self.nvlink_GBps = nvlink_effective_GBps(c.nvlink.bandwidth_GBps, c.gpu.name) if c.nvlink else 0.0
        nvl_lat = c.nvlink.latency_s if c.nvlink else 0.0
        self.nvl_out0 = add("nvlink_out", W, self.nvlink_GBps * GB, nvl_lat) if c.nvlink else -1
        self.nvl_in0 = add("nvlink_in", W, self.nvlink_GBps * GB, 0.0) if c.nvlink else -1
        if R and c.nic is not None:
            nic_bw, nic_lat = c.nic.bandwidth_GBps * GB, c.nic.latency_s
            self.nic_out0 = add("nic_out", N * R, nic_bw, nic_lat)
            self.nic_in0 = add("nic_in", N * R, nic_bw, 0.0)
            spine = N * nic_bw / c.spine_oversubscription
            self.spine_up0 = add("spine_up", R, spine, 0.0)
            self.spine_down0 = add("spine_down", R, spine, 0.0)
        else:
            self.nic_out0 = self.nic_in0 = self.spine_up0 = self.spine_down0 = -1
        self.h2d0 = add("pcie_h2d", W, c.pcie.bandwidth_GBps * GB, c.pcie.latency_s)
        self.d2h0 = add("pcie_d2h", W, c.pcie.bandwidth_GBps * GB, c.pcie.latency_s)
        self.dram0 = add("dram", N, c.host_memory_GBps * GB, 0.0)
        self.ssd_read0 = add("ssd_read", N, c.ssd_read_GBps * GB, 0.0)
        self.ssd_write0 = add("ssd_write", N, c.ssd_write_GBps * GB, 0.0)
        # one extra sentinel entry (index n_links) with zero latency and infinite capacity for padding
        self.n_links = len(caps)
        self.capacity = np.array(caps + [np.inf], dtype=float)
        self.latency = np.array(lats + [0.0], dtype=float)
        ranks = np.arange(W)
        self.node = ranks // G
        self.local = ranks % G
        self.rail = self.local // (G // R) if R else np.zeros(W, dtype=int)

    def link_name(self, link: int) -> str:
        return self._names[link]

    def links_of(self, kind: str) -> list[int]:
        return [i for i, n in enumerate(self._names) if n.startswith(kind + "[")]

    def routes(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """Route of each message as link ids, shape [M, MAX_HOPS], padded with the sentinel id."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        out = np.full((src.size, MAX_HOPS), self.n_links, dtype=np.int64)
        if src.size == 0:
            return out
        if np.any((src < 0) | (src >= self.world) | (dst < 0) | (dst >= self.world)):
            raise ValueError(f"rank out of range [0, {self.world})")
        same_node = self.node[src] == self.node[dst]
        intra = same_node & (src != dst)
        if intra.any():
            out[intra, 0] = self.nvl_out0 + src[intra]
            out[intra, 1] = self.nvl_in0 + dst[intra]
        inter = ~same_node
        if inter.any():
            s, d = src[inter], dst[inter]
            rs, rd = self.rail[s], self.rail[d]
            out[inter, 0] = self.nic_out0 + self.node[s] * self.nics + rs
            out[inter, 3] = self.nic_in0 + self.node[d] * self.nics + rd
            cross = rs != rd
            sub = out[inter]
            sub[cross, 1] = self.spine_up0 + rs[cross]
            sub[cross, 2] = self.spine_down0 + rd[cross]
            out[inter] = sub
        return out

    def route(self, src: int, dst: int) -> tuple[int, ...]:
        return tuple(int(x) for x in self.routes(np.array([src]), np.array([dst]))[0] if x != self.n_links)

    def device_route(self, kind: str, rank: int) -> np.ndarray:
        """Route of a host<->device or storage transfer of ``rank``: kind in h2d, d2h, ssd_read,
        ssd_write, dram (the last three are per node)."""
        out = np.full((1, MAX_HOPS), self.n_links, dtype=np.int64)
        node = int(self.node[rank])
        out[0, 0] = {
            "h2d": self.h2d0 + rank,
            "d2h": self.d2h0 + rank,
            "dram": self.dram0 + node,
            "ssd_read": self.ssd_read0 + node,
            "ssd_write": self.ssd_write0 + node,
        }[kind]
        return out
