"""Collectives: exact hand-computed timelines, cost-formula oracles, and the published 8 x A100 check."""

import numpy as np
import pytest

from semoe import cluster_preset
from simulator import collectives as C
from simulator.hardware import SIMPLE
from simulator.network import make_network
from simulator.topology import Topology

from sim_helpers import NIC, NVL, make_cluster, run_op

BASE = SIMPLE.base_latency_s



def test_ring_allreduce_three_gpus_exact_timeline(backend):
    # S = 114 MB on 3 GPUs: 4 steps of 38 MB at 380 GB/s = 100 us each, 1 us per hop, Simple base 8.4 us
    t, net, op = run_op(make_cluster(gpn=3), backend, lambda topo: C.all_reduce(topo, [0, 1, 2], 114e6))
    assert net.choose_protocol(op) is SIMPLE
    assert t.max() == pytest.approx(8.4e-6 + 4 * (1e-6 + 100e-6), rel=1e-12)
    assert np.allclose(t, t.max())
    assert np.allclose(net.bytes_sent[:3], 4 * 38e6)  # 2(n-1)/n * S per rank


@pytest.mark.parametrize("n", [2, 4, 8])
def test_ring_allreduce_matches_formula(backend, n):
    S = 64e6 * n
    t, _, _ = run_op(make_cluster(gpn=8), backend, lambda topo: C.all_reduce(topo, range(n), S))
    assert t.max() == pytest.approx(BASE + 2 * (n - 1) * (1e-6 + S / n / NVL), rel=1e-12)


def test_all_gather_and_reduce_scatter_formula(backend):
    S = 4 * 38e6
    for build in (C.all_gather, C.reduce_scatter):
        t, _, _ = run_op(make_cluster(gpn=4), backend, lambda topo: build(topo, range(4), S))
        assert t.max() == pytest.approx(BASE + 3 * (1e-6 + 100e-6), rel=1e-12)


def test_hierarchical_allreduce_two_nodes_exact(backend):
    # 2 nodes x 2 GPUs, S = 76 MB: intra RS 1 step of 38 MB (101 us), inter ring per rail 2 steps of
    # 19 MB at 10 GB/s (2 us + 1.9 ms), intra AG 101 us
    c = make_cluster(nodes=2, gpn=2)
    t, _, op = run_op(c, backend, lambda topo: C.all_reduce(topo, range(4), 76e6))
    assert len(op.steps) == 3
    assert t.max() == pytest.approx(BASE + 2 * 101e-6 + 2 * (2e-6 + 19e6 / NIC), rel=1e-12)


def test_fused_buckets_pay_latency_per_bucket():
    assert C.bucket_sizes([10, 10, 10, 10, 5], 25) == [30.0, 15.0]
    assert C.bucket_sizes([10, 0, 7], 0) == [10.0, 7.0]
    c = make_cluster(gpn=4)
    tensors = [1e5] * 40

    def total(bucket):
        tot = 0.0
        for b in C.bucket_sizes(tensors, bucket):
            t, _, _ = run_op(c, "analytic", lambda topo: C.all_reduce(topo, range(4), b))
            tot += t.max()
        return tot

    assert total(0) > 3 * total(4e6)  # 40 latency-bound calls vs one


def test_flat_alltoall_uniform_inside_a_node(backend):
    s = 38e6
    M = np.full((4, 4), s)
    t, net, _ = run_op(make_cluster(gpn=4), backend, lambda topo: C.all_to_all(topo, range(4), M))
    assert t.max() == pytest.approx(BASE + 1e-6 + 3 * s / NVL, rel=1e-12)
    assert np.allclose(net.bytes_sent[:4], 3 * s) and np.allclose(net.bytes_received[:4], 3 * s)


def test_flat_alltoall_uneven_sizes_rank_finishes_with_its_own_load(backend):
    M = np.zeros((4, 4))
    M[0, 1] = 38e6  # only 0 -> 1 carries data; 2 -> 3 a little
    M[2, 3] = 3.8e6
    t, _, _ = run_op(make_cluster(gpn=4), backend, lambda topo: C.all_to_all(topo, range(4), M))
    assert t[0] == pytest.approx(BASE + 1e-6 + 100e-6, rel=1e-12) and t[1] == pytest.approx(t[0], rel=1e-12)
    assert t[2] == pytest.approx(BASE + 1e-6 + 10e-6, rel=1e-12) and t[3] == pytest.approx(t[2], rel=1e-12)


def test_ranks_resume_at_their_own_completion_through_the_rendezvous(backend):
    from simulator.engine import Sim

    sim = Sim(make_cluster(gpn=4), backend=backend)
    M = np.zeros((4, 4))
    M[0, 1], M[2, 3] = 38e6, 3.8e6
    resumed = {}

    def rank(r, arrive):
        yield sim.env.timeout(arrive)
        yield sim.collective("a2a", r, 4, lambda: C.all_to_all(sim.topo, range(4), M))
        resumed[r] = sim.now

    for r in range(4):
        sim.env.process(rank(r, 5e-6 * r))  # rank 3 arrives last, at 15 us
    sim.env.run()
    sim.check_all_joined()
    assert resumed[0] == pytest.approx(15e-6 + BASE + 101e-6, rel=1e-12) == resumed[1]
    assert resumed[2] == pytest.approx(15e-6 + BASE + 11e-6, rel=1e-12) == resumed[3]


S_PAIR = 10e6


def _two_by_two(topo, algo):
    return C.all_to_all(topo, range(4), np.full((4, 4), S_PAIR), algo)


def test_hetu_alltoall_exact(backend):
    # gather 4s (the whole buffer, own row included) to the leader over NVLink, leaders exchange 4s over rail 0's NIC, scatter 4s
    t, _, op = run_op(make_cluster(nodes=2, gpn=2), backend, lambda topo: _two_by_two(topo, "hetu"))
    assert op.name == "all_to_all_hetu"
    want = BASE + 2 * (1e-6 + 4 * S_PAIR / NVL) + 2e-6 + 4 * S_PAIR / NIC
    assert t.max() == pytest.approx(want, rel=1e-12)


def test_rail_alltoall_exact_and_beats_flat_on_an_oversubscribed_spine(backend):
    c = make_cluster(nodes=2, gpn=2)
    t, _, _ = run_op(c, backend, lambda topo: _two_by_two(topo, "rail"))
    assert t.max() == pytest.approx(BASE + 1e-6 + 2 * S_PAIR / NVL + 2e-6 + 2 * S_PAIR / NIC, rel=1e-12)
    tf, _, _ = run_op(c, backend, lambda topo: _two_by_two(topo, "flat"))
    assert tf.max() == pytest.approx(BASE + 2e-6 + 2 * S_PAIR / NIC, rel=1e-12)
    c4 = make_cluster(nodes=2, gpn=2, oversub=4.0)  # spine = 2 NICs / 4: cross-rail bytes 2s at NIC/2
    tf4, _, _ = run_op(c4, backend, lambda topo: _two_by_two(topo, "flat"))
    tr4, _, _ = run_op(c4, backend, lambda topo: _two_by_two(topo, "rail"))
    assert tf4.max() == pytest.approx(BASE + 2e-6 + 4 * S_PAIR / NIC, rel=1e-12)
    assert tr4.max() == pytest.approx(t.max(), rel=1e-12)
    assert tr4.max() < tf4.max()


def test_hierarchical_alltoall_falls_back_to_flat_inside_one_node():
    topo = Topology(make_cluster(gpn=4))
    assert C.all_to_all(topo, range(4), np.ones((4, 4)), "rail").name == "all_to_all"
    with pytest.raises(ValueError, match="same number"):
        C.all_to_all_rail(Topology(make_cluster(nodes=2, gpn=2)), [0, 1, 2], np.ones((3, 3)))


@pytest.mark.parametrize("size, published", [(128 * 2**20, 202.0), (2**30, 229.0)])
def test_a100_allreduce_bus_bandwidth_within_15_percent_of_published(backend, size, published):
    """HARDWARE.md: 8 x A100 NVSwitch all-reduce bus bandwidth 202 GB/s at 128 MiB, 229 at 1 GiB.
    Predicted from NVLink 300 GB/s, NCCL's 235 GB/s A100 cap, hop latency and protocol choice."""
    import simpy

    c = cluster_preset("dgx-a100-80g", 1)
    env = simpy.Environment()
    topo = Topology(c)
    net = make_network(backend, env, topo)
    ev = net.run(C.all_reduce(topo, range(8), size))
    env.run()
    busbw = size / ev.value.max() * 2 * 7 / 8 / 1e9
    assert busbw == pytest.approx(published, rel=0.15)
