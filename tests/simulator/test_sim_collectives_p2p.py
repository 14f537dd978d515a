"""The point-to-point all-to-all (`collectives.all_to_all_p2p`): a per-peer rate cap on every message, applied
the same way by both network backends, and NCCL's p2p protocols only."""

import numpy as np
import pytest

from simulator import collectives as C
from simulator.hardware import LL128, SIMPLE

from sim_helpers import NVL, make_cluster, make_net, run_op



def test_cap_sets_the_time_below_the_link_and_not_above(backend):
    # 2 GPUs, 38 MB each way: the link alone takes 100 us; a 95 GB/s peer cap takes 400 us
    M = np.array([[0.0, 38e6], [38e6, 0.0]])
    c = make_cluster(gpn=2, nvl_lat=1e-6)
    t, net, op = run_op(c, backend, lambda topo: C.all_to_all_p2p(topo, [0, 1], M, 95.0))
    assert op.name == "all_to_all_p2p" and op.peer_GBps == 95.0
    assert net.choose_protocol(op) is SIMPLE
    assert t.max() == pytest.approx(SIMPLE.base_latency_s + 1e-6 + 38e6 / 95e9, rel=1e-9)
    # a cap above the link changes nothing: the flat collective's time
    t_hi, _, _ = run_op(c, backend, lambda topo: C.all_to_all_p2p(topo, [0, 1], M, 10 * NVL / 1e9))
    t_flat, _, _ = run_op(c, backend, lambda topo: C.all_to_all_flat(topo, [0, 1], M))
    assert t_hi.max() == pytest.approx(t_flat.max(), rel=1e-9)
    assert t_flat.max() == pytest.approx(SIMPLE.base_latency_s + 1e-6 + 38e6 / NVL, rel=1e-9)


def test_cap_is_per_peer_so_several_peers_add_up(backend):
    """Rank 0 sends 38 MB to each of 3 peers at a 95 GB/s cap: the three messages share rank 0's 380 GB/s port
    (126.7 GB/s each if uncapped), so the cap binds each at 95: 400 us, not 3 x 400."""
    M = np.zeros((4, 4))
    M[0, 1:] = 38e6
    c = make_cluster(gpn=4, nvl_lat=0.0)
    t, _net, _ = run_op(c, backend, lambda topo: C.all_to_all_p2p(topo, range(4), M, 95.0))
    assert t.max() == pytest.approx(SIMPLE.base_latency_s + 38e6 / 95e9, rel=1e-9)
    # a cap above the fair share: the port (3 x 38 MB at 380 GB/s = 300 us) sets the time
    t2, _, _ = run_op(c, backend, lambda topo: C.all_to_all_p2p(topo, range(4), M, 200.0))
    assert t2.max() == pytest.approx(SIMPLE.base_latency_s + 3 * 38e6 / NVL, rel=1e-9)


def test_flow_backend_gives_a_capped_flow_its_cap_and_the_rest_to_the_other():
    """Water-filling with a per-flow cap: a capped p2p message (95 GB/s) and an uncapped send share one
    380 GB/s port: the capped one runs at 95, the other at 285 until the capped one ends."""
    c = make_cluster(gpn=4, nvl_lat=0.0)
    env, topo, net = make_net(c, "flow")
    ends = {}

    def capped():
        yield net.transfer_routes(topo.routes(np.array([0]), np.array([1])), np.array([38e6]), SIMPLE, cap_Bps=95e9)
        ends["capped"] = env.now

    def free():
        yield net.send(0, 2, 57e6)
        ends["free"] = env.now

    env.process(capped())
    env.process(free())
    env.run()
    assert ends["capped"] == pytest.approx(38e6 / 95e9, rel=1e-9)
    assert ends["free"] == pytest.approx(57e6 / 285e9, rel=1e-9)  # 200 us < 400 us: ends first, at 285 GB/s
    assert net.max_utilisation == pytest.approx(1.0)


def test_p2p_protocols_and_bad_rate():
    M = np.full((2, 2), 64e3)
    _env, topo, net = make_net(make_cluster(gpn=2))
    op = C.all_to_all_p2p(topo, [0, 1], M, 50.0)
    for nb in (1e3, 1e5, 1e6, 1e8):  # NCCL's send/receive path has no LL128
        assert net.choose_protocol(C.all_to_all_p2p(topo, [0, 1], np.full((2, 2), nb), 50.0)) is not LL128
    assert net.op_offsets(op).max() > net.op_offsets(C.all_to_all_flat(topo, [0, 1], M)).max() - 1e-12
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="peer_GBps must be > 0"):
            C.all_to_all_p2p(topo, [0, 1], M, bad)
