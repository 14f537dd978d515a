"""Process groups built from a :class:`semoe.plan_spec.ParallelPlan`, node-aware.

Rank layout (DeepSpeed-MoE's convention, SEMOE.md; ``W`` = world = ``plan.data_parallel``,
``G`` = ``plan.expert_parallel``, ``p`` = GPUs per node, node of rank r = r // p, local rank = r % p)::

    dp     all W ranks                                     dense gradients, global loss
    ep     contiguous blocks {bG .. bG+G-1}                tokens all-to-all; experts split over it
    edp    strided {r % G + kG}  (W/G ranks)               replicas of one expert shard: expert grads
    node   contiguous blocks of p ranks                    intra-node (NVSwitch) collectives, ZeRO-3
    rail   same local rank across nodes {r % p + kp}       leaf-switch ("rail") collectives
    ep_node = ep ∩ node, ep_rail = ep ∩ rail               the two stages of hierarchical all-to-all

Contiguous EP blocks keep an all-to-all inside a node whenever ``G <= p``; when ``G > p`` an EP group
spans ``G / p`` whole nodes, which is where the hierarchical all-to-alls (HetuMoE, SE-MoE rail) pay.
``p`` comes from ``plan.gpus_per_node`` (the CPU tests' fake nodes), else ``LOCAL_WORLD_SIZE`` set by
torchrun, else the whole world is one node.

At world size 1 with no initialised process group every group is a no-op :class:`Group` of size 1,
so single-process code calls the same functions. ``torch.distributed.new_group`` must be called by
every rank for every group in the same order; :func:`build_groups` does exactly that (and caches
partitions, so repeated builds in one process reuse the communicators).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from semoe.plan_spec import ParallelPlan


@dataclass(frozen=True)
class Group:
    """One process group as seen from this rank: global ``ranks`` (sorted), this rank's index ``rank``
    in it, and the torch ``ProcessGroup`` (``None`` for a size-1 group or without torch.distributed)."""

    name: str
    ranks: tuple[int, ...]
    rank: int
    pg: object | None = None

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, index: int) -> int:
        return self.ranks[index]

    def __repr__(self) -> str:
        return f"Group({self.name}, ranks={list(self.ranks)}, rank={self.rank})"


@dataclass(frozen=True)
class ParallelGroups:
    """All groups of one plan on this rank. ``gpus_per_node`` is the node size actually used."""

    plan: ParallelPlan
    rank: int
    world_size: int
    gpus_per_node: int
    dp: Group
    ep: Group
    edp: Group
    node: Group
    rail: Group
    ep_node: Group
    ep_rail: Group
    dp_grads: Group  # same ranks as dp, own communicator: gradient buckets never queue behind tokens
    edp_grads: Group  # same ranks as edp, own communicator

    @property
    def node_index(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.gpus_per_node

    def local_experts(self, num_experts: int) -> range:
        """Global ids of the experts this rank holds: the ``ep.rank``-th contiguous slice."""
        G = self.ep.size
        if num_experts % G:
            raise ValueError(f"experts ({num_experts}) must be divisible by expert_parallel ({G})")
        n = num_experts // G
        return range(self.ep.rank * n, (self.ep.rank + 1) * n)


def _partitions(world: int, ep: int, p: int) -> dict[str, list[tuple[int, ...]]]:
    ranks = range(world)
    parts = {
        "dp": [tuple(ranks)],
        "ep": [tuple(range(b, b + ep)) for b in range(0, world, ep)],
        "edp": [tuple(range(i, world, ep)) for i in range(ep)],
        "node": [tuple(range(b, b + p)) for b in range(0, world, p)],
        "rail": [tuple(range(i, world, p)) for i in range(p)],
    }
    inter = lambda a, b: [  # noqa: E731 - non-empty intersections of two partitions
        tuple(sorted(set(x) & set(y))) for x in parts[a] for y in parts[b] if set(x) & set(y)
    ]
    parts["ep_node"] = sorted(set(inter("ep", "node")))
    parts["ep_rail"] = sorted(set(inter("ep", "rail")))
    return parts


_PG_CACHE: dict[tuple, object] = {}


def _new_groups(partition: list[tuple[int, ...]], rank: int, name: str, dist_on: bool, channel: str) -> Group:
    """Create (collectively) one torch group per block of ``partition``; return this rank's block.

    Communicators are cached per (world, channel, block): the same ranks on channel "comm" (tokens,
    counts) and "grads" (gradient buckets) get distinct communicators, so that asynchronous gradient
    reductions never interleave with token all-to-alls on one gloo/NCCL queue.
    """
    mine = None
    for block in partition:
        pg = None
        if dist_on and len(block) > 1:
            import torch.distributed as dist

            key = (id(dist.group.WORLD), channel, block)
            if key not in _PG_CACHE:
                whole = len(block) == dist.get_world_size() and channel == "comm"
                _PG_CACHE[key] = dist.group.WORLD if whole else dist.new_group(list(block))
            pg = _PG_CACHE[key]
        if rank in block:
            mine = Group(name, block, block.index(rank), pg)
    assert mine is not None, (name, partition, rank)
    return mine


def resolve_gpus_per_node(plan: ParallelPlan, world_size: int) -> int:
    p = plan.gpus_per_node
    if p is None:
        env = os.environ.get("LOCAL_WORLD_SIZE")
        p = int(env) if env else world_size
    if p < 1 or world_size % p:
        raise ValueError(f"ParallelPlan.gpus_per_node: world size ({world_size}) must be divisible by {p}")
    return p


def build_groups(plan: ParallelPlan) -> ParallelGroups:
    """All process groups of ``plan`` for this rank (collective over the world when initialised).

    Raises ``ValueError`` naming the parameter when the plan does not match the running world, or
    when an EP group would cut a node unevenly (``expert_parallel`` and ``gpus_per_node`` must divide
    one another).
    """
    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if dist_on else 1
    rank = dist.get_rank() if dist_on else 0
    if plan.data_parallel != world:
        raise ValueError(
            f"ParallelPlan.data_parallel ({plan.data_parallel}) must equal the world size ({world}); "
            "launch with torchrun --nproc-per-node or set --dp"
        )
    p = resolve_gpus_per_node(plan, world)
    G = plan.expert_parallel
    if G % p and p % G:
        raise ValueError(
            f"ParallelPlan.expert_parallel ({G}) and gpus_per_node ({p}) must divide one another "
            "(an expert-parallel group holds whole nodes or lies inside one)"
        )
    parts = _partitions(world, G, p)
    groups = {name: _new_groups(parts[name], rank, name, dist_on, "comm") for name in parts}
    groups["dp_grads"] = _new_groups(parts["dp"], rank, "dp_grads", dist_on, "grads")
    groups["edp_grads"] = _new_groups(parts["edp"], rank, "edp_grads", dist_on, "grads")
    return ParallelGroups(plan=plan, rank=rank, world_size=world, gpus_per_node=p, **groups)
