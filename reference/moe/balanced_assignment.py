"""Balanced assignment for the BASE gate: the auction algorithm (Bertsekas), NumPy on the host."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


# ----------------------------------------------------------------------------------- BASE auction
def balanced_assignment(scores_TE: Tensor, top_k: int = 1, *, eps_final: float | None = None) -> Tensor:
    """Maximum-score assignment of every token to ``top_k`` distinct experts, ``T*k/E`` tokens per expert.

    Solved with the auction algorithm (Bertsekas 1988, "The auction algorithm: a distributed
    relaxation method for the assignment problem"; Jacobi bidding, similar objects and epsilon
    scaling as in Bertsekas 1992, "Auction algorithms for network flow problems"). Objects are the
    ``C = T*k/E`` buffer slots of each expert, each with its own price; a token bids for the cheapest
    slot of its best expert among those it does not hold yet, raising that price to
    ``score - second_best_value + eps``. At the end every token satisfies eps-complementary slackness,
    so the total score is within ``T * k * eps`` of the optimum; the final eps is
    ``1e-9 * (max - min score) / (T * k)`` (at least ``1e-12`` times the score magnitude) unless given,
    which is exact unless two assignments are that close. Returns int64 ``[T, k]`` expert ids on the
    device of ``scores_TE``, each row sorted by descending score. No gradient.

    The bidding loop runs in NumPy on the host (one copy of the scores): rounds are many and tiny, and
    per-operation overhead dominates (about 0.5 s for T = 512, E = 8 on one CPU core).
    """
    T, E = scores_TE.shape
    if top_k < 1 or top_k > E:
        raise ValueError(f"top_k must be in 1..{E} (experts), got {top_k}")
    if (T * top_k) % E:
        raise ValueError(f"tokens * top_k ({T} * {top_k}) must be divisible by experts ({E})")
    s_TE = scores_TE.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(s_TE).all():
        raise ValueError("scores_TE: the balanced assignment needs finite scores")
    span = float(s_TE.max() - s_TE.min()) if s_TE.size else 0.0
    span = span if span > 0 else 1.0
    if eps_final is None:  # floor: bids must stay far above the rounding error of the prices
        magnitude = span + (float(np.abs(s_TE).max()) if s_TE.size else 0.0)
        eps_final = max(1e-9 * span / (T * top_k), 1e-12 * magnitude)
    price_EC = np.zeros((E, T * top_k // E))
    eps = span / 4
    while True:
        held_TE = _auction_phase(s_TE, price_EC, top_k, max(eps, eps_final))
        if eps <= eps_final:
            break
        eps /= 6
    ids_TK = np.argsort(-np.where(held_TE, s_TE, -np.inf), axis=1, kind="stable")[:, :top_k]
    return torch.from_numpy(ids_TK).to(scores_TE.device)


def _auction_phase(s_TE: np.ndarray, price_EC: np.ndarray, top_k: int, eps: float) -> np.ndarray:
    """One eps phase of the auction, from an empty assignment; updates ``price_EC`` in place.

    Each round, every token holding fewer than ``top_k`` experts bids for the cheapest slot of its best
    expert not yet held: ``bid = score - best_alternative + eps``, where the alternative includes the
    second cheapest slot of the same expert, so ``p_1 + eps <= bid <= p_2 + eps``. An expert with
    ``m`` bids sorted descending ``b_1 >= b_2 >= ...`` and slots sorted by price ``p_1 <= p_2 <= ...``
    gives slot ``j`` to bid ``j`` for the longest prefix with ``b_j >= p_j + eps/2`` (at least one),
    all at the uniform price ``b_m``: every winner then keeps eps-complementary slackness (its profit is
    at least ``score - b_j``, and ``b_m <= p_2 + eps <= p_{m+1} + eps``), every re-assigned slot's
    price rises by at least eps/2, and many slots change hands per round.
    """
    T, E = s_TE.shape
    C = price_EC.shape[1]
    owner_EC = np.full((E, C), -1)
    held_TE = np.zeros((T, E), dtype=bool)
    n_held_T = np.zeros(T, dtype=np.int64)
    while True:
        bidders_B = np.flatnonzero(n_held_T < top_k)
        if bidders_B.size == 0:
            return held_TE
        if C >= 2:  # cheapest and second cheapest slot price of every expert
            low_E2 = np.partition(price_EC, 1, axis=1)[:, :2]
            p1_E, p2_E = low_E2[:, 0], low_E2[:, 1]
        else:
            p1_E, p2_E = price_EC[:, 0], np.full(E, np.inf)
        s_BE = s_TE[bidders_B]
        value_BE = np.where(held_TE[bidders_B], -np.inf, s_BE - p1_E)
        best_B = value_BE.argmax(axis=1)
        rows_B = np.arange(bidders_B.size)
        v1_B = value_BE[rows_B, best_B]
        value_BE[rows_B, best_B] = -np.inf
        v2_B = value_BE.max(axis=1) if E >= 2 else np.full(bidders_B.size, -np.inf)
        s_best_B = s_BE[rows_B, best_B]
        second_B = np.maximum(v2_B, s_best_B - p2_E[best_B])  # best alternative to that slot
        second_B = np.where(np.isfinite(second_B), second_B, v1_B)  # no alternative: raise by eps
        bid_B = s_best_B - second_B + eps
        # group the bids by expert, descending inside a group (ties: lowest token index first)
        order = np.lexsort((bidders_B, -bid_B, best_B))
        e_W, t_W, bid_W = best_B[order], bidders_B[order], bid_B[order]
        counts_E = np.bincount(e_W, minlength=E)
        rank_W = np.arange(e_W.size) - (np.cumsum(counts_E) - counts_E)[e_W]
        keep = rank_W < C
        e_W, t_W, bid_W, rank_W = e_W[keep], t_W[keep], bid_W[keep], rank_W[keep]
        # slots of the experts bid on, by ascending price
        bid_experts = np.flatnonzero(counts_E)
        slot_order_XC = np.argsort(price_EC[bid_experts], axis=1, kind="stable")
        row_of_E = np.zeros(E, dtype=np.int64)
        row_of_E[bid_experts] = np.arange(bid_experts.size)
        c_W = slot_order_XC[row_of_E[e_W], rank_W]
        accept_W = (rank_W == 0) | (bid_W >= price_EC[e_W, c_W] + eps / 2)
        e_W, t_W, bid_W, c_W = e_W[accept_W], t_W[accept_W], bid_W[accept_W], c_W[accept_W]
        price_E = np.full(E, np.inf)
        np.minimum.at(price_E, e_W, bid_W)  # uniform price: the lowest winning bid
        previous_W = owner_EC[e_W, c_W]
        evicted = previous_W[previous_W >= 0]
        held_TE[evicted, e_W[previous_W >= 0]] = False
        np.subtract.at(n_held_T, evicted, 1)
        owner_EC[e_W, c_W] = t_W
        price_EC[e_W, c_W] = price_E[e_W]
        held_TE[t_W, e_W] = True
        np.add.at(n_held_T, t_W, 1)
