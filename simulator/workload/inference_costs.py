"""GPU work of the phases of one block of the simulated inference engine (`BlockCosts`, from a
`CostModel`), and constant phase times for tests (`FixedCosts`)."""

from __future__ import annotations

from semoe import ModelSpec
from simulator.cost import CostModel
from simulator.workload.inference_quant import dequant_bytes, gemm_factor

# results/bench/moe_layer.csv, permute_T16384_k8_D2048 impl torch (H100, 2026-11-24): argsort + gather +
# index_add round trip, 351.4 GB/s (our Triton permute: 2695 GB/s); reference/inference dispatches with torch
TORCH_PERMUTE_GBPS = 351.4


class BlockCosts:
    """GPU work (seconds) of the phases of one block, from a `CostModel` (see the module docstring)."""

    def __init__(self, m: ModelSpec, cost: CostModel, quant: str | None = None, dequant: str = "workspace") -> None:
        self.m, self.cm = m, cost
        self.gemm_factor = gemm_factor(quant, dequant)

    def dequant(self, experts: int, kernels: int = 1) -> float:
        """Dequantising ``experts`` experts into the workspace: memory-bound, ``kernels`` launches."""
        if experts <= 0:
            return 0.0
        return self.cm.memory(dequant_bytes(self.m, experts)) + max(0, kernels - 1) * self.cm.launch_s

    def attention(self, batch: int, q_len: int, kv_len: int) -> float:
        m, cm, dt = self.m, self.cm, self.m.dtype
        T, h, b = batch * q_len, m.hidden, m.dtype_bytes
        kv = m.n_kv_heads * m.head_dim
        t = cm.elementwise("rmsnorm", 2 * T * h * b, dt)  # norm1
        t += cm.matmul(T, h + 2 * kv, h, dt)  # qkv
        t += cm.elementwise("add", 3 * T * (h + kv) * b, dt)  # RoPE on q and k (read, rotate, write)
        t += cm.elementwise("copy_d2d", 2 * 2 * T * kv * b, dt)  # KV-cache write
        t += cm.sdpa(batch, m.heads, q_len, kv_len, m.head_dim, m.n_kv_heads, causal=True, dtype=dt)
        t += cm.matmul(T, h, h, dt)  # proj
        t += cm.elementwise("add", 3 * T * h * b, dt)  # residual
        t += cm.elementwise("rmsnorm", 2 * T * h * b, dt)  # norm2
        return t

    def gate(self, tokens: int) -> float:
        m, cm, dt = self.m, self.cm, self.m.dtype
        T, h = tokens, m.hidden
        t = cm.matmul(T, m.experts, h, dt)  # router logits
        t += cm.memory(4 * 4 * T * m.experts)  # fp32 softmax, top-k, statistics
        t += self.dispatch_combine(T) / 2  # dispatch: tokens to expert order
        return t

    def dispatch_combine(self, tokens: int) -> float:
        """The reference's torch dispatcher (argsort, gather, weighted index-add back): the round trip
        at ``TORCH_PERMUTE_GBPS`` over ``2 (T D + T k D)`` elements (the bench's byte count), scaled to
        other GPUs by their HBM bandwidth."""
        m = self.m
        nbytes = 2 * (tokens * m.hidden + tokens * m.top_k * m.hidden) * m.dtype_bytes
        return nbytes / (TORCH_PERMUTE_GBPS * 1e9 * self.cm.gpu.hbm_GBps / 3350.0)

    def experts(self, tokens: int, groups: int, fused: bool = True) -> float:
        """Grouped SwiGLU/GELU FFN of ``tokens * top_k`` routed rows over ``groups`` experts with rows
        (the grouped GEMM's empty groups cost nothing), the activation and the combine."""
        m, cm, dt = self.m, self.cm, self.m.dtype
        rows = tokens * m.top_k
        if rows <= 0 or groups <= 0:
            return 0.0
        per = rows / groups
        mats = 3 if m.activation == "swiglu" else 2
        t = (mats - 1) * cm.matmul(per, m.ffn, m.hidden, dt, groups=groups)  # w1 (and w3)
        t += cm.matmul(per, m.hidden, m.ffn, dt, groups=groups)  # w2
        t *= self.gemm_factor if fused else 1.0  # fused quantised GEMMs (ring / resident groups only)
        t += cm.elementwise("add", (mats) * rows * m.ffn * m.dtype_bytes, dt)  # act (* gate)
        t += self.dispatch_combine(tokens) / 2  # combine
        t += cm.elementwise("add", 3 * tokens * m.hidden * m.dtype_bytes, dt)  # residual
        return t

    def head(self, batch: int) -> float:
        m, cm, dt = self.m, self.cm, self.m.dtype
        return cm.elementwise("rmsnorm", 2 * batch * m.hidden * m.dtype_bytes, dt) + cm.matmul(batch, m.vocab, m.hidden, dt)

    def embed(self, tokens: int) -> float:
        return self.cm.memory(2 * tokens * self.m.hidden * self.m.dtype_bytes)


class FixedCosts:
    """Constant phase times (tests): attention and gate ``0`` unless given, experts ``experts_s``."""

    def __init__(self, experts_s: float, attention_s: float = 0.0, gate_s: float = 0.0, dequant_s: float = 0.0) -> None:
        self.experts_s, self.attention_s, self.gate_s = experts_s, attention_s, gate_s
        self.dequant_s = dequant_s  # per expert

    def dequant(self, experts, kernels=1):
        return self.dequant_s * experts

    def attention(self, batch, q_len, kv_len):
        return self.attention_s

    def gate(self, tokens):
        return self.gate_s

    def experts(self, tokens, groups, fused=True):
        return self.experts_s

    def head(self, batch):
        return 0.0

    def embed(self, tokens):
        return 0.0
