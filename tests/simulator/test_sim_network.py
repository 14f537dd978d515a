"""Network backends: exact timelines on tiny scenarios and max-min fairness oracles."""

import numpy as np
import pytest

from sim_helpers import NIC, NVL, make_cluster, make_net


def run_send(backend, cluster, src, dst, n, at=0.0):
    env, topo, net = make_net(cluster, backend)
    out = {}

    def proc():
        yield env.timeout(at)
        yield net.send(src, dst, n)
        out["t"] = env.now

    env.process(proc())
    env.run()
    return out["t"]


def test_single_send_is_alpha_plus_bytes_over_bandwidth(backend):
    c = make_cluster(nodes=2, gpn=2, nvl_lat=1e-6, nic_lat=2e-6)
    assert run_send(backend, c, 0, 1, 38e6) == pytest.approx(1e-6 + 38e6 / NVL, rel=1e-12)
    assert run_send(backend, c, 0, 2, 10e6) == pytest.approx(2e-6 + 10e6 / NIC, rel=1e-12)
    assert run_send(backend, c, 1, 1, 10e6) == 0.0


def test_two_flows_on_one_link_each_get_half():
    c = make_cluster(nodes=1, gpn=4, nvl_lat=0.0)
    env, topo, net = make_net(c, "flow")
    n = 38e6
    ends = {}

    def flow(name, dst, start):
        yield env.timeout(start)
        yield net.send(0, dst, n)
        ends[name] = env.now

    env.process(flow("a", 1, 0.0))
    env.process(flow("b", 2, 0.0))
    env.run()
    # both share nvlink_out[0]: rate NVL/2 each, both end at 2n/NVL
    assert ends["a"] == pytest.approx(2 * n / NVL, rel=1e-12)
    assert ends["b"] == pytest.approx(2 * n / NVL, rel=1e-12)
    assert net.max_utilisation == pytest.approx(1.0)


def test_staggered_flows_hand_computed_timeline():
    """a starts at 0, b at n/(2B): a runs alone at B (n/2 done), then both at B/2: a ends at
    1.5 n/B having sent n/2 more; b has n/2 left, alone at B: ends at 2 n/B."""
    c = make_cluster(nodes=1, gpn=4, nvl_lat=0.0)
    env, topo, net = make_net(c, "flow")
    n, B = 38e6, NVL
    ends = {}

    def flow(name, dst, start):
        yield env.timeout(start)
        yield net.send(0, dst, n)
        ends[name] = env.now

    env.process(flow("a", 1, 0.0))
    env.process(flow("b", 2, n / (2 * B)))
    env.run()
    assert ends["a"] == pytest.approx(1.5 * n / B, rel=1e-12)
    assert ends["b"] == pytest.approx(2.0 * n / B, rel=1e-12)


def test_max_min_fairness_with_different_bottlenecks():
    """One NIC per node: 0->2 and 1->3 share node 0's NIC (NIC/2 each); 0->1 runs on NVLink alone."""
    c = make_cluster(nodes=2, gpn=2, nics=1, nvl_lat=0.0, nic_lat=0.0)
    env, topo, net = make_net(c, "flow")
    n = 10e6
    ev = net.transfer(np.array([0, 1, 0]), np.array([2, 3, 1]), np.array([n, n, n]))
    env.run()
    t = ev.value
    assert t[0] == pytest.approx(2 * n / NIC, rel=1e-12)
    assert t[1] == pytest.approx(2 * n / NIC, rel=1e-12)
    assert t[2] == pytest.approx(n / NVL, rel=1e-12)
    # the analytic backend counts the same contention inside one batch
    env2, _, net2 = make_net(c, "analytic")
    ev2 = net2.transfer(np.array([0, 1, 0]), np.array([2, 3, 1]), np.array([n, n, n]))
    env2.run()
    assert np.allclose(ev2.value, t, rtol=1e-12)


def test_host_copies_use_the_copy_engines_concurrently(backend):
    c = make_cluster(nodes=1, gpn=2)
    env, topo, net = make_net(c, backend)
    n = 20e9 * 0.01  # 10 ms at 20 GB/s
    e1 = net.transfer_routes(topo.device_route("h2d", 0), np.array([n]))
    e2 = net.transfer_routes(topo.device_route("d2h", 0), np.array([n]))
    env.run()
    assert e1.value[0] == pytest.approx(0.01) and e2.value[0] == pytest.approx(0.01)
