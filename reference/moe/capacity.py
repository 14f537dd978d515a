"""Routing helpers shared by every gate: load-balancing and z losses, expert capacity, drop policies.

Shape legend: T tokens, E experts, K assignment slots per token, N = T*K flattened slots.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.moe.routing import Routing

DROP_POLICIES = ("position", "probability", "deepspeed")


# ---------------------------------------------------------------------------------------- losses
def load_balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Switch Transformer Eq. 4 / GShard: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the given assignments (``expert_ids_TK``, before capacity dropping) that
    go to expert ``e`` and ``P_e = mean_t probs_TE[t, e]``; only ``P`` carries gradient. Equals 1 for
    a perfectly uniform router. Gates pass the first choice only for K <= 2 and all K choices for
    K > 2, which is what DeepSpeed's ``top1gating``/``top2gating`` (first choice) and ``topkgating``
    (all k, divided by k) compute.
    """
    E = probs_TE.shape[1]
    f_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=E).to(probs_TE.dtype) / expert_ids_TK.numel()
    return E * (f_E * probs_TE.mean(dim=0)).sum()


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, Eq. 5): ``mean_t logsumexp(logits_t)^2``."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def _balance_ids(expert_ids_TK: Tensor) -> Tensor:
    """Assignments counted in ``f_e``: the first choice for K <= 2 (GShard, DeepSpeed top1/top2), else all."""
    return expert_ids_TK[:, :1] if expert_ids_TK.shape[1] <= 2 else expert_ids_TK


# -------------------------------------------------------------------------------------- capacity
def expert_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float | None, min_capacity: int
) -> int | None:
    """``max(min_capacity, ceil(capacity_factor * T * k / E))``; ``None`` (dropless) if no capacity factor.

    Computed in exact rational arithmetic on the decimal value of ``capacity_factor`` (so 1.1 * 10 / 11
    gives 1, where floating point gives 2). DeepSpeed's ``_capacity`` computes ``(T / E) * (cf * k)``
    in fp32; both agree whenever ``capacity_factor`` is a binary fraction (0.5, 1.0, 1.25, 2.0, ...);
    for factors such as 1.1 or 1.2 DeepSpeed sometimes rounds one slot higher.
    """
    if capacity_factor is None:
        return None
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
    exact = Fraction(num_tokens * top_k, num_experts) * Fraction(repr(float(capacity_factor)))
    return max(int(min_capacity), math.ceil(exact))


def _ranks_in_order(ids_N: Tensor, active_N: Tensor, num_experts: int) -> Tensor:
    """Rank of each active assignment among the active assignments of its expert, in the order given.

    ``ids_N`` [N] experts in priority order; inactive entries get rank -1. Same one-hot cumsum as
    DeepSpeed's ``locations = cumsum(mask, dim=0) - 1``.
    """
    onehot_NE = F.one_hot(ids_N, num_experts) * active_N.unsqueeze(1)
    ranks_N = (onehot_NE.cumsum(dim=0) - 1).gather(1, ids_N.unsqueeze(1)).squeeze(1)
    return torch.where(active_N, ranks_N, torch.full_like(ranks_N, -1))


def _position_ranks(ids_TK: Tensor, active_TK: Tensor, num_experts: int) -> Tensor:
    """Ranks in GShard order: every token's 1st choice (in token order) before any 2nd choice, ..."""
    ranks_KT = _ranks_in_order(ids_TK.t().reshape(-1), active_TK.t().reshape(-1), num_experts)
    return ranks_KT.reshape(ids_TK.shape[1], ids_TK.shape[0]).t()


def _token_order_ranks(ids_TK: Tensor, active_TK: Tensor, num_experts: int) -> Tensor:
    """Ranks in token order (then slot order), as DeepSpeed ``topkgating`` numbers its buffer."""
    ranks = _ranks_in_order(ids_TK.reshape(-1), active_TK.reshape(-1), num_experts)
    return ranks.reshape(ids_TK.shape)


def drop_to_capacity(
    expert_ids_TK: Tensor,
    scores_TK: Tensor,
    chosen_TK: Tensor,
    num_experts: int,
    capacity: int,
    policy: str,
) -> tuple[Tensor, Tensor]:
    """Which chosen assignments survive ``capacity`` per expert, and their slot in the expert buffer.

    Returns ``kept_TK`` (bool) and ``slots_TK`` (int64, -1 where not kept). Policies:

    - ``"position"``: every token's 1st choice before any 2nd choice, in token order; an assignment is
      kept if its rank in that order is below ``capacity`` and its slot is that rank (GShard
      Algorithm 1; DeepSpeed ``top2gating``).
    - ``"probability"``: each expert keeps its ``capacity`` highest ``scores_TK`` (ties: position
      order); slots number the kept assignments in token order (DeepSpeed ``topkgating``
      ``drop_policy="probs"``; batch prioritised routing, Riquelme et al. 2021).
    - ``"deepspeed"``: exactly what DeepSpeed keeps for this K. K == 1: ``top1gating(use_rts=False)``
      selects the kept tokens of each expert with ``torch.topk`` over the 0/1 int64 one-hot mask along
      the tokens, and ``torch.topk`` breaks ties in an implementation-defined order (on CPU it does
      *not* keep the first tokens), so we make the very same call; slots then number kept tokens in
      token order. K == 2: ``top2gating`` is ``"position"``. K > 2: ``topkgating``'s default
      ``drop_policy="probs"`` is ``"probability"``.
    """
    T, K = expert_ids_TK.shape
    if policy == "deepspeed":
        if K == 2:
            policy = "position"
        elif K > 2:
            policy = "probability"
        else:
            return _deepspeed_top1_keep(expert_ids_TK, chosen_TK, num_experts, capacity)
    if policy == "position":
        ranks_TK = _position_ranks(expert_ids_TK, chosen_TK, num_experts)
        kept_TK = chosen_TK & (ranks_TK < capacity)
        return kept_TK, torch.where(kept_TK, ranks_TK, torch.full_like(ranks_TK, -1))
    if policy == "probability":
        # priority order: descending score, ties broken by position order (k-major, then token)
        scores_N = scores_TK.detach().t().reshape(-1)
        order_N = torch.argsort(scores_N, descending=True, stable=True)
        ids_N = expert_ids_TK.t().reshape(-1)
        ranks_sorted = _ranks_in_order(ids_N[order_N], chosen_TK.t().reshape(-1)[order_N], num_experts)
        ranks_N = torch.empty_like(ranks_sorted).scatter_(0, order_N, ranks_sorted)
        kept_TK = chosen_TK & (ranks_N.reshape(K, T).t() < capacity)
        return kept_TK, _token_order_ranks(expert_ids_TK, kept_TK, num_experts)
    raise ValueError(f"drop_policy must be one of {', '.join(DROP_POLICIES)}, got {policy!r}")


def _deepspeed_top1_keep(
    expert_ids_TK: Tensor, chosen_TK: Tensor, num_experts: int, capacity: int
) -> tuple[Tensor, Tensor]:
    """The kept tokens of DeepSpeed ``top1gating(use_rts=False)``, call for call (see drop_to_capacity)."""
    T = expert_ids_TK.shape[0]
    mask1_TE = F.one_hot(expert_ids_TK[:, 0], num_experts) * chosen_TK[:, :1]  # int64, as DeepSpeed
    top_idx = torch.topk(mask1_TE, k=min(capacity, T), dim=0)[1]
    mask1_TE = mask1_TE * torch.zeros_like(mask1_TE).scatter_(0, top_idx, 1)
    kept_TK = mask1_TE.sum(dim=1, keepdim=True).bool()
    return kept_TK, _token_order_ranks(expert_ids_TK, kept_TK, num_experts)


def routing_to_combine_tensor(routing: Routing) -> Tensor:
    """The dense GShard/DeepSpeed combine tensor ``[T, E, C]``: ``weight`` at (token, expert, slot).

    With a capacity, ``C = routing.capacity`` and slots come from ``routing.slots_TK``. For a dropless
    routing, ``C = max(counts_E)`` (DeepSpeed ``drop_tokens=False``) and slots follow position order.
    """
    T, K = routing.expert_ids_TK.shape
    kept_TK = routing.kept_TK
    if routing.capacity is not None and routing.slots_TK is None:
        raise ValueError("routing.slots_TK must be set when routing.capacity is set")
    if routing.slots_TK is not None:
        slots_TK = routing.slots_TK
        C = routing.capacity if routing.capacity is not None else int(routing.counts_E.max())
    else:
        slots_TK = _position_ranks(routing.expert_ids_TK, kept_TK, routing.num_experts)
        C = int(routing.counts_E.max()) if kept_TK.any() else 0
    combine_TEC = routing.weights_TK.new_zeros(T, routing.num_experts, C)
    t_N = torch.arange(T, device=kept_TK.device).unsqueeze(1).expand(T, K)[kept_TK]
    combine_TEC[t_N, routing.expert_ids_TK[kept_TK], slots_TK[kept_TK]] = routing.weights_TK[kept_TK]
    return combine_TEC
