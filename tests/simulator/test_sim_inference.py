"""Inference workload: exact ring timelines (K=1, K=2 copy- and compute-bound), expert-aware copies,
memory plan within budget, log-normal routing skew, the CLI and the validation table."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sim_helpers import make_cluster

from semoe import ModelSpec, SpecError, Workload, cluster_preset
from semoe.presets import model_preset
from semoe.sizing import expert_params
from simulator.engine import Sim
from simulator.workload import routing
from simulator.workload.inference import (
    ExpertCache,
    FixedCosts,
    InferConfig,
    InferenceRun,
    expected_distinct_experts,
    plan_memory,
    simulate_inference,
)

PCIE = 20e9  # make_cluster: PCIe 20 GB/s, latency 0


def tiny(layers: int = 3, experts: int = 4, top_k: int = 1) -> ModelSpec:
    return ModelSpec(name="tiny-moe", layers=layers, hidden=64, heads=4, vocab=128, max_seq=256, ffn=128,
                     experts=experts, top_k=top_k, activation="swiglu", norm="rmsnorm", position="rope", dtype="bf16")


def block_copy_s(m: ModelSpec) -> float:
    return m.experts * expert_params(m) * m.dtype_bytes / PCIE


def one_pass(m: ModelSpec, K: int, t: float):
    """One prefill forward from a cold ring with no host overhead; (experts spans, copy spans)."""
    sim = Sim(make_cluster(gpn=1), profile=None)
    cfg = InferConfig(mode="ring", batch=1, prompt_len=16, gen_len=2, slots=K, launch_s=0.0)
    run = InferenceRun(m, cfg, sim, costs=FixedCosts(experts_s=t))
    sim.env.process(run.forward(1, 16, 0))
    sim.env.run()
    rows = sim.rows
    ex = [(r[4], r[5]) for r in rows if r[3] == "experts_fwd"]
    cp = sorted((r[4], r[5]) for r in rows if r[3] == "h2d_experts")
    return ex, cp


def spans(*pairs):
    return [pytest.approx(p, rel=1e-12, abs=1e-15) for p in pairs]


def test_ring_k1_serialises_copy_and_compute():
    m = tiny()
    c = block_copy_s(m)
    t = 0.5 * c
    ex, cp = one_pass(m, 1, t)
    # copy b0 [0,c]; experts b0 [c,c+t]; release -> copy b1 [c+t, 2c+t]; ... (no overlap with K=1)
    assert ex == spans((c, c + t), (2 * c + t, 2 * c + 2 * t), (3 * c + 2 * t, 3 * c + 3 * t))
    assert cp == spans((0, c), (c + t, 2 * c + t), (2 * c + 2 * t, 3 * c + 2 * t), (3 * c + 3 * t, 4 * c + 3 * t))


def test_ring_k2_copy_bound_hides_compute():
    m = tiny()
    c = block_copy_s(m)
    t = 0.25 * c
    ex, cp = one_pass(m, 2, t)
    # copies back to back; block i computes as soon as its copy lands: per block max(c, t) = c
    assert ex == spans((c, c + t), (2 * c, 2 * c + t), (3 * c, 3 * c + t))
    assert cp == spans((0, c), (c, 2 * c), (2 * c, 3 * c), (3 * c, 4 * c), (4 * c, 5 * c))


def test_ring_k2_compute_bound_hides_copies():
    m = tiny()
    c = block_copy_s(m)
    t = 3.0 * c
    ex, cp = one_pass(m, 2, t)
    # copy b2 into slot 0 waits for b0's release (c+t); compute back to back after the first load
    assert ex == spans((c, c + t), (c + t, c + 2 * t), (c + 2 * t, c + 3 * t))
    assert cp == spans((0, c), (c, 2 * c), (c + t, 2 * c + t), (c + 2 * t, 2 * c + 2 * t), (c + 3 * t, 2 * c + 3 * t))


def test_ring_steady_state_prefill_and_decode_time():
    """Timed passes start with blocks 0..K-1 loaded (the previous pass issued them) and end when the
    next pass's first K loads have landed (synchronize): L copies + one compute when copy-bound."""
    m = tiny(layers=4)
    c = block_copy_s(m)
    t = 0.2 * c
    sim = Sim(make_cluster(gpn=1), profile=None)
    cfg = InferConfig(mode="ring", batch=1, prompt_len=16, gen_len=3, slots=2, launch_s=0.0)
    res = InferenceRun(m, cfg, sim, costs=FixedCosts(experts_s=t)).run()
    assert res.prefill_s == pytest.approx(4 * c + t)
    assert res.decode_s == pytest.approx(2 * 4 * c + t)  # the ring pipelines across decode steps
    assert res.bytes_copied_decode == pytest.approx(2 * 4 * c * PCIE)


def test_resident_copies_nothing_and_host_overhead_counts():
    m = tiny()
    sim = Sim(make_cluster(gpn=1), profile=None)
    cfg = InferConfig(mode="resident", batch=1, prompt_len=16, gen_len=2, launch_s=1e-3)
    res = InferenceRun(m, cfg, sim, costs=FixedCosts(experts_s=0.0)).run()
    assert res.bytes_copied_decode == 0
    from simulator.workload.inference_host import host_program

    ops = host_program(None, "resident", "prefill").kernels(3)
    assert ops > 3 * 50  # ~70 kernels per block (results/profiles/op_counts.csv)
    assert res.prefill_s == pytest.approx(ops * 1e-3)  # zero GPU work: host-bound, one launch per kernel


def test_expert_cache_lru_matches_reference_registry():
    c = ExpertCache(capacity=4, experts=2)
    c.load_block(0, 0)  # ring slot 0 = slots 0, 1
    assert c.group_holds(0, 0) and not c.group_holds(1, 0)
    assert c.fetch(1, [0, 1]) == ([(1, 0), (1, 1)], False)  # free slots 2, 3 first
    assert c.fetch(0, [1]) == ([], False) and c.hits == 1  # hit refreshes (0, 1)
    assert c.fetch(2, [0]) == ([(2, 0)], False)  # evicts the least recently used: (0, 0)
    assert (0, 0) not in c.where and (0, 1) in c.where
    assert c.fetch(2, [0, 1]) == ([(2, 1)], False)  # (2, 0) is kept: needed by this block
    # ExpertPool.prefetch copies at most capacity - E experts (a pool of one block's experts: none)
    assert c.prefetch(3, [0, 1]) == [(3, 0), (3, 1)]
    assert ExpertCache(capacity=2, experts=2).prefetch(0, [0, 1]) == []


def test_expert_aware_decode_copies_fewer_bytes_than_ring():
    m = model_preset("mixtral-8x7b").replace(layers=4, name="mixtral-L4")
    cl = cluster_preset("h100-single")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, ring = simulate_inference(m, cl, InferConfig(mode="ring", batch=1, prompt_len=64, gen_len=4, gpu_budget_bytes=8e9), trace=False)
        _, exp = simulate_inference(m, cl, InferConfig(mode="expert", batch=1, prompt_len=64, gen_len=4, gpu_budget_bytes=8e9), trace=False)
    assert exp.passes["ring"] >= 2 and exp.passes["expert"] == 3  # prefills fall back to the ring
    eb = expert_params(m) * m.dtype_bytes
    assert exp.bytes_copied_decode <= 3 * 4 * 2 * eb  # at most top-2 experts per block and step
    assert exp.bytes_copied_decode < 0.5 * ring.bytes_copied_decode
    assert exp.decode_tokens_per_s > ring.decode_tokens_per_s
    assert expected_distinct_experts(8, 2, 1) == pytest.approx(2.0)


def test_memory_plan_within_budget_and_reference_slots():
    m = model_preset("mixtral-8x7b").replace(layers=8)
    for mode, B, slots in (("ring", 8, 2), ("expert", 1, 24), ("expert", 8, 22)):
        p = plan_memory(m, mode, 10e9, B, 256 + 8, B * 256)
        assert p.peak_hbm_bytes <= 10e9
        assert (p.ring_slots if mode == "ring" else p.pool_slots) == slots  # as the H100 bench planned
    with pytest.raises(SpecError, match="gpu_budget_bytes"):
        plan_memory(m, "ring", 3e9, 1, 264, 256)
    with pytest.raises(SpecError, match="InferConfig.mode"):
        InferConfig(mode="offload")


def test_lognormal_skew_is_seeded_and_shaped():
    m = tiny(experts=64, top_k=2)
    pops = {}
    for sigma in (0.0, 0.5, 2.0):
        w = Workload(routing="lognormal", routing_skew=sigma, seed=3)
        p1 = routing.expert_popularity(m, w, np.random.default_rng(3))
        p2 = routing.expert_popularity(m, w, np.random.default_rng(3))
        assert np.array_equal(p1, p2) and p1.shape == (64,) and p1.sum() == pytest.approx(1.0)
        pops[sigma] = p1
    assert np.allclose(pops[0.0], 1 / 64)
    assert pops[2.0].max() / pops[2.0].min() > pops[0.5].max() / pops[0.5].min() > 1.0
    # log-popularity has standard deviation ~ sigma
    assert np.std(np.log(pops[2.0])) == pytest.approx(2.0, rel=0.3)
    w = Workload(routing="lognormal", routing_skew=1.0, micro_batch=2, seq_len=32)
    counts = routing.token_counts(m, w, 4, np.random.default_rng(0))
    assert counts.shape == (4, 64) and (counts.sum(axis=1) == 2 * 32 * 2).all()


def test_cli_infer_writes_outputs(tmp_path):
    import typer
    from typer.testing import CliRunner

    from simulator.cli import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["simulate", "--kind", "infer", "--model", "tiny", "--cluster", "h100-single",
                                 "--infer-mode", "expert", "--batch", "2", "--prompt-len", "32", "--gen-len", "3",
                                 "--gpu-budget-gb", "1", "--routing", "lognormal", "--skew", "1.0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    s = pd.read_csv(out / "summary.csv")
    for col in ("step_time_s", "tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_hbm_bytes"):
        assert col in s.columns and s[col].iloc[0] > 0
    assert s["routing"].iloc[0] == "lognormal"
    for f in ("trace.json", "breakdown.csv", "breakdown.png", "memory.png"):
        assert (out / f).is_file()
    r = CliRunner().invoke(app, ["simulate", "--kind", "infer", "--model", "tiny", "--cluster", "h100-single",
                                 "--infer-mode", "bogus", "--out", str(out)])
    assert isinstance(r.exception, SpecError) and "InferConfig.mode" in str(r.exception)
    q = tmp_path / "q"
    r = CliRunner().invoke(app, ["simulate", "--kind", "infer", "--model", "tiny", "--cluster", "h100-single",
                                 "--infer-mode", "ring", "--batch", "2", "--prompt-len", "32", "--gen-len", "3",
                                 "--gpu-budget-gb", "1", "--quant", "int8", "--out", str(q)])
    assert r.exit_code == 0, r.output
    sq = pd.read_csv(q / "summary.csv")
    assert sq["quant"].iloc[0] == "int8"
    r = CliRunner().invoke(app, ["simulate", "--kind", "infer", "--model", "tiny", "--cluster", "h100-single",
                                 "--quant", "int4", "--out", str(q)])
    assert isinstance(r.exception, SpecError) and "quant" in str(r.exception)


def test_validation_ring_rows_within_10_percent():
    from simulator.validate_infer import MEASURED, POOLED_METRICS, predict_all

    # the pooled count rows (up to 1024 simulated generates each) are left out: no ring row depends on them
    measured = pd.read_csv(MEASURED)
    measured = measured[~measured["metric"].isin(POOLED_METRICS)]
    df = predict_all(measured)
    assert len(df) == len(measured)
    ring = df[df["mode"].str.startswith("ring") & df["metric"].isin(["prefill_tokens_per_s", "decode_tokens_per_s"])]
    bug = ring[ring["status"] == "measurement_bug"]  # the 344a526 run's int8-fused B=1 decode (autotune timed)
    assert len(bug) == 1 and bug["within_10pct"].eq(False).all()
    ok = ring[ring["status"] == "validated"]
    # copy-bound: a ring pass cannot beat its copies, so a miss is only ever a pass slower than simulated (a slow
    # stretch of the machine's copies; runs with copy probes simulate at the probes' bandwidth), and misses are rare;
    # or a pass faster than simulated where the row's copy probes read low (4a49973: probes that dipped to 31-45 GB/s
    # beside passes at full speed), never below the copies at the preset's 53.5 GB/s
    probe_GBps = ok["note"].str.extract(r"PCIe: ([\d.]+) GB/s", expand=False).astype(float)
    low_probe = probe_GBps < 0.9 * 53.5
    assert len(ok) >= 24 and (ok["within_10pct"].astype(bool) | (ok["error"] > 0) | low_probe).all()
    assert 0 < low_probe.sum() <= 8
    assert ok["within_10pct"].astype(bool).mean() >= 0.85
    # quantised rings (issue 11 acceptance) and the compiled ring are among them
    assert {"ring_int8", "ring_fp8", "ring_int8_fused", "ring_fp8_fused", "ring_compiled"} <= set(ok["mode"])


def test_expert_aware_decode_serialises_copies_and_compute():
    """Decode in expert mode, no host overhead: per block the misses are copied after the router, then
    the experts run (the remap's host sync waits for the copy): decode = misses * expert copy + steps * L * t."""
    m = tiny(layers=3, experts=8, top_k=2)
    eb = expert_params(m) * m.dtype_bytes
    t = 1e-6
    sim = Sim(make_cluster(gpn=1), profile=None)
    cfg = InferConfig(mode="expert", batch=1, prompt_len=16, gen_len=4, slots=1, launch_s=0.0)  # C = 8 slots
    run = InferenceRun(m, cfg, sim, costs=FixedCosts(experts_s=t))
    res = run.run()
    assert res.passes["expert"] == 3 and res.misses > 0
    assert res.decode_s == pytest.approx(res.misses * eb / PCIE + 3 * 3 * t)
    assert res.bytes_copied_decode == pytest.approx(res.misses * eb)


def test_prefetched_experts_are_waited_for_before_they_compute():
    """One block ahead (predict): the block's experts wait for the prefetch copies of them (the reference's
    ExpertPool.fetch waits for ``inflight_event``), and the next prefetch starts after this block's compute
    (its copy waits for the compute queued so far). With no host overhead and the experts taking one
    expert's copy time, everything is serial: decode = copied experts x copy + steps x L x t."""
    m = tiny(layers=3, experts=8, top_k=2)
    eb = expert_params(m) * m.dtype_bytes
    t = eb / PCIE
    sim = Sim(make_cluster(gpn=1), profile=None)
    # two ring slots (16 expert slots): the engine prefetches at most capacity - E experts, none with one slot
    cfg = InferConfig(mode="expert", batch=1, prompt_len=16, gen_len=4, slots=2, launch_s=0.0, predict=True)
    run = InferenceRun(m, cfg, sim, costs=FixedCosts(experts_s=t))
    res = run.run()
    assert res.passes["expert"] == 3 and res.prefetched > 0
    copied = res.fetch_bytes_decode / eb
    assert res.decode_s == pytest.approx(copied * eb / PCIE + 3 * 3 * t)
    # every prefetch copy ends before the next experts_fwd of its block starts
    rows = sorted(sim.rows, key=lambda r: r[4])
    pre = [r for r in rows if r[3] == "h2d_prefetch"]
    assert pre
    for p in pre:
        nxt = next(r for r in rows if r[3] == "experts_fwd" and r[1] == p[1] and r[4] >= p[4])
        assert nxt[4] >= p[5] - 1e-15


def test_expert_mode_falls_back_to_ring_when_most_experts_are_needed():
    m = tiny(layers=2, experts=8, top_k=2)
    sim = Sim(make_cluster(gpn=1), profile=None)
    # decode batch 16: E (1 - (1 - 2/8)^16) = 7.92 >= 0.95 * 8 -> every pass is a ring pass
    cfg = InferConfig(mode="expert", batch=16, prompt_len=8, gen_len=3, launch_s=0.0)
    res = InferenceRun(m, cfg, sim, costs=FixedCosts(experts_s=1e-6)).run()
    assert res.passes == {"ring": 5, "expert": 0}
    assert expected_distinct_experts(8, 2, 16) >= 0.95 * 8 > expected_distinct_experts(8, 2, 8)


def test_cost_reads_the_kernels_profile_schema(tmp_path):
    from simulator.cost import CostModel, Profile, find_profile

    gpu = cluster_preset("h100-single").gpu
    assert find_profile(gpu) is not None and find_profile(gpu).name == "h100_80gb_hbm3.csv"
    assert find_profile(cluster_preset("dgx-a100-80g").gpu) is None
    hdr = "gpu,op,impl,dtype,batch,m,n,k,groups,io_bytes,flop,time_s,TFLOPps,GBps"
    rows = ["NVIDIA H100 80GB HBM3,gemm,torch,bf16,1,128,1024,1024,1,0,0,1e-5,0,0",
            "NVIDIA H100 80GB HBM3,gemm,triton,bf16,1,128,1024,1024,1,0,0,2e-5,0,0",
            "NVIDIA H100 80GB HBM3,gemm,torch,bf16,1,512,1024,1024,1,0,0,2e-5,0,0",
            "NVIDIA H100 80GB HBM3,rmsnorm,torch,bf16,1,4096,2048,0,1,1000000,0,1e-6,0,0",
            "NVIDIA H100 80GB HBM3,rmsnorm,torch,bf16,1,16384,2048,0,1,4000000,0,2e-6,0,0"]
    p = tmp_path / "h100_80gb_hbm3.csv"
    p.write_text(hdr + "\n" + "\n".join(rows) + "\n")
    assert find_profile(gpu, tmp_path) == p
    torch_first = CostModel(gpu, Profile.from_csv(p, impl=("torch",)))
    triton_first = CostModel(gpu, Profile.from_csv(p, impl=("triton", "torch")))
    assert torch_first.matmul(128, 1024, 1024) == pytest.approx(1e-5)  # gemm -> matmul, impl preference
    assert triton_first.matmul(128, 1024, 1024) == pytest.approx(2e-5)
    # power-law interpolation: rate 2^a between m=128 (rate r) and 512 (2r): m=256 -> sqrt(2) r
    ll = CostModel(gpu, Profile.from_csv(p, impl=("torch",), loglog=True))
    r128 = 2 * 128 * 1024 * 1024 / 1e-5
    assert 2 * 256 * 1024 * 1024 / ll.matmul(256, 1024, 1024) == pytest.approx(r128 * 2 ** 0.5)
    assert torch_first.elementwise("rmsnorm", 2e6) == pytest.approx(2e6 / 1.5e12)  # GB/s linear in log bytes
    with pytest.warns(UserWarning, match="efficiency of n=1024 k=1024"):
        torch_first.matmul(256, 1536, 1024)  # borrows the nearest measured shape
    with pytest.warns(UserWarning, match="roofline"):
        torch_first.matmul(4096, 1024, 1024)  # outside the measured m range


def test_mispredict_keeps_accuracy_share_and_never_names_a_true_expert_twice():
    from simulator.workload.inference import mispredict, sample_topk

    rng = np.random.default_rng(0)
    p = np.full(8, 1 / 8)
    ids = sample_topk(p, 4000, 2, rng)
    assert (mispredict(ids, p, 1.0, rng) == ids).all()
    g = mispredict(ids, p, 0.75, rng)
    assert np.mean(g == ids) == pytest.approx(0.75, abs=0.02)
    # a wrong guess is an expert the token is not routed to
    wrong = g != ids
    assert not any(g[t, j] in ids[t] for t, j in zip(*np.nonzero(wrong)))
    with pytest.raises(SpecError, match="predict_accuracy"):
        InferConfig(mode="expert", predict=True, predict_accuracy=1.5)


def test_imperfect_predictor_wastes_prefetches_and_copies_more():
    """A wrong one-block-ahead guess prefetches an expert the block does not use (ExpertPool.prefetch_used
    counts the used ones) and the true expert is fetched on demand: more bytes, fewer hits."""
    m = tiny(layers=4, experts=8, top_k=2)
    out = {}
    for acc in (1.0, 0.5):
        sim = Sim(make_cluster(gpn=1), profile=None)
        cfg = InferConfig(mode="expert", batch=1, prompt_len=16, gen_len=8, slots=2, launch_s=0.0, predict=True,
                          predict_accuracy=acc)
        out[acc] = InferenceRun(m, cfg, sim, costs=FixedCosts(experts_s=1e-6)).run()
    perfect, half = out[1.0], out[0.5]
    assert perfect.prefetch_used == perfect.prefetched > 0
    assert half.prefetch_used < half.prefetched
    assert half.fetch_bytes_decode > perfect.fetch_bytes_decode
    assert half.hit_rate < perfect.hit_rate
