"""Gates (routers) of the testbed. Every gate maps tokens to a :class:`~reference.moe.routing.Routing`.

Shape legend: T tokens, D model dim, E experts, K assignment slots per token (top-k; E for expert
choice), C capacity (tokens per expert buffer), G expert groups, V vocabulary.

Gates (``GATES[name]``, built from a :class:`~semoe.model_spec.ModelSpec` by :func:`build_gate`):

================  =======================================================================================
``topk``          softmax, top-k (GShard / DeepSpeed ``TopKGate``); weights renormalised iff
                  ``spec.renormalize``
``switch``        top-1 with multiplicative input jitter in training; weight = raw softmax probability
                  (Fedus et al. 2021, "Switch Transformers", Sec. 2.1 and Appendix on jitter)
``gshard``        top-2, optional random routing of the 2nd expert (Lepikhin et al. 2020, Algorithm 1)
``noisy_topk``    logits + N(0,1) * softplus(x W_noise), top-k, softmax over the kept k
                  (Shazeer et al. 2017, Eq. 3-5)
``ktop1``         k prototype groups of E/k experts, softmax and top-1 inside each group, weights summed
                  (Yang et al. 2021, "M6-T: Exploring Sparse Expert Models and Beyond", expert prototyping)
``hash``          fixed random hash of the token id, no parameters (Roller et al. 2021, "Hash Layers")
``base``          balanced assignment solved by an auction (Lewis et al. 2021, "BASE Layers";
                  Bertsekas 1988/1992 auction algorithm); greedy top-k in eval
``sam``           switch to one expert group, then top-k inside it, plus an alignment loss (HetuMoE,
                  Nie et al. 2022, arXiv 2203.14685; SAM from Jiang et al. 2021, arXiv 2110.07431)
``expert_choice`` each expert takes its top-C tokens (Zhou et al. 2022, "Mixture-of-Experts with Expert
                  Choice Routing")
``sigmoid_bias``  sigmoid scores, selection with a non-learned per-expert bias, auxiliary-loss-free
                  balancing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", Sec. 2.1.2)
================  =======================================================================================

Pipeline shared by the token-choice gates (:meth:`Gate.forward`): fp32 (fp64 for fp64 inputs) logits
-> gate-specific choice of ``K`` experts per token with raw weights -> capacity and drop policy
(:func:`expert_capacity`, :func:`drop_to_capacity`) -> optional renormalisation of the kept weights
(after dropping, as DeepSpeed ``top2gating``) -> :class:`Routing`.

Auxiliary losses are returned unscaled in ``Routing.aux_losses`` (the model multiplies by the spec's
coefficients): ``load_balance`` (Switch Eq. 4 / GShard: ``E * sum_e f_e * P_e``), ``z_loss``
(ST-MoE, Zoph et al. 2022, Eq. 5: ``mean_t logsumexp(logits_t)^2``) and gate-specific ones
(``alignment`` for ``sam``). Which gate returns which key is listed in each class docstring.

DeepSpeed compatibility: with ``drop_policy="deepspeed"`` the ``topk`` gate keeps exactly the tokens
``deepspeed.moe.sharded_moe.top1gating(use_rts=False)`` / ``top2gating`` / ``topkgating`` keep (see
:func:`drop_to_capacity`); ``routing_to_combine_tensor`` rebuilds DeepSpeed's ``[T, E, C]`` combine
tensor from a Routing.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.moe.balanced_assignment import balanced_assignment
from reference.moe.capacity import (
    DROP_POLICIES,
    _balance_ids,
    _token_order_ranks,
    drop_to_capacity,
    expert_capacity,
    load_balance_loss,
    routing_to_combine_tensor,
    z_loss,
)
from reference.moe.routing import Routing
from semoe.model_spec import ModelSpec

__all__ = [
    "DROP_POLICIES",
    "GATES",
    "BaseGate",
    "ExpertChoiceGate",
    "GShardGate",
    "Gate",
    "HashGate",
    "KTop1Gate",
    "NoisyTopKGate",
    "SAMGate",
    "SigmoidBiasGate",
    "SwitchGate",
    "TopKGate",
    "balanced_assignment",
    "build_gate",
    "drop_to_capacity",
    "expert_capacity",
    "load_balance_loss",
    "routing_to_combine_tensor",
    "z_loss",
]


# ------------------------------------------------------------------------------------------ gates
def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{param}: {message}")


class Gate(nn.Module):
    """Base of all gates: ``forward(x_TD, token_ids_T=None) -> Routing``.

    Holds the router ``nn.Linear(D, E, bias=False)`` named ``router`` (parameter count as
    ``semoe.sizing.router_params``). Subclasses implement :meth:`choose` (token-choice gates) or
    override :meth:`forward`. ``renormalize_kept``: ``None`` follows ``spec.renormalize``, a bool fixes
    it for the gate (its paper's definition). ``drop_policy`` overrides ``spec.drop_policy`` (needed
    for ``"deepspeed"``, which ModelSpec does not list yet).
    """

    name: ClassVar[str] = ""
    renormalize_kept: ClassVar[bool | None] = None
    has_router: ClassVar[bool] = True

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None) -> None:
        super().__init__()
        self.hidden = spec.hidden
        self.num_experts = spec.experts
        self.top_k = spec.top_k
        self.capacity_factor = spec.capacity_factor
        self.min_capacity = spec.min_capacity
        self.drop_policy = drop_policy if drop_policy is not None else spec.drop_policy
        _require(
            self.drop_policy in DROP_POLICIES,
            "drop_policy",
            f"must be one of {', '.join(DROP_POLICIES)}, got {self.drop_policy!r}",
        )
        _require(1 <= self.top_k <= self.num_experts, "top_k", f"must be in 1..experts ({self.num_experts})")
        # gates following the spec renormalise only for top_k > 1: a top-1 gate weights by the raw
        # probability (Switch), else the router would get no gradient from the task loss
        follow = spec.renormalize and spec.top_k > 1
        self.renormalize = follow if self.renormalize_kept is None else self.renormalize_kept
        if self.has_router:
            self.router = nn.Linear(spec.hidden, spec.experts, bias=False)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"drop_policy={self.drop_policy!r}, renormalize={self.renormalize}"
        )

    # ------------------------------------------------------------------ shared steps
    def _check_input(self, x_TD: Tensor) -> None:
        _require(
            x_TD.dim() == 2 and x_TD.shape[1] == self.hidden,
            "x_TD",
            f"expected shape [tokens, {self.hidden}], got {list(x_TD.shape)}",
        )

    @staticmethod
    def compute_dtype(x_TD: Tensor) -> torch.dtype:
        """fp32 for fp32/bf16/fp16 inputs (as DeepSpeed ``TopKGate``), fp64 for fp64 inputs."""
        return torch.float64 if x_TD.dtype == torch.float64 else torch.float32

    def logits(self, x_TD: Tensor, linear: nn.Linear | None = None) -> Tensor:
        """``x W^T`` in fp32 (fp64 for fp64 input) whatever the dtype of ``x`` and of the weight."""
        linear = self.router if linear is None else linear
        dtype = self.compute_dtype(x_TD)
        return F.linear(x_TD.to(dtype), linear.weight.to(dtype))

    def choose(
        self, x_TD: Tensor, token_ids_T: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, dict[str, Tensor]]:
        """Gate-specific choice: ``(expert_ids_TK, raw_weights_TK, chosen_TK or None, probs_TE, aux)``."""
        raise NotImplementedError

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        self._check_input(x_TD)
        ids_TK, raw_TK, chosen_TK, probs_TE, aux = self.choose(x_TD, token_ids_T)
        return self._finish(ids_TK, raw_TK, chosen_TK, probs_TE, aux)

    def _finish(
        self,
        ids_TK: Tensor,
        raw_TK: Tensor,
        chosen_TK: Tensor | None,
        probs_TE: Tensor,
        aux: dict[str, Tensor],
    ) -> Routing:
        """Capacity, drop policy, renormalisation of the kept weights (after dropping), counts."""
        T, K = ids_TK.shape
        E = self.num_experts
        chosen_TK = torch.ones_like(ids_TK, dtype=torch.bool) if chosen_TK is None else chosen_TK
        capacity = expert_capacity(T, E, K, self.capacity_factor, self.min_capacity)
        slots_TK = None
        kept_TK = chosen_TK
        if capacity is not None:
            kept_TK, slots_TK = drop_to_capacity(ids_TK, raw_TK, chosen_TK, E, capacity, self.drop_policy)
        weights_TK = raw_TK * kept_TK  # exactly 0 where dropped, as DeepSpeed's gates * mask
        if self.renormalize:
            denom_T1 = weights_TK.sum(dim=-1, keepdim=True)
            weights_TK = weights_TK / denom_T1.clamp(min=torch.finfo(weights_TK.dtype).eps)
        return Routing(
            expert_ids_TK=ids_TK,
            weights_TK=weights_TK,
            kept_TK=kept_TK,
            counts_E=torch.bincount(ids_TK[kept_TK], minlength=E),
            probs_TE=probs_TE,
            capacity=capacity,
            slots_TK=slots_TK,
            aux_losses=aux,
        )

    def _softmax_topk(self, logits_TE: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Softmax over experts, top-k: ``(ids_TK, probs_TK, probs_TE, {load_balance, z_loss})``."""
        probs_TE = logits_TE.softmax(dim=-1)
        probs_TK, ids_TK = probs_TE.topk(self.top_k, dim=-1)
        aux = {"load_balance": load_balance_loss(probs_TE, _balance_ids(ids_TK)), "z_loss": z_loss(logits_TE)}
        return ids_TK, probs_TK, probs_TE, aux


class TopKGate(Gate):
    """Softmax top-k (GShard / DeepSpeed ``TopKGate``). Weights: the softmax probabilities of the k
    chosen experts, renormalised over the kept ones iff ``spec.renormalize``.
    aux: ``load_balance`` (first choice for k <= 2, all k otherwise), ``z_loss``."""

    name = "topk"

    def choose(self, x_TD, token_ids_T):
        ids_TK, probs_TK, probs_TE, aux = self._softmax_topk(self.logits(x_TD))
        return ids_TK, probs_TK, None, probs_TE, aux


class SwitchGate(TopKGate):
    """Switch Transformer top-1 (Fedus et al. 2021, Eq. 1-2): weight = raw softmax probability.

    In training the router input is multiplied by noise ``U(1 - eps, 1 + eps)``, ``eps = 1e-2``
    (Switch Transformers' "multiplicative jitter"; DeepSpeed ``noisy_gate_policy="Jitter"``).
    aux: ``load_balance``, ``z_loss``."""

    name = "switch"
    renormalize_kept = False

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None, jitter_eps: float = 1e-2) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        _require(self.top_k == 1, "top_k", f"the switch gate is top-1, got {self.top_k}")
        _require(0 <= jitter_eps < 1, "jitter_eps", f"must be in [0, 1), got {jitter_eps}")
        self.jitter_eps = jitter_eps

    def choose(self, x_TD, token_ids_T):
        x_TD = x_TD.to(self.compute_dtype(x_TD))
        if self.training and self.jitter_eps > 0:
            x_TD = x_TD * (1 - self.jitter_eps + 2 * self.jitter_eps * torch.rand_like(x_TD))
        ids_TK, probs_TK, probs_TE, aux = self._softmax_topk(self.logits(x_TD))
        return ids_TK, probs_TK, None, probs_TE, aux


class GShardGate(TopKGate):
    """GShard top-2 (Lepikhin et al. 2020, Algorithm 1). Weights renormalised over the kept experts
    iff ``spec.renormalize`` (DeepSpeed ``top2gating`` renormalises after dropping).

    ``random_routing`` (off by default, training only): the 2nd expert is used only if
    ``2 * g2 > u``, ``u ~ U(0, 1)``, with ``g2 = p2 / (p1 + p2)`` its normalised gate value; an unused
    2nd slot has ``kept = False``, takes no capacity and its weight is 0.
    aux: ``load_balance`` (first choice, as GShard), ``z_loss``."""

    name = "gshard"

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None, random_routing: bool = False) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        _require(self.top_k == 2, "top_k", f"the gshard gate is top-2, got {self.top_k}")
        self.random_routing = random_routing

    def choose(self, x_TD, token_ids_T):
        ids_TK, probs_TK, probs_TE, aux = self._softmax_topk(self.logits(x_TD))
        chosen_TK = None
        if self.random_routing and self.training:
            g2_T = (probs_TK[:, 1] / probs_TK.sum(dim=-1)).detach()
            use2_T = 2 * g2_T > torch.rand_like(g2_T)
            chosen_TK = torch.stack([torch.ones_like(use2_T), use2_T], dim=1)
        return ids_TK, probs_TK, chosen_TK, probs_TE, aux


class NoisyTopKGate(Gate):
    """Noisy top-k gating (Shazeer et al. 2017, Eq. 3-5).

    ``H = x W_g + N(0, 1) * softplus(x W_noise)`` in training (``H = x W_g`` in eval); the k largest
    ``H`` are kept and the weights are ``softmax`` over the kept entries (= the softmax of ``H``
    renormalised over the kept slots, also after capacity dropping). ``W_noise`` is the second
    ``nn.Linear(D, E, bias=False)`` named ``noise``.
    aux: ``load_balance`` and ``z_loss`` on ``H`` (in place of the paper's importance/load losses)."""

    name = "noisy_topk"
    renormalize_kept = True

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        self.noise = nn.Linear(spec.hidden, spec.experts, bias=False)

    def choose(self, x_TD, token_ids_T):
        logits_TE = self.logits(x_TD)
        if self.training:
            noise_std_TE = F.softplus(self.logits(x_TD, self.noise))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        ids_TK, probs_TK, probs_TE, aux = self._softmax_topk(logits_TE)
        return ids_TK, probs_TK, None, probs_TE, aux


class KTop1Gate(Gate):
    """k top-1, M6-T expert prototyping (Yang et al. 2021, arXiv 2105.15082).

    The E experts form k prototype groups of E/k consecutive experts; each group has its own softmax
    and routes the token to its top-1; slot ``g`` of the token is group ``g``'s expert and its weight is
    the in-group probability (outputs of the k prototypes are summed, not renormalised).
    ``probs_TE`` holds the in-group softmaxes. aux: ``load_balance`` (mean over groups of each
    group's Switch loss), ``z_loss`` (mean over groups)."""

    name = "ktop1"
    renormalize_kept = False

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        _require(
            self.num_experts % self.top_k == 0,
            "top_k",
            f"ktop1 needs experts ({self.num_experts}) divisible by top_k ({self.top_k})",
        )

    def choose(self, x_TD, token_ids_T):
        T, K, S = x_TD.shape[0], self.top_k, self.num_experts // self.top_k
        logits_TKS = self.logits(x_TD).reshape(T, K, S)
        probs_TKS = logits_TKS.softmax(dim=-1)
        w_TK, local_TK = probs_TKS.max(dim=-1)
        ids_TK = local_TK + S * torch.arange(K, device=x_TD.device)
        f_KS = F.one_hot(local_TK, S).to(probs_TKS.dtype).mean(dim=0)
        aux = {
            "load_balance": S * (f_KS * probs_TKS.mean(dim=0)).sum(dim=-1).mean(),
            "z_loss": torch.logsumexp(logits_TKS, dim=-1).square().mean(),
        }
        return ids_TK, w_TK, None, probs_TKS.reshape(T, K * S), aux


class HashGate(Gate):
    """Hash layer (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed random table
    ``vocab -> k distinct experts`` (buffer ``table_VK``, drawn once from ``seed``); no parameters.

    Needs ``token_ids_T``. Weights ``1/k`` (1.0 for k = 1), not learned, no gradient; capacity and
    drop policy apply as for any gate. ``probs_TE`` is the one-hot assignment / k. aux: none."""

    name = "hash"
    renormalize_kept = False
    has_router = False

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None, seed: int = 0) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        self.vocab = spec.vocab
        generator = torch.Generator().manual_seed(seed)
        if self.top_k == 1:
            table_VK = torch.randint(self.num_experts, (spec.vocab, 1), generator=generator)
        else:  # k distinct experts per token id: the first k of a random permutation
            noise_VE = torch.rand(spec.vocab, self.num_experts, generator=generator)
            table_VK = noise_VE.argsort(dim=1)[:, : self.top_k]
        self.register_buffer("table_VK", table_VK)

    def choose(self, x_TD, token_ids_T):
        T = x_TD.shape[0]
        _require(token_ids_T is not None, "token_ids_T", "the hash gate routes by token id; pass token_ids_T")
        _require(
            token_ids_T.shape == (T,) and not token_ids_T.is_floating_point(),
            "token_ids_T",
            f"expected integer ids of shape [{T}], got {token_ids_T.dtype} {list(token_ids_T.shape)}",
        )
        if T:
            lo, hi = int(token_ids_T.min()), int(token_ids_T.max())
            ok = lo >= 0 and hi < self.vocab
            _require(ok, "token_ids_T", f"ids must be in 0..{self.vocab - 1}, got {lo}..{hi}")
        ids_TK = self.table_VK[token_ids_T.long()]
        dtype = self.compute_dtype(x_TD)
        w_TK = torch.full(ids_TK.shape, 1.0 / self.top_k, dtype=dtype, device=x_TD.device)
        probs_TE = torch.zeros(T, self.num_experts, dtype=dtype, device=x_TD.device).scatter_(1, ids_TK, w_TK)
        return ids_TK, w_TK, None, probs_TE, {}


class BaseGate(Gate):
    """BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models").

    Training: the balanced assignment maximising the total score ``sum x_t . w_e`` with every expert
    receiving exactly ``T*k/E`` tokens (:func:`balanced_assignment`, auction algorithm); tokens times
    top_k must be divisible by experts. Eval: greedy top-k by score, no balancing, dropless (the
    paper's test-time routing). Weight = ``sigmoid(x_t . w_e)`` (paper Eq. for the BASE layer output
    ``h + sigma(h . w_e) f_e(h)``); ``probs_TE`` = sigmoid scores. Capacity in training is
    ``T*k/E`` (``spec.capacity_factor`` is ignored). aux: ``z_loss`` only (no balancing loss needed).

    ``auction_eps`` sets the auction's final epsilon relative to the score span: the assignment's total
    score is within ``T * k * auction_eps * span`` of the optimum (in practice far closer). The default
    1e-2 is about 10x faster than the exact solve (``balanced_assignment(..., eps_final=None)``) and is
    what a training step needs; the BASE paper's own implementation also runs an approximate auction.
    """

    name = "base"
    renormalize_kept = False

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None, auction_eps: float = 1e-2) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        _require(auction_eps > 0, "auction_eps", f"must be > 0, got {auction_eps}")
        self.auction_eps = auction_eps

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        self._check_input(x_TD)
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.sigmoid()
        aux = {"z_loss": z_loss(logits_TE)}
        if not self.training:
            ids_TK = logits_TE.detach().topk(K, dim=-1).indices
            kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
            return Routing(
                expert_ids_TK=ids_TK,
                weights_TK=probs_TE.gather(1, ids_TK),
                kept_TK=kept_TK,
                counts_E=torch.bincount(ids_TK.reshape(-1), minlength=E),
                probs_TE=probs_TE,
                aux_losses=aux,
            )
        _require(
            (T * K) % E == 0,
            "x_TD",
            f"the base gate balances exactly: tokens * top_k ({T} * {K}) must be divisible by experts ({E})",
        )
        span = float(logits_TE.detach().max() - logits_TE.detach().min()) if T else 0.0
        eps = self.auction_eps * span if span > 0 else None
        ids_TK = balanced_assignment(logits_TE, K, eps_final=eps)
        kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        return Routing(
            expert_ids_TK=ids_TK,
            weights_TK=probs_TE.gather(1, ids_TK),
            kept_TK=kept_TK,
            counts_E=torch.bincount(ids_TK.reshape(-1), minlength=E),
            probs_TE=probs_TE,
            capacity=T * K // E,
            slots_TK=_token_order_ranks(ids_TK, kept_TK, E),
            aux_losses=aux,
        )


class SAMGate(Gate):
    """Switch-and-mixture (SAM) routing, as listed by HetuMoE (Nie et al. 2022, arXiv 2203.14685;
    SAM from Jiang et al. 2021, arXiv 2110.07431), with one router [D, E].

    ``p = softmax(x W)`` over all E experts, split into ``G = spec.expert_groups`` groups of ``E/G``
    consecutive experts (e.g. one group per node). Switch: the token goes to the group with the largest
    summed probability ``P_g = sum_{e in g} p_e``. Mixture: top-k of ``p`` inside that group; weights
    are those ``p_e``, renormalised over the kept ones iff ``spec.renormalize``.

    Alignment loss (our choice, the papers give no formula we can follow with one router):
    ``alignment = mean_t (1 - P_{g*(t)})``, the routing probability mass left outside the chosen group.
    It is 0 exactly when every token's distribution lies inside its group, where the two-level
    decision equals a flat top-k over all experts, and its gradient moves probability into the
    chosen group. aux: ``load_balance`` (experts), ``z_loss``, ``alignment``.
    """

    name = "sam"

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        self.groups = spec.expert_groups
        _require(
            self.num_experts % self.groups == 0,
            "expert_groups",
            f"experts ({self.num_experts}) must be divisible by expert_groups ({self.groups})",
        )
        S = self.num_experts // self.groups
        _require(self.top_k <= S, "top_k", f"sam picks top_k ({self.top_k}) inside one group of {S} experts")

    def choose(self, x_TD, token_ids_T):
        T, G = x_TD.shape[0], self.groups
        S = self.num_experts // G
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        probs_TGS = probs_TE.reshape(T, G, S)
        group_T = probs_TGS.sum(dim=-1).argmax(dim=-1)
        in_group_TS = probs_TGS[torch.arange(T, device=x_TD.device), group_T]
        w_TK, local_TK = in_group_TS.topk(self.top_k, dim=-1)
        ids_TK = local_TK + S * group_T.unsqueeze(1)
        aux = {
            "load_balance": load_balance_loss(probs_TE, _balance_ids(ids_TK)),
            "z_loss": z_loss(logits_TE),
            "alignment": (1 - in_group_TS.sum(dim=-1)).mean(),
        }
        return ids_TK, w_TK, None, probs_TE, aux


class ExpertChoiceGate(Gate):
    """Expert choice routing (Zhou et al. 2022, Sec. 3.2, Eq. 1): ``S = softmax(x W)`` over experts,
    each expert takes the ``C`` tokens with the largest ``S[:, e]``,
    ``C = max(min_capacity, ceil(cf * T * k / E))`` (at most T) with ``cf = capacity_factor`` or 1.0 when
    dropless. ``K = E`` slots per token: slot ``e`` is expert ``e``, ``kept_TK[t, e]`` marks that
    expert ``e`` took token ``t``, weight ``S[t, e]`` (not renormalised); slots number an expert's
    tokens in token order. aux: ``z_loss`` only (balanced by construction)."""

    name = "expert_choice"
    renormalize_kept = False

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        self._check_input(x_TD)
        T, E = x_TD.shape[0], self.num_experts
        cf = self.capacity_factor if self.capacity_factor is not None else 1.0
        C = min(T, expert_capacity(T, E, self.top_k, cf, self.min_capacity))
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_CE = probs_TE.detach().topk(C, dim=0).indices
        kept_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device).scatter_(0, top_CE, True)
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E).contiguous()
        return Routing(
            expert_ids_TK=ids_TE,
            weights_TK=probs_TE * kept_TE,
            kept_TK=kept_TE,
            counts_E=kept_TE.sum(dim=0),
            probs_TE=probs_TE,
            capacity=C,
            slots_TK=_token_order_ranks(ids_TE, kept_TE, E),
            aux_losses={"z_loss": z_loss(logits_TE)},
        )


class SigmoidBiasGate(Gate):
    """Auxiliary-loss-free balancing (DeepSeek-V3 Technical Report, Sec. 2.1.2).

    ``s = sigmoid(x W)``; experts selected by top-k of ``s + expert_bias`` (a buffer, not a
    parameter, used for selection only); weights ``s`` of the selected experts normalised to sum 1
    over the kept ones. The training loop calls :meth:`update_bias` with the observed counts.
    aux: ``load_balance`` (DeepSeek-V3's complementary balance loss ``E * sum_e f_e P_e`` with ``f``
    over all k choices and ``P`` the mean of ``s / sum_e s``, here over the whole batch rather than
    per sequence), ``z_loss``."""

    name = "sigmoid_bias"
    renormalize_kept = True

    def __init__(self, spec: ModelSpec, *, drop_policy: str | None = None) -> None:
        super().__init__(spec, drop_policy=drop_policy)
        self.register_buffer("expert_bias", torch.zeros(spec.experts))

    def choose(self, x_TD, token_ids_T):
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        biased_TE = scores_TE.detach() + self.expert_bias.to(scores_TE.dtype)
        ids_TK = biased_TE.topk(self.top_k, dim=-1).indices
        normalized_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        aux = {"load_balance": load_balance_loss(normalized_TE, ids_TK), "z_loss": z_loss(logits_TE)}
        return ids_TK, scores_TE.gather(1, ids_TK), None, scores_TE, aux

    @torch.no_grad()
    def update_bias(self, counts_E: Tensor, rate: float) -> None:
        """``b_e += rate * sign(mean(counts) - counts_e)``: lower the bias of overloaded experts, raise
        it for underloaded ones (DeepSeek-V3's bias update speed gamma = ``rate``)."""
        _require(counts_E.shape == (self.num_experts,), "counts_E", f"expected shape [{self.num_experts}]")
        counts_E = counts_E.to(self.expert_bias.device, torch.float64)
        self.expert_bias += rate * torch.sign(counts_E.mean() - counts_E).to(self.expert_bias.dtype)


GATES: dict[str, type[Gate]] = {
    cls.name: cls
    for cls in (
        TopKGate,
        SwitchGate,
        GShardGate,
        NoisyTopKGate,
        KTop1Gate,
        HashGate,
        BaseGate,
        SAMGate,
        ExpertChoiceGate,
        SigmoidBiasGate,
    )
}


def build_gate(spec: ModelSpec, **options) -> Gate:
    """The gate ``spec.gate`` built from ``spec``; ``options`` go to its constructor (``drop_policy``
    for every gate, ``jitter_eps`` for switch, ``random_routing`` for gshard, ``seed`` for hash)."""
    if spec.gate not in GATES:
        raise ValueError(f"gate: unknown gate {spec.gate!r}; known: {', '.join(GATES)}")
    return GATES[spec.gate](spec, **options)
