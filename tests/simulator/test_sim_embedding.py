"""Embedding partition in the simulator (simulator.workload.embedding): hand-computed bytes, times and
memory on a 4-GPU test node (NVLink 380 GB/s effective, tests/simulator/sim_helpers.py)."""

from __future__ import annotations

import numpy as np
import pytest

from semoe import Run, SpecError
from semoe.plan_spec import ParallelPlan
from semoe.presets import model_preset
from semoe.workload_spec import Workload
from simulator.hardware import SIMPLE
from simulator.workload.embedding import embedding_comm_bytes, embedding_state_bytes, simulate_embedding
from sim_helpers import NVL, make_cluster

V, H, W, MB, SEQ, MBS = 32000, 4096, 4, 4, 1024, 2
T = MB * SEQ  # tokens per rank and micro-batch


def _run(partition: bool, tied: bool, zero: int = 0) -> Run:
    m = model_preset("tiny").replace(vocab=V, hidden=H, heads=32, ffn=1024, max_seq=SEQ, dtype="bf16",
                                     tied_embeddings=tied)
    plan = ParallelPlan(data_parallel=W, expert_parallel=W, zero_stage=zero, embedding_partition=partition,
                        fusion_bucket_bytes=1 << 25)
    return Run(model=m, cluster=make_cluster(gpn=W), plan=plan,
               workload=Workload(micro_batch=MB, seq_len=SEQ, micro_batches=MBS))


def _rows(sim, rank=0):
    return [r for r in sim.rows if r[0] == rank]


def test_analytic_bytes_hand_case():
    m, h, b = _run(True, False).model, H // W, 2
    on = embedding_comm_bytes(m, _run(True, False).plan, T, micro_batches=MBS)
    assert on["ids_a2a"] == MBS * 3 * 8 * T == 196608
    assert on["vec_a2a"] == on["grad_a2a"] == MBS * 3 * T * h * b == 50331648
    assert on["allreduce"] == 0 and on["tied_gather_scatter"] == 0
    off = embedding_comm_bytes(m, _run(False, False).plan, T, micro_batches=MBS)
    assert off["allreduce"] == 2 * 3 / 4 * V * H * b == 393216000
    st_on, st_off = embedding_state_bytes(m, _run(True, False).plan), embedding_state_bytes(m, _run(False, False).plan)
    assert sum(st_off.values()) == 16 * V * H and sum(st_on.values()) == 4 * V * H  # 16 B/param, / W


def test_three_alltoalls_hand_timed_and_allreduce_shrinks():
    sim_on, on = simulate_embedding(_run(True, False), trace=True)
    sim_off, off = simulate_embedding(_run(False, False), trace=True)
    s = T * (H // W) * 2  # bytes per pair of the vector / gradient all-to-all
    for phase, per_rank in (("embedding_ids_a2a", 3 * 8 * T), ("embedding_vec_a2a", 3 * s), ("embedding_grad_a2a", 3 * s)):
        rows = [r for r in _rows(sim_on) if r[3] == phase]
        assert [r[2] for r in rows] == list(range(MBS)), phase  # once per micro-batch
        assert all(r[6] == per_rank for r in rows)
        if phase != "embedding_ids_a2a":  # 8 MB per pair: Simple protocol, t = base + a + (n-1) s / B
            for r in rows:
                assert r[5] - r[4] == pytest.approx(SIMPLE.base_latency_s + 1e-6 + 3 * s / NVL, rel=1e-9)
    assert not any(r[3].startswith("embedding_") and "a2a" in r[3] for r in sim_off.rows)
    ar_on = sum(r[6] for r in _rows(sim_on) if r[3] == "grad_allreduce")
    ar_off = sum(r[6] for r in _rows(sim_off) if r[3] == "grad_allreduce")
    assert ar_off - ar_on == 2 * V * H  # the table's bf16 gradient left the all-reduce
    # memory: the table's replicated 16 B/param become 16/W B/param (static; activations identical)
    assert off["peak_hbm_bytes"] - on["peak_hbm_bytes"] == pytest.approx(16 * V * H * (1 - 1 / W), rel=1e-12)
    assert off["state_bytes_gpu"] - on["state_bytes_gpu"] == pytest.approx(12 * V * H, rel=1e-12)


def test_tied_head_gathers_and_reduce_scatters_the_table():
    sim, on = simulate_embedding(_run(True, True), trace=True)
    _, off = simulate_embedding(_run(False, True), trace=True)
    phases = [r[3] for r in _rows(sim)]
    assert phases.count("embedding_table_allgather") == MBS and phases.count("embedding_grad_reduce_scatter") == MBS
    assert all(r[6] == 2 * V * H for r in _rows(sim) if r[3] in ("embedding_table_allgather", "embedding_grad_reduce_scatter"))
    assert off["state_bytes_gpu"] - on["state_bytes_gpu"] == pytest.approx(12 * V * H, rel=1e-12)
    # transient: gathered table + its full gradient (2 x 2 V H) minus the saved states still leaves a saving
    assert on["peak_hbm_bytes"] < off["peak_hbm_bytes"]


def test_off_equals_the_plain_training_iteration_and_zero3_refused():
    from simulator.api import simulate

    _, mine = simulate_embedding(_run(False, True))
    _, base = simulate(_run(False, True), trace=False)
    assert mine["step_time_s"] == base["step_time_s"] and mine["peak_hbm_bytes"] == base["peak_hbm_bytes"]
    with pytest.raises(SpecError, match="zero_stage 3"):
        simulate_embedding(_run(True, True, zero=3))


def test_sweep_quick_writes_csv(tmp_path):
    import pandas as pd

    from paper_repro.embedding_partition import collect

    df = pd.read_csv(collect(tmp_path, quick=True))
    assert len(df) == 4 * 2 * 2 * 2 and set(df.embedding_partition) == {True, False}
    four = df[(df.experts == 4) & (df.hidden == 8192) & (df.plan == "dp_offload") & ~df.tied]
    on, off = four[four.embedding_partition].iloc[0], four[~four.embedding_partition].iloc[0]
    assert on.peak_hbm_GB < off.peak_hbm_GB and np.isclose(off.embedding_states_GB, 4 * on.embedding_states_GB)


def test_optimizer_updates_only_the_slice():
    sim_on, _ = simulate_embedding(_run(True, False), trace=True)
    sim_off, _ = simulate_embedding(_run(False, False), trace=True)
    dur = lambda sim: [r[5] - r[4] for r in _rows(sim) if r[3] == "optimizer"][0]  # noqa: E731
    hbm = sim_on.cost.hbm
    assert dur(sim_off) - dur(sim_on) == pytest.approx(32 * V * H * (1 - 1 / W) / hbm, rel=1e-9)
