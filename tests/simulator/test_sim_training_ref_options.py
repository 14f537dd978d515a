"""impl="reference" options of the training workload: the GPU AdamW (foreach / fused), the expert GEMM path
(grouped / loop, torch / triton profile rows), the capacity gate's rank scan and the expert activation."""

import warnings

import pytest

from semoe import Run, Workload, cluster_preset, model_preset
from semoe.plan_spec import ParallelPlan
from semoe.sizing import count_params
from simulator.engine import Sim
from simulator.workload import training as T


def _run(top_k=1, **over):
    m = model_preset("paper-13.9b").replace(layers=2, hidden=1024, heads=8, ffn=4096, experts=8, top_k=top_k,
                                            dtype="bf16", name="x", **over)
    return Run(model=m, cluster=cluster_preset("h100-single"), plan=ParallelPlan(),
               workload=Workload(micro_batch=4, seq_len=512, steps=1))


def _sim(run, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = Sim(run.cluster, seed=0, trace=True)
        s = T.TrainingIteration(run, sim, impl="reference", **kw).run()
    phases = {}
    for row in sim.rows:
        phases[row[3]] = phases.get(row[3], 0.0) + row[5] - row[4]
    return s, phases, sim


def test_fused_adamw_moves_28_bytes_per_parameter_foreach_80():
    run = _run()
    _, fo, sim = _sim(run)
    _, fu, _ = _sim(run, ref_optimizer="fused")
    n = count_params(run.model).total
    # dense and expert states are two HBM passes (two launches) at the achieved HBM bandwidth
    assert fo["optimizer"] == pytest.approx(80 * n / sim.cost.hbm + 2 * sim.cost.launch_s)
    assert fu["optimizer"] == pytest.approx(28 * n / sim.cost.hbm + 2 * sim.cost.launch_s)
    assert T.REF_OPTIMIZERS == {"foreach": 80, "fused": 28}


def test_default_is_foreach_and_bad_options_fail():
    run = _run()
    a, _, _ = _sim(run)
    b, _, _ = _sim(run, ref_optimizer="foreach")
    assert a["step_time_s"] == b["step_time_s"]
    with pytest.raises(ValueError, match="ref_optimizer"):
        _sim(run, ref_optimizer="sgd")
    with pytest.raises(ValueError, match="expert_kernels"):
        _sim(run, expert_kernels="cuda")


def test_expert_kernels_pick_profile_rows():
    run = _run()
    _, torch_, sim = _sim(run, expert_kernels="torch")
    _, triton, _ = _sim(run, expert_kernels="triton")
    if sim.cost.profile is None:
        pytest.skip("no H100 profile")
    assert torch_["experts_fwd"] != pytest.approx(triton["experts_fwd"], rel=1e-6)
    # everything but the expert GEMMs is the same
    assert torch_["attention_fwd"] == pytest.approx(triton["attention_fwd"])


def test_loop_experts_pay_dense_gradients():
    run = _run()
    _, g, _ = _sim(run, expert_impl="grouped")
    _, lp, _ = _sim(run, expert_impl="loop")
    assert "expert_grad_select" in lp and "expert_grad_select" not in g


def test_rank_scan_scales_with_routed_rows_and_only_with_a_capacity():
    _, k1, _ = _sim(_run(top_k=1))
    _, k2, _ = _sim(_run(top_k=2))
    assert k2["gate_rank_scan"] == pytest.approx(2 * k1["gate_rank_scan"])
    assert k1["gate_rank_scan"] == pytest.approx(2 * T.REF_RANK_SCAN_S_PER_ROW * 4 * 512)  # 2 MoE layers
    _, dropless, _ = _sim(_run(capacity_factor=None))
    assert "gate_rank_scan" not in dropless


def test_expert_activation_pass_bytes():
    run = _run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = T.TrainingIteration(run, Sim(run.cluster, seed=0, trace=False), impl="reference")
    f, b = it._expert_act_bytes(1000)
    assert (f, b) == (2 * 1000 * 4096 * 2, 3 * 1000 * 4096 * 2)
    assert it.t_expert_act and all(v[1].min() > v[0].min() > 0 for v in it.t_expert_act.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ideal = T.TrainingIteration(run, Sim(run.cluster, seed=0, trace=False))
    assert not ideal.t_expert_act
