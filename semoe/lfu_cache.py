"""The CPU expert cache policy of SE-MoE (the paper's Algorithm 2): LFU with decayed hit counts.

Pure Python (no torch), shared by the reference offload store and the simulator.

Each key (e.g. ``(layer, expert)``) has a hit count ``h``. Per training step:

1. ``touch(keys or {key: count})``: the experts the step uses. Each use adds to the key's hit count
   (1 per key, or the given count, e.g. tokens routed to the expert) and is a *hit* if the key is
   cached, else a *miss* (its state is read from the SSD). After the touch, a missed key whose hit
   count reaches ``admit_hits`` is *admitted*; when the cache is full it replaces the cached key with
   the lowest hit count, only if that count is lower than the newcomer's (strictly; ties keep the
   resident key: no thrashing). The replaced key is *evicted*; its state is written back to the SSD.
2. ``step()``: ends the step; every ``decay_every`` (K) steps all hit counts are multiplied by
   ``decay`` (beta), so old popularity fades.

``touch`` returns a `TouchResult` (hits, misses, admitted, evicted keys, in the order processed);
counters ``hits``, ``misses``, ``admissions``, ``evictions`` accumulate over the cache's life. Ties in the
eviction choice go to the smallest key (deterministic). Keys must be hashable and orderable.

Defaults (`semoe.plan_spec.ParallelPlan`: ``cache_decay`` = 0.5, ``cache_decay_every`` = 10,
``cache_admit_hits`` = 1.0; the paper gives no values).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class TouchResult:
    hits: list = field(default_factory=list)
    misses: list = field(default_factory=list)
    admitted: list = field(default_factory=list)
    evicted: list = field(default_factory=list)


class LFUCache:
    """LFU with decayed hit counts over at most ``capacity`` keys (see the module docstring)."""

    def __init__(self, capacity: int, decay: float = 0.5, decay_every: int = 10, admit_hits: float = 1.0) -> None:
        if capacity < 0:
            raise ValueError(f"LFUCache: capacity must be >= 0, got {capacity}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"LFUCache: decay must be in (0, 1], got {decay}")
        if decay_every < 1:
            raise ValueError(f"LFUCache: decay_every must be >= 1, got {decay_every}")
        if admit_hits < 0:
            raise ValueError(f"LFUCache: admit_hits must be >= 0, got {admit_hits}")
        self.capacity, self.decay, self.decay_every, self.admit_hits = capacity, decay, decay_every, admit_hits
        self.counts: dict[Hashable, float] = {}
        self.cached: set = set()
        self.steps = 0
        self.hits = self.misses = self.admissions = self.evictions = 0

    def __contains__(self, key) -> bool:
        return key in self.cached

    def __len__(self) -> int:
        return len(self.cached)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def touch(self, used: Iterable | Mapping) -> TouchResult:
        """Record one step's uses (keys, or ``{key: weight}``; weight 0 is not a use)."""
        items = sorted(used.items()) if isinstance(used, Mapping) else [(k, 1.0) for k in sorted(set(used))]
        res = TouchResult()
        for key, w in items:
            if w < 0:
                raise ValueError(f"LFUCache.touch: negative count {w} for {key!r}")
            if w == 0:
                continue
            self.counts[key] = self.counts.get(key, 0.0) + float(w)
            if key in self.cached:
                res.hits.append(key)
            else:
                res.misses.append(key)
        self.hits += len(res.hits)
        self.misses += len(res.misses)
        # admit the most frequent misses first
        for key in sorted(res.misses, key=lambda k: (-self.counts[k], k)):
            victim = self.admit(key)
            if victim is not False:
                res.admitted.append(key)
                if victim is not None:
                    res.evicted.append(victim)
        return res

    def admit(self, key):
        """Try to put ``key`` in the cache: False if refused, else the evicted key (None if none)."""
        c = self.counts.get(key, 0.0)
        if key in self.cached or self.capacity == 0 or c < self.admit_hits:
            return False
        victim = None
        if len(self.cached) >= self.capacity:
            victim = min(self.cached, key=lambda k: (self.counts.get(k, 0.0), k))
            if self.counts.get(victim, 0.0) >= c:
                return False
            self.evict(victim)
        self.cached.add(key)
        self.admissions += 1
        return victim

    def evict(self, key) -> None:
        self.cached.discard(key)
        self.evictions += 1

    def step(self) -> bool:
        """End a step; returns True when the hit counts were decayed (every ``decay_every`` steps)."""
        self.steps += 1
        if self.steps % self.decay_every:
            return False
        for k in self.counts:
            self.counts[k] *= self.decay
        return True

    @classmethod
    def from_plan(cls, plan, capacity: int | None = None) -> LFUCache:
        """With a `ParallelPlan`'s ``cache_*`` fields; capacity default ``plan.cpu_cache_experts``."""
        return cls(plan.cpu_cache_experts if capacity is None else capacity, plan.cache_decay,
                   plan.cache_decay_every, plan.cache_admit_hits)
