"""Process groups from a ParallelPlan: rank layout on fake nodes, no-op groups at world size 1, clear errors."""

from __future__ import annotations

import pytest

from reference.parallel.groups import _partitions, build_groups
from semoe.plan_spec import ParallelPlan


def test_partitions_8_ranks_ep4_on_2_nodes_of_4():
    p = _partitions(8, 4, 4)
    assert p["ep"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert p["edp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert p["node"] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert p["rail"] == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert p["ep_node"] == p["node"] and p["ep_rail"] == [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,)]


def test_partitions_ep_spanning_nodes():
    p = _partitions(8, 8, 2)  # 4 nodes of 2, one EP group over all
    assert p["ep_node"] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert p["ep_rail"] == [(0, 2, 4, 6), (1, 3, 5, 7)]
    q = _partitions(8, 4, 2)  # two EP groups of 2 nodes each
    assert q["ep_rail"] == [(0, 2), (1, 3), (4, 6), (5, 7)] and q["edp"] == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_world_size_one_without_init():
    g = build_groups(ParallelPlan())
    assert g.world_size == 1 and g.gpus_per_node == 1
    for name in ("dp", "ep", "edp", "node", "rail", "ep_node", "ep_rail", "dp_grads", "edp_grads"):
        grp = getattr(g, name)
        assert grp.size == 1 and grp.rank == 0 and grp.pg is None
    assert g.local_experts(4) == range(0, 4)


def test_plan_must_match_world():
    with pytest.raises(ValueError, match=r"data_parallel \(2\) must equal the world size \(1\)"):
        build_groups(ParallelPlan(data_parallel=2, expert_parallel=2))


def _layout_worker():
    import torch.distributed as dist

    g = build_groups(ParallelPlan(data_parallel=4, expert_parallel=2, gpus_per_node=2))
    assert g.node_index == dist.get_rank() // 2 and g.local_rank == dist.get_rank() % 2
    with pytest.raises(ValueError, match=r"experts \(3\) must be divisible by expert_parallel \(2\)"):
        g.local_experts(3)
    return [g.ep.ranks, g.edp.ranks, g.node.ranks, g.rail.ranks, list(g.local_experts(8))]


@pytest.mark.distributed
def test_groups_on_4_gloo_ranks(pool4):
    out = pool4.run(_layout_worker)
    assert out[3] == [(2, 3), (1, 3), (2, 3), (1, 3), [4, 5, 6, 7]]
    assert out[0] == [(0, 1), (0, 2), (0, 1), (0, 2), [0, 1, 2, 3]]
