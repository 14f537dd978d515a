"""The routing decision every gate returns, and the contract between gates and dispatchers.

Shape legend: T tokens, D model dim, E experts, K assignment slots per token (top-k; for gates with a
variable number of experts per token, such as expert choice, K is the most a token can get and
``kept_TK`` marks the slots in use).

A gate maps ``x_TD`` (and optionally ``token_ids_T``) to a :class:`Routing`. A dispatcher takes the
kept assignments, groups them by expert, runs the experts and combines
``y_T = sum_k weights_TK[t, k] * expert[expert_ids_TK[t, k]](x_T[t])`` over kept slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Routing:
    expert_ids_TK: Tensor  # int64 [T, K], expert of each slot (any value in 0..E-1 where not kept)
    weights_TK: Tensor  # float [T, K], combine weights, differentiable; exactly 0 where not kept
    kept_TK: Tensor  # bool [T, K], slot survives capacity / is in use
    counts_E: Tensor  # int64 [E], kept assignments per expert (sums to kept_TK.sum())
    probs_TE: Tensor  # float [T, E], router scores after softmax/sigmoid (for statistics)
    capacity: int | None = None  # tokens per expert buffer; None: dropless
    # int64 [T, K]: position of the slot inside its expert's capacity buffer (0..capacity-1), -1 where
    # not kept. Gates that drop fill it; dropless gates may leave it None (the dispatcher sorts).
    slots_TK: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # e.g. load_balance, z_loss

    @property
    def num_tokens(self) -> int:
        return self.expert_ids_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    @property
    def dropped(self) -> int:
        """Assignments that were chosen but not kept (slots not in use count too for expert choice)."""
        return int((~self.kept_TK).sum())

    def check(self) -> None:
        """Invariants every gate must satisfy (used by tests and debug runs)."""
        T, K = self.expert_ids_TK.shape
        E = self.num_experts
        assert self.weights_TK.shape == (T, K) and self.kept_TK.shape == (T, K)
        assert self.kept_TK.dtype == torch.bool
        ids = self.expert_ids_TK[self.kept_TK]
        assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < E), "expert id out of range"
        assert torch.equal(torch.bincount(ids, minlength=E), self.counts_E), "counts_E != kept ids"
        assert bool((self.weights_TK[~self.kept_TK] == 0).all()), "dropped slot has a nonzero weight"
        if self.capacity is not None:
            assert int(self.counts_E.max()) <= self.capacity, "expert over capacity"
        if self.slots_TK is not None:
            assert bool((self.slots_TK[~self.kept_TK] == -1).all())
            s = self.slots_TK[self.kept_TK]
            if self.capacity is not None:
                assert s.numel() == 0 or int(s.max()) < self.capacity
            pairs = ids * (T * K + 1) + s  # (expert, slot) pairs are unique
            assert pairs.unique().numel() == pairs.numel(), "two assignments share a capacity slot"
