"""The training step's device-time breakdown (simulator.train_breakdown) and the mechanisms it found: the kernel
profile found for the GPU, cuDNN attention's backward ratio, cuBLAS dense GEMMs' backward."""

from __future__ import annotations

import warnings

import pytest

from semoe import Run, Workload, cluster_preset
from semoe.plan_spec import ParallelPlan
from semoe.presets import model_preset
from simulator import train_breakdown as B
from simulator.cost import CostModel, find_profile
from simulator.engine import Sim
from simulator.workload.training import TORCH_DENSE_BWD_FACTOR, TrainingIteration


def test_kernel_profile_found_not_another_table_of_the_same_gpu():
    """results/profiles also holds other tables measured on the H100 (collective_host_h100.csv sorts first and
    carries the GPU's name): the cost model must read the kernel profile, named for the GPU."""
    gpu = cluster_preset("h100-single").gpu
    assert find_profile(gpu).name == "h100_80gb_hbm3.csv"
    cm = CostModel.auto(gpu)
    assert ("sdpa_fwd", "bf16") in cm.profile.sdpa_times and cm.profile.mem_curves


def test_sdpa_backward_ratio_from_the_profile_rows():
    cm = CostModel.auto(cluster_preset("h100-single").gpu)
    # the committed rows at seq 2048, 16 heads of 128: fwd 0.276512 ms, fwd+bwd 1.14966 ms
    assert cm.sdpa_backward_ratio(2048, 128, 16) == pytest.approx((1.14966 - 0.276512) / 0.276512, rel=1e-4)
    assert cm.sdpa_backward_ratio(2048, 64, 16) == cm.sdpa_backward_ratio(2048, 128, 16)  # nearest head dim
    assert CostModel(cluster_preset("h100-single").gpu).sdpa_backward_ratio(2048, 64, 16) is None  # no profile


def _it(impl):
    m = model_preset("paper-13.9b").replace(layers=2, hidden=1024, heads=8, ffn=2048, vocab=8192, name="t")
    run = Run(model=m, cluster=cluster_preset("h100-single"), plan=ParallelPlan(),
              workload=Workload(micro_batch=2, seq_len=1024, steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainingIteration(run, Sim(run.cluster, seed=0, trace=False), impl=impl, expert_kernels="torch")


def test_reference_backward_of_dense_gemms_and_attention():
    """impl=reference: cuBLAS dense GEMMs' backward is 2 forward GEMMs, cuDNN attention's the profile's ratio;
    impl=ideal keeps the calibrated factor on every part."""
    ref, ideal = _it("reference"), _it("ideal")
    ratio = ref.sim.cost.sdpa_backward_ratio(1024, ref.m.head_dim, ref.m.heads)
    assert ref.parts_bwd["attention"]["dense_gemm"] == pytest.approx(2 * TORCH_DENSE_BWD_FACTOR
                                                                      * ref.parts["attention"]["dense_gemm"])
    assert ref.parts_bwd["attention"]["attention_core"] == pytest.approx(ratio * ref.parts["attention"]["attention_core"])
    assert ideal.t_attn_bwd == pytest.approx(ideal.bwd * ideal.t_attn)
    assert ratio > ideal.bwd  # flash backward is slower than the GEMM factor says
    parts = ref.phase_parts()
    assert sum(parts["attention_bwd"].values()) == pytest.approx(1.0) and parts["experts_fwd"] == {"expert_gemm": 1.0}


def test_profile_table_parsed_and_categorised():
    prof = B.parse_profile(B.PROFILE.read_text())
    assert prof["self_cuda_total_s"] == pytest.approx(1.310)
    gm = next(r for r in prof["rows"] if r["name"] == "aten::_grouped_mm")
    assert gm["calls"] == 192 and gm["self_cuda_s"] == pytest.approx(0.475919)
    cats = B.measured_categories(prof)
    assert sum(v["total"] for v in cats.values()) == pytest.approx(prof["self_cuda_total_s"])
    assert cats["expert_gemm"]["bwd"] == pytest.approx(0.305968) and cats["attention_core"]["bwd"] == pytest.approx(0.109296)
    with pytest.raises(ValueError, match="header"):
        B.parse_profile("no table here")


def test_simulated_breakdown_adds_up_to_the_compute_time():
    sim = B.simulate_breakdown()
    total = sum(v["total"] for v in sim["categories"].values())
    bd = sim["summary"]["breakdown"]  # the GPU optimizer is its own busy category there, a compute row in the trace
    assert total == pytest.approx(bd["compute"][0] + bd["optimizer"][0], rel=1e-6)
    assert "unclassified" not in sim["categories"]
    text = B.markdown(sim, B.measured_categories(B.parse_profile(B.PROFILE.read_text())), 1.31, "t")
    assert "| expert GEMMs" in text and "**device total**" in text
