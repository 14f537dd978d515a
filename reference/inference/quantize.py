"""Quantized expert weights for offloaded inference: int8 and fp8 (e4m3) with per-output-channel scales.

Shape legend: E experts, D model dim, F expert hidden width; a weight ``w_EIO`` maps I inputs to O
outputs (``w1_EDF``: I=D, O=F; ``w2_EFD``: I=F, O=D; ``w3_EDF`` like w1), as in
:class:`reference.moe.experts.ExpertWeights` (``y = x @ w``, input-major).

Scales are per output channel, i.e. per column ``(e, :, o)`` of each expert matrix, reduced over the
input dim I (dim -2), kept in fp32 with shape ``[E, 1, O]`` so that ``deq = q.float() * scale``
broadcasts and ``x @ deq == (x @ q) * scale`` (the scale can be applied after the GEMM, which is what a
fused int8 / ``torch._scaled_mm`` kernel does)::

    amax[e, o] = max_i |w[e, i, o]|                (0 -> scale 1, the column is all zeros)
    int8 (symmetric):  scale = amax / 127;  q = clamp(round(w / scale), -127, 127)   (int8, no -128)
    fp8 e4m3fn:        scale = amax / 448;  q = (w / scale).to(float8_e4m3fn)         (448 = e4m3 max)

Error bounds (element-wise, ``deq = q * scale`` in fp32; tested in
tests/reference/inference/test_quantize.py):

* int8: ``|w - deq| <= scale / 2`` (round to nearest of ``w / scale`` in [-127, 127], no clipping
  since ``|w / scale| <= 127``), up to the fp32 rounding of ``w / scale`` (at most 127 * 2^-24 * scale,
  < 3e-5 of the bound) and of the product ``q * scale`` when it is formed in fp32.
* fp8 e4m3: 3 mantissa bits, round to nearest even: ``|w - deq| <= 2^-4 |w|`` where
  ``|w / scale| >= 2^-6`` (normal range); below it (subnormals, spacing 2^-9)
  ``|w - deq| <= 2^-10 * scale`` (same fp32 slack). Nothing overflows because ``|w / scale| <= 448``.

Bytes: the quantized data is exactly half of bf16 (1 byte per element); the fp32 scales add
``4 * E * O`` bytes per matrix, i.e. a fraction ``2 / I`` of the int8 data, so a layer shrinks by
``2 I / (I + 4)`` against bf16 (1.88x for ``tiny``'s I=64, 1.998x for Mixtral's I=4096).
Biases (if any) stay in their original dtype (they are tiny).

What the ring / expert-aware integration needs (wired in reference/inference/ring.py and engine.py,
``InferConfig(quant="int8" | "fp8")``, see :class:`reference.inference.ring.ExpertPool`): the :class:`ExpertPool` keeps per slot the quantized ``data`` tensor
(int8 / fp8, ``[C, I, O]``) and the ``scale`` tensor (``[C, 1, O]``), copies both per block or expert
(:meth:`QuantizedLayer.nbytes` bytes instead of the bf16 layer bytes), and before the grouped GEMM
calls :func:`dequantize_into` into one preallocated bf16 ``[E, I, O]`` workspace per tensor (or, on the
H100, passes ``data`` and ``scale`` to an fp8 ``torch._scaled_mm`` / an int8 grouped GEMM that applies
the scale in its epilogue, removing the workspace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

QuantFormat = Literal["int8", "fp8"]
FORMATS: tuple[str, ...] = ("int8", "fp8")
INT8_MAX = 127.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_MIN_NORMAL = 2.0**-6  # smallest normal e4m3 magnitude
FP8_REL_ERR = 2.0**-4  # half an ulp relative to the value, 3 mantissa bits
FP8_SUBNORMAL_ABS_ERR = 2.0**-10  # half the subnormal spacing 2^-9, in units of scale
WEIGHT_TENSORS = ("w1_EDF", "w3_EDF", "w2_EFD")  # quantized; biases are kept as they are


@dataclass
class QuantizedTensor:
    """``data`` (int8 or float8_e4m3fn, the weight's shape) and fp32 ``scale`` (``[..., 1, O]``)."""

    data: Tensor
    scale: Tensor
    fmt: str
    dtype: torch.dtype  # of the original weight (what dequantize returns by default)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize(self, dtype)

    def to(self, device, non_blocking: bool = False) -> QuantizedTensor:
        return QuantizedTensor(self.data.to(device, non_blocking=non_blocking),
                               self.scale.to(device, non_blocking=non_blocking), self.fmt, self.dtype)

    def pin_memory(self) -> QuantizedTensor:
        return QuantizedTensor(pin(self.data), pin(self.scale), self.fmt, self.dtype)


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"quantize: format must be one of {FORMATS}, got {fmt!r}")


def channel_scale(w: Tensor, fmt: str) -> Tensor:
    """Per-output-channel scale ``amax / qmax`` (fp32, reduced over dim -2, keepdim); 1 for zero columns."""
    _check_fmt(fmt)
    if w.dim() < 2:
        raise ValueError(f"quantize: expected a weight of >= 2 dims [..., I, O], got shape {tuple(w.shape)}")
    amax = w.detach().float().abs().amax(dim=-2, keepdim=True)
    qmax = INT8_MAX if fmt == "int8" else FP8_MAX
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize(w: Tensor, fmt: QuantFormat) -> QuantizedTensor:
    """Quantize ``w [..., I, O]`` per output channel (see the module doc for formulas and bounds)."""
    scale = channel_scale(w, fmt)
    x = w.detach().float() / scale
    if fmt == "int8":
        data = x.round().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        data = x.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedTensor(k_major(data), scale.contiguous(), fmt, w.dtype)


def k_major(t: Tensor) -> Tensor:
    """``t [..., I, O]`` stored input-contiguous (physically ``[..., O, I]``, returned as the transposed
    view): each output column's I weights are adjacent, the layout of the weight operand of
    ``torch._scaled_mm`` / ``torch._scaled_grouped_mm`` ("column-major B") and a layout the fused int8
    GEMM (kernels/dequant_gemm.py) reads as well as row-major."""
    return t.mT.contiguous().mT


def raw(t: Tensor) -> Tensor:
    """The contiguous physical tensor behind a :func:`k_major` view (``t`` itself if contiguous):
    copies between two tensors of the same layout go through these (one plain memcpy)."""
    if t.dim() >= 2 and not t.is_contiguous() and t.mT.is_contiguous():
        return t.mT
    return t


def pin(t: Tensor) -> Tensor:
    """A pinned host copy that keeps ``t``'s strides (``Tensor.pin_memory`` would make it contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True).copy_(t)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> Tensor:
    """``q.data * q.scale`` (computed in fp32) as ``dtype`` (default: the original weight's dtype)."""
    return (q.data.float() * q.scale).to(dtype or q.dtype)


def dequantize_into(out: Tensor, q: QuantizedTensor) -> Tensor:
    """The ring's path: dequantize into a preallocated (device) buffer ``out`` of the weight's shape.

    No temporary of the weight's size: ``q`` is copied into ``out`` (exact: int8 and e4m3 values are
    representable in bf16 / fp16 / fp32), then ``out *= scale``, which PyTorch computes in fp32 (the
    common dtype with the fp32 scale) and rounds once to ``out.dtype``, the values of :func:`dequantize`.
    """
    if tuple(out.shape) != tuple(q.data.shape):
        raise ValueError(f"dequantize_into: out is {tuple(out.shape)}, quantized data is {tuple(q.data.shape)}")
    if out.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # fp64 would multiply in fp64
        return out.copy_(q.data.to(device=out.device, dtype=torch.float32) * q.scale.to(out.device))
    out.copy_(q.data)
    return out.mul_(q.scale.to(out.device, torch.float32))


def error_bound(w: Tensor, q: QuantizedTensor) -> Tensor:
    """The element-wise bound on ``|w - dequantize(q)|`` that the format guarantees (module doc)."""
    wf = w.detach().float()
    if q.fmt == "int8":
        return (q.scale / 2).expand_as(wf)
    normal = (wf / q.scale).abs() >= FP8_MIN_NORMAL
    return torch.where(normal, FP8_REL_ERR * wf.abs(), FP8_SUBNORMAL_ABS_ERR * q.scale.expand_as(wf))


# --------------------------------------------------------------------------- expert store layers
@dataclass
class QuantizedLayer:
    """One MoE block's expert tensors: weights quantized, biases (if any) kept as they were."""

    weights: dict[str, QuantizedTensor]
    others: dict[str, Tensor]
    fmt: str

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q in self.weights.values()) + sum(
            t.numel() * t.element_size() for t in self.others.values())

    @property
    def data_nbytes(self) -> int:
        return sum(q.data.numel() * q.data.element_size() for q in self.weights.values())

    def pin_memory(self) -> QuantizedLayer:
        """A copy in pinned host memory (what the ring copies from with ``non_blocking``)."""
        return QuantizedLayer({n: q.pin_memory() for n, q in self.weights.items()},
                              {n: pin(t) for n, t in self.others.items()}, self.fmt)

    def host_tensors(self) -> dict[str, Tensor]:
        """Flat ``{key: tensor [E, ...]}`` as the :class:`ExpertPool` keeps its slots: ``w1_EDF`` the
        quantized data, ``w1_EDF:scale`` its scale (:func:`scale_key`), biases under their own names."""
        out: dict[str, Tensor] = {}
        for n, q in self.weights.items():
            out[n], out[scale_key(n)] = q.data, q.scale
        out.update(self.others)
        return out

    def dequantize(self, dtype: torch.dtype | None = None, device=None) -> dict[str, Tensor]:
        """All expert tensors (ExpertWeights names) ready for compute; quantized bytes move to ``device`` first."""
        out = {n: dequantize(q.to(device) if device is not None else q, dtype) for n, q in self.weights.items()}
        out.update({n: t.to(device=device, dtype=dtype or t.dtype) for n, t in self.others.items()})
        return out


def scale_key(name: str) -> str:
    """The pool / host key of a quantized weight's scale tensor."""
    return f"{name}:scale"


def quantized_expert_bytes(table: dict[str, dict], experts: int) -> int:
    """Bytes of one quantized expert (1-byte data + fp32 scale per output column of each weight,
    biases as stored) from a store's expert tensor table (``ModelStore.expert_table``)."""
    n = 0
    for name, t in table.items():
        shape = t["shape"]
        if name in WEIGHT_TENSORS:
            numel = 1
            for s in shape:
                numel *= s
            n += numel + 4 * shape[0] * shape[-1]
        else:
            n += t["nbytes"]
    return n // experts


def quantize_layer(tensors: dict[str, Tensor], fmt: QuantFormat) -> QuantizedLayer:
    """Quantize a block's expert tensors (``{"w1_EDF": [E, D, F], ...}``, e.g. ``ModelStore.layer_views(b)``)."""
    _check_fmt(fmt)
    weights = {n: quantize(t, fmt) for n, t in tensors.items() if n in WEIGHT_TENSORS}
    if not weights:
        raise ValueError(f"quantize_layer: no expert weights among {sorted(tensors)}")
    others = {n: t.detach().clone() for n, t in tensors.items() if n not in WEIGHT_TENSORS}
    return QuantizedLayer(weights, others, fmt)


def quantize_store_layer(store, block: int, fmt: QuantFormat, device=None) -> QuantizedLayer:
    """Quantize block ``block`` of a loaded :class:`reference.inference.store.ModelStore`; with a
    ``device`` (e.g. cuda: seconds instead of minutes for Mixtral-sized blocks) the block is moved
    there, quantized, and the result moved back to host memory (same values, same layout)."""
    if block not in store.layer_buffers:
        raise ValueError(f"quantize_store_layer: block {block} is not an MoE block of the store ({store.moe_blocks})")
    views = store.layer_views(block)
    if device is None or torch.device(device).type == "cpu":
        return quantize_layer(views, fmt)
    ql = quantize_layer({n: t.to(device) for n, t in views.items()}, fmt)
    return QuantizedLayer({n: QuantizedTensor(q.data.to("cpu"), q.scale.to("cpu"), q.fmt, q.dtype)
                           for n, q in ql.weights.items()}, {n: t.to("cpu") for n, t in ql.others.items()}, fmt)


def quantize_store(store, fmt: QuantFormat) -> dict[int, QuantizedLayer]:
    """Every MoE block of a store, quantized (host memory)."""
    return {b: quantize_store_layer(store, b, fmt) for b in store.moe_blocks}


def expert_weight_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every routed-expert weight matrix of ``model`` (MoELayer.experts.w*_E**)."""
    out = []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if ".experts." in f".{name}" and leaf in WEIGHT_TENSORS and ".shared_experts." not in f".{name}":
            out.append((name, p))
    return out


@torch.no_grad()
def quantize_model_experts_(model: nn.Module, fmt: QuantFormat) -> dict[str, float]:
    """Replace every routed-expert weight of ``model`` in place by its quantize-dequantize round trip
    (what the ring would compute with); returns the max abs weight error per tensor name."""
    errs = {}
    for name, p in expert_weight_params(model):
        deq = dequantize(quantize(p, fmt), p.dtype)
        errs[name] = float((deq - p).abs().max())
        p.copy_(deq)
    if not errs:
        raise ValueError("quantize_model_experts_: the model has no routed expert weights")
    return errs
