"""Offloaded expert states in the training iteration (issue 6): tiers, copy engines, LFU cache, prefetch,
CPU optimizer; and the reference-trainer overheads (impl="reference")."""

from itertools import pairwise

import numpy as np
import pytest

from semoe import Run, Workload, cluster_preset, model_preset
from semoe.plan_spec import OffloadPlacement, ParallelPlan
from semoe.sizing import (
    OPTIMIZER_BYTES,
    PARAM_BYTES,
    expert_params,
    state_bytes_per_tier,
)
from simulator.engine import Sim
from simulator.workload.offload import received, simulate_cache
from simulator.workload.training import CPU_ADAM_BYTES_PER_PARAM, TrainingIteration

MODEL = model_preset("paper-13.9b").replace(layers=3, hidden=512, heads=4, ffn=2048, experts=4, vocab=4096,
                                            name="small")


def run_of(tier="cpu", depth=1, cache=0, model=MODEL, mb=4, seq=256, steps=5, **wl):
    off = OffloadPlacement() if tier == "gpu" else OffloadPlacement(expert_params=tier, expert_optimizer=tier)
    plan = ParallelPlan(offload=off, prefetch_depth=depth, cpu_cache_experts=cache)
    return Run(model=model, cluster=cluster_preset("h100-single"), plan=plan,
               workload=Workload(micro_batch=mb, seq_len=seq, steps=steps, **wl))


def sim_of(run, impl="ideal", **kw):
    sim = Sim(run.cluster, seed=run.workload.seed, profile=None)
    return sim, TrainingIteration(run, sim, impl=impl, **kw).run()


def spans(sim, phase, rank=0):
    return sorted((r[4], r[5]) for r in sim.rows if r[3] == phase and r[0] == rank)


def overlaps(a, b):
    return any(x0 < y1 and y0 < x1 for x0, x1 in a for y0, y1 in b)


def test_received_sums_the_expert_parallel_group():
    counts = np.array([[1, 2, 3, 4], [10, 20, 30, 40]])  # 2 ranks, 4 experts, EP 2: rank 0 owns 0-1
    assert received(counts, 2).tolist() == [[11, 22], [33, 44]]
    assert received(counts, 1).tolist() == [[1, 2, 3, 4], [10, 20, 30, 40]]


def test_prefetch_hides_the_copies_on_demand_stalls_compute():
    sim_on, on = sim_of(run_of("cpu", depth=1))
    sim_off, off = sim_of(run_of("cpu", depth=0))
    assert off["step_time_s"] > on["step_time_s"]
    assert off["breakdown"]["copy"][0] > on["breakdown"]["copy"][0]
    # prefetched copies run while the compute stream works; on demand, nothing computes during them
    comp_on = [(r[4], r[5]) for r in sim_on.rows if r[8] == "compute"]
    comp_off = [(r[4], r[5]) for r in sim_off.rows if r[8] == "compute" and r[3] != "optimizer"]
    assert overlaps(spans(sim_on, "h2d_prefetch"), comp_on)
    assert not overlaps(spans(sim_off, "h2d_prefetch"), comp_off)
    # the same bytes cross PCIe either way: 2 fetches (fwd, bwd) of every used expert of every MoE layer
    P = expert_params(MODEL)
    assert on["bytes"]["h2d_prefetch"] == off["bytes"]["h2d_prefetch"] == 2 * MODEL.moe_layers * 4 * PARAM_BYTES * P


def test_h2d_and_d2h_are_separate_engines_full_duplex():
    sim, _ = sim_of(run_of("cpu", depth=2))
    h2d, d2h = spans(sim, "h2d_prefetch"), spans(sim, "d2h_grads")
    assert overlaps(h2d, d2h)  # gradients go down while the next layer's experts come up
    for eng in (h2d, d2h):  # each engine runs one copy at a time
        assert all(b[0] >= a[1] - 1e-12 for a, b in pairwise(eng))


def test_cpu_optimizer_overlaps_the_backward_and_is_serial_per_node():
    sim, s = sim_of(run_of("cpu", depth=1))
    adam = spans(sim, "cpu_adam")
    P = expert_params(MODEL)
    per = P / (cluster_preset("h100-single").host_memory_GBps * 1e9 / CPU_ADAM_BYTES_PER_PARAM)
    assert len(adam) == MODEL.moe_layers * 4 and all(b - a == pytest.approx(per) for a, b in adam)
    assert all(b[0] >= a[1] - 1e-12 for a, b in pairwise(adam))
    bwd = spans(sim, "attention_bwd")
    assert adam[0][0] < bwd[-1][1]  # the first layer's update starts before the backward ends
    assert s["step_time_s"] >= adam[-1][1] - 1e-12


def test_ssd_tier_cache_hits_skip_ssd_reads():
    P = expert_params(MODEL)
    _, none = sim_of(run_of("ssd", cache=0))
    _, half = sim_of(run_of("ssd", cache=2))
    _, full = sim_of(run_of("ssd", cache=4))
    L = MODEL.moe_layers
    # no cache: the optimizer reads and writes back every used expert's fp32 state (the 16-bit params come
    # from the pinned host mirror, as in reference.offload)
    assert none["bytes"]["ssd_read"] == pytest.approx(L * 4 * OPTIMIZER_BYTES * P)
    assert none["bytes"]["ssd_write"] == pytest.approx(L * 4 * OPTIMIZER_BYTES * P)
    assert np.isnan(none["cache_hit_rate"])
    # a cache as large as the experts: every expert is admitted on first use and hits from step 2 on
    assert full["cache_hit_rate"] == 1.0 and "ssd_read" not in full["bytes"] and full["cache_evictions"] == 0
    assert 0 < half["bytes"]["ssd_read"] < none["bytes"]["ssd_read"]
    assert none["step_time_s"] > half["step_time_s"] > full["step_time_s"]
    sim, _ = sim_of(run_of("ssd", cache=0))
    # DRAM: the pinned bf16 mirror + gradient buffer of every local expert (semoe.sizing counts it there,
    # as reference.offload allocates it); no fp32 state without a cache
    run0 = run_of("ssd", cache=0)
    dram = sim.memory.by_label[(0, "dram", "model_states")]
    assert dram == state_bytes_per_tier(run0.model, run0.plan)["cpu"]
    assert dram >= 4 * L * 4 * P
    sim4, _ = sim_of(run_of("ssd", cache=4))
    assert sim4.memory.by_label[(0, "dram", "model_states")] - dram == 12 * L * 4 * P  # + the cached fp32 states


def test_cache_hit_rate_evolves_over_steps_and_follows_skew():
    run = run_of("ssd", cache=1, mb=1, seq=16, steps=12, routing="histogram", expert_histogram=(20.0, 1.0, 1.0, 1.0))
    sim = Sim(run.cluster, seed=0, profile=None)
    it = TrainingIteration(run, sim)
    rates = it.cache.hit_rate_per_step
    assert rates[0] == 0.0 and rates[-1] > rates[0]  # cold start, then the hot expert stays cached
    # the cached expert of every layer is the hot one (expert 0)
    hot = [{k for k in it.cache.caches[0].cached if k[0] == i} for i in it.a2a]
    assert all(h == {(i, 0)} for h, i in zip(hot, it.a2a))


def test_evictions_are_written_back():
    history = [{0: np.array([[5.0, 0.0]])}, {0: np.array([[0.0, 9.0]])}]
    plan = ParallelPlan(offload=OffloadPlacement(expert_params="ssd", expert_optimizer="ssd"), cpu_cache_experts=1,
                        cache_decay=0.5, cache_decay_every=1)
    c = simulate_cache(plan, history, capacity=1)
    assert c.evicted == [{0: [0]}] and c.evictions == 1  # step 2: expert 1 (9) replaces expert 0 (5 x 0.5)
    # in the iteration: the write-back of the last step's evictions, the 12-byte fp32 state per parameter
    run = run_of("ssd", cache=1, mb=1, seq=32, steps=8)
    _, s = sim_of(run)
    P = expert_params(MODEL)
    assert s["bytes"].get("ssd_writeback", 0.0) == pytest.approx(s["cache_evictions"] * OPTIMIZER_BYTES * P)


def test_unused_experts_are_not_fetched_but_still_updated():
    """Only experts with tokens are copied to the GPU; the gradient buffer of the layer comes back whole
    and AdamW updates every expert (reference.offload)."""
    _, all_used = sim_of(run_of("cpu"))
    _, two = sim_of(run_of("cpu", routing="histogram", expert_histogram=(1.0, 1.0, 0.0, 0.0)))
    assert two["bytes"]["h2d_prefetch"] == pytest.approx(all_used["bytes"]["h2d_prefetch"] / 2)
    assert two["bytes"]["d2h_grads"] == pytest.approx(all_used["bytes"]["d2h_grads"])
    assert two["busy_s"]["cpu_adam"] == pytest.approx(all_used["busy_s"]["cpu_adam"])


def test_zero_offload_style_copies_updated_params_back():
    plan = ParallelPlan(offload=OffloadPlacement(expert_optimizer="cpu"))
    run = run_of("gpu").replace(plan=plan)
    sim, s = sim_of(run)
    assert spans(sim, "h2d_params") and spans(sim, "cpu_adam") and "h2d_prefetch" not in s["bytes"]


def test_reference_impl_adds_its_hbm_passes_and_a_host_floor():
    run = run_of("gpu")
    sim_i, ideal = sim_of(run)
    sim_r, ref = sim_of(run, impl="reference")
    phases = {r[3] for r in sim_r.rows}
    assert {"weight_cast", "grad_cast", "loss_fwd", "loss_bwd", "grad_clip"} <= phases
    assert not phases & {"weight_cast", "loss_fwd"} - {r[3] for r in sim_i.rows} - phases
    assert ref["step_time_s"] > ideal["step_time_s"]
    _, host = sim_of(run, impl="reference", host_ops=1e6)
    assert host["step_time_s"] == pytest.approx(1e6 * 8e-6) and host["device_step_s"] == ref["step_time_s"]
    with pytest.raises(ValueError, match="impl"):
        sim_of(run, impl="fast")


def test_reference_schedule_updates_after_clipping_and_overlaps_the_next_forward():
    """impl="reference" with a CPU optimizer follows reference.offload: D2H and the CPU update after the
    backward and clipping, one task per layer on one optimizer thread in layer order; the next step's
    fetch of a layer waits for that layer's update. Three steps are simulated (the SSD write-backs of a
    step are not awaited, they delay the next step's reads); the last (steady state) is reported."""
    sim, s = sim_of(run_of("cpu", depth=1), impl="reference")
    clip = spans(sim, "grad_clip")
    adam = spans(sim, "cpu_adam")
    L = MODEL.moe_layers
    assert len(clip) == 3 and len(adam) == 3 * L  # one AdamW over each layer's experts per step
    first_step_adam = adam[:L]
    assert first_step_adam[0][0] >= clip[0][1] - 1e-12  # after the backward and the clipping
    assert all(a[1] <= b[0] + 1e-12 for a, b in pairwise(first_step_adam))  # one thread: one layer at a time
    fwd2 = [t for t in spans(sim, "attention_fwd") if t[0] > clip[0][1]]
    assert fwd2[0][0] < first_step_adam[-1][1]  # the next forward starts while later layers update
    h2d2 = [t for t in spans(sim, "h2d_prefetch") if t[0] > clip[0][1]]
    assert h2d2[0][0] >= first_step_adam[0][1] - 1e-12  # layer 0's fetch waits for layer 0's update
    assert s["step_time_s"] == pytest.approx(s["device_step_s"])
    assert s["step_time_s"] < sim.env.now / 2  # the last step, not all three
    P = expert_params(MODEL)
    assert s["bytes"]["d2h_grads"] == pytest.approx(L * 4 * 2 * P)  # per step


def test_reference_ssd_reads_queue_behind_write_backs_on_one_io_queue():
    """reference.offload, ssd tier without staging (depth 0): each layer's update reads its missed states
    on demand through the one I/O queue, behind the previous layer's write-backs, which are queued and not
    awaited; the block preparation (``ssd_write_prep``) occupies that queue before each write."""
    run = run_of("ssd", depth=0, cache=0)
    sim, s = sim_of(run, impl="reference")
    reads, writes = spans(sim, "ssd_read"), spans(sim, "ssd_write")
    assert reads and writes and not overlaps(reads, writes)  # one queue
    # in the last step, layer 1's read starts after layer 0's write-back
    last = [w for w in writes if w[0] >= reads[-MODEL.moe_layers][0]]
    assert last and reads[-MODEL.moe_layers + 1][0] >= last[0][1] - 1e-12
    _, slow = sim_of(run, impl="reference", io_rates={"ssd_write_prep": 1e9})
    assert slow["step_time_s"] > s["step_time_s"]


def test_loop_experts_pay_a_dense_gradient_per_expert():
    """expert_impl="loop": SelectBackward's zero-filled full-size gradient per used expert plus their sum:
    u (4 E + 8) + (u - 1) 12 E bytes per weight element of one expert (u used of E experts)."""
    from simulator.cost import CostModel

    run = run_of("gpu")
    sim, s = sim_of(run, impl="reference", expert_impl="loop")
    sel = spans(sim, "expert_grad_select")
    assert len(sel) == MODEL.moe_layers
    E = u = 4
    per = 2 * (u * (4 * E + 8) + (u - 1) * 12 * E) * MODEL.hidden * MODEL.ffn
    assert sel[0][1] - sel[0][0] == pytest.approx(CostModel(run.cluster.gpu).memory(per))
    _, grouped = sim_of(run, impl="reference")
    assert s["step_time_s"] > grouped["step_time_s"]
    with pytest.raises(ValueError, match="expert_impl"):
        sim_of(run, impl="reference", expert_impl="bmm")


def test_cache_warm_up_draws_from_the_runs_own_popularity():
    run = run_of("ssd", cache=1, mb=1, seq=64, steps=10, routing="zipf", routing_skew=2.0, seed=5)
    it = TrainingIteration(run, Sim(run.cluster, seed=5, profile=None))
    hot = int(np.argmax(it.pop))
    assert {k for k in it.cache.caches[0].cached} == {(i, hot) for i in it.a2a}


def test_grad_sync_adds_bucket_copies_and_the_moe_clip_passes():
    from semoe.sizing import count_params
    from simulator.cost import CostModel
    from simulator.workload.training import (
        REF_BUCKET_BYTES,
        REF_CLIP_BYTES,
        REF_CLIP_MOE_BYTES,
    )

    run = run_of("gpu")
    cm = CostModel(run.cluster.gpu)
    n = count_params(MODEL).total
    for sync, per in ((False, REF_CLIP_BYTES), (True, REF_BUCKET_BYTES + REF_CLIP_MOE_BYTES)):
        sim, _ = sim_of(run, impl="reference", grad_sync=sync)
        (a, b), = spans(sim, "grad_clip")
        assert b - a == pytest.approx(cm.memory(per * n))


def test_reference_pool_reuses_slots_and_ships_fp32_accumulated_grads():
    """impl="reference": reference.offload's pool of max(2, depth + 1) slots (layer i in slot i % S) re-fetches
    a layer only when its slot was reused since, and a step's new weights make every slot stale; with
    gradient accumulation the D2H copies the fp32 accumulator (4 B/param), else the 16-bit gradient."""
    P, L, E = expert_params(MODEL), MODEL.moe_layers, 4  # 3 MoE layers, 4 experts: all used at 4 x 256 tokens
    layer_bytes = E * PARAM_BYTES * P
    for mb, d2h in ((1, 2), (3, 4)):
        run = run_of("cpu", depth=1, model=MODEL)
        run = run.replace(workload=run.workload.replace(micro_batches=mb))
        _, ref = sim_of(run, impl="reference")
        _, ideal = sim_of(run)
        # 3 layers, 2 slots: forward fetches 0 (slot 0), 1 (slot 1), 2 (slot 0); backward: 2 and 1 hit, 0
        # (overwritten by 2) is fetched again -> 4; each later micro-batch: 0, 1 hit, 2 fetched, 2, 1 hit,
        # 0 fetched -> 2
        assert ref["bytes"]["h2d_prefetch"] == pytest.approx((4 + 2 * (mb - 1)) * layer_bytes)
        assert ideal["bytes"]["h2d_prefetch"] == pytest.approx(2 * L * mb * layer_bytes)  # ideal: every time
        assert ref["bytes"]["d2h_grads"] == pytest.approx(d2h * L * E * P)
