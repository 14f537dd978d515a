"""Memory plan of the simulated inference engine: ``reference/inference/engine.plan_memory`` on specs
(dense weights + KV cache + an activation reserve of 1.5 x the activation estimate + the quantised
dequant workspace + the expert pool: ring ``K = pool // (E * expert_bytes)``, expert-aware ``C = pool
// expert_bytes``)."""

from __future__ import annotations

from dataclasses import dataclass

from semoe import ModelSpec, SpecError
from semoe.sizing import count_params
from simulator.workload.inference_quant import expert_bytes, workspace_bytes


def activation_estimate_bytes(m: ModelSpec, tokens: int, batch: int) -> float:
    """Activations of one forward (attention, dispatch, expert hidden, fp32 logits of the last token):
    the reference's ``activation_reserve_bytes`` without its 1.5 safety factor."""
    per_token = 8 * m.hidden + m.top_k * (3 * m.ffn + 4 * m.hidden)
    return tokens * per_token * m.dtype_bytes + batch * m.vocab * 4


def kv_cache_bytes(m: ModelSpec, batch: int, max_len: int) -> int:
    return 2 * m.layers * batch * m.n_kv_heads * max_len * m.head_dim * m.dtype_bytes


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: float
    dense_bytes: int
    kv_bytes: int
    act_bytes: float  # estimate (peak); the plan reserves 1.5x
    expert_bytes: int  # one expert of one block
    experts: int
    blocks: int
    pool_slots: int  # C
    ring_slots: int  # K
    quant: str | None = None  # expert_bytes are then quantised bytes (data + scales)
    workspace_bytes: int = 0  # quantised, dequant "workspace": one block's experts in the model dtype

    @property
    def pool_bytes(self) -> int:
        return self.pool_slots * self.expert_bytes + self.workspace_bytes

    @property
    def peak_hbm_bytes(self) -> float:
        return self.dense_bytes + self.kv_bytes + self.pool_bytes + self.act_bytes


def plan_memory(m: ModelSpec, mode: str, budget_bytes: float, batch: int, max_len: int, tokens: int,
                slots: int | None = None, quant: str | None = None, dequant: str = "workspace") -> MemoryPlan:
    """``reference/inference/engine.plan_memory`` on specs (raises SpecError when the budget is too small);
    ``quant``: slots hold quantised experts and the dequant workspace is reserved (`inference_quant`)."""
    eb = expert_bytes(m, quant)
    ws = workspace_bytes(m, quant, dequant)
    E, L = m.experts, m.moe_layers
    pc = count_params(m)
    dense = pc.dense * m.dtype_bytes
    kv = kv_cache_bytes(m, batch, max_len)
    act = activation_estimate_bytes(m, tokens, batch)
    avail = budget_bytes - dense - kv - int(1.5 * act) - ws
    if mode == "resident":
        C, K = L * E, L
        if avail < C * eb and slots is None:
            raise SpecError(f"InferConfig.gpu_budget_bytes: {budget_bytes / 1e9:.2f} GB too small for resident mode "
                            f"(experts {C * eb / 1e9:.2f} GB, available {max(avail, 0) / 1e9:.2f} GB)")
    elif slots is not None:
        K = min(slots, L)
        C = K * E
    else:
        C = int(max(0, avail // eb))
        K = min(C // E, L)
        if K < 1:
            raise SpecError(f"InferConfig.gpu_budget_bytes: {budget_bytes / 1e9:.2f} GB too small: "
                            f"{max(avail, 0) / 1e9:.2f} GB left, one block's experts need {E * eb / 1e9:.2f} GB")
        if mode == "ring":
            C = K * E
        else:
            C = min(C, L * E, 1023)
            K = min(C // E, L)
    return MemoryPlan(budget_bytes, dense, kv, act, eb, E, L, C, K, quant, ws)
