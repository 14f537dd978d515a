"""Token dispatch and combine: tokens to expert-contiguous order and back (single process).

Shape legend (torchtitan style): T tokens, K slots per token (top-k), D model dim, E experts,
N kept assignments (= ``kept_TK.sum()`` = T*K - dropped), C capacity (rows per expert buffer).

Data flow (Megatron-Core ``MoEAlltoAllTokenDispatcher`` split, torchtitan ``dispatch``/``combine``)::

    dispatch(x_TD, routing) -> (x_ND | x_ECD, tokens_per_expert_E, meta)
        dispatch_preprocess   sort kept (token, slot) assignments by expert then token (stable),
                              count tokens per expert, gather rows x_ND = x_TD[token_N]
                              (padded layout: scatter rows to buffer row e*C + slot -> x_ECD)
        dispatch_communicate  identity here; all-to-all to the expert owners in AllToAllDispatcher
        dispatch_postprocess  identity here; regroup received chunks by local expert there
    experts(x, tokens_per_expert_E) -> y (same layout)
    combine(y, meta) -> y_TD
        combine_preprocess    identity here (padded: gather y_ND = y_ECD[buffer_row_N])
        combine_communicate   identity here; the reverse all-to-all there
        combine_postprocess   y_TD[t] = sum_k weights_TK[t, k] * y_N[row of (t, k)], dropped slots 0

``communicate`` returns a :class:`Pending` whose ``wait()`` yields the tensor, so that a subclass can
return an async collective handle and the caller can overlap it with other work (start/wait handles).
All per-call state lives in the frozen :class:`DispatchMeta` returned by preprocess; the dispatcher
object itself is stateless.

Layouts: ``"contiguous"`` rows ``[N, D]`` ordered by (expert, token, slot), counts in
``tokens_per_expert_E`` (dropless and capacity modes: dropped slots are simply absent);
``"padded"`` ``[E, C, D]`` zero-padded buffers as in GShard (Lepikhin et al. 2020, Alg. 1) and
DeepSpeed-MoE (``einsum("sec,sm->ecm")``): a kept slot goes to row ``routing.slots_TK`` of its
expert's buffer when the gate gave slots, else to its rank in (expert, token) order; C is
``routing.capacity`` or, dropless, the largest count.

Combine is exact and deterministic: each kept slot writes its weighted row into its own place of a
``[T*K, D]`` buffer (unique indices), then the K slots of a token are summed in slot order.
Differentiable w.r.t. ``x_TD``, the expert outputs and ``routing.weights_TK``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from reference.moe.routing import Routing

Layout = Literal["contiguous", "padded"]
LAYOUTS: tuple[str, ...] = ("contiguous", "padded")


@dataclass(frozen=True)
class DispatchMeta:
    """Everything combine needs to undo a dispatch (one per call; never stored on the module)."""

    num_tokens: int  # T
    top_k: int  # K
    num_experts: int  # E
    hidden: int  # D
    layout: str  # "contiguous" | "padded"
    assignment_N: Tensor  # int64 [N], flat slot index t*K + k of each expert-ordered row
    weights_N: Tensor  # float [N], combine weight of each row (differentiable, from weights_TK)
    tokens_per_expert_E: Tensor  # int64 [E], kept assignments per expert (= routing.counts_E)
    capacity: int | None = None  # C of the padded layout (rows per expert buffer)
    buffer_row_N: Tensor | None = None  # int64 [N], row e*C + slot in the flat [E*C] buffer (padded)

    @property
    def num_kept(self) -> int:
        return self.assignment_N.shape[0]

    @property
    def token_N(self) -> Tensor:
        """Source token of each expert-ordered row."""
        return torch.div(self.assignment_N, self.top_k, rounding_mode="floor")


class Pending:
    """A tensor that may still be in flight; ``wait()`` returns it. Local ops are already complete."""

    def __init__(self, value: Tensor) -> None:
        self._value = value

    def wait(self) -> Tensor:
        return self._value


# ------------------------------------------------------------------ pure-torch permutation ops
# The torch reference of kernels/permute.py; a Triton backend replaces these two functions.
def permute(x_TD: Tensor, token_N: Tensor) -> Tensor:
    """Gather rows: ``x_ND[n] = x_TD[token_N[n]]``."""
    return x_TD.index_select(0, token_N)


def unpermute(y_ND: Tensor, assignment_N: Tensor, weights_N: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """Weighted scatter back: ``y_TD[t] = sum_k w * y_ND[row of (t, k)]`` over kept slots, others 0.

    Slots are unique, so the scatter into ``[T*K, D]`` has no collisions (deterministic), and the
    sum over K runs in slot order.
    """
    D = y_ND.shape[-1]
    weighted_ND = y_ND * weights_N.to(y_ND.dtype).unsqueeze(-1)
    y_TKD = y_ND.new_zeros(num_tokens * top_k, D).index_copy(0, assignment_N, weighted_ND)
    return y_TKD.view(num_tokens, top_k, D).sum(dim=1)


class LocalDispatcher:
    """Single-process dispatcher: permutes to expert-contiguous (or padded) order and back.

    Subclass hooks: override the ``*_communicate`` methods (and extend preprocess/postprocess and
    :class:`DispatchMeta`) for all-to-all; :meth:`dispatch` and :meth:`combine` stay the same.
    """

    def __init__(self, num_experts: int, layout: Layout = "contiguous") -> None:
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise ValueError(f"{type(self).__name__}: num_experts must be a positive int, got {num_experts!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"{type(self).__name__}: layout must be one of {LAYOUTS}, got {layout!r}")
        self.num_experts = num_experts
        self.layout = layout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_experts={self.num_experts}, layout={self.layout!r})"

    # ------------------------------------------------------------------------- public API
    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchMeta]:
        """Route ``x_TD [T, D]``: returns (``x_ND`` or ``x_ECD``, ``tokens_per_expert_E``, meta)."""
        x, meta = self.dispatch_preprocess(x_TD, routing)
        x = self.dispatch_communicate(x, meta).wait()
        return self.dispatch_postprocess(x, meta)

    def combine(self, y: Tensor, meta: DispatchMeta) -> Tensor:
        """Undo :meth:`dispatch` on the expert outputs ``y`` (same layout): weighted ``y_TD [T, D]``."""
        y = self.combine_preprocess(y, meta)
        y = self.combine_communicate(y, meta).wait()
        return self.combine_postprocess(y, meta)

    # ----------------------------------------------------------------------------- dispatch
    def dispatch_preprocess(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, DispatchMeta]:
        meta = self.make_meta(x_TD, routing)
        x_ND = permute(x_TD, meta.token_N)
        if meta.layout == "padded":
            E, C, D = meta.num_experts, meta.capacity, meta.hidden
            x_ECD = x_ND.new_zeros(E * C, D).index_copy(0, meta.buffer_row_N, x_ND)
            return x_ECD.view(E, C, D), meta
        return x_ND, meta

    def dispatch_communicate(self, x: Tensor, meta: DispatchMeta) -> Pending:
        return Pending(x)

    def dispatch_postprocess(self, x: Tensor, meta: DispatchMeta) -> tuple[Tensor, Tensor, DispatchMeta]:
        return x, meta.tokens_per_expert_E, meta

    # ------------------------------------------------------------------------------ combine
    def combine_preprocess(self, y: Tensor, meta: DispatchMeta) -> Tensor:
        expected = (
            (meta.num_experts, meta.capacity, meta.hidden) if meta.layout == "padded" else (meta.num_kept, meta.hidden)
        )
        if tuple(y.shape) != expected:
            raise ValueError(f"{type(self).__name__}.combine: expected y of shape {expected}, got {tuple(y.shape)}")
        if meta.layout == "padded":
            return y.reshape(-1, meta.hidden).index_select(0, meta.buffer_row_N)
        return y

    def combine_communicate(self, y_ND: Tensor, meta: DispatchMeta) -> Pending:
        return Pending(y_ND)

    def combine_postprocess(self, y_ND: Tensor, meta: DispatchMeta) -> Tensor:
        return unpermute(y_ND, meta.assignment_N, meta.weights_N, meta.num_tokens, meta.top_k)

    # ------------------------------------------------------------------------- permutation
    def make_meta(self, x_TD: Tensor, routing: Routing) -> DispatchMeta:
        """Sort kept assignments by (expert, token, slot) and build the metadata (no data moved)."""
        self._check(x_TD, routing)
        T, K = routing.expert_ids_TK.shape
        E = self.num_experts
        kept = routing.kept_TK.reshape(-1)
        # dropped slots get key E so they sort last; stable sort keeps (token, slot) order inside an expert
        key = torch.where(kept, routing.expert_ids_TK.reshape(-1), torch.full_like(kept, E, dtype=torch.long))
        order = torch.sort(key, stable=True).indices
        tokens_per_expert_E = torch.bincount(key, minlength=E + 1)[:E]
        n_kept = int(tokens_per_expert_E.sum())  # host sync: the routed row count sets the shapes
        assignment_N = order[:n_kept]
        weights_N = routing.weights_TK.reshape(-1)[assignment_N]
        capacity, buffer_row_N = None, None
        if self.layout == "padded":
            capacity, buffer_row_N = self._buffer_rows(routing, assignment_N, key[assignment_N], tokens_per_expert_E)
        return DispatchMeta(
            num_tokens=T,
            top_k=K,
            num_experts=E,
            hidden=x_TD.shape[-1],
            layout=self.layout,
            assignment_N=assignment_N,
            weights_N=weights_N,
            tokens_per_expert_E=tokens_per_expert_E,
            capacity=capacity,
            buffer_row_N=buffer_row_N,
        )

    @staticmethod
    def _buffer_rows(
        routing: Routing, assignment_N: Tensor, expert_N: Tensor, tokens_per_expert_E: Tensor
    ) -> tuple[int, Tensor]:
        """Capacity C and the row ``e * C + slot`` of each kept assignment in the padded buffer."""
        if routing.slots_TK is not None:
            slot_N = routing.slots_TK.reshape(-1)[assignment_N]
        else:  # rank inside the expert in (token, slot) order
            start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
            slot_N = torch.arange(assignment_N.shape[0], device=assignment_N.device) - start_E[expert_N]
        max_count = int(tokens_per_expert_E.max()) if tokens_per_expert_E.numel() else 0
        capacity = routing.capacity if routing.capacity is not None else max(max_count, 1)
        if slot_N.numel() and (int(slot_N.min()) < 0 or int(slot_N.max()) >= capacity):
            raise ValueError(
                f"{LocalDispatcher.__name__}: a kept slot lies outside the capacity buffer [0, {capacity}) "
                f"(slots {int(slot_N.min())}..{int(slot_N.max())})"
            )
        return capacity, expert_N * capacity + slot_N

    def _check(self, x_TD: Tensor, routing: Routing) -> None:
        name = type(self).__name__
        if x_TD.dim() != 2:
            raise ValueError(f"{name}: expected x_TD with 2 dims [T, D], got shape {tuple(x_TD.shape)}")
        ids = routing.expert_ids_TK
        if ids.dim() != 2 or ids.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"{name}: routing.expert_ids_TK shape {tuple(ids.shape)} does not match {x_TD.shape[0]} tokens"
            )
        for field in ("weights_TK", "kept_TK"):
            if tuple(getattr(routing, field).shape) != tuple(ids.shape):
                raise ValueError(f"{name}: routing.{field} shape differs from expert_ids_TK {tuple(ids.shape)}")
        if routing.num_experts != self.num_experts:
            raise ValueError(f"{name}: routing has {routing.num_experts} experts, dispatcher {self.num_experts}")
