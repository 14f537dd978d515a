"""The reference trainer's peak-HBM model (`simulator.train_memory`) and its counted saved-tensor table
(`simulator.train_mem_count`): the table is what the reference code saves, its per-unit bytes do not depend on
the widths or the token count, the model's peak agrees with a live tracker of a real training step on the CPU,
and `TrainingIteration(impl="reference")` allocates exactly the model's high points."""

from __future__ import annotations

import pytest

from semoe import ParallelPlan
from semoe.plan_spec import OffloadPlacement
from semoe.presets import model_preset
from simulator import train_mem_count as C
from simulator import train_memory as M


def _bench_model(**over):
    base = {"layers": 2, "experts": 8, "top_k": 2, "heads": 4, "dtype": "bf16", "vocab": 32, "max_seq": 128}
    base.update(over)
    return model_preset("tiny").replace(**base)


def _table_rows(key: str) -> dict[tuple, float]:
    return {(r["region"], r["rows"], r["unit"], r["dtype"]): float(r["bytes_per_unit"]) for r in M.saved_table()[key]}


def test_committed_table_matches_the_reference_code():
    assert C.main(["--check"]) == 0


def test_per_unit_bytes_do_not_depend_on_widths_or_tokens():
    """Recounted at other (distinct) widths and another token count, every per-token / per-row / per-parameter
    coefficient equals the committed one: the table extrapolates to the GPU configurations' widths."""
    m = model_preset("tiny").replace(layers=2, experts=8, top_k=2, heads=4, dtype="bf16", hidden=96, ffn=112,
                                     vocab=136, max_seq=160)
    rows = C.count_saved(m, batch=2, seq=33)
    got = {(r["region"], r["rows"], r["unit"], r["dtype"]): float(r["bytes_per_unit"]) for r in rows}
    want = _table_rows(C.config_key(m))
    per_row = {k: v for k, v in want.items() if k[1] != "1"}
    assert per_row and {k: got.get(k) for k in per_row} == per_row
    # the mechanisms the model is built on: fp32 layer-norm inputs (4 B per token per hidden unit), bf16 expert
    # activations before and after GELU (2 x 2 B per routed row per ffn unit), fp32 log-softmax over the vocab
    assert want[("norm1", "T", "D", "fp32")] == 4
    assert want[("experts", "N", "F", "bf16")] == 4
    assert want[("head", "T", "V", "fp32")] == 4
    # attention saves O(S) per token: q, k, v, output in bf16 (8 B per hidden unit) + the input cast (2) and an
    # fp32 log-sum-exp per head, never an S x S matrix
    assert want[("attn", "T", "D", "bf16")] == 10 and want[("attn", "T", "H", "fp32")] == 4


def test_unknown_code_path_and_bad_input_are_one_clear_error():
    m = _bench_model(activation="swiglu")
    with pytest.raises(ValueError, match="no saved-tensor counts for the code path 'k2 topk capnone swiglu"):
        M.saved_coeffs(m)
    with pytest.raises(ValueError, match="trainer must be one of"):
        M.step_peak(_bench_model(), ParallelPlan(), tokens=64, routed_rows=[128, 128], trainer="deepspeed")
    with pytest.raises(ValueError, match="ZeRO stage 2 is not what the reference trainer runs"):
        M.step_peak(_bench_model(), ParallelPlan(zero_stage=2), tokens=64, routed_rows=[128, 128])
    with pytest.raises(ValueError, match="routed_rows has 1 entries"):
        M.step_peak(_bench_model(), ParallelPlan(), tokens=64, routed_rows=[128])


@pytest.mark.parametrize("trainer,micro,vocab", [("bench", 2, 32), ("train", 1, 512)])
def test_peak_matches_a_live_tracker_of_the_reference_step(trainer, micro, vocab):
    """Ground truth: the live bytes of every tensor storage during a real step (bf16 autocast, fused AdamW) on
    the CPU. The bench loop peaks in the backward of the last expert GEMM (small vocabulary), reference.train
    with a larger vocabulary in the loss."""
    m = _bench_model(hidden=64, ffn=256, vocab=vocab)
    B, S = 2, 64
    tr = C.track_step(m, B, S, micro_batches=micro, trainer=trainer)
    pk = M.step_peak(m, ParallelPlan(), tokens=B * S, routed_rows=[2 * B * S] * 2, micro_batches=micro,
                     trainer=trainer)
    assert pk.peak == pytest.approx(tr["peak"], rel=0.02)
    assert pk.point == ("backward_experts" if trainer == "bench" else "forward_loss")
    assert tr["phase"].startswith("bwd" if trainer == "bench" else "fwd")


@pytest.mark.parametrize("micro", [1, 3])
def test_offloaded_experts_peak_matches_the_live_tracker(micro):
    """Experts in reference.offload's engine (cpu placement, the bench loop): the pool slots, the bf16 / fp32
    gradient accumulators that grow block by block in the backward, no fp32 expert state on the device."""
    m = _bench_model(hidden=64, ffn=256, layers=3)
    plan = ParallelPlan(offload=OffloadPlacement(expert_params="cpu", expert_optimizer="cpu"), prefetch_depth=1)
    tr = C.track_step(m, 2, 64, micro_batches=micro, trainer="bench", placement="cpu")
    pk = M.step_peak(m, plan, tokens=128, routed_rows=[256] * 3, micro_batches=micro, trainer="bench")
    assert pk.peak == pytest.approx(tr["peak"], rel=0.02)
    assert pk.point == "backward_experts" and tr["phase"] == f"bwd{micro - 1}"


def test_states_as_the_reference_allocates_them():
    m = _bench_model(hidden=64, ffn=256)
    T = 128
    from semoe.sizing import count_params, expert_params

    pc = count_params(m)
    base = M.step_peak(m, ParallelPlan(), tokens=T, routed_rows=[2 * T] * 2, trainer="bench")
    assert base.parts["params"] == 4 * pc.total and base.parts["adam"] == 8 * pc.total
    # reference.train keeps last step's gradients through the forward (zero_grad after it); the bench loop
    # frees them first
    train = M.step_peak(m, ParallelPlan(), tokens=T, routed_rows=[2 * T] * 2, trainer="train")
    assert train.points["forward_loss"] - base.points["forward_loss"] == pytest.approx(4 * pc.total)
    # offloaded experts: no fp32 expert state, a pool of two 16-bit layer slots, fp32 accumulators of every
    # layer with micro-batches
    off = ParallelPlan(offload=OffloadPlacement(expert_params="cpu", expert_optimizer="cpu"), prefetch_depth=1)
    o = M.step_peak(m, off, tokens=T, routed_rows=[2 * T] * 2, micro_batches=4, trainer="bench")
    P = m.experts * expert_params(m)
    assert o.parts["params"] == 4 * pc.dense
    assert o.parts["expert_pool"] == 2 * 2 * P and o.parts["expert_grad_acc"] == 4 * P * 2
    # gradient buckets: a flat fp32 copy of every gradient at the end of the backward; foreach AdamW's temporaries
    pg = M.step_peak(m, ParallelPlan(), tokens=T, routed_rows=[2 * T] * 2, process_group=True, optimizer="foreach")
    assert pg.points["end_backward"] - base.points["end_backward"] == pytest.approx(4 * pc.total)
    assert pg.points["optimizer"] - base.points["optimizer"] == pytest.approx(4 * pc.total)


@pytest.mark.parametrize("trainer,micro,vocab,point,placement", [
    ("train", 1, 512, "forward_loss", "gpu"), ("bench", 2, 32, "backward_experts", "gpu"),
    ("bench", 1, 32, "backward_experts", "cpu"), ("bench", 3, 32, "backward_experts", "cpu")])
def test_training_iteration_allocates_the_models_high_points(trainer, micro, vocab, point, placement):
    import warnings

    from semoe import Run, Workload, cluster_preset
    from simulator.engine import Sim
    from simulator.workload.training import TrainingIteration

    warnings.simplefilter("ignore")  # the tiny shapes are outside the kernel profile (roofline fallbacks)
    m = _bench_model(hidden=64, ffn=256, vocab=vocab, layers=2)
    plan = ParallelPlan() if placement == "gpu" else ParallelPlan(
        offload=OffloadPlacement(expert_params=placement, expert_optimizer=placement), prefetch_depth=1)
    run = Run(model=m, cluster=cluster_preset("h100-single"), plan=plan,
              workload=Workload(micro_batch=2, seq_len=64, steps=1, micro_batches=micro))
    s = TrainingIteration(run, Sim(run.cluster, seed=0, trace=False), impl="reference", trainer=trainer).run()
    assert s["hbm_model"] == "reference"
    assert max(s["hbm_points"], key=s["hbm_points"].get) == point
    assert s["peak_hbm_bytes"] == pytest.approx(max(s["hbm_points"].values()), rel=1e-9)
    ideal = TrainingIteration(run, Sim(run.cluster, seed=0, trace=False)).run()
    assert ideal["hbm_model"] == "ideal" and ideal["peak_hbm_bytes"] != pytest.approx(s["peak_hbm_bytes"], rel=0.05)
    with pytest.raises(ValueError, match="trainer must be 'train' or 'bench'"):
        TrainingIteration(run, Sim(run.cluster, seed=0, trace=False), impl="reference", trainer="x")


def test_offload_bench_peaks_within_a_few_percent():
    """The H100 offload bench's peak_mem_gb rows (config a: all in HBM, CPU and SSD offload; config b over a
    budget) from the committed bench CSV: was -12 .. -17 % with the ideal model."""
    import warnings

    from simulator.validate_offload import compare

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = compare()
    d = df[(df.metric == "peak_mem_gb") & df.predicted.notna()]
    a = d[d.config.str.startswith("a_compute_bound")]
    assert len(a) >= 10 and a.error.abs().max() < 0.03
    b = d[d.config.str.startswith("b_over_budget") & (d.commit != "4ceddea")]
    assert len(b) >= 2 and b.error.abs().max() < 0.08


def test_multigpu_rows_and_the_zero3_leak():
    """The multi-GPU rows' scoring helper, and the mechanism behind its ``earlier_leaked_bytes``: a finished ZeRO-3
    run of `reference.train` leaves its model alive in the process (autograd nodes holding closures), so runs that
    follow it in one process start with its parameters and gradients allocated."""
    rows = C.leak_runs("cpu", zero_stages=(3,), runs=2)
    assert [r["alive_models"] for r in rows] == [1, 2]
    m = _bench_model(hidden=64, ffn=256, vocab=512)
    plan = ParallelPlan(data_parallel=2, expert_parallel=2, gpus_per_node=2, zero_stage=3)
    from semoe.sizing import count_params, expert_params

    pc = count_params(m)
    assert M.leaked_state_bytes(m, plan) == 8 * (-(-pc.dense // 2) + 4 * expert_params(m) * m.moe_layers)
    z3 = M.step_peak(m, plan, tokens=128, routed_rows=[256, 256])
    z0 = M.step_peak(m, ParallelPlan(data_parallel=2, expert_parallel=2, gpus_per_node=2), tokens=128,
                     routed_rows=[256, 256])
    assert z3.parts["zero3_root"] == 4 * (m.vocab * m.hidden + m.max_seq * m.hidden + m.hidden)  # + final norm
    assert z3.parts["params"] < z0.parts["params"] and z3.parts["buckets"] < z0.parts["buckets"]
    s = {"peak_hbm_bytes": 1e9, "hbm_model": "reference", "hbm_points": {"forward_loss": 1e9}, "hbm_parts": {}}
    p, status, note = M.multigpu_peak(s, "peak_mem_allocated_bytes rank0")
    assert (p, status) == (1e9, "validated") and "peak at forward_loss" in note
    p, status, note = M.multigpu_peak(s, "peak_mem_allocated_bytes_max", earlier_leaked_bytes=2e9)
    assert (p, status) == (3e9, "not_modelled") and "earlier runs" in note
    assert M.multigpu_peak(s, "peak_mem_reserved_bytes rank1")[1] == "not_modelled"
    assert M.multigpu_peak({**s, "hbm_model": "ideal", "hbm_model_note": "x"}, "peak_mem_allocated_bytes")[1] == \
        "not_modelled"


def test_probe_quick_writes_its_csv(tmp_path):
    out = tmp_path / "probe.csv"
    assert C.main(["--probe", "--quick", "--out", str(out)]) == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    peak = next(r for r in rows if r["point"] == "step_peak")
    assert abs(float(peak["error"])) < 0.03
    assert [r["measured_bytes"] for r in rows if r["point"] == "alive_models"] == ["1", "2"]
