"""The simulation context: SimPy environment, topology, network backend, cost model, memory tracker,
trace recorder and the rendezvous through which ranks enter collectives.

Ranks are SimPy processes. A collective is entered by every rank of its group with the same key (ranks
issue collectives in the same program order, as with NCCL); when the last rank arrives the op is built
once and run on the network, and each rank resumes at its own completion time (when its messages of
the op's last step have arrived), with either backend.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import numpy as np
import simpy

from semoe import ClusterSpec
from simulator.cost import CostModel, Profile
from simulator.memory import MemoryTracker
from simulator.network import make_network
from simulator.network.analytic import AnalyticNetwork
from simulator.topology import Topology


class Sim:
    def __init__(
        self,
        cluster: ClusterSpec,
        backend: str = "analytic",
        seed: int = 0,
        profile: Profile | str | None = "auto",
        trace: bool = True,
    ) -> None:
        self.cluster = cluster
        self.env = simpy.Environment()
        self.topo = Topology(cluster)
        self.net = make_network(backend, self.env, self.topo)
        # "auto": results/profiles/<gpu>.csv when one matches the cluster's GPU, else the roofline
        self.cost = CostModel.auto(cluster.gpu) if isinstance(profile, str) and profile == "auto" else CostModel(cluster.gpu, profile)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.trace_enabled = trace
        self.rows: list[tuple] = []  # TraceRow fields, converted lazily by `report`
        self.memory = MemoryTracker(cluster)
        self._pending: dict[Hashable, list] = {}

    @property
    def now(self) -> float:
        return self.env.now

    def record(self, rank: int, layer: int, mb: int, phase: str, start: float, end: float,
               nbytes: float = 0, flops: float = 0, resource: str = "compute") -> None:
        if self.trace_enabled:
            self.rows.append((rank, layer, mb, phase, start, end, int(nbytes), int(flops), resource))

    def _fire_at(self, event: simpy.Event, delay: float, value=None) -> None:
        # schedule an already-created event to succeed ``delay`` from now (what simpy.Timeout does)
        event._ok = True
        event._value = value
        self.env.schedule(event, delay=max(delay, 0.0))

    def collective(self, key: Hashable, rank: int, group_size: int, factory: Callable) -> simpy.Event:
        """Enter collective ``key`` as ``rank``; ``factory()`` builds the `CommOp` once."""
        ev = self.env.event()
        ent = self._pending.get(key)
        if ent is None:
            ent = self._pending[key] = [{}, factory]
        ent[0][rank] = ev
        if len(ent[0]) == group_size:
            del self._pending[key]
            op = ent[1]()
            events = ent[0]
            if isinstance(self.net, AnalyticNetwork):
                offsets = self.net.op_offsets(op)
                for r, off in zip(op.ranks, offsets):
                    self._fire_at(events[int(r)], float(off))
            else:
                ranks = [int(r) for r in op.ranks]
                self.net.run(op, on_rank=lambda k: events[ranks[k]].succeed())
        return ev

    def check_all_joined(self) -> None:
        if self._pending:
            key = next(iter(self._pending))
            raise RuntimeError(f"collective {key!r} never completed: {len(self._pending)} pending (deadlock)")
