"""The gloo test harness fails fast: an exception on one rank names it, a hang times out."""

from __future__ import annotations

import pytest

from reference.parallel.spawn import RankPool


def _fail_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would wait forever


def _hang_on_rank_0():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        dist.barrier()
    return dist.get_rank()


def _rank():
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


@pytest.mark.distributed
def test_pool_reports_errors_and_hangs_then_recovers():
    with RankPool(2, timeout_s=20) as pool:
        assert pool.run(_rank) == [(0, 2), (1, 2)]
        with pytest.raises(RuntimeError, match=r"failed on ranks \[1\](.|\n)*boom on rank one"):
            pool.run(_fail_on_rank_1)
        with pytest.raises(TimeoutError, match=r"no result within 3 s; waiting for ranks \[0\]"):
            pool.run(_hang_on_rank_0, timeout_s=3)
        assert pool.run(_rank) == [(0, 2), (1, 2)]  # a fresh pool after the failures


def test_pool_rejects_bad_size():
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        RankPool(0)
