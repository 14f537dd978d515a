"""Sizing formulas: the paper's parameter counts, FLOP bookkeeping, state bytes per tier."""

from __future__ import annotations

import pytest

from semoe import ParallelPlan, model_preset, plan_preset
from semoe import sizing as sz
from semoe.plan_spec import OffloadPlacement

# SEMOE.md "Experiment setups": 8 GPUs -> 13.9B, 64 -> 104.1B, 128 -> 207.2B
PAPER = [("paper-13.9b", 13.9e9), ("paper-104b", 104.1e9), ("paper-207b", 207.2e9)]


@pytest.mark.parametrize("name,expected", PAPER)
def test_paper_presets_within_half_a_percent(name, expected):
    total = sz.count_params(model_preset(name)).total
    assert abs(total - expected) / expected < 0.005, (name, total)


def test_paper_family_follows_published_decomposition():
    # P ~= 0.805B (attention) + 0.206B (embedding) + 1.611B x experts
    for e in (8, 16, 32, 64, 128):
        m = model_preset("paper-13.9b").replace(experts=e)
        approx = 0.805e9 + 0.206e9 + 1.611e9 * e
        assert abs(sz.count_params(m).total - approx) / approx < 0.005


def test_mixtral_total_and_active_match_published():
    pc = sz.count_params(model_preset("mixtral-8x7b"))
    assert abs(pc.total - 46.7e9) / 46.7e9 < 0.005  # Mixtral paper: 46.7B total
    assert abs(pc.active - 12.9e9) / 12.9e9 < 0.01  # 12.9B active per token


def test_training_flops_are_three_forwards_and_6n_dominates():
    m = model_preset("paper-13.9b")
    f = sz.forward_flops_per_token(m, 2048)
    assert sz.training_flops_per_token(m, 2048) == 3 * f
    # 2 x active params (without embedding lookup, plus attention scores) is the textbook estimate
    pc = sz.count_params(m)
    textbook = 2 * (pc.active - m.vocab * m.hidden - m.max_seq * m.hidden) + 2 * m.hidden * m.vocab
    textbook += m.layers * 4 * 2048 * m.hidden
    assert abs(f - textbook) / f < 0.01
    assert sz.training_flops_per_token(m, 2048, recompute_experts=True) > 3 * f


def test_state_bytes_all_on_gpu_is_16_bytes_per_param_per_shard():
    m = model_preset("paper-104b")
    plan = ParallelPlan(data_parallel=64, expert_parallel=64, zero_stage=0)
    pc = sz.count_params(m)
    t = sz.state_bytes_per_tier(m, plan)
    assert t["cpu"] == t["ssd"] == 0
    assert t["gpu"] == 16 * pc.dense + 16 * pc.sparse / 64
    z3 = sz.state_bytes_per_tier(m, plan.replace(zero_stage=3))
    assert z3["gpu"] == pytest.approx(16 * pc.dense / 64 + 16 * pc.sparse / 64)


def test_semoe_plan_puts_expert_fp32_states_on_ssd_and_two_layers_on_gpu():
    m = model_preset("paper-104b")
    plan = plan_preset("semoe", 64, 64)
    t = sz.state_bytes_per_tier(m, plan)
    per_expert = sz.expert_params(m)
    assert t["ssd"] == 12 * per_expert * m.moe_layers  # 12S on SSD (one local expert per layer)
    pc = sz.count_params(m)
    assert t["gpu"] == pytest.approx(16 * pc.dense / 64 + 4 * per_expert * 2)
    assert t["cpu"] == 16 * per_expert * m.moe_layers  # the cache holds all local experts here


def test_cpu_offload_of_dense_optimizer():
    m = model_preset("tiny")
    plan = ParallelPlan(offload=OffloadPlacement(dense_optimizer="cpu"))
    t = sz.state_bytes_per_tier(m, plan)
    assert t["cpu"] == 12 * sz.count_params(m).dense


def test_router_params_per_gate():
    m = model_preset("tiny")
    assert sz.router_params(m) == m.hidden * m.experts
    assert sz.router_params(m.replace(gate="hash")) == 0
    assert sz.router_params(m.replace(gate="noisy_topk")) == 2 * m.hidden * m.experts


def test_offloaded_experts_keep_their_16bit_mirror_in_pinned_host_memory():
    """reference.offload: the host mirror (16-bit weights) and gradient buffer of every offloaded expert are
    in DRAM for both the cpu and the ssd tier; the SSD holds only fp32 states; the cache holds fp32 states."""
    m = model_preset("tiny").replace(experts=8, layers=2)
    pc, P, L = sz.count_params(m), sz.expert_params(m), m.moe_layers
    dense = 16 * pc.dense
    for tier in ("cpu", "ssd"):
        plan = ParallelPlan(offload=OffloadPlacement(expert_params=tier, expert_optimizer=tier))
        t = sz.state_bytes_per_tier(m, plan)
        assert t["gpu"] == dense + 4 * 8 * P * 2  # two layers' 16-bit params + grads in the pool
        if tier == "cpu":
            assert t["cpu"] == 16 * 8 * P * L and t["ssd"] == 0
        else:
            assert t["cpu"] == 4 * 8 * P * L and t["ssd"] == 12 * 8 * P * L
            cached = sz.state_bytes_per_tier(m, plan.replace(cpu_cache_experts=3))
            assert cached["cpu"] - t["cpu"] == 12 * 3 * P * L and cached["ssd"] == t["ssd"]
    # ZeRO-Offload style: params on the GPU, optimizer states on the CPU (no cache there)
    t = sz.state_bytes_per_tier(m, ParallelPlan(offload=OffloadPlacement(expert_optimizer="cpu"), cpu_cache_experts=3))
    assert t["gpu"] == dense + 4 * 8 * P * L and t["cpu"] == 12 * 8 * P * L
