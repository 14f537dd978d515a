"""Training iteration: memory equals semoe.sizing, determinism, skew, schedule invariants, OOM."""

import numpy as np
import pytest

from semoe import Run, SpecError, Workload, cluster_preset, model_preset, plan_preset
from semoe.sizing import state_bytes_per_tier
from simulator.api import simulate

PHASES = {
    "embedding_fwd", "attention_fwd", "gate_fwd", "dispatch_a2a", "experts_fwd", "combine_a2a", "ffn_fwd",
    "head_fwd", "head_bwd", "combine_a2a_bwd", "experts_bwd", "dispatch_a2a_bwd", "gate_bwd", "ffn_bwd",
    "attention_bwd", "embedding_bwd", "param_allgather", "grad_reduce_scatter", "grad_allreduce",
    "expert_grad_allreduce", "h2d_prefetch", "d2h_grads", "optimizer", "optimizer_ssd",
    # offloaded expert states (simulator.workload.offload) and impl="reference" overheads
    "ssd_read", "ssd_write", "ssd_writeback", "cpu_adam", "h2d_params",
    "weight_cast", "grad_cast", "loss_fwd", "loss_bwd", "grad_clip", "expert_grad_select",
}


def make_run(model="paper-13.9b", nodes=1, plan="deepspeed", ep=None, seq=512, cluster="dgx-a100-80g", **wl):
    m = model_preset(model) if isinstance(model, str) else model
    c = cluster_preset(cluster, nodes) if isinstance(cluster, str) else cluster
    p = plan_preset(plan, c.world_size, ep or min(c.world_size, m.experts)) if isinstance(plan, str) else plan
    return Run(model=m, cluster=c, plan=p, workload=Workload(micro_batch=1, seq_len=seq, **wl))


@pytest.mark.parametrize("plan", ["deepspeed", "semoe"])
def test_model_state_bytes_equal_sizing_exactly(plan):
    run = make_run(plan=plan)
    sim, s = simulate(run)
    want = state_bytes_per_tier(run.model, run.plan)
    lab = sim.memory.by_label
    assert lab[(0, "hbm", "model_states")] == want["gpu"]
    assert lab[(0, "dram", "model_states")] == want["cpu"]
    assert lab[(0, "ssd", "model_states")] == want["ssd"]
    assert s["peak_hbm_bytes"] >= want["gpu"]
    assert s["peak_dram_bytes"] == pytest.approx(8 * want["cpu"])  # per node: 8 ranks


def test_deterministic_for_a_seed_and_seed_matters_under_skew():
    run = make_run(routing="zipf", routing_skew=1.2, seed=3)
    sim1, s1 = simulate(run)
    sim2, s2 = simulate(run)
    assert s1["step_time_s"] == s2["step_time_s"] and sim1.rows == sim2.rows
    sim3, _ = simulate(run.replace(workload=run.workload.replace(seed=4)))
    assert sim3.rows != sim1.rows


def test_routing_skew_slows_a_dropless_model():
    m = model_preset("paper-13.9b").replace(capacity_factor=None)
    uni = simulate(make_run(model=m))[1]["step_time_s"]
    skew = simulate(make_run(model=m, routing="zipf", routing_skew=1.5))[1]["step_time_s"]
    hist = [8.0] + [1.0] * 7
    hot = simulate(make_run(model=m, routing="histogram", expert_histogram=tuple(hist)))[1]["step_time_s"]
    assert skew > 1.1 * uni and hot > 1.1 * uni


def test_schedule_invariants_phases_streams_and_breakdown():
    sim, s = simulate(make_run(nodes=2, plan="semoe"))
    phases = {r[3] for r in sim.rows}
    assert phases <= PHASES
    assert {"dispatch_a2a", "param_allgather", "h2d_prefetch", "expert_grad_allreduce"} <= phases
    for rank in (0, 9):  # the compute stream never runs two kernels at once
        comp = sorted((r[4], r[5]) for r in sim.rows if r[0] == rank and r[8] == "compute")
        assert all(b[0] >= a[1] - 1e-12 for a, b in zip(comp, comp[1:]))
    b = s["breakdown"]
    busy = b["compute"] + b["comm"] + b["copy"] + b["optimizer"]
    assert np.all(busy <= s["step_time_s"] + 1e-9) and np.all(b["idle"] >= 0)
    assert s["tokens_per_s"] == pytest.approx(16 * 512 / s["step_time_s"])


def test_prefetch_and_fusion_help():
    base = make_run(plan="semoe")
    no_prefetch = base.replace(plan=base.plan.replace(prefetch_depth=0))
    unfused = base.replace(plan=base.plan.replace(fusion_bucket_bytes=0))
    t = simulate(base)[1]["step_time_s"]
    assert simulate(no_prefetch)[1]["step_time_s"] > t
    sim_u, s_u = simulate(unfused)
    sim_f, _ = simulate(base)
    count = lambda sim: sum(r[3].startswith("grad_") for r in sim.rows)  # noqa: E731
    assert count(sim_u) > 5 * count(sim_f)


def test_out_of_memory_is_reported():
    c = cluster_preset("dgx-a100-80g", 1)
    small = c.replace(gpu=c.gpu.replace(memory_bytes=10**9))
    s = simulate(make_run(cluster=small))[1]
    assert "HBM" in s["oom"]
    assert s["peak_hbm_bytes"] > 10**9


def test_backends_agree_on_a_small_run():
    run = make_run(model="tiny", nodes=2, seq=128)
    ta = simulate(run, backend="analytic")[1]["step_time_s"]
    tf = simulate(run, backend="flow")[1]["step_time_s"]
    assert tf == pytest.approx(ta, rel=0.1)


def test_plain_data_parallel_allreduces_gradients():
    run = make_run()
    run = run.replace(plan=run.plan.replace(zero_stage=0))
    sim, s = simulate(run)
    phases = {r[3] for r in sim.rows}
    assert "grad_allreduce" in phases and "param_allgather" not in phases


def test_inference_is_not_simulated_yet():
    with pytest.raises(SpecError, match="kind"):
        simulate(make_run(kind="infer", gen_len=4))


def test_micro_batches_dense_blocks_and_swiglu():
    m = model_preset("mixtral-8x7b").replace(layers=4, moe_every=2)
    one = make_run(model=m, seq=256)
    two = one.replace(workload=one.workload.replace(micro_batches=2))
    sim1, s1 = simulate(one)
    sim2, s2 = simulate(two)
    phases = {r[3] for r in sim2.rows}
    assert {"ffn_fwd", "ffn_bwd", "experts_fwd"} <= phases
    assert {r[2] for r in sim2.rows if r[3] == "attention_fwd"} == {0, 1}
    c1 = s1["breakdown"]["compute"].mean()
    assert s2["breakdown"]["compute"].mean() == pytest.approx(2 * c1, rel=0.05)
    assert s2["tokens_per_s"] > 0.9 * s1["tokens_per_s"]  # gradient sync amortised over 2 micro-batches
