"""Host contention between the CPU update and the SSD I/O of one node (task hH, issue 6).

`reference.offload`'s optimizer thread (AdamW over the layer's flat fp32 states, cores - 2 intra-op threads) and its
I/O thread (crc32, serialisation, file reads and writes, page-cache copies) run on the same host and draw on the same
DRAM bandwidth and cores. The bench measures each alone and beside the other (`reference.offload.bench.
ContentionProbe`: the update beside the I/O thread's reads and beside its write-backs, each I/O part beside the
update); this module turns that into a schedule. A job of class ``cls`` has a duration ALONE and a duration BESIDE
each other class it is slowed by (``beside``: class -> seconds); it progresses at the matching speed while the set of
active classes changes (a rate switch, piecewise constant):

    done fraction' = 1 / alone_s            while no class of ``beside`` is active
                   = 1 / max beside_s[c]    over the classes c of ``beside`` that are active

so a job that overlaps another class for a fraction f of its work takes ``(1 - f) alone_s + f beside_s``. A class
not named in ``beside`` (its own included) does not slow the job (in `simulator.workload.training` the optimizer is
one thread and the SSD reads and writes share one I/O queue: they are serialised there already).
"""

from __future__ import annotations

EPS = 1e-12


class HostShare:
    """The classes of host work of one node that are active now, and the rate switch between them (module docstring).

    ``run(cls, alone_s, beside)`` is a SimPy generator (``yield from``): it returns when the job is done; the caller
    measures the elapsed time itself."""

    def __init__(self, env) -> None:
        self.env = env
        self.active: dict[str, int] = {}
        self._changed = env.event()

    def _signal(self) -> None:
        ev, self._changed = self._changed, self.env.event()
        ev.succeed()

    def duration(self, alone_s: float, beside: dict[str, float]) -> float:
        """The job's full duration at the speed of the classes active now."""
        slow = [s for c, s in beside.items() if self.active.get(c, 0) > 0]
        return max(slow) if slow else alone_s

    def run(self, cls: str, alone_s: float, beside: dict[str, float]):
        if alone_s < 0 or any(s < 0 for s in beside.values()):
            raise ValueError(f"HostShare: durations must be >= 0, got alone {alone_s}, beside {beside}")
        if alone_s == 0:
            return
        left = 1.0  # the fraction of the job still to do
        self.active[cls] = self.active.get(cls, 0) + 1
        self._signal()
        try:
            while left > EPS:
                dur = self.duration(alone_s, beside)
                if dur <= 0:
                    break
                t0 = self.env.now
                done = self.env.timeout(left * dur)
                got = yield done | self._changed
                if done in got:
                    break
                left -= (self.env.now - t0) / dur
        finally:
            self.active[cls] -= 1
            self._signal()
