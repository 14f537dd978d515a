"""Uneven all-to-all: flat = hetu = rail = a hand-computed exchange, forward and backward, on gloo ranks.

Fake node layouts (``gpus_per_node``): 4 ranks as 2 nodes x 2, as 1 node x 4 and as 4 nodes x 1;
2 ranks as 2 x 1 and 1 x 2. Random uneven counts include zeros and whole empty ranks.
"""

from __future__ import annotations

import pytest
import torch

from reference.comm.alltoall import ALGORITHMS, AllToAll, all_to_all_uneven, count_matrix, regroup
from reference.parallel.groups import Group, build_groups
from semoe.plan_spec import ParallelPlan

pytestmark = pytest.mark.distributed


def _rows(src: int, dst: int, n: int, D: int) -> torch.Tensor:
    """Row r from src to dst is the recognisable value 1000 src + 100 dst + r (+ column / 10)."""
    base = 1000.0 * src + 100.0 * dst + torch.arange(n, dtype=torch.float64)[:, None]
    return base + torch.arange(D, dtype=torch.float64)[None, :] / 10


def _case(seed: int, G: int, D: int = 3):
    gen = torch.Generator().manual_seed(seed)
    C = torch.randint(0, 4, (G, G), generator=gen)
    C[C == 3] = 0  # plenty of zeros
    if seed % 3 == 0:
        C[seed % G] = 0  # one rank sends nothing
    return C


def _exchange_worker(world: int, gpus_per_node: int, seeds: list[int]) -> list[str]:
    import torch.distributed as dist

    plan = ParallelPlan(data_parallel=world, expert_parallel=world, gpus_per_node=gpus_per_node)
    groups = build_groups(plan)
    me, D = dist.get_rank(), 3
    for seed in seeds:
        C = _case(seed, world, D)
        x = torch.cat([_rows(me, d, int(C[me, d]), D) for d in range(world)]).requires_grad_(True)
        expected = torch.cat([_rows(s, me, int(C[s, me]), D) for s in range(world)])
        # counts exchanged first: the all-gathered matrix equals the generator's
        assert torch.equal(count_matrix(C[me], groups.ep), C)
        grads = []
        for alg in ALGORITHMS:
            a2a = AllToAll.from_groups(alg, groups)
            y, recv = all_to_all_uneven(x, C[me], a2a)
            assert torch.equal(recv, C[:, me]), (alg, recv, C[:, me])
            assert torch.equal(y, expected), (alg, seed, y, expected)
            # backward = the reverse exchange: grad of sum(w * y) is w's rows sent back
            w = expected * 7 + 1
            (gx,) = torch.autograd.grad((y * w).sum(), x)
            grads.append(gx)
            # start/wait: compute between them, same answer
            h = a2a.start(x.detach(), C)
            _ = torch.ones(64, 64) @ torch.ones(64, 64)
            assert torch.equal(h.wait(), expected)
            # the combine direction is the transposed matrix and brings the rows home
            back = a2a(y, C.T.contiguous())
            assert torch.equal(back, x.detach())
        expected_gx = torch.cat([_rows(me, d, int(C[me, d]), D) * 7 + 1 for d in range(world)])
        for alg, gx in zip(ALGORITHMS, grads):
            assert torch.equal(gx, expected_gx), (alg, seed)
    return [repr(groups.ep_node), repr(groups.ep_rail)]


@pytest.mark.parametrize("gpus_per_node", [2, 4, 1])
def test_flat_hetu_rail_equal_on_4_ranks(pool4, gpus_per_node):
    out = pool4.run(_exchange_worker, 4, gpus_per_node, list(range(6)))
    if gpus_per_node == 2:  # 2 nodes x 2: rank 3 is node 1 local 1
        assert out[3] == ["Group(ep_node, ranks=[2, 3], rank=1)", "Group(ep_rail, ranks=[1, 3], rank=1)"]


@pytest.mark.parametrize("gpus_per_node", [1, 2])
def test_flat_hetu_rail_equal_on_2_ranks(pool2, gpus_per_node):
    pool2.run(_exchange_worker, 2, gpus_per_node, [0, 1, 2])


def _ep2_of_4_worker() -> None:
    """EP=2 inside DP=4 with 2 x 2 nodes: two independent EP groups (one per node)."""
    import torch.distributed as dist

    groups = build_groups(ParallelPlan(data_parallel=4, expert_parallel=2, gpus_per_node=2))
    me = groups.ep.rank
    C = torch.tensor([[1, 2], [0, 3]]) + dist.get_rank() // 2  # different per EP group
    x = torch.cat([_rows(me, d, int(C[me, d]), 2) for d in range(2)])
    for alg in ALGORITHMS:
        y = AllToAll.from_groups(alg, groups)(x, C)
        assert torch.equal(y, torch.cat([_rows(s, me, int(C[s, me]), 2) for s in range(2)]))


def test_alltoall_inside_ep_subgroups(pool4):
    pool4.run(_ep2_of_4_worker)


def test_world_size_one_needs_no_process_group():
    groups = build_groups(ParallelPlan())
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    for alg in ALGORITHMS:
        y, recv = all_to_all_uneven(x, torch.tensor([5]), AllToAll.from_groups(alg, groups))
        assert y is x and recv.tolist() == [5]


def test_regroup_and_bad_inputs_name_the_problem():
    x = torch.arange(6.0)[:, None]
    y = regroup(x, ["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, ["c", "a", "b"])
    assert y.flatten().tolist() == [3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError, match="algorithm must be one of"):
        AllToAll("ring", Group("ep", (0,), 0))
    a2a = AllToAll("flat", Group("ep", (0,), 0))
    with pytest.raises(ValueError, match=r"counts_GG\[0\] sums to 4 but x has 6 rows"):
        a2a(x, torch.tensor([[4]]))
