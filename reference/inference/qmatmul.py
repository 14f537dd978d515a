"""Expert FFNs computed straight from quantized weights (no dequantized bf16 copy of the weights).

Shape legend: N expert-sorted rows, E experts, I / O a matrix's input / output dim, F expert width.

``quant_grouped_ffn(x_ND, counts_E, w, fmt)`` is :func:`reference.inference.engine.grouped_ffn` with
``w`` the quantized pool views (``w1_EDF`` 1-byte data ``[E, I, O]`` stored k-major, ``w1_EDF:scale``
fp32 ``[E, 1, O]``, biases as stored). Each matrix product picks, once per process (a failing
launch is reported and the next option taken for good; ``IMPL_USED`` records what ran):

* fp8 on CUDA: ``torch._scaled_grouped_mm`` (one launch over all experts: e4m3 activations quantized
  per row, ``scale_a`` [N], ``scale_b`` = the per-channel weight scales [E, O], int32 offsets),
  else one ``torch._scaled_mm`` per non-empty expert (row-wise scales; needs the counts on the host),
  else dequantize;
* int8 on CUDA (or with ``TRITON_INTERPRET=1``), and fp8 when both ``_scaled_*mm`` failed: the Triton kernel :func:`kernels.dequant_gemm.dequant_gemm`
  (bytes converted in registers, per-column scale in the epilogue, bf16 activations unchanged);
  chosen over ``torch._int_mm`` because that needs int8 activations too (a second quantization
  error and a per-row dequant) and has no grouped form;
* otherwise (CPU): :func:`kernels.dequant_gemm.dequant_gemm_ref`, dequantize then GEMM (the reference).

Numerics: int8 weight-only equals dequantize-then-GEMM up to fp32 summation order. fp8 also
quantizes the activations (e4m3, per row: ``s_n = amax_n / 448``), adding a relative error of at
most 2^-4 per activation element (same bound as the weights, quantize.py), so the product errs by at
most ``(2^-4 + 2^-4 + 2^-8) sum_i |x_i| |w_io|`` against the unquantized product: tested on the CPU
with :func:`fp8_emulated` (the same formula in fp32) and on the GPU against it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.inference.quantize import FP8_DTYPE, FP8_MAX, scale_key

IMPL_USED: dict[str, str] = {}  # fmt -> the implementation that last ran
_BROKEN: set[str] = set()
_CHECKED: set[str] = set()
CHECK_REL_ERR = 0.05  # first call of each implementation: relative error allowed against its reference


def quantize_rows_fp8(x_ND: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row e4m3 activations: ``(q [N, I] e4m3, scale [N] fp32)`` with ``x ~= q * scale``."""
    amax = x_ND.detach().float().abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x_ND.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_emulated(x_ND: Tensor, data_EIO: Tensor, scale_E1O: Tensor, counts_E: Tensor) -> Tensor:
    """What the fp8 ``_scaled_mm`` paths compute, in fp32 on any device (CPU reference)."""
    q, s = quantize_rows_fp8(x_ND)
    xa = q.float() * s.unsqueeze(-1)
    out = torch.zeros(x_ND.shape[0], data_EIO.shape[-1], device=x_ND.device)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            out[start : start + n] = xa[start : start + n] @ (data_EIO[e].float() * scale_E1O[e].float())
        start += n
    return out.to(x_ND.dtype)


def _try(name: str, fn, ref_fn):
    """``fn()``, or None if it raised or (first call only) disagreed with ``ref_fn()``: then never again."""
    if name in _BROKEN:
        return None
    try:
        out = fn()
        if name not in _CHECKED:
            ref = ref_fn().float()
            err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            if not err <= CHECK_REL_ERR:
                raise RuntimeError(f"relative error {err:.3g} against the reference exceeds {CHECK_REL_ERR}")
            _CHECKED.add(name)
        return out
    except Exception as exc:  # noqa: BLE001 - an op missing in this torch / GPU: use the next option
        _BROKEN.add(name)
        warnings.warn(f"quantized GEMM: {name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                      "using the next implementation from now on", stacklevel=3)
        return None


def _fp8_grouped(x_ND: Tensor, data: Tensor, scale: Tensor, counts_E: Tensor) -> Tensor:
    q, s = quantize_rows_fp8(x_ND)
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    return torch._scaled_grouped_mm(q, data, s, scale.reshape(scale.shape[0], -1).contiguous(), offs=offs,
                                    out_dtype=x_ND.dtype)


def _fp8_loop(x_ND: Tensor, data: Tensor, scale: Tensor, counts_E: Tensor) -> Tensor:
    q, s = quantize_rows_fp8(x_ND)
    out = x_ND.new_zeros(x_ND.shape[0], data.shape[-1])
    start = 0
    for e, n in enumerate(counts_E.tolist()):  # host sync: the counts set the launches
        if n:
            out[start : start + n] = torch._scaled_mm(q[start : start + n], data[e], s[start : start + n, None].contiguous(),
                                                      scale[e].reshape(1, -1).contiguous(), out_dtype=x_ND.dtype)
        start += n
    return out


def quant_mm(x_ND: Tensor, data: Tensor, scale: Tensor, counts_E: Tensor, fmt: str) -> Tensor:
    """``x[rows of e] @ (data[e] * scale[e])`` for expert-sorted rows, from the quantized bytes."""
    from kernels._common import use_triton
    from kernels.dequant_gemm import dequant_gemm, dequant_gemm_ref

    if fmt == "fp8" and x_ND.is_cuda:
        emu = lambda: fp8_emulated(x_ND, data, scale, counts_E)  # noqa: E731
        out = _try("_scaled_grouped_mm", lambda: _fp8_grouped(x_ND, data, scale, counts_E), emu)
        if out is not None:
            IMPL_USED[fmt] = "scaled_grouped_mm"
            return out
        out = _try("_scaled_mm", lambda: _fp8_loop(x_ND, data, scale, counts_E), emu)
        if out is not None:
            IMPL_USED[fmt] = "scaled_mm_loop"
            return out
    if use_triton(x_ND, data) and (fmt == "int8" or x_ND.is_cuda):  # the interpreter has no fp8
        out = _try(f"triton_dequant_gemm_{fmt}", lambda: dequant_gemm(x_ND, data, scale, counts_E),
                   lambda: dequant_gemm_ref(x_ND, data, scale, counts_E))
        if out is not None:
            IMPL_USED[fmt] = "triton_dequant_gemm"
            return out
    IMPL_USED[fmt] = "dequant_ref"
    return dequant_gemm_ref(x_ND, data, scale, counts_E)


def quant_grouped_ffn(x_ND: Tensor, counts_E: Tensor, w: dict[str, Tensor], fmt: str) -> Tensor:
    """The grouped expert FFN (``engine.grouped_ffn`` math) from quantized pool views ``w``."""
    G = counts_E.shape[0]
    expert_N = None

    def mm(a: Tensor, name: str, bias: str) -> Tensor:
        out = quant_mm(a, w[name], w[scale_key(name)], counts_E, fmt)
        b = w.get(bias)
        if b is None:
            return out
        nonlocal expert_N
        if expert_N is None:
            expert_N = torch.repeat_interleave(torch.arange(G, device=a.device), counts_E, output_size=a.shape[0])
        return (out.float() + b.float().index_select(0, expert_N)).to(out.dtype)

    x_ND = x_ND.contiguous()
    h = mm(x_ND, "w1_EDF", "b1_EF")
    h = F.gelu(h) if "w3_EDF" not in w else F.silu(h) * mm(x_ND, "w3_EDF", "b3_EF")
    return mm(h.contiguous(), "w2_EFD", "b2_ED")
