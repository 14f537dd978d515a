"""Quantised expert weights and fewer experts for the inference workload (issue 11).

Bytes per expert (``expert_bytes``), as ``reference/inference/quantize.py`` stores them: bf16 / the
model dtype, or ``int8`` / ``fp8`` (e4m3): one byte per weight plus one fp32 scale per output channel
of each weight matrix (``w1``, ``w3``: F columns; ``w2``: D), biases kept in the model dtype. The
ring and the expert-aware cache copy these bytes; the pool's slots hold them.

Dequantisation (``DEQUANT`` paths, ``InferConfig.dequant``; the reference's ``quant_kernel``
"dequant" / "fused"):

* ``workspace``: before the grouped FFN the block's (ring, resident) or the fetched (expert-aware)
  experts are dequantised into a dtype workspace of one block's experts on the compute stream (the
  reference's strided ``copy_`` then in-place ``mul_`` by the scales): the profile's ``dequant`` rows
  when measured, else memory-bound passes of ``1 + 3 dtype_bytes`` per weight (`dequant_bytes`,
  `CostModel.memory`); the GEMMs then run in bf16.
* ``fused``: ring and resident groups compute from the quantised bytes (the reference's
  ``reference/inference/qmatmul.py``: fp8 ``torch._scaled_grouped_mm``, int8 a Triton GEMM with the
  scale in the epilogue): no dequant pass; the GEMMs at the profile's ``qgemm_fwd`` rate (the
  reference's ``quant_mm`` call, fp8 including the per-row activation quantisation) when measured,
  else fp8 at ``FP8_GEMM_SPEEDUP`` x the bf16 rate (H100 datasheet: 1979 vs 989 dense TFLOP/s, an
  assumption) and int8 weight-only at the bf16 rate (the weights are widened in registers). Expert-aware passes
  still dequantise their fetched experts, as the reference does.
Either way the plan reserves the workspace (E experts in the model dtype), as the reference's
``plan_memory`` does.

Fewer experts: a distilled student (Mixture-of-Students, ``semoe distill``) is just a `ModelSpec`
with fewer experts (`student_spec`); every byte count and the routing follow from the spec.
"""

from __future__ import annotations

from semoe import ModelSpec, SpecError
from semoe.sizing import expert_params

QUANTS = ("int8", "fp8")
DEQUANT = ("workspace", "fused")
FP8_GEMM_SPEEDUP = 1979.0 / 989.0  # H100 SXM dense fp8 / bf16 peak (datasheet)


def check_quant(quant: str | None, dequant: str = "workspace") -> None:
    if quant is not None and quant not in QUANTS:
        raise SpecError(f"InferConfig.quant: {quant!r} is not one of none, {', '.join(QUANTS)}")
    if dequant not in DEQUANT:
        raise SpecError(f"InferConfig.dequant: {dequant!r} is not one of {', '.join(DEQUANT)}")


def weight_shapes(m: ModelSpec) -> list[tuple[int, int]]:
    """(inputs, outputs) of each weight matrix of one expert: w1 (and w3) D->F, w2 F->D."""
    mats = [(m.hidden, m.ffn)] * (2 if m.activation == "swiglu" else 1)
    return [*mats, (m.ffn, m.hidden)]


def expert_bytes(m: ModelSpec, quant: str | None = None) -> int:
    """Bytes of one expert of one block as the pool holds it (model dtype, or quantised + scales)."""
    if quant is None:
        return expert_params(m) * m.dtype_bytes
    check_quant(quant)
    shapes = weight_shapes(m)
    weights = sum(i * o for i, o in shapes)
    scales = 4 * sum(o for _, o in shapes)
    biases = expert_params(m) - weights  # everything else the expert holds (biases), model dtype
    return weights + scales + biases * m.dtype_bytes


def workspace_bytes(m: ModelSpec, quant: str | None, dequant: str = "workspace") -> int:
    """Device workspace of one block's dequantised experts (the reference's ``plan_memory`` reserves it
    for every quantised engine: expert-aware passes dequantise even with fused ring kernels)."""
    check_quant(quant, dequant)
    if quant is None:
        return 0
    return m.experts * expert_params(m) * m.dtype_bytes


def dequant_bytes(m: ModelSpec, experts: int) -> float:
    """HBM bytes of the reference's dequantisation of ``experts`` experts (``dequantize_into``: ``copy_`` of
    the 1-byte data into the workspace, read 1 + write ``dtype_bytes``; then ``mul_`` by the scales in
    place, read ``dtype_bytes`` + the scale, write ``dtype_bytes``): ``1 + 3 dtype_bytes`` per weight. A
    lower bound: the copy reads the k-major data transposed (strided), which the profile's ``dequant``
    rows measure (`simulator.workload.inference_costs.BlockCosts.dequant`)."""
    shapes = weight_shapes(m)
    return experts * sum(i * o * (1 + 3 * m.dtype_bytes) + 4 * o for i, o in shapes)


def gemm_factor(quant: str | None, dequant: str) -> float:
    """Time of the expert GEMMs relative to bf16."""
    if quant == "fp8" and dequant == "fused":
        return 1.0 / FP8_GEMM_SPEEDUP
    return 1.0


def student_spec(m: ModelSpec, experts: int, top_k: int | None = None) -> ModelSpec:
    """A model distilled into ``experts`` experts (same dense part): ``m`` with fewer experts."""
    if experts < 1 or experts > m.experts:
        raise SpecError(f"student_spec: experts ({experts}) must be in 1..{m.experts}")
    k = min(top_k or m.top_k, experts)
    return m.replace(experts=experts, top_k=k, name=f"{m.name}-E{experts}")
