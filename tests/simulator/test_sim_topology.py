import numpy as np
import pytest

from semoe import cluster_preset
from simulator.topology import Topology

from sim_helpers import NIC, NVL, make_cluster


def names(topo, src, dst):
    return [topo.link_name(i) for i in topo.route(src, dst)]


def test_intra_node_route_crosses_two_nvswitch_ports():
    topo = Topology(make_cluster(nodes=1, gpn=4))
    assert names(topo, 1, 3) == ["nvlink_out[1]", "nvlink_in[3]"]
    assert topo.route(2, 2) == ()
    assert topo.capacity[topo.nvl_out0] == pytest.approx(NVL)


def test_same_rail_stays_on_leaf_cross_rail_climbs_to_spine():
    topo = Topology(make_cluster(nodes=2, gpn=4))
    assert names(topo, 1, 5) == ["nic_out[1]", "nic_in[5]"]  # local 1 -> local 1: rail 1
    assert names(topo, 1, 6) == ["nic_out[1]", "spine_up[1]", "spine_down[2]", "nic_in[6]"]
    assert topo.capacity[topo.nic_out0] == NIC


def test_fewer_nics_than_gpus_share_a_nic_and_oversubscription_divides_the_spine():
    topo = Topology(make_cluster(nodes=4, gpn=4, nics=2, oversub=2.0))
    assert list(topo.rail) == [0, 0, 1, 1] * 4
    assert names(topo, 0, 4)[0] == names(topo, 1, 4)[0] == "nic_out[0]"
    assert topo.capacity[topo.spine_up0] == pytest.approx(4 * NIC / 2.0)


def test_presets_build_and_a100_nvlink_is_capped_by_ncclmodel():
    topo = Topology(cluster_preset("dgx-a100-80g", 2))
    assert topo.nvlink_GBps == pytest.approx(235.0)  # min(300 * 380/450, 235)
    h = Topology(cluster_preset("dgx-h100", 1))
    assert h.nvlink_GBps == pytest.approx(380.0)
    single = Topology(cluster_preset("h100-single", 1))
    assert single.world == 1 and single.nvl_out0 == -1
    r = single.device_route("h2d", 0)
    assert single.link_name(int(r[0, 0])) == "pcie_h2d[0]"


def test_routes_vectorised_match_scalar():
    topo = Topology(make_cluster(nodes=3, gpn=4, nics=2))
    src, dst = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    R = topo.routes(src.ravel(), dst.ravel())
    for k, (s, d) in enumerate(zip(src.ravel(), dst.ravel())):
        assert tuple(int(x) for x in R[k] if x != topo.n_links) == topo.route(int(s), int(d))


@pytest.mark.parametrize("name", ["dgx-a100-80g", "dgx-a100-40g", "dgx-h100", "h100-single", "h200-single"])
def test_every_cluster_preset_simulates_a_tiny_iteration(name):
    import math

    from semoe import CLUSTER_PRESETS, Run, Workload, model_preset, plan_preset
    from simulator.api import simulate

    assert name in CLUSTER_PRESETS
    c = cluster_preset(name, 2 if name.startswith("dgx") else 1)
    m = model_preset("tiny")
    run = Run(model=m, cluster=c, plan=plan_preset("semoe", c.world_size, math.gcd(c.world_size, m.experts)),
              workload=Workload(seq_len=64))
    sim, s = simulate(run)
    assert s["step_time_s"] > 0 and not s["oom"]
