"""Collective algorithms as sequences of concurrent message steps (`CommOp`), run by any backend.

Notation: ``n`` ranks in the group, ``S`` bytes (the full buffer: all-reduce input, all-gather output,
reduce-scatter input), ``B`` the bottleneck bandwidth of a step, ``a`` the per-hop latency, ``base`` the
protocol's launch latency (`hardware`). Each step is a set of concurrent messages; a step ``repeat``-ed
``r`` times costs ``r`` times one step. Formulas below are what the analytic backend computes exactly
when no two messages of a step share a link other than as written.

* ring all-reduce: ``2(n-1)`` steps, each rank sends ``S/n`` to its successor:
  ``t = base + 2(n-1) (a + S/(n B))``; bus bandwidth ``S/t * 2(n-1)/n`` -> ``B`` for large ``S``.
* ring reduce-scatter / all-gather: ``n-1`` steps of ``S/n``: ``t = base + (n-1)(a + S/(n B))``.
* hierarchical (2D) forms, used when the group is ``m > 1`` whole nodes of ``g > 1`` ranks each:
  all-reduce = intra-node reduce-scatter, inter-node ring all-reduce among equal local ranks (one ring
  per rail, all concurrent), intra-node all-gather:
  ``t = base + 2(g-1)(a_nv + S/(g B_nv)) + 2(m-1)(a_net + S/(g m B_nic))``; reduce-scatter and
  all-gather are the halves (``(g-1)`` and ``(m-1)`` steps).
* fused buckets (`bucket_sizes`): tensors are packed in order into buckets of at least
  ``bucket_bytes`` and one collective runs per bucket, so the ``base + steps*a`` latency is paid per
  bucket instead of per tensor.
* flat all-to-all with a per-pair byte matrix ``M[i, j]`` (i sends to j): one step of all pairs,
  ``t_i = a + max_{link on i's routes} load(link)/cap(link)``; with uniform ``M = s`` inside one
  node: ``t = base + a + (n-1) s / B_nv``.
* point-to-point all-to-all (`all_to_all_p2p`): the same single step of all pairs as the flat form, run
  as grouped send/receive pairs instead of one collective kernel (PyTorch's ``all_to_all_single`` with
  explicit split lists: ``torch::cuda::nccl::all2all_single_unequal_split``, one ``ncclSend`` /
  ``ncclRecv`` per peer inside ``ncclGroupStart/End``; the even-split call is a separate function,
  ``all2all_single_equal_split``). NCCL runs such sends on its p2p channels (``p2pnChannelsPerPeer`` of
  them per peer, LL or Simple protocol only), so each message is also limited to a per-peer rate
  ``B_p2p`` whatever the link could carry: ``t_i = a + max(max_{link} load/cap, max_j M[i, j] / B_p2p)``.
  ``B_p2p`` is a measured input (`CommOp.peer_GBps`), not a datasheet value; a rank's message to itself
  (the pair ``(i, i)``) is a local copy and, as everywhere here, not sent.
* HetuMoE hierarchical all-to-all, as `reference.comm.alltoall.AllToAll._hetu` runs it: (1) every
  non-leader sends its whole send buffer (the rows for itself included) to local rank 0 of its node
  (gather), (2) local ranks 0 exchange one aggregated message per node pair, (3) local rank 0 scatters
  to each rank of its node everything destined to it (its rows for itself included). With uniform
  ``M = s`` on ``m`` nodes of ``g``: steps 1 and 3 carry ``m g s`` per non-leader over NVLink (into /
  out of the leader: ``(g-1) m g s`` on its port). Step 2 puts all inter-node bytes on the
  NIC of local rank 0 (the hotspot SEMOE.md mentions): ``t2 = a_net + (bytes leaving the node)/B_nic``.
* SE-MoE rail-aligned all-to-all: (1) intra-node all-to-all where rank (n,i) sends to (n,j) all of
  its data for local rank j of *every* node, (2) rank (n,j) sends to (m,j), m != n, everything of node
  n for (m,j): same rail, no spine, ``g`` NICs of the node busy in parallel; messages ``g`` x larger
  and ``g`` x fewer than flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulator.topology import Topology


@dataclass
class Step:
    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    repeat: int = 1

    @classmethod
    def of(cls, src, dst, nbytes, repeat: int = 1) -> "Step":
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        nb = np.broadcast_to(np.asarray(nbytes, dtype=float), src.shape).copy()
        keep = (nb > 0) & (src != dst)
        return cls(src[keep], dst[keep], nb[keep], repeat)


@dataclass
class CommOp:
    name: str
    ranks: np.ndarray  # global ranks of the group
    steps: list[Step] = field(default_factory=list)
    payload_bytes: float = 0.0  # per-rank bytes the caller asked for (trace rows)
    peer_GBps: float | None = None  # p2p path: each message at most this rate (GB/s); None: links only

    def add(self, step: Step) -> None:
        if step.repeat > 0 and step.src.size:
            self.steps.append(step)


def _group(ranks) -> np.ndarray:
    g = np.asarray(ranks, dtype=np.int64).ravel()
    if g.size == 0:
        raise ValueError("a collective needs at least one rank")
    if np.unique(g).size != g.size:
        raise ValueError("a collective group must not repeat ranks")
    return g


def node_layout(topo: Topology, ranks: np.ndarray) -> np.ndarray | None:
    """``[m, g]`` matrix of group ranks by node (rows) and local position (columns) if the group is
    ``m`` nodes of ``g`` ranks each, else None. Rows sorted by node, columns by rank."""
    nodes = topo.node[ranks]
    uniq = np.unique(nodes)
    rows = [np.sort(ranks[nodes == n]) for n in uniq]
    if len({len(r) for r in rows}) != 1:
        return None
    return np.stack(rows)


def _ring(op: CommOp, rings: list[np.ndarray], chunk: float, repeat: int) -> None:
    src = np.concatenate([r for r in rings if r.size > 1] or [np.zeros(0, dtype=np.int64)])
    dst = np.concatenate([np.roll(r, -1) for r in rings if r.size > 1] or [np.zeros(0, dtype=np.int64)])
    op.add(Step.of(src, dst, chunk, repeat))


def _hierarchical(topo: Topology, g: np.ndarray) -> np.ndarray | None:
    lay = node_layout(topo, g)
    if lay is None or lay.shape[0] < 2 or lay.shape[1] < 2:
        return None
    return lay


def all_reduce(topo: Topology, ranks, nbytes: float, algo: str = "auto") -> CommOp:
    g = _group(ranks)
    op = CommOp("all_reduce", g, payload_bytes=nbytes)
    n = g.size
    lay = _hierarchical(topo, g) if algo in ("auto", "hierarchical") else None
    if lay is None:
        _ring(op, [g], nbytes / n, 2 * (n - 1))
        return op
    m, gg = lay.shape
    _ring(op, list(lay), nbytes / gg, gg - 1)  # intra-node reduce-scatter
    _ring(op, list(lay.T), nbytes / (gg * m), 2 * (m - 1))  # inter-node all-reduce, one ring per rail
    _ring(op, list(lay), nbytes / gg, gg - 1)  # intra-node all-gather
    return op


def _half(topo: Topology, ranks, nbytes: float, name: str, algo: str) -> CommOp:
    g = _group(ranks)
    op = CommOp(name, g, payload_bytes=nbytes)
    lay = _hierarchical(topo, g) if algo in ("auto", "hierarchical") else None
    if lay is None:
        _ring(op, [g], nbytes / g.size, g.size - 1)
        return op
    m, gg = lay.shape
    intra = (list(lay), nbytes / gg, gg - 1)
    inter = (list(lay.T), nbytes / (gg * m), m - 1)
    for rings, chunk, rep in ((intra, inter) if name == "reduce_scatter" else (inter, intra)):
        _ring(op, rings, chunk, rep)
    return op


def reduce_scatter(topo: Topology, ranks, nbytes: float, algo: str = "auto") -> CommOp:
    return _half(topo, ranks, nbytes, "reduce_scatter", algo)


def all_gather(topo: Topology, ranks, nbytes: float, algo: str = "auto") -> CommOp:
    return _half(topo, ranks, nbytes, "all_gather", algo)


def bucket_sizes(tensor_bytes, bucket_bytes: int) -> list[float]:
    """Pack tensors in order into buckets of >= ``bucket_bytes`` (the last may be smaller);
    ``bucket_bytes == 0``: one bucket per tensor (unfused)."""
    if bucket_bytes <= 0:
        return [float(b) for b in tensor_bytes if b > 0]
    out, cur = [], 0.0
    for b in tensor_bytes:
        cur += b
        if cur >= bucket_bytes:
            out.append(cur)
            cur = 0.0
    if cur > 0:
        out.append(cur)
    return out


# ----------------------------------------------------------------------------- all-to-all
def _matrix(g: np.ndarray, matrix) -> np.ndarray:
    M = np.asarray(matrix, dtype=float)
    if M.shape != (g.size, g.size):
        raise ValueError(f"all-to-all matrix must be {g.size}x{g.size}, got {M.shape}")
    if np.any(M < 0):
        raise ValueError("all-to-all bytes must be >= 0")
    return M


def all_to_all_flat(topo: Topology, ranks, matrix) -> CommOp:
    g = _group(ranks)
    M = _matrix(g, matrix)
    op = CommOp("all_to_all", g, payload_bytes=float(M.sum(axis=1).max()))
    i, j = np.nonzero(M)
    op.add(Step.of(g[i], g[j], M[i, j]))
    return op


def _layout_or_raise(topo: Topology, g: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    lay = node_layout(topo, g)
    if lay is None:
        raise ValueError(f"{name} all-to-all needs the same number of group ranks on every node")
    pos = {int(r): k for k, r in enumerate(g)}
    perm = np.array([pos[int(r)] for r in lay.ravel()])  # group index of layout cell
    return lay, perm


def all_to_all_hetu(topo: Topology, ranks, matrix) -> CommOp:
    g = _group(ranks)
    M = _matrix(g, matrix)
    lay, perm = _layout_or_raise(topo, g, "hetu")
    m, gg = lay.shape
    op = CommOp("all_to_all_hetu", g, payload_bytes=float(M.sum(axis=1).max()))
    A = M[np.ix_(perm, perm)].reshape(m, gg, m, gg)  # A[n, i, m, j]: (n,i) -> (m,j)
    leaders = lay[:, 0]
    # step 1: each non-leader ships its whole send buffer (its rows for itself included) to the leader, as
    # reference.comm.alltoall.AllToAll._hetu's stage 1 does (send1 = [x.shape[0], 0, ...])
    op.add(Step.of(lay[:, 1:].ravel(), np.repeat(leaders, gg - 1), A.sum(axis=(2, 3))[:, 1:].ravel()))
    node_pair = A.sum(axis=(1, 3))  # n -> m
    src, dst = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    op.add(Step.of(leaders[src.ravel()], leaders[dst.ravel()], node_pair.ravel()))
    # step 3: the leader scatters to each non-leader everything destined to it, its own rows included
    # (the reference's send3 = [sum_s C[s][(a, j)] ...])
    incoming = A.sum(axis=(0, 1))  # bytes for (m,j) from every rank
    op.add(Step.of(np.repeat(leaders, gg - 1), lay[:, 1:].ravel(), incoming[:, 1:].ravel()))
    return op


def all_to_all_rail(topo: Topology, ranks, matrix) -> CommOp:
    g = _group(ranks)
    M = _matrix(g, matrix)
    lay, perm = _layout_or_raise(topo, g, "rail")
    m, gg = lay.shape
    op = CommOp("all_to_all_rail", g, payload_bytes=float(M.sum(axis=1).max()))
    A = M[np.ix_(perm, perm)].reshape(m, gg, m, gg)
    intra = A.sum(axis=2)  # (n,i) -> (n,j): data of (n,i) for local j of any node
    n_idx, i_idx, j_idx = np.meshgrid(np.arange(m), np.arange(gg), np.arange(gg), indexing="ij")
    op.add(Step.of(lay[n_idx, i_idx].ravel(), lay[n_idx, j_idx].ravel(), intra.ravel()))
    inter = A.sum(axis=1)  # [n, m, j]: node n -> (m, j), carried by (n, j)
    n_idx, m_idx, j_idx = np.meshgrid(np.arange(m), np.arange(m), np.arange(gg), indexing="ij")
    op.add(Step.of(lay[n_idx, j_idx].ravel(), lay[m_idx, j_idx].ravel(), inter.ravel()))
    return op


def all_to_all_p2p(topo: Topology, ranks, matrix, peer_GBps: float) -> CommOp:
    """The flat all-to-all as grouped point-to-point sends: each message at most ``peer_GBps`` (module
    docstring); the network backends apply the cap and the p2p protocols (LL / Simple)."""
    if not (np.isfinite(peer_GBps) and peer_GBps > 0):
        raise ValueError(f"all_to_all_p2p: peer_GBps must be > 0, got {peer_GBps}")
    op = all_to_all_flat(topo, ranks, matrix)
    op.name, op.peer_GBps = "all_to_all_p2p", float(peer_GBps)
    return op


ALL_TO_ALL = {"flat": all_to_all_flat, "hetu": all_to_all_hetu, "rail": all_to_all_rail}


def all_to_all(topo: Topology, ranks, matrix, algo: str = "flat") -> CommOp:
    """Dispatch by algorithm; hierarchical forms fall back to flat for a group inside one node or
    with unequal ranks per node (documented: they have nothing to aggregate there)."""
    g = _group(ranks)
    if algo != "flat":
        lay = node_layout(topo, g)
        if lay is None or lay.shape[0] < 2 or lay.shape[1] < 2:
            algo = "flat"
    return ALL_TO_ALL[algo](topo, g, matrix)
