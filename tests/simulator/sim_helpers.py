"""Helpers for the simulator tests: small clusters with round numbers.

NVLink raw 450 GB/s x achievable 380/450 = exactly 380 GB/s (no NCCL cap for "TestGPU")."""

from __future__ import annotations

import numpy as np
import simpy

from semoe import ClusterSpec, GPUSpec, LinkSpec
from simulator.network import make_network
from simulator.topology import Topology

NVL = 380e9  # effective NVLink bytes/s of the test clusters
NIC = 10e9


def make_cluster(nodes: int = 1, gpn: int = 4, nics: int | None = None, nvl_lat: float = 1e-6,
                 nic_lat: float = 2e-6, oversub: float = 1.0, hbm_bytes: int = 80 * 10**9) -> ClusterSpec:
    return ClusterSpec(
        name="test", nodes=nodes, gpus_per_node=gpn,
        gpu=GPUSpec(name="TestGPU", memory_bytes=hbm_bytes, bf16_tflops=100.0, hbm_GBps=1000.0),
        nvlink=LinkSpec(bandwidth_GBps=450.0, latency_s=nvl_lat) if gpn > 1 else None,
        pcie=LinkSpec(bandwidth_GBps=20.0, latency_s=0.0),
        nics_per_node=(gpn if nics is None else nics) if nodes > 1 else 0,
        nic=LinkSpec(bandwidth_GBps=NIC / 1e9, latency_s=nic_lat) if nodes > 1 else None,
        spine_oversubscription=oversub,
        host_memory_bytes=10**12, host_memory_GBps=100.0, ssd_bytes=10**13, ssd_read_GBps=10.0, ssd_write_GBps=5.0,
    )


def make_net(cluster: ClusterSpec, backend: str = "analytic"):
    env = simpy.Environment()
    topo = Topology(cluster)
    return env, topo, make_network(backend, env, topo)


def run_op(cluster, backend, build):
    """Run the op ``build(topology)`` on a fresh network of ``cluster``: (per-rank finish times, network, op)."""
    env, topo, net = make_net(cluster, backend)
    op = build(topo)
    ev = net.run(op)
    env.run()
    return np.asarray(ev.value), net, op
