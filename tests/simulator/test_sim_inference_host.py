"""Inference workload: host-bound steps (counted kernels x host seconds per kernel, host syncs wait for
the device), quantised expert bytes and dequantisation, fewer experts."""

from __future__ import annotations

import pytest
from sim_helpers import make_cluster

from semoe import ModelSpec, SpecError, cluster_preset
from semoe.presets import model_preset
from semoe.sizing import expert_params
from simulator.engine import Sim
from simulator.workload.inference import (
    FixedCosts,
    InferConfig,
    InferenceRun,
    plan_memory,
    simulate_inference,
)
from simulator.workload.inference_host import HostProbe, host_program
from simulator.workload.inference_quant import (
    dequant_bytes,
    expert_bytes,
    student_spec,
    workspace_bytes,
)


def tiny(layers: int = 3, experts: int = 4, top_k: int = 1) -> ModelSpec:
    return ModelSpec(name="tiny-moe", layers=layers, hidden=64, heads=4, vocab=128, max_seq=256, ffn=128,
                     experts=experts, top_k=top_k, activation="swiglu", norm="rmsnorm", position="rope", dtype="bf16")


def run(m, cfg, costs, cluster=None):
    sim = Sim(cluster or make_cluster(gpn=1), profile=None)
    return InferenceRun(m, cfg, sim, costs=costs).run()


def test_decode_is_max_of_host_and_device_time():
    m = tiny()
    h = 1e-4
    prog = host_program(None, "resident", "decode")
    host_step = prog.kernels(m.moe_layers) * h
    # device work negligible: a step takes the host time of its counted kernels
    fast = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=5, launch_s=h), FixedCosts(experts_s=0.0))
    assert fast.decode_s == pytest.approx(4 * host_step, rel=1e-9)
    # device work dominant (the experts segment ends the block and a later sync waits for it): device time
    slow_dev = 50 * host_step
    slow = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=5, launch_s=h), FixedCosts(experts_s=slow_dev))
    assert slow.decode_s >= 4 * m.moe_layers * slow_dev
    assert slow.decode_s < 4 * (m.moe_layers * slow_dev + host_step)


def test_syncs_serialise_host_and_device():
    """A block's device work before a sync cannot overlap the host's issue of the next segments."""
    m = tiny(layers=2)
    h, att = 1e-4, 5e-3
    prog = host_program(None, "resident", "decode")
    res = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=2, launch_s=h),
              FixedCosts(experts_s=0.0, attention_s=att))
    # attention (no sync) is followed by the gate's bincount sync: the host waits for the attention work,
    # then issues the rest of the block; so each block costs at least att + the kernels after the sync
    after = sum(s.kernels for s in prog.block[2:])  # segments after attention and moe_0
    assert res.decode_s >= m.moe_layers * (att + after * h)
    assert res.decode_s < m.moe_layers * (att + prog.block_kernels * h) + (prog.embedding + prog.head) * h + 1e-9


def test_host_op_s_comes_from_the_cost_model():
    m = tiny()
    sim = Sim(make_cluster(gpn=1), profile=None)
    r = InferenceRun(m, InferConfig(mode="resident", prompt_len=16, gen_len=2), sim, costs=FixedCosts(0.0))
    assert r.host_op_s == sim.cost.host_op_s


def test_quantised_expert_bytes_match_reference_format():
    m = model_preset("mixtral-8x7b")
    bf16 = expert_bytes(m)
    assert bf16 == expert_params(m) * 2
    for q in ("int8", "fp8"):
        qb = expert_bytes(m, q)
        # 1 byte per weight + an fp32 scale per output column (F, F, D): reference/inference/quantize.py
        assert qb == 3 * m.hidden * m.ffn + 4 * (2 * m.ffn + m.hidden)
        assert bf16 / qb == pytest.approx(2 * 4096 / (4096 + 4), rel=1e-3)
    with pytest.raises(SpecError, match="quant"):
        expert_bytes(m, "int4")
    with pytest.raises(SpecError, match="quant"):
        InferConfig(quant="int4")


def test_quantised_ring_copies_fewer_bytes_and_gets_more_slots():
    m = model_preset("mixtral-8x7b").replace(layers=8)
    c = cluster_preset("h100-single")
    out = {}
    for q in (None, "int8", "fp8"):
        cfg = InferConfig(mode="ring", batch=2, prompt_len=64, gen_len=3, gpu_budget_bytes=10e9, quant=q)
        out[q] = simulate_inference(m, c, cfg, trace=False)[1]
    bf, i8 = out[None], out["int8"]
    assert i8.bytes_copied_decode < 0.55 * bf.bytes_copied_decode
    assert i8.plan.workspace_bytes == workspace_bytes(m, "int8") > 0
    assert i8.plan.ring_slots >= bf.plan.ring_slots
    # PCIe-bound ring: about 2x the tokens/s (the dequant pass costs a little)
    assert 1.6 < i8.prefill_tokens_per_s / bf.prefill_tokens_per_s < 2.05
    assert out["fp8"].prefill_tokens_per_s == pytest.approx(i8.prefill_tokens_per_s, rel=1e-4)  # same bytes


def test_dequant_path_is_a_parameter():
    m = tiny()
    per = 1e-3
    wsp = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=2, launch_s=0.0, quant="int8"),
              FixedCosts(experts_s=0.0, dequant_s=per))
    fused = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=2, launch_s=0.0, quant="int8", dequant="fused"),
                FixedCosts(experts_s=0.0, dequant_s=per))
    assert wsp.prefill_s == pytest.approx(m.moe_layers * m.experts * per)  # every block dequantised
    assert fused.prefill_s == pytest.approx(0.0, abs=1e-12)  # resident / ring groups: GEMMs on the bytes
    # expert-aware passes dequantise their fetched experts with either kernel (as the reference)
    ex = [run(m, InferConfig(mode="expert", prompt_len=4, gen_len=3, launch_s=0.0, quant="int8", dequant=d,
                             fallback_frac=1.0), FixedCosts(experts_s=0.0, dequant_s=per)) for d in ("workspace", "fused")]
    assert ex[0].decode_s == pytest.approx(ex[1].decode_s) and ex[0].decode_s >= 2 * m.moe_layers * per
    # the plan reserves the workspace either way (reference plan_memory)
    pl = plan_memory(m, "ring", 1e9, 1, 32, 16, quant="int8", dequant="fused")
    assert pl.workspace_bytes == m.experts * expert_params(m) * 2
    assert dequant_bytes(m, 2) == pytest.approx(2 * (3 * 64 * 128 * 7 + 4 * (2 * 128 + 64)))  # copy_ + mul_


def test_fewer_experts_student_copies_less():
    m = model_preset("mixtral-8x7b").replace(layers=4)
    s = student_spec(m, 4)
    assert s.experts == 4 and s.top_k == 2 and s.hidden == m.hidden
    c = cluster_preset("h100-single")
    cfg = InferConfig(mode="ring", batch=1, prompt_len=32, gen_len=3, slots=1)
    t, st = (simulate_inference(x, c, cfg, trace=False)[1] for x in (m, s))
    assert st.bytes_copied_decode == pytest.approx(t.bytes_copied_decode / 2)
    assert st.decode_tokens_per_s > 1.8 * t.decode_tokens_per_s
    with pytest.raises(SpecError):
        student_spec(m, 16)


# ------------------------------------------------------------------ the run's engine host probe
def test_host_probe_rate_per_kernel_is_the_median_over_probed_batches():
    """At tiny widths the counted program does not depend on the batch: the per-kernel rate is one value,
    the median over the probed batches (one jittery point does not move it), for every batch."""
    p = HostProbe(2, (("resident", "decode", 1, 10e-3, 0.0), ("resident", "decode", 2, 30e-3, 0.0),
                      ("resident", "decode", 9, 18e-3, 0.0)))

    def per(b, c):  # kernels of a probe pass
        return 100
    for b in (1, 2, 5, 16):
        assert p.rate("resident", "decode", b, per) == pytest.approx(1.8e-4)  # median of 10, 30, 18 ms / 100
    assert p.rate("resident", "decode", 16, per, keep=lambda b: b == 1) == pytest.approx(1e-4)
    assert p.rate("resident", "decode", 16, per, keep=lambda b: b > 1) == pytest.approx(2.4e-4)  # two: their mean
    assert p.rate("resident", "decode", 16, per, keep=lambda b: b > 99) == pytest.approx(1.8e-4)  # none kept: all
    assert p.rate("ring", "decode", 1, per) is None and not p.has("resident", "prefill")
    # copy calls are kernels of the probed pass: more copies -> fewer seconds per kernel
    q = HostProbe(2, (("ring", "decode", 1, 10e-3, 4.0),))
    assert q.rate("ring", "decode", 1, lambda b, c: 100 + 3 * c) == pytest.approx(10e-3 / 112)


def test_host_probe_rejects_bad_points():
    with pytest.raises(SpecError, match="HostProbe.blocks"):
        HostProbe(0, ())
    with pytest.raises(SpecError, match="HostProbe.points"):
        HostProbe(2, (("resident", "decode", 1, 0.0, 0.0),))
    with pytest.raises(SpecError, match="HostProbe.points"):
        HostProbe(2, (("ringx", "decode", 1, 1e-3, 0.0),))
    with pytest.raises(SpecError, match="InferConfig.host_probe"):
        InferConfig(host_probe={"resident": 1})


def test_host_probe_rows_round_trip():
    rows = [("-", 0, "host_probe_moe_blocks", "3"), ("resident", 1, "host_decode_ms_per_step", "25"),
            ("resident", 1, "host_decode_copies_per_step", "0"), ("ring", 4, "host_prefill_ms", "30"),
            ("ring", 4, "host_prefill_copies", "3"), ("-", 0, "host_op_us", "35")]
    p = HostProbe.from_rows(rows)
    assert p.blocks == 3
    assert set(p.points) == {("resident", "decode", 1, 0.025, 0.0), ("ring", "prefill", 4, 0.030, 3.0)}
    assert HostProbe.from_rows(rows[1:]) is None  # no block count: not a probe


def test_host_bound_decode_takes_the_probed_host_time():
    """Device work ~0: a decode step is the probe's measured host time of the same code path, scaled by the
    counted kernels when the probe model has another block count; unprobed phases keep launch_s."""
    m = tiny()
    h, step = 1e-4, 7e-3
    prog = host_program(None, "resident", "decode")
    same = HostProbe(m.moe_layers, (("resident", "decode", 1, step, 0.0),))
    r = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=5, launch_s=h, host_probe=same), FixedCosts(0.0))
    assert r.decode_s == pytest.approx(4 * step, rel=1e-9)
    assert r.host_op_s[("decode", 1)] == pytest.approx(step / prog.kernels(m.moe_layers))
    plain = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=5, launch_s=h), FixedCosts(0.0))
    assert r.prefill_s == pytest.approx(plain.prefill_s)  # prefill not probed: launch_s per kernel
    two = HostProbe(2, (("resident", "decode", 1, step, 0.0),))
    r2 = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=5, launch_s=h, host_probe=two), FixedCosts(0.0))
    assert r2.decode_s == pytest.approx(4 * step * prog.kernels(m.moe_layers) / prog.kernels(2), rel=1e-9)
    # quantised experts: the (bf16) probe does not apply
    rq = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=5, launch_s=h, host_probe=same, quant="int8"),
             FixedCosts(0.0))
    q = run(m, InferConfig(mode="resident", prompt_len=16, gen_len=5, launch_s=h, quant="int8"), FixedCosts(0.0))
    assert rq.decode_s == pytest.approx(q.decode_s, rel=1e-9) and rq.host_op_s[("decode", 1)] == h


def test_probe_pass_kernels_count_copies_and_prediction():
    m = tiny(layers=4, experts=8, top_k=2)
    probe = HostProbe(4, (("expert", "decode", 1, 5e-3, 3.0),))
    cfg = InferConfig(mode="expert", prompt_len=64, gen_len=3, predict=True, host_probe=probe, slots=2)
    r = InferenceRun(m, cfg, Sim(make_cluster(gpn=1), profile=None), costs=FixedCosts(0.0))
    pe, pr = host_program(None, "expert", "decode"), host_program(None, "ring", "prefill")
    assert r.probe_pass_kernels("decode", 1, 3.0) == pe.kernels(4) + 3 * pe.unit("copy_expert") + 3 * pe.unit("predict")
    # prefill of 64 tokens falls back to the ring: ring program, copies are ring blocks
    assert r.probe_pass_kernels("prefill", 1, 2.0) == pr.kernels(4) + 2 * pr.unit("copy_block")
    assert r.probe_key == "expert"
    r2 = InferenceRun(m, InferConfig(mode="expert", prompt_len=64, gen_len=3, host_probe=probe, slots=2),
                      Sim(make_cluster(gpn=1), profile=None), costs=FixedCosts(0.0))
    assert r2.probe_key == "expert_nopred" and r2._host_rate("decode", 1) == r2.base_host_op_s  # not probed


def test_expert_fallback_counts_no_pool_copies():
    """A decode batch whose tokens touch most experts runs the ring: its copies are ring copies, none of the
    expert-aware fetches the engine's pool statistics count."""
    m = tiny(layers=4, experts=8, top_k=2)
    res = run(m, InferConfig(mode="expert", batch=16, prompt_len=8, gen_len=3, slots=2, predict=True), FixedCosts(1e-4))
    assert res.passes["expert"] == 0 and res.bytes_copied_decode > 0
    assert res.fetch_bytes_decode == 0 and res.prefetched == 0
    small = run(m, InferConfig(mode="expert", batch=1, prompt_len=8, gen_len=3, slots=2, predict=True), FixedCosts(1e-4))
    assert small.passes["expert"] > 0 and small.fetch_bytes_decode == small.bytes_copied_decode > 0
