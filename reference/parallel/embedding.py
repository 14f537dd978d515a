"""Embedding partition across data-parallel ranks (SE-MoE, Shen et al. 2022, arXiv 2205.10034, sec. 3.4;
SEMOE.md mechanism 6).

Shape legend: N ranks of the DP group, r this rank, V vocab, H hidden, h = H / N columns per rank,
T_r tokens of rank r (flattened batch), T_all = sum_r T_r.

Rank k stores ``E[:, k h : (k + 1) h]`` (``weight_slice_Vh``) for the whole vocabulary, instead of the
full ``E_VH`` replicated on every rank::

    forward   counts   all-gather T_r                                   (N int64, sizes the buffers)
              ids      all-to-all: rank r sends its ids_T to every rank -> ids_all [T_all]
              lookup   weight_slice_Vh[ids_all]                         -> [T_all, h]
              vectors  all-to-all back: rows of rank j go to rank j     -> [N, T_r, h] -> x_TH
    backward  grads    all-to-all: column block k of dx_TH goes to rank k -> dx_all [T_all, h]
              update   index_add of dx_all into the slice's gradient rows (a sparse update: only rows
                       of ids seen this step are non-zero; ``sparse=True`` returns a COO gradient)

Each rank's slice gradient then already holds the contributions of every rank's tokens: no all-reduce
of the table's gradient (the replicated baseline all-reduces V H elements per step). It is scaled by
``grad_scale`` (default 1 / N) to equal the data-parallel mean the gradient buckets compute for the
other dense parameters. Per rank (equal T), elements sent: (N-1) T ids, (N-1) T h vector elements
forward and (N-1) T h gradient elements backward; the replicated table's ring all-reduce sends
2 (N-1)/N V H elements. Parameter, gradient and optimizer state of the table shrink N x.

Tied output embeddings (``logits = x W^T`` with ``W = E``): the head contracts over H, the dimension
that is split, so it needs either the full table or a reduction of partial logits. Two choices:

    (A) gather the table   forward all-gather of the slices -> E_VH (transient), logits = x E^T locally;
                           backward: every rank's dE_VH (from its own tokens) is reduce-scattered by
                           columns (an all-to-all of column blocks, then a sum) onto the owners.
                           Bytes per rank: 2 (N-1)/N V H  -- what the replicated all-reduce costs.
    (B) column-parallel    rank k computes partial logits x[:, k-block] E_k^T for all ranks' tokens and
                           the partials are summed (reduce-scatter over tokens): (N-1)/N T_all V forward
                           and the same again backward for dlogits.

(B) moves tokens x vocab, (A) moves vocab x hidden; with a per-rank batch of T tokens, (A) is cheaper
whenever T_all > H (e.g. SE-MoE's GPT: H = 4096, 8 x 1024 tokens per rank on 8 ranks: T_all = 65536),
and it keeps the head's matmul and loss unchanged. We implement (A): :attr:`PartitionedEmbedding.weight`
is the gathered table (differentiable), so ``MoEDecoder``'s ``F.linear(x, self.tok_emb.weight)`` works
unmodified. The full table exists only between the head's forward and the end of its backward
(autograd keeps it for dx = dlogits E); the persistent state (parameter, gradient, Adam moments) is
still N x smaller. With tied embeddings the partition therefore saves memory, not communication.

Use (from outside the model, like ``parallelize_moe``)::

    model, sync = parallelize(model, plan)                 # plan.embedding_partition = True
    sync = partition_embedding(model, sync.groups, sync)   # swaps tok_emb, removes it from the DP buckets

Gloo has no reduce-scatter; the column reduce-scatter is an all-to-all of column blocks followed by a
local sum, which sends the same bytes as a ring reduce-scatter.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from reference.comm.buckets import GradBuckets, clip_grad_norm_moe
from reference.parallel.groups import Group, ParallelGroups


def _a2a(x: Tensor, send: list[int], recv: list[int], group: Group) -> Tensor:
    """Uneven all-to-all of the rows of ``x`` (not differentiable; used inside autograd Functions)."""
    if group.size == 1:
        return x
    import torch.distributed as dist

    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group.pg)
    return out


def _gather_counts(t: int, group: Group, device) -> list[int]:
    if group.size == 1:
        return [t]
    import torch.distributed as dist

    mine = torch.tensor([t], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(group.size)]
    dist.all_gather(out, mine, group=group.pg)
    return [int(c) for c in out]


class _PartitionedLookup(torch.autograd.Function):
    """ids_T -> x_TH from column slices held by the ranks of ``group`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, ids_T: Tensor, weight_Vh: Tensor, group: Group, scale: float, sparse: bool) -> Tensor:
        N, T, h = group.size, ids_T.shape[0], weight_Vh.shape[1]
        Ts = _gather_counts(T, group, ids_T.device)
        ids_all = _a2a(ids_T.repeat(N), [T] * N, Ts, group)  # [T_all], ordered by source rank
        part = weight_Vh[ids_all]  # [T_all, h]
        back = _a2a(part, Ts, [T] * N, group)  # [N * T, h], block k = columns of rank k
        ctx.save_for_backward(ids_all)
        ctx.group, ctx.scale, ctx.sparse, ctx.Ts, ctx.V = group, scale, sparse, Ts, weight_Vh.shape[0]
        return back.view(N, T, h).permute(1, 0, 2).reshape(T, N * h)

    @staticmethod
    def backward(ctx, g_TH: Tensor):
        (ids_all,) = ctx.saved_tensors
        group, Ts = ctx.group, ctx.Ts
        N, T = group.size, g_TH.shape[0]
        h = g_TH.shape[1] // N
        blocks = g_TH.reshape(T, N, h).permute(1, 0, 2).reshape(N * T, h)  # block k -> rank k
        g_all = _a2a(blocks, [T] * N, Ts, group)  # [T_all, h]: grads of every rank's ids, my columns
        if ctx.scale != 1.0:
            g_all = g_all * ctx.scale
        if ctx.sparse:
            grad_w = torch.sparse_coo_tensor(ids_all.unsqueeze(0), g_all, (ctx.V, h)).coalesce()
        else:
            grad_w = g_all.new_zeros((ctx.V, h)).index_add_(0, ids_all, g_all)
        return None, grad_w, None, None, None


class _GatherColumns(torch.autograd.Function):
    """weight_Vh slices -> E_VH (all-gather); backward: column reduce-scatter of dE_VH, times ``scale``."""

    @staticmethod
    def forward(ctx, weight_Vh: Tensor, group: Group, scale: float) -> Tensor:
        ctx.group, ctx.scale = group, scale
        if group.size == 1:
            return weight_Vh.clone()
        import torch.distributed as dist

        parts = [torch.empty_like(weight_Vh) for _ in range(group.size)]
        dist.all_gather(parts, weight_Vh.contiguous(), group=group.pg)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, g_VH: Tensor):
        group = ctx.group
        N = group.size
        V, H = g_VH.shape
        h = H // N
        blocks = g_VH.reshape(V, N, h).permute(1, 0, 2).reshape(N * V, h)  # block k -> rank k
        got = _a2a(blocks, [V] * N, [V] * N, group).view(N, V, h).sum(0)  # reduce-scatter by columns
        return got * ctx.scale, None, None


class PartitionedEmbedding(nn.Module):
    """A token embedding whose columns are split over ``group`` (rank k holds columns [k h, (k+1) h)).

    ``forward(ids)`` returns full ``[..., H]`` vectors for this rank's ids (three all-to-alls, see the
    module docstring); :attr:`weight` is the gathered full table (for a tied head). The only
    parameter is ``weight_slice`` ``[V, H / N]``.
    """

    def __init__(self, full_weight: Tensor, group: Group, *, grad_scale: float | None = None,
                 sparse: bool = False) -> None:
        super().__init__()
        V, H = full_weight.shape
        N = group.size
        if H % N:
            raise ValueError(f"PartitionedEmbedding: hidden ({H}) must be divisible by the data-parallel size ({N})")
        h = H // N
        self.num_embeddings, self.embedding_dim, self.group, self.sparse = V, H, group, sparse
        self.grad_scale = 1.0 / N if grad_scale is None else float(grad_scale)
        self.weight_slice = nn.Parameter(full_weight.detach()[:, group.rank * h : (group.rank + 1) * h].clone())

    @property
    def columns(self) -> range:
        h = self.embedding_dim // self.group.size
        return range(self.group.rank * h, (self.group.rank + 1) * h)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, columns=[{self.columns.start}, {self.columns.stop}) "
                f"of {self.group}")

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        out = _PartitionedLookup.apply(flat, self.weight_slice, self.group, self.grad_scale, self.sparse)
        return out.view(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """The full ``[V, H]`` table, all-gathered (differentiable; the tied head's weight)."""
        return _GatherColumns.apply(self.weight_slice, self.group, self.grad_scale)


def tied_head_comm_elements(vocab: int, hidden: int, ranks: int, tokens_per_rank: int) -> dict[str, float]:
    """Elements one rank sends per step for a tied head over a column-partitioned table (module
    docstring): ``gather_table`` = all-gather + column reduce-scatter of the V x H table, 2 (N-1)/N V H;
    ``column_parallel`` = partial-logit reduce-scatter forward and dlogits back, 2 (N-1) T V, plus the
    x / dx column exchange 2 (N-1) T H / N. (A) wins iff H < N T (+ a small term)."""
    V, H, N, T = vocab, hidden, ranks, tokens_per_rank
    return {"gather_table": 2.0 * (N - 1) / N * V * H,
            "column_parallel": 2.0 * (N - 1) * T * V + 2.0 * (N - 1) * T * H / N}


# ------------------------------------------------------------------------------ applying it
@dataclass
class PartitionedGradSync:
    """A ``GradSync`` whose dense buckets exclude the partitioned slices; clipping adds the slices'
    squared norms summed over DP (the full table's norm). Delegates everything else."""

    base: object  # reference.parallel.parallelize.GradSync
    partitioned: list[nn.Parameter] = field(default_factory=list)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def finish(self) -> None:
        self.base.finish()

    def set_sync(self, on: bool) -> None:
        self.base.set_sync(on)

    def clip(self, max_norm: float) -> Tensor:
        b = self.base
        grads_d = [p.grad for p in b.dense if p.grad is not None]
        grads_p = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in self.partitioned if p.grad is not None]
        ref = (grads_d or grads_p or [torch.zeros(())])[0]
        acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
        slice_sq = sum((g.to(acc).pow(2).sum() for g in grads_p), torch.zeros((), dtype=acc, device=ref.device))
        dp = b.groups.dp
        if dp.size > 1:
            import torch.distributed as dist

            dist.all_reduce(slice_sq, group=dp.pg)
        dense_sq = sum((g.to(acc).pow(2).sum() for g in grads_d), torch.zeros((), dtype=acc, device=ref.device))
        total = clip_grad_norm_moe(b.dense + self.partitioned, b.experts, max_norm, b.groups.ep,
                                   dense_sq=dense_sq + slice_sq)
        return total


def partition_embedding(model: nn.Module, groups: ParallelGroups, sync=None, *, sparse: bool = False,
                        attr: str = "tok_emb"):
    """Replace ``model.<attr>`` (an ``nn.Embedding``) by a :class:`PartitionedEmbedding` over
    ``groups.dp`` when ``groups.plan.embedding_partition`` is set; returns the (possibly wrapped) sync.

    With a ``GradSync`` from ``parallelize`` (call this after it), the old table's parameter leaves the
    dense gradient buckets and the returned :class:`PartitionedGradSync` clips with the full table's
    norm. Not combined with ZeRO-3 (the table would already be sharded there).
    """
    if not groups.plan.embedding_partition:
        return sync
    if groups.plan.zero_stage == 3:
        raise ValueError("ParallelPlan.embedding_partition: not combined with zero_stage 3 (ZeRO-3 shards the table)")
    old = getattr(model, attr)
    if not isinstance(old, nn.Embedding):
        raise ValueError(f"partition_embedding: model.{attr} is {type(old).__name__}, expected nn.Embedding")
    new = PartitionedEmbedding(old.weight, groups.dp, sparse=sparse)
    setattr(model, attr, new)
    if sync is None:
        return None
    gone = id(old.weight)
    b = sync.dense_buckets
    b.remove_hooks()
    sync.dense = [p for p in sync.dense if id(p) != gone]
    sync.dense_buckets = GradBuckets(sync.dense, b.group, b.bucket_bytes, scale=b.scale, name=b.name,
                                     on_bucket=b.on_bucket)
    return PartitionedGradSync(sync, [new.weight_slice])


def embedding_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                          attr: str = "tok_emb") -> dict[str, int]:
    """Bytes this rank holds for the token embedding: parameters (and gradients if present) and the
    optimizer's per-parameter state tensors, measured from the live objects."""
    emb = getattr(model, attr)
    params = list(emb.parameters())
    out = {"params": sum(p.numel() * p.element_size() for p in params),
           "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
           "optimizer": 0}
    if optimizer is not None:
        for p in params:
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() > 0:
                    out["optimizer"] += v.numel() * v.element_size()
    return out
