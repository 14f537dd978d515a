"""Property tests (hypothesis): bytes conserved, no link above capacity, determinism, termination."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator import collectives as C

from sim_helpers import make_cluster, make_net

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scenario(draw, hierarchical: bool = False):
    nodes = draw(st.integers(1, 3))
    gpn = draw(st.sampled_from([1, 2, 4]))
    nics = draw(st.sampled_from([n for n in (1, 2, 4) if n <= gpn and gpn % n == 0]))
    oversub = draw(st.sampled_from([1.0, 2.0]))
    c = make_cluster(nodes=nodes, gpn=gpn, nics=nics, oversub=oversub)
    W = nodes * gpn
    if hierarchical:
        use_nodes = draw(st.lists(st.integers(0, nodes - 1), min_size=1, max_size=nodes, unique=True))
        locs = draw(st.lists(st.integers(0, gpn - 1), min_size=1, max_size=gpn, unique=True))
        group = sorted(n * gpn + l for n in use_nodes for l in locs)
    else:
        group = draw(st.lists(st.integers(0, W - 1), min_size=1, max_size=W, unique=True))
    n = len(group)
    vals = draw(st.lists(st.integers(0, 5) , min_size=n * n, max_size=n * n))
    M = np.array(vals, dtype=float).reshape(n, n) * 1e5
    backend = draw(st.sampled_from(["analytic", "flow"]))
    return c, group, M, backend


def _run(c, backend, build):
    env, topo, net = make_net(c, backend)
    op = build(topo)
    ev = net.run(op)
    env.run()
    assert ev.processed  # terminated
    return np.asarray(ev.value), net


@SETTINGS
@given(scenario(), st.sampled_from(["flat", "hetu", "rail"]))
def test_alltoall_conserves_bytes_and_respects_capacity(sc, algo):
    c, group, M, backend = sc
    if algo != "flat":
        env, topo, _ = make_net(c)
        lay = C.node_layout(topo, np.array(group))
        if lay is None:
            algo = "flat"
    t, net = _run(c, backend, lambda topo: C.all_to_all(topo, group, M, algo))
    assert np.isclose(net.bytes_sent.sum(), net.bytes_received.sum())
    assert np.all(t >= 0)
    if algo == "flat" or len(group) == 1:
        off = M.copy()
        np.fill_diagonal(off, 0)
        assert np.allclose(net.bytes_sent[group], off.sum(axis=1))
        assert np.allclose(net.bytes_received[group], off.sum(axis=0))
    if backend == "flow":
        assert net.max_utilisation <= 1 + 1e-9


@SETTINGS
@given(scenario(hierarchical=True), st.sampled_from(["hetu", "rail"]))
def test_hierarchical_alltoall_delivers_every_remote_byte(sc, algo):
    c, group, M, backend = sc
    t, net = _run(c, backend, lambda topo: C.all_to_all(topo, group, M, algo))
    topo = net.topo
    nodes = topo.node[np.array(group)]
    remote = M[nodes[:, None] != nodes[None, :]].sum()
    # every byte between nodes crosses a NIC exactly once (rail: same-rail, no spine)
    nic_out = net.link_bytes[topo.nic_out0: topo.nic_out0 + topo.nodes * topo.nics].sum() if topo.nics else 0.0
    eff = 1.0 / (net.choose_protocol(C.all_to_all(topo, group, M, algo)).efficiency)
    assert np.isclose(nic_out, remote * eff)
    if topo.nics:  # both send between equal local ranks only: same rail, the spine stays idle
        assert net.link_bytes[topo.spine_up0: topo.spine_up0 + topo.nics].sum() == 0.0


@SETTINGS
@given(scenario(), st.sampled_from(["all_reduce", "all_gather", "reduce_scatter"]), st.integers(1, 10**8))
def test_ring_collectives_terminate_and_are_deterministic(sc, name, size):
    c, group, _, backend = sc
    build = getattr(C, name)
    t1, net1 = _run(c, backend, lambda topo: build(topo, group, float(size)))
    t2, _ = _run(c, backend, lambda topo: build(topo, group, float(size)))
    assert np.array_equal(t1, t2)
    assert np.isclose(net1.bytes_sent.sum(), net1.bytes_received.sum())
    n = len(group)
    factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}[name]
    if C.node_layout(net1.topo, np.array(group)) is None or n == 1:
        assert np.allclose(net1.bytes_sent[group], factor * size)
    if backend == "flow":
        assert net1.max_utilisation <= 1 + 1e-9
