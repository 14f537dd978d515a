"""Flow backend: every message is a flow on its route; active flows share every link max-min fairly.

Rates are recomputed by progressive filling (water-filling, Bertsekas & Gallager, Data Networks,
sec. 6.5.2) whenever a flow starts or ends: repeatedly find the link with the smallest fair share
``remaining capacity / unfixed flows``, fix the rate of its flows to that share, subtract. A flow of
``n`` payload bytes carries ``n / protocol.efficiency`` wire bytes and its completion is reported
``alpha`` (route latency x protocol hop factor) after its last byte has drained. Two flows on one link
each get half of it; no link is ever above capacity (checked in ``max_utilisation``).

A message on NCCL's p2p path (``op.peer_GBps``, `collectives.all_to_all_p2p`) is a flow with its own rate
cap: progressive filling treats the cap like a private link of that capacity (the next bottleneck is the
smallest of the links' fair shares and the unfixed flows' caps).

Completion coalescing: when the earliest flow ends, every flow due within ``coalesce`` (default 1%)
of its own lifetime after it ends too, so that an all-to-all with thousands of slightly different flow
sizes needs at most ~100 rate recomputations instead of thousands; a flow ends at most 1% of its
lifetime early. ``coalesce=0`` is exact.

Multi-step collectives run their steps literally: step k+1 starts when every message of step k has
arrived (a barrier per step, as in the analytic backend).
"""

from __future__ import annotations

import numpy as np
import simpy

from simulator.hardware import P2P, Protocol
from simulator.network.base import Network, peer_Bps


class _Flow:
    __slots__ = ("links", "remaining", "rate", "size", "callback", "start", "cap")

    def __init__(self, links: np.ndarray, size: float, callback, start: float = 0.0, cap: float = np.inf) -> None:
        self.start = start
        self.cap = cap
        self.links = links
        self.remaining = size
        self.size = size
        self.rate = 0.0
        self.callback = callback


class FlowNetwork(Network):
    name = "flow"

    def __init__(self, env: simpy.Environment, topo, coalesce: float = 0.01) -> None:
        super().__init__(env, topo)
        self.coalesce = coalesce
        self._flows: dict[int, _Flow] = {}
        self._next_id = 0
        self._t_last = 0.0
        self._gen = 0
        self._finishing: list[int] = []
        self.max_utilisation = 0.0
        self.recomputes = 0

    # ----------------------------------------------------------------- flow bookkeeping
    def _advance(self) -> None:
        dt = self.env.now - self._t_last
        if dt > 0:
            for f in self._flows.values():
                f.remaining -= f.rate * dt
        self._t_last = self.env.now

    def _recompute(self) -> None:
        self.recomputes += 1
        flows = list(self._flows.values())
        if not flows:
            return
        ids = np.stack([f.links for f in flows])
        used, inv = np.unique(ids, return_inverse=True)  # compress to the links in use
        inv = inv.reshape(ids.shape)
        K = used.size
        cap = self.topo.capacity[used].copy()
        finite = np.isfinite(cap)
        rate = np.zeros(len(flows))
        fcap = np.fromiter((f.cap for f in flows), float, len(flows))
        unfixed = np.ones(len(flows), dtype=bool)
        share = np.empty(K)
        while unfixed.any():
            cnt = np.bincount(inv[unfixed].ravel(), minlength=K)
            live = (cnt > 0) & finite
            share.fill(np.inf)
            share[live] = cap[live] / cnt[live]
            s_link = share.min()
            s_cap = fcap[unfixed].min()
            s = min(s_link, s_cap)
            if not np.isfinite(s):
                rate[unfixed] = np.inf  # only unbounded links: never the case on a built topology
                break
            bott = share <= s * (1 + 1e-12)
            hit = unfixed & (bott[inv].any(axis=1) | (fcap <= s * (1 + 1e-12)))
            rate[hit] = s
            unfixed &= ~hit
            cap -= np.bincount(inv[hit].ravel(), minlength=K) * s
        load = np.bincount(inv.ravel(), weights=np.repeat(rate, inv.shape[1]), minlength=K)
        self.max_utilisation = max(self.max_utilisation, float((load[finite] / self.topo.capacity[used][finite]).max()))
        for f, r in zip(flows, rate.tolist()):
            f.rate = r

    def _reschedule(self) -> None:
        self._recompute()
        self._gen += 1
        if not self._flows:
            self._finishing = []
            return
        fids = list(self._flows)
        fl = [self._flows[i] for i in fids]
        rem = np.fromiter((f.remaining for f in fl), float, len(fl))
        rate = np.fromiter((f.rate for f in fl), float, len(fl))
        start = np.fromiter((f.start for f in fl), float, len(fl))
        times = rem / rate
        tmin = max(float(times.min()), 0.0)
        # coalesce: a flow due within `coalesce` of its own lifetime after the earliest ends with it
        slack = max(self.coalesce, 1e-9) * (self.env.now + tmin - start) + 1e-9 * tmin + 1e-15
        self._finishing = [fids[i] for i in np.nonzero(times <= tmin + slack)[0]]
        gen = self._gen
        self.env.timeout(tmin).callbacks.append(lambda _e, g=gen: self._on_timer(g))

    def _on_timer(self, gen: int) -> None:
        if gen != self._gen:
            return
        self._advance()
        done = [self._flows.pop(fid) for fid in self._finishing]
        self._reschedule()
        for f in done:
            f.callback()

    # ----------------------------------------------------------------- interface
    def transfer_routes(self, routes, nbytes, protocol: Protocol = P2P, on_message=None,
                        cap_Bps: float | None = None) -> simpy.Event:
        """As `Network.transfer_routes`; ``on_message(i)`` is called when message ``i`` arrives; ``cap_Bps``:
        each message's payload rate is at most this (NCCL's p2p path)."""
        nbytes = np.asarray(nbytes, dtype=float)
        env = self.env
        start = env.now
        done = env.event()
        out = np.zeros(len(nbytes))
        wire = nbytes / protocol.efficiency
        fcap = np.inf if cap_Bps is None else cap_Bps / protocol.efficiency  # a wire-byte rate, like the links
        self.link_bytes += np.bincount(
            routes.ravel(), weights=np.repeat(wire, routes.shape[1]), minlength=self.topo.n_links + 1
        )
        lat = self.topo.latency[routes].sum(axis=1) * protocol.hop_latency_scale
        pending = [0]
        real = routes != self.topo.n_links

        def finish(i: int) -> None:
            out[i] = env.now - start
            if on_message is not None:
                on_message(i)
            pending[0] -= 1
            if pending[0] == 0:
                done.succeed(out)

        def drained(i: int) -> None:
            if lat[i] > 0:
                env.timeout(lat[i]).callbacks.append(lambda _e: finish(i))
            else:
                finish(i)

        todo = [i for i in range(len(nbytes)) if nbytes[i] > 0 and real[i].any()]
        if on_message is not None:
            for i in sorted(set(range(len(nbytes))) - set(todo)):
                on_message(i)
        pending[0] = len(todo)
        if not todo:
            done.succeed(out)
            return done
        # start all flows of the batch with one rate recomputation
        self._advance()
        for i in todo:
            self._flows[self._next_id] = _Flow(routes[i], float(wire[i]), lambda i=i: drained(i), start, fcap)
            self._next_id += 1
        self._reschedule()
        return done

    def run(self, op, on_rank=None) -> simpy.Event:
        """Run ``op``; the event's value is each rank's completion offset. ``on_rank(k)`` is called
        when group rank ``k`` has finished its part of the last step (before the whole op ends)."""
        protocol = self.choose_protocol(op)
        return self.env.process(self._run(op, protocol, on_rank))

    def _run(self, op, protocol: Protocol, on_rank=None):
        env = self.env
        start = env.now
        n = len(op.ranks)
        pos = np.full(self.topo.world, -1, dtype=np.int64)
        pos[np.asarray(op.ranks, dtype=np.int64)] = np.arange(n)
        out = np.zeros(n)
        notify = on_rank if on_rank is not None else (lambda k: None)
        if not op.steps:
            for k in range(n):
                notify(k)
            return out
        cap = peer_Bps(op)
        yield env.timeout(protocol.base_latency_s)
        for k, s in enumerate(op.steps):
            for rep in range(s.repeat):
                if k < len(op.steps) - 1 or rep < s.repeat - 1:
                    if cap is None:
                        yield self.transfer(s.src, s.dst, s.nbytes, protocol)
                    else:
                        np.add.at(self.bytes_sent, s.src, s.nbytes)
                        np.add.at(self.bytes_received, s.dst, s.nbytes)
                        yield self.transfer_routes(self.topo.routes(s.src, s.dst), s.nbytes, protocol, cap_Bps=cap)
                    continue
                # last step: each rank is done when its own messages (in and out) have arrived
                ps, pd = pos[s.src], pos[s.dst]
                left = np.bincount(ps, minlength=n) + np.bincount(pd, minlength=n)
                out[:] = env.now - start
                for r in np.nonzero(left == 0)[0]:
                    notify(int(r))

                def arrived(i: int) -> None:
                    for r in (ps[i], pd[i]):
                        left[r] -= 1
                        if left[r] == 0:
                            out[r] = env.now - start
                            notify(int(r))

                src, dst = np.asarray(s.src), np.asarray(s.dst)
                np.add.at(self.bytes_sent, src, s.nbytes)
                np.add.at(self.bytes_received, dst, s.nbytes)
                yield self.transfer_routes(self.topo.routes(src, dst), s.nbytes, protocol, on_message=arrived,
                                           cap_Bps=cap)
        return out
