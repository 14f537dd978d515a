"""The slot registry of offloaded-expert inference, shared by the reference and the simulator.

``capacity`` device slots hold experts ``(block, expert)``; ring slot group ``k`` is slots
``[k*E, (k+1)*E)`` (one block's experts); an LRU order over the resident keys picks victims for the
expert-aware mode (free slots first, then the least recently used key not in ``keep``). Only the
bookkeeping lives here: ``reference/inference/ring.py`` (``ExpertPool``) adds the tensors and copies,
``simulator/workload/inference_pool.py`` (``ExpertCache``) adds hit/miss counting.
"""

from __future__ import annotations

from collections import OrderedDict

Key = tuple[int, int]  # (block, expert)


class ExpertSlots:
    def __init__(self, capacity: int, experts: int) -> None:
        self.capacity, self.E = capacity, experts
        self.owner: list[Key | None] = [None] * capacity
        self.where: dict[Key, int] = {}
        self.lru: OrderedDict[Key, None] = OrderedDict()

    def assign(self, slot: int, key: Key) -> None:
        """``slot`` now holds ``key`` (most recently used); its previous key and ``key``'s previous
        slot are forgotten."""
        old = self.owner[slot]
        if old is not None and self.where.get(old) == slot:
            del self.where[old]
            self.lru.pop(old, None)
        prev = self.where.get(key)
        if prev is not None and prev != slot:
            self.owner[prev] = None
        self.owner[slot] = key
        self.where[key] = slot
        self.lru[key] = None
        self.lru.move_to_end(key)

    def assign_block(self, block: int, k: int) -> None:
        """Ring slot group ``k`` now holds every expert of ``block``."""
        for e in range(self.E):
            self.assign(k * self.E + e, (block, e))

    def group_holds(self, k: int, block: int) -> bool:
        return all(self.owner[k * self.E + e] == (block, e) for e in range(self.E))

    def victims(self, n: int, keep: set) -> list[int]:
        """``n`` slots to overwrite: free ones first, then the least recently used not in ``keep``."""
        out = [s for s, o in enumerate(self.owner) if o is None][:n]
        if len(out) < n:
            for key in self.lru:  # oldest first
                if key not in keep:
                    out.append(self.where[key])
                    if len(out) == n:
                        break
        return out
