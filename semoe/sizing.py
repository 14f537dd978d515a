"""Parameters, FLOPs and bytes of a ModelSpec, written once for the simulator, MFU reports and the CLI.

Parameter counts are exact for the model `reference/model.py` builds (a test asserts equality).
FLOPs count one multiply-add as 2 FLOPs, matmuls only (norms, softmax, activations ignored).
Attention scores use the full (not causal-halved) convention of Megatron/PaLM MFU reports:
QK^T and AV cost 2 * 2 * seq * hidden FLOPs per token per layer forward. Training = forward + backward
(backward = 2 x forward), so 3 x forward; recomputation adds a forward where it applies.

Model-state bytes with mixed-precision Adam follow the SE-MoE paper (SEMOE.md, "Hierarchical
storage"): 2 (fp16/bf16 param) + 2 (grad) + 12 (fp32 master, m, v) = 16 bytes per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from semoe.model_spec import ModelSpec
from semoe.plan_spec import ParallelPlan

PARAM_BYTES = 2  # fp16/bf16 working copy
GRAD_BYTES = 2
OPTIMIZER_BYTES = 12  # fp32 master + Adam m + v
STATE_BYTES = PARAM_BYTES + GRAD_BYTES + OPTIMIZER_BYTES


# ----------------------------------------------------------------------------- parameters
def norm_params(m: ModelSpec) -> int:
    if m.norm == "rmsnorm":
        return m.hidden
    return m.hidden * (2 if m.bias else 1)


def attention_params(m: ModelSpec) -> int:
    d, kv = m.hidden, m.n_kv_heads * m.head_dim
    weights = 2 * d * d + 2 * d * kv  # q, o; k, v
    biases = (2 * d + 2 * kv) if m.bias else 0
    return weights + biases


def ffn_params(m: ModelSpec, width: int) -> int:
    """One FFN (an expert, a shared expert or a dense block): GELU (w1, w2) or SwiGLU (w1, w3, w2)."""
    mats = 3 if m.activation == "swiglu" else 2
    biases = ((mats - 1) * width + m.hidden) if m.bias else 0
    return mats * m.hidden * width + biases


def expert_params(m: ModelSpec) -> int:
    return ffn_params(m, m.ffn)


def router_params(m: ModelSpec) -> int:
    """Router weights [D, E] without bias. The hash gate has none; noisy top-k adds its noise matrix."""
    if m.gate == "hash":
        return 0
    if m.gate == "noisy_topk":
        return 2 * m.hidden * m.experts
    return m.hidden * m.experts


def block_params(m: ModelSpec, i: int) -> dict[str, int]:
    """Parameters of block ``i`` split into dense (attention, norms, router, dense FFN, shared experts)
    and sparse (routed experts)."""
    dense = 2 * norm_params(m) + attention_params(m)
    sparse = 0
    if m.is_moe_layer(i):
        dense += router_params(m) + m.shared_experts * expert_params(m)
        sparse = m.experts * expert_params(m)
    else:
        dense += ffn_params(m, m.dense_ffn_width)
    return {"dense": dense, "sparse": sparse}


def embedding_params(m: ModelSpec) -> int:
    pos = m.max_seq * m.hidden if m.position == "learned" else 0
    head = 0 if m.tied_embeddings else m.vocab * m.hidden
    return m.vocab * m.hidden + pos + head + norm_params(m)  # + final norm


@dataclass(frozen=True)
class ParamCount:
    dense: int  # attention, norms, embeddings, routers, dense FFNs, shared experts
    sparse: int  # routed experts (all of them)
    active: int  # parameters one token touches: dense + top_k experts per MoE layer

    @property
    def total(self) -> int:
        return self.dense + self.sparse


def count_params(m: ModelSpec) -> ParamCount:
    dense = embedding_params(m)
    sparse = 0
    for i in range(m.layers):
        b = block_params(m, i)
        dense += b["dense"]
        sparse += b["sparse"]
    active = dense + m.moe_layers * m.top_k * expert_params(m)
    return ParamCount(dense=dense, sparse=sparse, active=active)


# ---------------------------------------------------------------------------------- FLOPs
def ffn_flops_per_token(m: ModelSpec, width: int) -> int:
    return 2 * (3 if m.activation == "swiglu" else 2) * m.hidden * width


def layer_forward_flops_per_token(m: ModelSpec, i: int, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token of block ``i``, by part."""
    d, kv = m.hidden, m.n_kv_heads * m.head_dim
    out = {
        "attention_proj": 2 * (2 * d * d + 2 * d * kv),
        "attention_scores": 2 * 2 * seq_len * d,
    }
    if m.is_moe_layer(i):
        out["router"] = 2 * router_params(m)
        out["experts"] = (m.top_k + m.shared_experts) * ffn_flops_per_token(m, m.ffn)
    else:
        out["dense_ffn"] = ffn_flops_per_token(m, m.dense_ffn_width)
    return out


def forward_flops_per_token(m: ModelSpec, seq_len: int) -> int:
    total = 2 * m.hidden * m.vocab  # output head (tied or not)
    for i in range(m.layers):
        total += sum(layer_forward_flops_per_token(m, i, seq_len).values())
    return total


def training_flops_per_token(m: ModelSpec, seq_len: int, recompute_experts: bool = False) -> int:
    fwd = forward_flops_per_token(m, seq_len)
    extra = 0
    if recompute_experts:
        extra = sum(
            layer_forward_flops_per_token(m, i, seq_len).get("experts", 0) for i in range(m.layers)
        )
    return 3 * fwd + extra


# ---------------------------------------------------------------------------------- bytes
def alltoall_bytes_per_token(m: ModelSpec) -> int:
    """Bytes one token sends in one MoE layer's dispatch (the combine returns the same again):
    top_k copies of its hidden vector in the model dtype."""
    return m.top_k * m.hidden * m.dtype_bytes


def dense_state_bytes_per_rank(dense_params: int, plan: ParallelPlan) -> dict[str, float]:
    """Bytes per rank of the dense states by ZeRO stage (ZeRO paper, Rajbhandari et al. 2020, eq. in
    Fig. 1): stage 1 shards optimizer states, 2 also gradients, 3 also parameters, over data_parallel."""
    n, p = plan.data_parallel, dense_params
    opt = OPTIMIZER_BYTES * p / (n if plan.zero_stage >= 1 else 1)
    grad = GRAD_BYTES * p / (n if plan.zero_stage >= 2 else 1)
    par = PARAM_BYTES * p / (n if plan.zero_stage >= 3 else 1)
    return {"params": par, "grads": grad, "optimizer": opt}


def state_bytes_per_tier(m: ModelSpec, plan: ParallelPlan) -> dict[str, float]:
    """Model-state bytes per rank on each tier (gpu / cpu / ssd), activations excluded.

    Dense states: by ZeRO stage, on the tiers of ``plan.offload.dense_*``. Expert states: each rank
    owns ``experts / expert_parallel`` experts of every MoE layer, laid out as `reference.offload` keeps
    them. Expert parameters on the GPU: their 16-bit params + grads there. Offloaded (``cpu`` or ``ssd``):
    the GPU holds the working 16-bit params + grads of the local experts of two MoE layers (current and
    next, double-buffered, SEMOE.md) and the host keeps a pinned 16-bit mirror and gradient buffer of
    every local expert (4 bytes per parameter in DRAM: every H2D fetch reads the mirror, so the SSD never
    holds 16-bit weights). The fp32 optimizer states (master, m, v: 12 bytes per parameter) live on
    ``offload.expert_optimizer``; with ``ssd`` the SSD keeps those of all experts (SEMOE.md: 12S <= M_ssd)
    and the pinned CPU cache holds copies of ``cpu_cache_experts`` local experts per MoE layer (12 bytes
    per parameter each); the cache only exists in front of the SSD.
    """
    tiers = {"gpu": 0.0, "cpu": 0.0, "ssd": 0.0}
    pc = count_params(m)
    dense = dense_state_bytes_per_rank(pc.dense, plan)
    tiers[plan.offload.dense_params] += dense["params"] + dense["grads"]
    tiers[plan.offload.dense_optimizer] += dense["optimizer"]
    local_experts = m.experts // plan.expert_parallel if m.moe_layers else 0
    per_layer = local_experts * expert_params(m)
    all_layers = per_layer * m.moe_layers
    if plan.offload.expert_params == "gpu":
        tiers["gpu"] += (PARAM_BYTES + GRAD_BYTES) * all_layers
    else:
        tiers["gpu"] += (PARAM_BYTES + GRAD_BYTES) * per_layer * min(2, m.moe_layers)
        tiers["cpu"] += (PARAM_BYTES + GRAD_BYTES) * all_layers  # pinned mirror + gradient buffer
    tiers[plan.offload.expert_optimizer] += OPTIMIZER_BYTES * all_layers
    if plan.offload.expert_optimizer == "ssd":
        cached = min(plan.cpu_cache_experts, local_experts) * m.moe_layers * expert_params(m)
        tiers["cpu"] += OPTIMIZER_BYTES * cached
    return tiers


def summary(m: ModelSpec, seq_len: int | None = None, plan: ParallelPlan | None = None) -> dict[str, float]:
    """One flat dict for tables: parameter counts, FLOPs per token, state bytes per tier."""
    seq = seq_len or m.max_seq
    pc = count_params(m)
    out: dict[str, float] = {
        "params_total": pc.total,
        "params_dense": pc.dense,
        "params_sparse": pc.sparse,
        "params_active": pc.active,
        "params_per_expert": expert_params(m) if m.moe_layers else 0,
        "seq_len": seq,
        "forward_flops_per_token": forward_flops_per_token(m, seq),
        "training_flops_per_token": training_flops_per_token(m, seq),
        "alltoall_bytes_per_token_layer": alltoall_bytes_per_token(m),
    }
    if plan is not None:
        for tier, b in state_bytes_per_tier(m, plan).items():
            out[f"state_bytes_{tier}"] = b
    return out
