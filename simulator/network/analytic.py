"""Analytic alpha-beta backend: no events per message, one timeout per batch.

A batch of concurrent messages costs, per message, ``alpha + T`` where ``alpha`` is the route latency
(scaled by the protocol's hop-latency factor) and ``T = max_{link in route} load(link) / capacity(link)``
with ``load`` the wire bytes (``nbytes / protocol.efficiency``) of *all* messages of the batch on that
link: contention inside one collective step is counted, contention between independent batches
(e.g. an all-to-all and a background all-gather) is not (use the flow backend for that). The size-
dependent efficiency curve comes from the protocol choice (`hardware`): small collectives run at LL
speed (low latency, half bandwidth), large ones at Simple (full bandwidth).

A multi-step collective (`collectives.CommOp`) with steps ``s`` repeated ``r_s`` times costs
``base_p + sum_s r_s * max_msg(alpha_s + T_s)``; ranks finish the last step at their own time (a rank
that sends and receives little in the last step finishes early). On NCCL's p2p path (``op.peer_GBps``)
``T`` is at least ``nbytes / peer rate`` per message (`base.Network.step_costs`).
"""

from __future__ import annotations

import numpy as np
import simpy

from simulator.hardware import P2P, Protocol
from simulator.network.base import Network, peer_Bps


class AnalyticNetwork(Network):
    name = "analytic"

    def message_times(self, routes: np.ndarray, nbytes: np.ndarray, protocol: Protocol = P2P,
                      cap_Bps: float | None = None) -> np.ndarray:
        busy, lat = self.step_costs(routes, nbytes, cap_Bps)
        return busy / protocol.efficiency + lat * protocol.hop_latency_scale

    def transfer_routes(self, routes, nbytes, protocol: Protocol = P2P) -> simpy.Event:
        nbytes = np.asarray(nbytes, dtype=float)
        self.link_bytes += np.bincount(
            routes.ravel(), weights=np.repeat(nbytes / protocol.efficiency, routes.shape[1]), minlength=self.topo.n_links + 1
        )
        t = self.message_times(routes, nbytes, protocol)
        t = t + (protocol.base_latency_s if t.size else 0.0)
        return self.env.timeout(float(t.max()) if t.size else 0.0, value=t)

    def op_offsets(self, op, protocol: Protocol | None = None) -> np.ndarray:
        """Completion offset of each rank of ``op.ranks`` (same order), without simulating."""
        p = protocol or self.choose_protocol(op)
        pos = np.full(self.topo.world, -1, dtype=np.int64)
        pos[np.asarray(op.ranks, dtype=np.int64)] = np.arange(len(op.ranks))
        t = p.base_latency_s if op.steps else 0.0
        out = np.full(len(op.ranks), t)
        for k, s in enumerate(op.steps):
            routes = self.topo.routes(s.src, s.dst)
            times = self.message_times(routes, s.nbytes, p, peer_Bps(op))
            np.add.at(self.bytes_sent, s.src, s.nbytes * s.repeat)
            np.add.at(self.bytes_received, s.dst, s.nbytes * s.repeat)
            self.link_bytes += s.repeat * np.bincount(
                routes.ravel(), weights=np.repeat(s.nbytes / p.efficiency, routes.shape[1]), minlength=self.topo.n_links + 1
            )
            step_max = float(times.max()) if times.size else 0.0
            last = k == len(op.steps) - 1
            if not last:
                t += s.repeat * step_max
                continue
            t += (s.repeat - 1) * step_max
            per = np.zeros(len(op.ranks))
            if times.size:
                np.maximum.at(per, pos[s.src], times)
                np.maximum.at(per, pos[s.dst], times)
            out = t + per
        return out

    def run(self, op, on_rank=None) -> simpy.Event:
        """Run ``op``; the event's value is each rank's completion offset; ``on_rank(k)`` is called
        at group rank ``k``'s own completion time."""
        offsets = self.op_offsets(op)
        if on_rank is not None:
            for k, off in enumerate(offsets):
                self.env.timeout(float(off)).callbacks.append(lambda _e, k=k: on_rank(k))
        return self.env.timeout(float(offsets.max()) if offsets.size else 0.0, value=offsets)
