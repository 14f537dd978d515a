"""Expert parallelism: an all-to-all dispatcher and the function that shards a model's MoE layers.

Shape legend: T local tokens, K top-k, D model dim, E experts, G ranks of the EP group, L = E / G
local experts (member g holds experts g*L .. g*L+L-1), N rows this rank routes, M rows it receives.

Data flow (Megatron-Core ``MoEAlltoAllTokenDispatcher``; DeepSpeed-MoE ``_AllToAll``)::

    dispatch_preprocess   LocalDispatcher permute -> x_ND ordered by (expert, token, slot);
                          all-gather tokens_per_expert_E over EP -> counts_GE (every rank, CPU ints;
                          the one host sync: row counts size the receive buffers)
    dispatch_communicate  AllToAll(flat | hetu | rail).start(x_ND, counts_GG) -> handle (async)
    dispatch_postprocess  rows arrive by (source g, local expert l) -> regroup to (l, g):
                          x_MD contiguous per local expert, tokens_per_local_expert_L
    experts(x_MD, tokens_per_local_expert_L)
    combine_preprocess    regroup (l, g) -> (g, l)
    combine_communicate   AllToAll.start(y_MD, counts_GG^T) -> handle: the rows return home
    combine_postprocess   LocalDispatcher unpermute (weighted sum over the K slots)

Cost per MoE layer and rank: 2 all-to-alls of N*D elements forward, 2 backward (autograd runs the
reverse exchanges), plus one all-gather of G*E int64 counts. Outputs and gradients equal the
single-process layer exactly up to summation order (tests: EP=1/2/4 in fp64).

:func:`parallelize_moe` swaps each :class:`~reference.moe.layer.MoELayer`'s dispatcher for an
:class:`EPDispatcher` and its experts for the local slice (built full, then sliced, because
``ExpertWeights`` has no ``expert_offset`` yet; the copy equals the full model's init).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reference.comm.alltoall import AllToAll, AllToAllHandle, gather_counts, regroup
from reference.moe.dispatcher import DispatchMeta, LocalDispatcher
from reference.moe.routing import Routing
from reference.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class EPDispatchMeta(DispatchMeta):
    """:class:`DispatchMeta` plus the EP exchange: ``counts_GE[g, e]`` rows member g sends to expert e."""

    counts_GE: Tensor | None = None  # int64 [G, E] on the CPU
    ep_rank: int = 0

    @property
    def group_size(self) -> int:
        return self.counts_GE.shape[0]

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.group_size

    @property
    def local_counts_GL(self) -> Tensor:
        L = self.local_experts
        return self.counts_GE[:, self.ep_rank * L : (self.ep_rank + 1) * L]

    @property
    def counts_GG(self) -> Tensor:
        """Rows member s sends to member d (sum over d's experts)."""
        G = self.group_size
        return self.counts_GE.view(G, G, self.local_experts).sum(-1)


class EPDispatcher(LocalDispatcher):
    """All-to-all dispatcher over the EP group of ``a2a`` (contiguous layout only).

    ``communicate`` returns the all-to-all handle; ``dispatch()``/``combine()`` call ``wait()`` at
    once, a scheduler may split them to overlap other work.
    """

    def __init__(self, num_experts: int, a2a: AllToAll) -> None:
        super().__init__(num_experts, layout="contiguous")
        G = a2a.ep.size
        if num_experts % G:
            raise ValueError(f"EPDispatcher: num_experts ({num_experts}) must be divisible by expert_parallel ({G})")
        self.a2a = a2a
        self.num_local = num_experts // G

    def __repr__(self) -> str:
        return f"EPDispatcher(num_experts={self.num_experts}, local={self.num_local}, {self.a2a!r})"

    # ----------------------------------------------------------------------------- dispatch
    def dispatch_preprocess(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, EPDispatchMeta]:
        x_ND, meta = super().dispatch_preprocess(x_TD, routing)
        counts_GE = gather_counts(meta.tokens_per_expert_E, self.a2a.ep)
        fields = {f: getattr(meta, f) for f in meta.__dataclass_fields__}
        return x_ND, EPDispatchMeta(**fields, counts_GE=counts_GE, ep_rank=self.a2a.ep.rank)

    def dispatch_communicate(self, x_ND: Tensor, meta: EPDispatchMeta) -> AllToAllHandle:
        return self.a2a.start(x_ND, meta.counts_GG)

    def dispatch_postprocess(self, x_MD: Tensor, meta: EPDispatchMeta) -> tuple[Tensor, Tensor, EPDispatchMeta]:
        c = meta.local_counts_GL
        G, L = c.shape
        sizes = {(g, l): int(c[g, l]) for g in range(G) for l in range(L)}
        x = regroup(x_MD, [(g, l) for g in range(G) for l in range(L)], sizes, [(g, l) for l in range(L) for g in range(G)])
        return x, c.sum(0).to(x_MD.device), meta

    # ------------------------------------------------------------------------------ combine
    def combine_preprocess(self, y: Tensor, meta: EPDispatchMeta) -> Tensor:
        c = meta.local_counts_GL
        G, L = c.shape
        if y.dim() != 2 or y.shape != (int(c.sum()), meta.hidden):
            raise ValueError(f"EPDispatcher.combine: expected y of shape ({int(c.sum())}, {meta.hidden}), got {tuple(y.shape)}")
        sizes = {(g, l): int(c[g, l]) for g in range(G) for l in range(L)}
        return regroup(y, [(g, l) for l in range(L) for g in range(G)], sizes, [(g, l) for g in range(G) for l in range(L)])

    def combine_communicate(self, y_MD: Tensor, meta: EPDispatchMeta) -> AllToAllHandle:
        return self.a2a.start(y_MD, meta.counts_GG.T.contiguous())


# ------------------------------------------------------------------------------ sharding
def shard_experts(experts: nn.Module, local: range) -> nn.Module:
    """A copy of ``experts`` (an ``ExpertWeights``) holding only experts ``local`` (same class, same
    init values as the full module's slice)."""
    kwargs = dict(activation=experts.activation, bias=experts.has_bias, init_std=experts.init_std,
                  num_layers=experts.num_layers, seed=experts.seed)
    if hasattr(experts, "impl"):
        kwargs["impl"] = experts.impl
    ref = experts.w1_EDF
    out = type(experts)(len(local), experts.hidden, experts.ffn_hidden, **kwargs, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(getattr(experts, name)[local.start : local.stop])
    return out


def moe_layers(model: nn.Module) -> list[nn.Module]:
    from reference.moe.layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the routed-expert parameters (sharded over EP, reduced over EDP); all else is dense."""
    return {id(p) for layer in moe_layers(model) for p in layer.experts.parameters()}


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters in registration order."""
    ids = expert_parameter_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in ids], [p for p in params if id(p) in ids]


def parallelize_moe(model: nn.Module, groups: ParallelGroups, algorithm: str | None = None) -> nn.Module:
    """Shard every MoE layer of ``model`` over ``groups.ep`` in place (no-op at EP=1); returns ``model``.

    ``algorithm`` defaults to ``groups.plan.alltoall``.
    """
    algorithm = algorithm or groups.plan.alltoall
    a2a = AllToAll.from_groups(algorithm, groups)
    for layer in moe_layers(model):
        if layer.dispatcher.layout != "contiguous":
            raise ValueError("parallelize_moe: expert parallelism needs MoELayer(layout='contiguous')")
        E = layer.dispatcher.num_experts
        local = groups.local_experts(E)
        if groups.ep.size > 1 or algorithm != "flat":
            layer.dispatcher = EPDispatcher(E, a2a)
            if len(local) != E:
                layer.experts = shard_experts(layer.experts, local)
        layer.expert_range = local  # checkpoints read it to name global experts
    return model
