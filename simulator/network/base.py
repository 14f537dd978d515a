"""The narrow network interface every backend implements.

``send(src, dst, nbytes) -> simpy.Event`` delivers one message; ``transfer(src, dst, nbytes, protocol)``
starts a batch of concurrent messages and returns an event whose value is each message's completion
offset (seconds after the call); ``transfer_routes`` does the same for explicit routes (host/device
copies, SSD). ``run(op)`` executes a multi-step collective (`collectives.CommOp`) and returns an event
whose value is each group rank's completion offset. ``now`` is the simulated time.

A collective on NCCL's point-to-point path (`collectives.all_to_all_p2p`: ``op.peer_GBps`` set) has each
message also limited to that per-peer rate and chooses between the p2p protocols only (`P2P_PROTOCOLS`:
NCCL runs sends and receives with LL below its p2p LL threshold and Simple above; LL128 is collectives-only).

Accounting kept by every backend (used by the property tests): bytes sent and received per rank, and
wire bytes per link.
"""

from __future__ import annotations

import numpy as np
import simpy

from simulator.hardware import GB, LL, P2P, PROTOCOLS, SIMPLE, Protocol
from simulator.topology import Topology

P2P_PROTOCOLS: tuple[Protocol, ...] = (LL, SIMPLE)  # the protocols of NCCL's send/receive path


def peer_Bps(op) -> float | None:
    """Bytes per second each message of ``op`` is limited to (NCCL's p2p path), or None."""
    g = getattr(op, "peer_GBps", None)
    return None if g is None else float(g) * GB


class Network:
    name = "base"

    def __init__(self, env: simpy.Environment, topo: Topology) -> None:
        self.env = env
        self.topo = topo
        self.bytes_sent = np.zeros(topo.world)
        self.bytes_received = np.zeros(topo.world)
        self.link_bytes = np.zeros(topo.n_links + 1)

    @property
    def now(self) -> float:
        return self.env.now

    # ------------------------------------------------------------------ interface
    def send(self, src: int, dst: int, nbytes: float) -> simpy.Event:
        return self.transfer(np.array([src]), np.array([dst]), np.array([float(nbytes)]), P2P)

    def transfer(self, src, dst, nbytes, protocol: Protocol = P2P) -> simpy.Event:
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        nbytes = np.asarray(nbytes, dtype=float)
        if np.any(nbytes < 0):
            raise ValueError("nbytes must be >= 0")
        np.add.at(self.bytes_sent, src, nbytes)
        np.add.at(self.bytes_received, dst, nbytes)
        return self.transfer_routes(self.topo.routes(src, dst), nbytes, protocol)

    def transfer_routes(self, routes: np.ndarray, nbytes: np.ndarray, protocol: Protocol = P2P) -> simpy.Event:
        raise NotImplementedError

    def run(self, op, on_rank=None) -> simpy.Event:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared analytics
    def step_costs(self, routes: np.ndarray, nbytes: np.ndarray, cap_Bps: float | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Per message: bottleneck busy time at protocol efficiency 1 (each link drains its total load
        at capacity; a message ends when its most loaded link has drained; with ``cap_Bps`` a message also
        takes at least ``nbytes / cap_Bps``) and route latency."""
        L = self.topo.n_links
        if routes.size == 0:
            return np.zeros(0), np.zeros(0)
        w = np.repeat(nbytes, routes.shape[1])
        loads = np.bincount(routes.ravel(), weights=w, minlength=L + 1)
        busy = loads / self.topo.capacity
        busy[L] = 0.0
        active = nbytes > 0
        t = busy[routes].max(axis=1)
        if cap_Bps is not None:
            t = np.maximum(t, nbytes / cap_Bps)
        return np.where(active, t, 0.0), np.where(
            active, self.topo.latency[routes].sum(axis=1), 0.0
        )

    def choose_protocol(self, op) -> Protocol:
        """NCCL-style tuner over the whole op (see `hardware`): least predicted time."""
        protocols = P2P_PROTOCOLS if peer_Bps(op) is not None else PROTOCOLS
        best, best_t = protocols[-1], float("inf")
        stats = [(s.repeat, *self._step_max(s, peer_Bps(op))) for s in op.steps]
        for p in protocols:
            t = p.base_latency_s + sum(rep * (lat * p.hop_latency_scale + busy / p.efficiency) for rep, busy, lat in stats)
            if t < best_t:
                best, best_t = p, t
        return best

    def _step_max(self, step, cap_Bps: float | None = None) -> tuple[float, float]:
        busy, lat = self.step_costs(self.topo.routes(step.src, step.dst), step.nbytes, cap_Bps)
        if busy.size == 0:
            return 0.0, 0.0
        return float(busy.max()), float(lat.max())
