"""Expert FFNs over expert-contiguous tokens: a slow oracle and a fast path sharing one weight layout.

Shape legend (torchtitan style): N routed rows (expert-contiguous, sum of ``tokens_per_expert_E``),
E experts, C rows per expert in the padded layout, D model dim, F expert hidden width.

Data flow (one expert ``e`` applied to its rows ``x_nD``), GELU or SwiGLU:

    gelu:    y = gelu(x @ w1[e] + b1[e]) @ w2[e] + b2[e]                        (exact erf GELU,
                                                             Hendrycks & Gimpel 2016, eq. GELU(x)=x*Phi(x))
    swiglu:  y = (silu(x @ w1[e] + b1[e]) * (x @ w3[e] + b3[e])) @ w2[e] + b2[e]
                                                             (Shazeer 2020, "GLU Variants", FFN_SwiGLU)

Weights are stacked per expert and stored input-major so that ``x @ w`` needs no transpose:
``w1_EDF``, ``w3_EDF`` (SwiGLU only), ``w2_EFD``, and with ``bias`` ``b1_EF``, ``b3_EF``, ``b2_ED``.
Parameter count per expert equals :func:`semoe.sizing.ffn_params` exactly.

Inputs come in two layouts (see :mod:`reference.moe.dispatcher`):

* contiguous ``x_ND`` with ``tokens_per_expert_E`` (rows of expert 0 first, then expert 1, ...);
* padded ``x_ECD`` (GShard / DeepSpeed capacity buffers); padding rows are computed and ignored by
  the combine.

:class:`SequentialExperts` is the plainly-correct oracle (Megatron-Core ``SequentialMLP``): a Python
loop, one expert at a time. :class:`GroupedExperts` is the fast path (torchtitan ``GroupedExperts``):
one ``torch._grouped_mm`` per matrix where that kernel runs, else a padded ``bmm`` or a loop.
Both derive from :class:`ExpertWeights`, so either loads the other's ``state_dict``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ActivationName = Literal["gelu", "swiglu"]
GroupedImpl = Literal["auto", "grouped_mm", "bmm", "loop"]
GROUPED_IMPLS: tuple[str, ...] = ("auto", "grouped_mm", "bmm", "loop")


def ffn(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor | None = None,
    b1: Tensor | None = None,
    b2: Tensor | None = None,
    b3: Tensor | None = None,
) -> Tensor:
    """One expert FFN on rows ``x [n, D]``: GELU when ``w3`` is None, else SwiGLU. Returns ``[n, D]``."""
    h = x @ w1
    if b1 is not None:
        h = h + b1
    if w3 is None:
        h = F.gelu(h)  # exact (erf) GELU, not the tanh approximation
    else:
        g = x @ w3
        if b3 is not None:
            g = g + b3
        h = F.silu(h) * g
    y = h @ w2
    if b2 is not None:
        y = y + b2
    return y


class ExpertWeights(nn.Module):
    """Stacked weights of ``num_experts`` FFNs (the layout both implementations share).

    Init (seeded, no global RNG use): ``w1``/``w3`` ~ N(0, init_std), ``w2`` ~ N(0, init_std /
    sqrt(2 * num_layers)) (GPT-2 scaled residual init, Radford et al. 2019; Megatron
    ``scaled_init_method_normal``), biases zero.
    """

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        ffn_hidden: int,
        *,
        activation: ActivationName = "gelu",
        bias: bool = False,
        init_std: float = 0.02,
        num_layers: int = 1,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("num_experts", num_experts), ("hidden", hidden), ("ffn_hidden", ffn_hidden)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"{type(self).__name__}: activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.num_experts, self.hidden, self.ffn_hidden = num_experts, hidden, ffn_hidden
        self.activation, self.has_bias = activation, bias
        self.init_std, self.num_layers, self.seed = init_std, num_layers, seed
        E, D, Fh = num_experts, hidden, ffn_hidden
        kw = {"dtype": dtype, "device": device}
        self.w1_EDF = nn.Parameter(torch.empty(E, D, Fh, **kw))
        self.w2_EFD = nn.Parameter(torch.empty(E, Fh, D, **kw))
        self.w3_EDF = nn.Parameter(torch.empty(E, D, Fh, **kw)) if activation == "swiglu" else None
        self.b1_EF = nn.Parameter(torch.empty(E, Fh, **kw)) if bias else None
        self.b2_ED = nn.Parameter(torch.empty(E, D, **kw)) if bias else None
        self.b3_EF = nn.Parameter(torch.empty(E, Fh, **kw)) if bias and activation == "swiglu" else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-initialise from ``seed`` (default: the constructor's) with a private generator."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed if seed is None else seed)
        out_std = self.init_std / math.sqrt(2 * self.num_layers)
        for p, std in ((self.w1_EDF, self.init_std), (self.w3_EDF, self.init_std), (self.w2_EFD, out_std)):
            if p is not None:  # draw on the CPU in fp64 so every dtype/device gets the same values
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
        for b in (self.b1_EF, self.b2_ED, self.b3_EF):
            if b is not None:
                b.zero_()

    def expert_weights(self, e: int) -> dict[str, Tensor | None]:
        """Weights of expert ``e`` as keyword arguments of :func:`ffn`."""

        def pick(p: Tensor | None) -> Tensor | None:
            return None if p is None else p[e]

        return {
            "w1": self.w1_EDF[e],
            "w2": self.w2_EFD[e],
            "w3": pick(self.w3_EDF),
            "b1": pick(self.b1_EF),
            "b2": pick(self.b2_ED),
            "b3": pick(self.b3_EF),
        }

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden}, ffn={self.ffn_hidden}, "
            f"activation={self.activation}, bias={self.has_bias}"
        )

    # --------------------------------------------------------------------------- input checks
    def _check_input(self, x: Tensor, tokens_per_expert_E: Tensor | None) -> None:
        name = type(self).__name__
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden:
            raise ValueError(
                f"{name}: expected x_ND [N, {self.hidden}] or x_ECD [{self.num_experts}, C, {self.hidden}], "
                f"got shape {tuple(x.shape)}"
            )
        if x.dim() == 3 and x.shape[0] != self.num_experts:
            raise ValueError(f"{name}: padded input has {x.shape[0]} experts, expected {self.num_experts}")
        if x.dtype != self.w1_EDF.dtype:
            raise ValueError(f"{name}: x dtype {x.dtype} differs from the weights' dtype {self.w1_EDF.dtype}")
        if x.dim() == 2:
            if tokens_per_expert_E is None:
                raise ValueError(f"{name}: contiguous input x_ND needs tokens_per_expert_E")
            if tuple(tokens_per_expert_E.shape) != (self.num_experts,):
                raise ValueError(
                    f"{name}: tokens_per_expert_E must have shape ({self.num_experts},), "
                    f"got {tuple(tokens_per_expert_E.shape)}"
                )


class SequentialExperts(ExpertWeights):
    """The oracle: a Python loop over experts, one plain FFN each (kept slow on purpose).

    ``forward(x_ND, tokens_per_expert_E) -> y_ND`` or ``forward(x_ECD) -> y_ECD``.
    """

    def forward(self, x: Tensor, tokens_per_expert_E: Tensor | None = None) -> Tensor:
        self._check_input(x, tokens_per_expert_E)
        if x.dim() == 3:
            return torch.stack([ffn(x[e], **self.expert_weights(e)) for e in range(self.num_experts)])
        counts = [int(c) for c in tokens_per_expert_E.tolist()]
        if sum(counts) != x.shape[0]:
            raise ValueError(f"SequentialExperts: tokens_per_expert_E sums to {sum(counts)}, x has {x.shape[0]} rows")
        outs, start = [], 0
        for e, n in enumerate(counts):
            outs.append(ffn(x[start : start + n], **self.expert_weights(e)))
            start += n
        return torch.cat(outs) if outs else x.new_zeros(0, self.hidden)


def grouped_mm_supported(x: Tensor, *widths: int, num_groups: int = 1) -> bool:
    """Whether ``torch._grouped_mm`` runs for rows ``x``, matrices with inner sizes ``widths`` and
    ``num_groups`` experts.

    Constraints of torch 2.11-2.13 (``_meta_grouped_mm_common`` in torch/_meta_registrations.py, the
    CUDA kernel in aten/src/ATen/native/cuda/Blas.cpp, ``torch.nn.functional.grouped_mm`` docs): CUDA
    needs bf16 on SM >= 80 (fp8 only through the scaled variant); the CPU fallback takes fp32/bf16/fp16;
    every row stride must be a multiple of 16 bytes; offsets are int32; no bias; at least one row
    (zero rows fail in backward) and fewer than 1024 groups (the CUTLASS bf16 kernel's cap).
    """
    if not hasattr(torch, "_grouped_mm") or x.dim() != 2 or x.shape[0] == 0 or num_groups >= 1024:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    align = 16 // x.element_size()
    return all(w % align == 0 for w in (x.shape[1], *widths))


def _offsets(tokens_per_expert_E: Tensor) -> Tensor:
    return torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)


class GroupedExperts(ExpertWeights):
    """The fast path: all experts in one grouped GEMM per weight matrix.

    ``impl``: ``"grouped_mm"`` (``torch._grouped_mm`` with int32 offsets; bias added per row),
    ``"bmm"`` (scatter rows into a padded ``[E, max_count, D]`` buffer, ``torch.bmm``, gather back),
    ``"loop"`` (torchtitan's for-loop fallback over ``torch.split``), or ``"auto"``: grouped_mm when
    :func:`grouped_mm_supported`, else loop. A padded input ``x_ECD`` always runs as one bmm.
    """

    def __init__(self, *args, impl: GroupedImpl = "auto", **kwargs) -> None:
        if impl not in GROUPED_IMPLS:
            raise ValueError(f"GroupedExperts: impl must be one of {GROUPED_IMPLS}, got {impl!r}")
        super().__init__(*args, **kwargs)
        self.impl = impl

    def forward(self, x: Tensor, tokens_per_expert_E: Tensor | None = None) -> Tensor:
        self._check_input(x, tokens_per_expert_E)
        if x.dim() == 3:
            return self._forward_bmm(x)
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.is_floating_point():
            # autocast does not cover torch._grouped_mm, and the residual stream arrives in fp32: without this
            # cast a bf16 run on CUDA takes the loop path in fp32 (results/profiles/train_profile_h100.csv)
            x = x.to(torch.get_autocast_dtype(dev))
        impl = self.impl
        if impl in ("auto", "grouped_mm"):
            ok = grouped_mm_supported(x, self.ffn_hidden, num_groups=self.num_experts)
            if impl == "grouped_mm" and not ok:
                raise ValueError(
                    f"GroupedExperts: torch._grouped_mm does not support {x.dtype} on {x.device.type} with "
                    f"D={self.hidden}, F={self.ffn_hidden}, N={x.shape[0]} (see grouped_mm_supported)"
                )
            impl = "grouped_mm" if ok else "loop"
        if impl == "grouped_mm":
            return self._forward_grouped_mm(x, tokens_per_expert_E)
        if impl == "bmm":
            return self._forward_padded(x, tokens_per_expert_E)
        return self._forward_loop(x, tokens_per_expert_E)

    # ------------------------------------------------------------------------------ impls
    def _forward_grouped_mm(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        # no host sync here: tokens_per_expert_E must sum to N (the dispatcher guarantees it)
        offs = _offsets(tokens_per_expert_E)
        expert_N = None
        if self.has_bias:  # grouped_mm takes no bias: add each row's expert bias
            expert_N = torch.repeat_interleave(
                torch.arange(self.num_experts, device=x_ND.device), tokens_per_expert_E, output_size=x_ND.shape[0]
            )

        def mm(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            out = torch._grouped_mm(a, w if w.dtype == a.dtype else w.to(a.dtype), offs=offs)
            if b is None:
                return out
            # in fp32 so that the bias gradient (a scatter-add over N rows) accumulates in fp32
            return (out.float() + b.float().index_select(0, expert_N)).to(out.dtype)

        x_ND = x_ND.contiguous()  # row strides must be 16-byte multiples
        h_NF = mm(x_ND, self.w1_EDF, self.b1_EF)
        if self.w3_EDF is None:
            h_NF = F.gelu(h_NF)
        else:
            h_NF = F.silu(h_NF) * mm(x_ND, self.w3_EDF, self.b3_EF)
        return mm(h_NF, self.w2_EFD, self.b2_ED)

    def _forward_bmm(self, x_ECD: Tensor) -> Tensor:
        def mm(a: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return torch.bmm(a, w) if b is None else torch.baddbmm(b.unsqueeze(1), a, w)

        h_ECF = mm(x_ECD, self.w1_EDF, self.b1_EF)
        if self.w3_EDF is None:
            h_ECF = F.gelu(h_ECF)
        else:
            h_ECF = F.silu(h_ECF) * mm(x_ECD, self.w3_EDF, self.b3_EF)
        return mm(h_ECF, self.w2_EFD, self.b2_ED)

    def _forward_padded(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        E, N, D = self.num_experts, x_ND.shape[0], self.hidden
        C = max(int(tokens_per_expert_E.max()), 1) if N else 1
        start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
        expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), tokens_per_expert_E, output_size=N)
        rows_N = torch.arange(N, device=x_ND.device) - start_E[expert_N] + expert_N * C  # e * C + slot
        x_ECD = x_ND.new_zeros(E * C, D).index_copy(0, rows_N, x_ND).view(E, C, D)
        return self._forward_bmm(x_ECD).reshape(E * C, D).index_select(0, rows_N)

    def _forward_loop(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        counts = tokens_per_expert_E.tolist()
        if sum(counts) != x_ND.shape[0]:
            raise ValueError(f"GroupedExperts: tokens_per_expert_E sums to {sum(counts)}, x has {x_ND.shape[0]} rows")
        chunks = torch.split(x_ND, counts)
        outs = [ffn(chunk, **self.expert_weights(e)) for e, chunk in enumerate(chunks)]
        return torch.cat(outs) if outs else x_ND.new_zeros(0, self.hidden)


EXPERT_IMPLS: dict[str, type[ExpertWeights]] = {"grouped": GroupedExperts, "sequential": SequentialExperts}
