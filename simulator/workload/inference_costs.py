"""GPU work of the phases of one block of the simulated inference engine (`BlockCosts`, from a
`CostModel`), and constant phase times for tests (`FixedCosts`).

Expert GEMMs (bf16, and the quantised workspace path): ``torch._grouped_mm`` at the profile's rate for
the mean rows per expert, on the rows the kernel really computes: CUTLASS tiles each group's rows in
tiles of ``grouped_mm_tile_m`` rows, so uneven routed groups (random routing: per-expert loads
``~ Binomial(T, k p_e)``, never tile multiples) cost ``sum_e E[ceil(X_e / tile) * tile]`` rows
(`padded_rows`), while the profile's rows are measured at tile-aligned equal groups. The SwiGLU
activation is the reference's ``F.silu(h1) * h3``: two kernels, 5 passes over ``rows x F``.

Where the profile measured ``torch._grouped_mm`` on uneven routed groups of the same shape
(``grouped_gemm_fwd_routed``, seeded uniform top-k routing; `inference_profile.InferProfile.routed_gemm_s`),
the bf16 expert GEMMs of a forward whose mean rows per expert lie in the measured range take those rows'
time instead (the H100: 256-2048 rows per expert, 27% above the padding model at 256 rows, 3% at 1024);
outside it, and for skewed routing, the padding model stays.

Quantised experts (`simulator.workload.inference_quant`): the workspace dequantisation and the fused
quantised GEMMs use the profile's ``dequant`` / ``qgemm_fwd`` rows when the profile has them
(`simulator.workload.inference_profile`, sweep ``infer`` of ``kernels/profile.py``: the reference's
own calls), else the analytic memory pass / bf16-rate assumption.

Small kernels (issue 7, resident prefill at small batch): the per-operator prices above hold the data each
operator moves, not the fixed device time of each of the ~70 kernels a block launches. `BlockCosts.kernels`
charges `KERNEL_DEVICE_S` per counted kernel (every one but the priced grouped GEMMs, `BlockCosts.ffn_gemms`),
measured in the engine's profiled prefill (`diag_kernel_device_s`, results/bench/infer_diag); it shows where
the device is the critical path (B >= 2 of the bench model: ~0.17 ms per block). `FFN_LEAD_KERNELS` (counted
from the reference) are the kernels the host issues after the dispatcher's last sync before the first grouped
GEMM: the inference workload starts the GEMMs only after them (`BlockCosts.ffn_lead`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from semoe import ModelSpec
from simulator.cost import CostModel
from simulator.workload.inference_profile import InferProfile
from simulator.workload.inference_quant import dequant_bytes, gemm_factor, weight_shapes

# results/bench/moe_layer.csv, permute_T16384_k8_D2048 impl torch (H100, 2026-11-24): argsort + gather +
# index_add round trip, 351.4 GB/s (our Triton permute: 2695 GB/s); reference/inference dispatches with torch
TORCH_PERMUTE_GBPS = 351.4

# Device time per counted kernel that the per-operator prices above do not hold (the launch, ramp and drain of
# each small kernel and the gap before the next on the stream; composite operators such as bincount and
# logsumexp launch several CUDA kernels per counted one): H100, the engine's own resident prefill forward
# under torch.profiler (results/bench/infer_diag/kernels_resident_prefill_B{1,2,4}.txt, commit c456f2b, a
# diagnostic run that is no row of results/bench/infer.csv): per block, the device time of every kernel but
# the grouped GEMMs and the LM head ((Self CUDA total - aten::_grouped_mm - the head's GEMM) / 4 blocks: 357,
# 449, 642 us at B = 1, 2, 4) less what `BlockCosts` prices for the same kernels (191, 276, 479 us) is 166,
# 173, 162 us: a constant, over the 68 non-GEMM kernels a block counts (`inference_host`): 2.44, 2.55, 2.38
# us; the median (`diag_kernel_device_s` recomputes it from the tables; a test checks this constant).
KERNEL_DEVICE_S = 2.44e-6
# Kernels ``engine.grouped_ffn`` and the dispatcher issue in the grouped-FFN segment before its first
# grouped GEMM (the segment after the dispatcher's ``int(n_kept)`` sync): the permute (index, div,
# index_select) and the offsets (cumsum, to int32), counted from the reference code (a CPU test re-counts
# them). The device cannot start the expert GEMMs before the host has issued these: right after the sync
# the stream is idle for their host time. The fused quantised GEMMs (``quant_grouped_ffn``) take the
# dispatch's three (their own offsets are issued inside ``quant_mm``).
FFN_LEAD_KERNELS = 5
DISPATCH_LEAD_KERNELS = 3


def grouped_mm_tile_m(rows_per_group: float, n: int) -> int:
    """Rows per CUTLASS tile of ``torch._grouped_mm`` (bf16, SM90): PyTorch's GroupMM.cu picks 64 x 128
    tiles when the mean rows per group or N is <= 128, else 128 x 256 (or 128 x 128): 128 rows."""
    return 64 if rows_per_group <= 128 or n <= 128 else 128


def padded_rows(tokens: int, top_k: int, popularity, tile: int) -> float:
    """Expected rows a grouped GEMM computes when each group's rows are rounded up to ``tile``: expert
    ``e`` gets ``X_e ~ Binomial(tokens, min(1, top_k p_e))`` rows (``popularity`` p, uniform if None)
    and costs ``ceil(X_e / tile) * tile``."""
    if tokens <= 0:
        return 0.0
    p = np.full(top_k, 1.0 / top_k) if popularity is None else np.asarray(popularity, dtype=float)
    total = 0.0
    for q in np.minimum(1.0, top_k * p):
        if q <= 0:
            continue
        mu, sd = tokens * q, math.sqrt(tokens * q * (1 - q))
        lo, hi = max(0, int(mu - 10 * sd - 1)), min(tokens, int(mu + 10 * sd + 2))
        x = np.arange(lo, hi + 1, dtype=float)
        if q >= 1.0:
            pmf = (x == tokens).astype(float)
        else:
            lg = (math.lgamma(tokens + 1) - np.array([math.lgamma(v + 1) + math.lgamma(tokens - v + 1) for v in x])
                  + x * math.log(q) + (tokens - x) * math.log1p(-q))
            pmf = np.exp(lg)
        total += float(np.sum(pmf * np.ceil(x / tile) * tile) / max(np.sum(pmf), 1e-300))
    return total


DIAG = Path(__file__).resolve().parents[2] / "results" / "bench" / "infer_diag"
DIAG_BLOCKS = 4  # the diagnostic's --layers (results/bench/infer_diag/README.md)
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(field: str) -> float:
    for unit in ("us", "ms", "s"):
        if field.endswith(unit):
            return float(field[: -len(unit)]) * _UNITS[unit]
    raise ValueError(f"not a profiler time: {field!r}")


def read_kernel_table(path: str | Path) -> dict:
    """A ``torch.profiler`` table (``key_averages().table``, as ``inference_diag`` writes it): ``{"total_s": Self
    CUDA time total, "rows": [(name, self_cuda_s, calls), ...]}``."""
    rows, total = [], None
    for line in Path(path).read_text().splitlines():
        if line.startswith("Self CUDA time total:"):
            total = _seconds(line.split(":", 1)[1].strip())
            continue
        f = re.split(r"\s{2,}", line.strip())
        if len(f) == 11 and f[-1].isdigit():
            rows.append((f[0], _seconds(f[6]), int(f[-1])))
    if total is None or not rows:
        raise ValueError(f"{path}: not a torch.profiler kernel table")
    return {"total_s": total, "rows": rows}


def diag_kernel_device_s(costs: BlockCosts, kernels: int, diag: str | Path = DIAG, batches=(1, 2, 4),
                         prompt_len: int = 256, blocks: int = DIAG_BLOCKS) -> dict:
    """`KERNEL_DEVICE_S` recomputed from the diagnostic's resident prefill tables: per batch, the device time per
    block of every kernel but the grouped GEMMs (``aten::_grouped_mm``) and the LM head (the one GEMM kernel
    called once per forward) less what ``costs`` prices for them (attention + gate + experts - the grouped
    GEMMs), over ``kernels`` (the counted non-GEMM kernels of a block). ``{batch: seconds}``."""
    out = {}
    for B in batches:
        t = read_kernel_table(Path(diag) / f"kernels_resident_prefill_B{B}.txt")
        gmm = sum(s for n, s, _ in t["rows"] if n == "aten::_grouped_mm")
        head = sum(s for n, s, c in t["rows"] if c == 1 and n.startswith("nvjet"))
        measured = (t["total_s"] - gmm - head) / blocks
        T = B * prompt_len
        groups = costs.m.experts
        priced = (costs.attention(B, prompt_len, prompt_len) + costs.gate(T) + costs.experts(T, groups)
                  - costs.gemms(T, groups))
        out[B] = (measured - priced) / kernels
    return out


class BlockCosts:
    """GPU work (seconds) of the phases of one block, from a `CostModel` (see the module docstring).
    ``popularity``: per-expert routing probabilities (uniform if None), for the uneven group loads."""

    def __init__(self, m: ModelSpec, cost: CostModel, quant: str | None = None, dequant: str = "workspace",
                 popularity=None) -> None:
        self.m, self.cm = m, cost
        self.quant, self.dequant_path = quant, dequant
        self.gemm_factor = gemm_factor(quant, dequant)
        self.popularity = None if popularity is None else np.asarray(popularity, dtype=float)
        self.prof = InferProfile.of(cost)
        self.kernel_s = KERNEL_DEVICE_S

    @property
    def ffn_gemms(self) -> int:
        """Grouped GEMM kernels of the expert FFN (w1, w3, w2 for SwiGLU; w1, w2 for GELU): priced by
        `experts`, so they carry no `kernel_s`."""
        return 3 if self.m.activation == "swiglu" else 2

    def ffn_lead(self, fused: bool = True) -> int:
        """Kernels of the grouped-FFN segment issued before its first grouped GEMM (`FFN_LEAD_KERNELS`;
        the fused quantised path: `DISPATCH_LEAD_KERNELS`)."""
        return DISPATCH_LEAD_KERNELS if fused and self.fused_path else FFN_LEAD_KERNELS

    @property
    def fused_path(self) -> bool:
        return self.quant is not None and self.dequant_path == "fused"

    def kernels(self, n: int) -> float:
        """Unpriced device time of ``n`` counted kernels (`KERNEL_DEVICE_S` each)."""
        return max(0, n) * self.kernel_s

    def dequant(self, experts: int, kernels: int = 1) -> float:
        """Dequantising ``experts`` experts into the workspace: the profile's ``dequant`` rows (the
        reference's strided copy + scale pass) for every weight matrix when present, else one memory-bound
        pass; ``kernels`` launches."""
        if experts <= 0:
            return 0.0
        if self.quant is not None:
            ts = [self.prof.dequant_s(self.quant, i, o, experts) for i, o in weight_shapes(self.m)]
            if all(t is not None for t in ts):
                return float(sum(ts))
        return self.cm.memory(dequant_bytes(self.m, experts)) + max(0, kernels - 1) * self.cm.launch_s

    def fused_gemms(self, rows_per_expert: float, groups: int) -> float | None:
        """The fused quantised GEMMs (w1, w3, w2) from the profile's ``qgemm_fwd`` rows, None if any is
        not measured."""
        if self.quant is None or self.dequant_path != "fused":
            return None
        ts = [self.prof.qgemm_s(self.quant, rows_per_expert, i, o, groups) for i, o in weight_shapes(self.m)]
        return float(sum(ts)) if all(t is not None for t in ts) else None

    def routed_gemms(self, rows_per_expert: float, groups: int) -> tuple[float, float] | None:
        """(w1 (= w3), w2) seconds of the bf16 grouped GEMMs from the profile's ``grouped_gemm_fwd_routed``
        rows (the reference's own ``torch._grouped_mm`` call on uneven groups of seeded uniform top-k
        routing, `InferProfile.routed_gemm_s`); None when quantised, when the workload's routing is not
        uniform (the rows measured uniform routing), when ``groups`` is not every expert, or outside the
        measured rows per expert."""
        m = self.m
        if self.quant is not None or groups != m.experts or m.dtype != "bf16":
            return None
        if self.popularity is not None and not np.allclose(self.popularity, 1.0 / m.experts):
            return None
        w13 = self.prof.routed_gemm_s(rows_per_expert, m.hidden, m.ffn, groups)
        w2 = self.prof.routed_gemm_s(rows_per_expert, m.ffn, m.hidden, groups)
        return None if w13 is None or w2 is None else (w13, w2)

    def grouped_rows(self, tokens: int, groups: int, n: int) -> float:
        """Rows per group the bf16 grouped GEMM computes for ``tokens`` routed tokens: the routed rows
        padded to the kernel's tiles (`padded_rows`), over the groups with rows."""
        m = self.m
        per = tokens * m.top_k / groups
        pop = self.popularity if self.popularity is not None else np.full(m.experts, 1.0 / m.experts)
        return max(per, padded_rows(tokens, m.top_k, pop, grouped_mm_tile_m(per, n)) / groups)

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

    def gemms(self, tokens: int, groups: int, fused: bool = True) -> float:
        """The grouped GEMMs alone (w1, w3, w2) of `experts`: the fused quantised rows, the routed rows (bf16,
        uniform routing, measured rows per expert), else the tile-padded rows at the aligned-group rate."""
        m, cm, dt = self.m, self.cm, self.m.dtype
        rows = tokens * m.top_k
        if rows <= 0 or groups <= 0:
            return 0.0
        per = rows / groups
        mats = 3 if m.activation == "swiglu" else 2
        q = self.fused_gemms(per, groups) if fused else None
        if q is not None:  # measured fused quantised GEMMs (ring / resident groups)
            return q
        if (routed := self.routed_gemms(per, groups)) is not None:  # measured uneven routed groups
            return (mats - 1) * routed[0] + routed[1]
        r1, r2 = self.grouped_rows(tokens, groups, m.ffn), self.grouped_rows(tokens, groups, m.hidden)
        t = (mats - 1) * cm.matmul(r1, m.ffn, m.hidden, dt, groups=groups)  # w1 (and w3)
        t += cm.matmul(r2, m.hidden, m.ffn, dt, groups=groups)  # w2
        return t * (self.gemm_factor if fused else 1.0)  # fused quantised GEMMs, no profile row (assumed rate)

    def activation(self, tokens: int) -> float:
        """The expert FFN's activation over ``tokens * top_k`` routed rows: SwiGLU ``F.silu(h1) * h3`` (silu: read +
        write; mul: 2 reads + write), GELU read + write."""
        m = self.m
        rows = tokens * m.top_k
        return self.cm.elementwise("add", (5 if m.activation == "swiglu" else 2) * rows * m.ffn * m.dtype_bytes, m.dtype)

    def experts(self, tokens: int, groups: int, fused: bool = True) -> float:
        """Grouped SwiGLU/GELU FFN of ``tokens * top_k`` routed rows over ``groups`` experts with rows
        (the grouped GEMM's empty groups cost nothing), the activation and the combine."""
        m, cm, dt = self.m, self.cm, self.m.dtype
        rows = tokens * m.top_k
        if rows <= 0 or groups <= 0:
            return 0.0
        t = self.gemms(tokens, groups, fused) + self.activation(tokens)
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

    ffn_gemms = 3
    kernel_s = 0.0  # no unpriced device time per kernel: the tests' timelines stay exact

    def __init__(self, experts_s: float, attention_s: float = 0.0, gate_s: float = 0.0, dequant_s: float = 0.0,
                 ffn_lead: int = 0) -> None:
        self.experts_s, self.attention_s, self.gate_s = experts_s, attention_s, gate_s
        self.dequant_s = dequant_s  # per expert
        self.lead = ffn_lead  # kernels before the first grouped GEMM (0: the experts' work starts at once)

    def ffn_lead(self, fused=True):
        return self.lead

    def kernels(self, n):
        return 0.0

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
