"""ModelSpec: the architecture of a GPT-style MoE decoder, shared by the reference and the simulator.

Architecture (what `reference/model.py` builds and `semoe/sizing.py` counts):
token embedding [V, D] (+ learned positions [max_seq, D] when ``position == "learned"``), ``layers``
pre-norm blocks of causal self-attention (``heads`` query heads, ``kv_heads`` key/value heads) and an
FFN that is an MoE layer every ``moe_every``-th block (blocks ``moe_every-1, 2*moe_every-1, ...``) and a
dense FFN of width ``dense_ffn`` otherwise; a final norm; an output head tied to the embedding or not.
An MoE layer has a router [D, E] (no bias), ``experts`` expert FFNs of width ``ffn`` and
``shared_experts`` always-on FFNs of the same width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from semoe.spec_base import Spec

GateName = Literal[
    "topk",
    "switch",
    "gshard",
    "noisy_topk",
    "ktop1",
    "hash",
    "base",
    "sam",
    "expert_choice",
    "sigmoid_bias",
]
GATE_NAMES: tuple[str, ...] = GateName.__args__  # type: ignore[attr-defined]

Activation = Literal["gelu", "swiglu"]
DType = Literal["fp32", "fp64", "bf16", "fp16"]
DTYPE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True, kw_only=True)
class ModelSpec(Spec):
    """A GPT-style decoder with MoE FFNs. Sizes in elements; ``ffn`` is one expert's hidden width."""

    name: str = "custom"
    layers: int
    hidden: int
    heads: int
    kv_heads: int | None = None  # None: same as heads (multi-head attention); fewer: grouped-query
    vocab: int
    max_seq: int = 2048
    ffn: int  # hidden width of one expert FFN
    dense_ffn: int | None = None  # width of non-MoE FFN blocks; None: same as ffn
    experts: int
    top_k: int = 1
    moe_every: int = 1  # 1: every block is MoE; 2: every other block (1, 3, 5, ...); 0: no MoE
    shared_experts: int = 0
    gate: GateName = "topk"
    capacity_factor: float | None = None  # None: dropless; else capacity = ceil(cf * T * k / E)
    min_capacity: int = 1
    # which assignments survive when an expert is over capacity: "position" keeps every token's first
    # choice before any second choice, in token order (GShard / DeepSpeed); "probability" keeps the
    # highest router weights (BPR); "deepspeed" keeps exactly what DeepSpeed-MoE keeps for this k
    # (top-1: torch.topk over the one-hot mask, whose tie order is implementation-defined; top-2:
    # "position"; top-k > 2: "probability")
    drop_policy: Literal["position", "probability", "deepspeed"] = "position"
    # renormalise the kept top-k weights to sum to 1 (after dropping) when top_k > 1; a top-1 gate
    # always weights by the raw router probability (Switch), else the router would get no gradient
    # from the task loss
    renormalize: bool = True
    expert_groups: int = 1  # groups for the `sam` gate (e.g. one per node)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    activation: Activation = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    position: Literal["learned", "rope"] = "learned"
    bias: bool = False  # biases on attention and FFN linears
    tied_embeddings: bool = True
    dtype: DType = "bf16"

    def validate(self) -> None:
        self.require_positive("layers", "hidden", "heads", "kv_heads", "vocab", "max_seq", "ffn")
        self.require_positive("dense_ffn", "experts", "top_k", "expert_groups")
        self.require_non_negative("moe_every", "shared_experts", "min_capacity")
        self.require_non_negative("aux_loss_coef", "z_loss_coef")
        if self.hidden % self.heads:
            self.fail("heads", f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            self.fail("kv_heads", f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            self.fail("position", f"rope needs an even head dim, got {self.head_dim}")
        if self.top_k > self.experts:
            self.fail("top_k", f"top_k ({self.top_k}) must be <= experts ({self.experts})")
        if self.moe_every > self.layers:
            self.fail("moe_every", f"moe_every ({self.moe_every}) must be <= layers ({self.layers})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            self.fail("capacity_factor", f"capacity_factor ({self.capacity_factor}) must be > 0 or null (dropless)")
        if self.experts % self.expert_groups:
            self.fail(
                "expert_groups",
                f"experts ({self.experts}) must be divisible by expert_groups ({self.expert_groups})",
            )
        if self.gate == "switch" and self.top_k != 1:
            self.fail("top_k", f"the switch gate is top-1, got top_k ({self.top_k})")
        if self.gate == "gshard" and self.top_k != 2:
            self.fail("top_k", f"the gshard gate is top-2, got top_k ({self.top_k})")
        if self.gate == "ktop1" and self.experts % self.top_k:
            self.fail("top_k", f"ktop1 needs experts ({self.experts}) divisible by top_k ({self.top_k})")
        if self.gate == "sam" and self.top_k > self.experts // self.expert_groups:
            self.fail(
                "top_k",
                f"sam picks top_k ({self.top_k}) inside one group of "
                f"{self.experts // self.expert_groups} experts",
            )

    # ------------------------------------------------------------------ derived quantities
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def dense_ffn_width(self) -> int:
        return self.dense_ffn if self.dense_ffn is not None else self.ffn

    def is_moe_layer(self, i: int) -> bool:
        """Block ``i`` (0-based) is an MoE block."""
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.layers))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]
