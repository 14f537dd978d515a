"""Uneven all-to-all over an expert-parallel group: flat, HetuMoE hierarchical, SE-MoE rail-aligned.

Shape legend: G ranks of the EP group, n nodes in it, p ranks per node inside it (G = n * p), a/b
node index, i/j local rank, member g = a * p + i. ``counts_GG[s, d]`` = rows rank s sends to rank d
(every rank knows the whole matrix: one all-gather of the per-rank count rows, :func:`count_matrix`).
Rows of the send buffer ``x`` are ordered by destination member; rows of the result by source member
(what ``torch.distributed.all_to_all_single`` does). All three algorithms return identical tensors.

    flat   one all_to_all_single over the EP group. Cost (alpha-beta, per rank, V bytes sent):
           (G - 1) alpha + V / B_slowest; with G > p, (n - 1) p messages per rank cross nodes.
    hetu   HetuMoE (Nie et al. 2022, arXiv 2203.14685, sec. 3.3): (1) gather the node's rows on local
           rank 0 (intra-node), (2) leaders exchange one message per node pair (rail of local rank 0),
           (3) the leader scatters inside the node. (n - 1) inter-node messages per leader, p x larger,
           but every byte of the node goes through one NIC (local rank 0 is a hotspot).
    rail   SE-MoE (Shen et al. 2022, arXiv 2205.10034, sec. 3.3, "resource-aware communication"):
           (1) intra-node all-to-all regrouping so rows for remote (b, j) sit on local rank j,
           (2) all-to-all among same-local-rank ranks (one rail, no spine). (n - 1) inter-node messages
           per rank, p x larger, spread over all p NICs / rails.

Every stage is a differentiable :func:`all_to_all_single_autograd` (backward = the reverse
all-to-all with the split sizes swapped), and the regrouping between stages is split/cat, so the
hierarchical algorithms are autograd-capable without their own backward; the backward of ``rail``
mirrors it (rails first, then the node), which is the combine direction of SE-MoE.

Start/wait: :meth:`AllToAll.start` issues the first stage asynchronously and returns an
:class:`AllToAllHandle`; ``handle.wait()`` finishes the first stage and runs the rest. Compute placed
between start and wait overlaps the first stage (all of ``flat``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from reference.parallel.groups import Group, ParallelGroups

Algorithm = Literal["flat", "hetu", "rail"]
ALGORITHMS: tuple[str, ...] = ("flat", "hetu", "rail")


# ----------------------------------------------------------------------- autograd all-to-all
class _Work:
    """Holds the async work object between the start and wait autograd nodes."""

    work = None


class _AllToAllStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], pg, box: _Work) -> Tensor:
        import torch.distributed as dist

        ctx.send, ctx.recv, ctx.pg = send, recv, pg
        out = x.new_empty((sum(recv), *x.shape[1:]))
        box.work = dist.all_to_all_single(out, x.contiguous(), recv, send, group=pg, async_op=True)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        import torch.distributed as dist

        gx = g.new_empty((sum(ctx.send), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), ctx.send, ctx.recv, group=ctx.pg)
        return gx, None, None, None, None


class _AllToAllWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, box: _Work) -> Tensor:
        if box.work is not None:
            box.work.wait()
            box.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


class Pending:
    """A tensor that may still be in flight; ``wait()`` returns it (the dispatcher's handle type)."""

    def __init__(self, finish: Callable[[], Tensor]) -> None:
        self._finish, self._value = finish, None

    def wait(self) -> Tensor:
        if self._finish is not None:
            self._value, self._finish = self._finish(), None
        return self._value


def all_to_all_single_autograd(
    x: Tensor, send: Sequence[int], recv: Sequence[int], group: Group, async_op: bool = False
) -> Pending | Tensor:
    """Differentiable uneven all-to-all of the rows of ``x`` over ``group``.

    ``send[k]`` rows go to member k (in order), ``recv[k]`` rows arrive from member k. With
    ``async_op`` the collective is issued now and a :class:`Pending` is returned.
    """
    send, recv = [int(c) for c in send], [int(c) for c in recv]
    if len(send) != group.size or len(recv) != group.size:
        raise ValueError(f"all_to_all over {group}: need {group.size} split sizes, got send {send}, recv {recv}")
    if sum(send) != x.shape[0]:
        raise ValueError(f"all_to_all over {group}: send splits sum to {sum(send)} but x has {x.shape[0]} rows")
    if group.size == 1:
        out = x
        return Pending(lambda: out) if async_op else out
    box = _Work()
    started = _AllToAllStart.apply(x, send, recv, group.pg, box)
    pending = Pending(lambda: _AllToAllWait.apply(started, box))
    return pending if async_op else pending.wait()


# ---------------------------------------------------------------------------------- counts
def count_matrix(send_counts_G: Tensor, group: Group) -> Tensor:
    """All-gather every member's send counts: ``counts_GG[s, d]`` rows s -> d (int64, on the CPU).

    One all-gather of G int64 per rank; the hierarchical algorithms need counts of other pairs too,
    and a flat exchange would be an all-to-all of the same size class.
    """
    if send_counts_G.numel() != group.size:
        raise ValueError(f"count_matrix over {group}: send_counts has {send_counts_G.numel()} entries, need {group.size}")
    return gather_counts(send_counts_G, group)


def gather_counts(counts: Tensor, group: Group) -> Tensor:
    """All-gather an int vector from every member: ``[group.size, len(counts)]`` int64 on the CPU."""
    c = counts.detach().to(torch.int64).reshape(1, -1)
    if group.size == 1:
        return c.cpu()
    import torch.distributed as dist

    rows = [torch.empty_like(c) for _ in range(group.size)]
    dist.all_gather(rows, c, group=group.pg)
    return torch.cat(rows).cpu()


# -------------------------------------------------------------------------------- regroup
def regroup(x: Tensor, keys_in: Sequence, sizes: dict, keys_out: Sequence) -> Tensor:
    """Reorder row chunks: ``x`` is the concatenation of chunks ``keys_in`` (``sizes[key]`` rows each);
    return the chunks concatenated in ``keys_out`` order (a permutation of ``keys_in``)."""
    chunks = dict(zip(keys_in, torch.split(x, [int(sizes[k]) for k in keys_in])))
    if len(keys_out) == 1:
        return chunks[keys_out[0]]
    return torch.cat([chunks[k] for k in keys_out])


# ---------------------------------------------------------------------------- algorithms
@dataclass(frozen=True)
class AllToAllHandle:
    """``wait()`` returns the received rows (ordered by source member)."""

    _pending: Pending

    def wait(self) -> Tensor:
        return self._pending.wait()


class AllToAll:
    """Uneven all-to-all over ``ep`` with one of :data:`ALGORITHMS`; ``node``/``rail`` are the EP group's
    intra-node and same-local-rank subgroups (``ParallelGroups.ep_node`` / ``ep_rail``)."""

    def __init__(self, algorithm: Algorithm, ep: Group, node: Group | None = None, rail: Group | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"AllToAll: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        node = node or Group("node", ep.ranks, ep.rank)
        rail = rail or Group("rail", (ep.ranks[ep.rank],), 0)
        if node.size * rail.size != ep.size:
            raise ValueError(f"AllToAll: node ({node.size}) x rail ({rail.size}) must equal the EP group ({ep.size})")
        self.algorithm, self.ep, self.node, self.rail = algorithm, ep, node, rail
        self.p, self.n = node.size, rail.size
        self.a, self.i = rail.rank, node.rank  # this rank is member a * p + i
        if self.a * self.p + self.i != ep.rank:
            raise ValueError(f"AllToAll: {ep} is not laid out node-major over {node} and {rail}")

    @classmethod
    def from_groups(cls, algorithm: Algorithm, groups: ParallelGroups) -> "AllToAll":
        return cls(algorithm, groups.ep, groups.ep_node, groups.ep_rail)

    def __repr__(self) -> str:
        return f"AllToAll({self.algorithm}, G={self.ep.size}, nodes={self.n}, per_node={self.p})"

    def member(self, a: int, i: int) -> int:
        return a * self.p + i

    def __call__(self, x: Tensor, counts_GG: Tensor) -> Tensor:
        return self.start(x, counts_GG).wait()

    def start(self, x: Tensor, counts_GG: Tensor) -> AllToAllHandle:
        """Send the rows of ``x`` (ordered by destination) with ``counts_GG[me]`` rows per member."""
        C = [[int(v) for v in row] for row in counts_GG.tolist()]
        G = self.ep.size
        if len(C) != G or any(len(r) != G for r in C):
            raise ValueError(f"{self!r}: counts_GG must be [{G}, {G}], got {tuple(counts_GG.shape)}")
        me = self.ep.rank
        if sum(C[me]) != x.shape[0]:
            raise ValueError(f"{self!r}: counts_GG[{me}] sums to {sum(C[me])} but x has {x.shape[0]} rows")
        algorithm = self.algorithm if G > 1 else "flat"
        if algorithm == "flat" or (self.n == 1 and algorithm == "rail") or (self.p == 1):
            recv = [C[s][me] for s in range(G)]
            return AllToAllHandle(all_to_all_single_autograd(x, C[me], recv, self.ep, async_op=True))
        return AllToAllHandle(getattr(self, f"_{algorithm}")(x, C))

    # ---------------------------------------------------------------------------- SE-MoE rail
    def _rail(self, x: Tensor, C: list[list[int]]) -> Pending:
        n, p, a, i, m = self.n, self.p, self.a, self.i, self.member
        me = m(a, i)
        # stage 1 (node): rows for (b, j) move to local rank j; order (b, j) -> (j, b)
        sizes1 = {(b, j): C[me][m(b, j)] for b in range(n) for j in range(p)}
        x1 = regroup(x, [(b, j) for b in range(n) for j in range(p)], sizes1, [(b, j) for j in range(p) for b in range(n)])
        send1 = [sum(C[me][m(b, j)] for b in range(n)) for j in range(p)]
        recv1 = [sum(C[m(a, k)][m(b, i)] for b in range(n)) for k in range(p)]
        stage1 = all_to_all_single_autograd(x1, send1, recv1, self.node, async_op=True)

        def finish() -> Tensor:
            y1 = stage1.wait()  # chunks (k, b): from (a, k) to (b, i)
            sizes2 = {(k, b): C[m(a, k)][m(b, i)] for k in range(p) for b in range(n)}
            x2 = regroup(y1, [(k, b) for k in range(p) for b in range(n)], sizes2,
                         [(k, b) for b in range(n) for k in range(p)])
            send2 = [sum(C[m(a, k)][m(b, i)] for k in range(p)) for b in range(n)]
            recv2 = [sum(C[m(c, k)][me] for k in range(p)) for c in range(n)]
            # stage 2 (rail): from node c arrive chunks k = (c, k) -> me: source-member order
            return all_to_all_single_autograd(x2, send2, recv2, self.rail)

        return Pending(finish)

    # ---------------------------------------------------------------------------- HetuMoE
    def _hetu(self, x: Tensor, C: list[list[int]]) -> Pending:
        n, p, a, i, m = self.n, self.p, self.a, self.i, self.member
        me, G = m(a, i), n * p
        leader = i == 0
        # stage 1 (node): gather every local rank's rows on local rank 0
        send1 = [x.shape[0]] + [0] * (p - 1)
        recv1 = [sum(C[m(a, k)]) for k in range(p)] if leader else [0] * p
        stage1 = all_to_all_single_autograd(x, send1, recv1, self.node, async_op=True)

        def finish() -> Tensor:
            y1 = stage1.wait()
            if leader:
                # chunks (k, b, j) from (a, k) to (b, j) -> order (b, j, k): one message per node b
                sizes = {(k, b, j): C[m(a, k)][m(b, j)] for k in range(p) for b in range(n) for j in range(p)}
                keys_in = [(k, b, j) for k in range(p) for b in range(n) for j in range(p)]
                keys_out = [(k, b, j) for b in range(n) for j in range(p) for k in range(p)]
                x2 = regroup(y1, keys_in, sizes, keys_out)
                send2 = [sum(C[m(a, k)][m(b, j)] for j in range(p) for k in range(p)) for b in range(n)]
                recv2 = [sum(C[m(c, k)][m(a, j)] for j in range(p) for k in range(p)) for c in range(n)]
                # stage 2 (rail of local rank 0, the leaders): arrive chunks (c, j, k) from (c, k) to (a, j)
                y2 = all_to_all_single_autograd(x2, send2, recv2, self.rail)
                sizes3 = {(c, j, k): C[m(c, k)][m(a, j)] for c in range(n) for j in range(p) for k in range(p)}
                keys_in3 = [(c, j, k) for c in range(n) for j in range(p) for k in range(p)]
                keys_out3 = [(c, j, k) for j in range(p) for c in range(n) for k in range(p)]
                x3 = regroup(y2, keys_in3, sizes3, keys_out3)
                send3 = [sum(C[s][m(a, j)] for s in range(G)) for j in range(p)]
            else:
                x3, send3 = y1, [0] * p
            # stage 3 (node): the leader scatters; rows arrive in source-member order (c, k)
            recv3 = [sum(C[s][me] for s in range(G))] + [0] * (p - 1)
            return all_to_all_single_autograd(x3, send3, recv3, self.node)

        return Pending(finish)


def all_to_all_uneven(x: Tensor, send_counts_G: Tensor, a2a: AllToAll) -> tuple[Tensor, Tensor]:
    """Exchange counts first (one all-gather), then rows: returns (received rows, recv counts [G])."""
    C = count_matrix(send_counts_G, a2a.ep)
    return a2a(x, C), C[:, a2a.ep.rank].clone()
