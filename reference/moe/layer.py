"""The MoE layer: gate -> dispatch -> experts -> combine (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k, N routed rows.

Data flow (torchtitan ``MoE.forward``; Megatron-Core ``MoELayer``; shared experts as in
DeepSeekMoE, Dai et al. 2024, eq. 9: h = sum_i FFN_i^shared(u) + sum_i g_i FFN_i^routed(u))::

    x_BSD | x_TD --flatten--> x_TD
    routing = gate(x_TD, token_ids_T)                      reference.moe.router (a Routing)
    x_ND, tokens_per_expert_E, meta = dispatcher.dispatch(x_TD, routing)
    y_ND = experts(x_ND, tokens_per_expert_E)              GroupedExperts | SequentialExperts
    y_TD = dispatcher.combine(y_ND, meta)                  weighted sum over the kept top-k slots
    y_TD += sum_s shared_s(x_TD)                           spec.shared_experts always-on FFNs
    return y (input shape), aux

``aux`` holds the gate's auxiliary losses *unscaled* (e.g. ``load_balance``, ``z_loss``; the caller
multiplies by ``spec.aux_loss_coef`` / ``spec.z_loss_coef``) and the detached statistics in
:data:`STAT_KEYS`, which must not be added to the loss:

* ``dropped_fraction``: float scalar, share of the T*K assignment slots not kept (capacity drops;
  for expert choice, slots a token did not get);
* ``tokens_per_expert``: int64 [E], kept assignments per expert (the measured routing histogram).

A token whose slots were all dropped gets exactly the shared-expert output (0 without shared experts),
i.e. only the residual connection outside this layer carries it.
"""

from __future__ import annotations

import contextlib
import os

from typing import Literal

import torch
from torch import Tensor, nn

from reference.moe.dispatcher import Layout, LocalDispatcher
from reference.moe.experts import EXPERT_IMPLS, ExpertWeights, GroupedExperts, GroupedImpl
from semoe.model_spec import ModelSpec

STAT_KEYS: tuple[str, ...] = ("dropped_fraction", "tokens_per_expert")
ExpertsImpl = Literal["grouped", "sequential"]
Backend = Literal["torch", "triton", "auto"]
BACKENDS: tuple[str, ...] = ("torch", "triton", "auto")


@contextlib.contextmanager
def moe_backend_env(backend: str):
    """``SEMOE_MOE_BACKEND=backend`` for the ``with`` block (what ``auto`` resolves to, `resolve_backend`), the
    previous value (or its absence) restored after it."""
    old = os.environ.get("SEMOE_MOE_BACKEND")
    os.environ["SEMOE_MOE_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SEMOE_MOE_BACKEND", None)
        else:
            os.environ["SEMOE_MOE_BACKEND"] = old


def resolve_backend(backend: str) -> str:
    """``auto``: the environment variable ``SEMOE_MOE_BACKEND`` (``torch`` / ``triton``) when set (benchmarks
    use it to pick a backend without new flags everywhere), else the fastest available: ``triton`` on a CUDA
    GPU with Triton installed, else ``torch`` (results/bench/moe_layer.csv: the Triton path beats the torch
    grouped path on the H100)."""
    if backend != "auto":
        return backend
    env = os.environ.get("SEMOE_MOE_BACKEND", "")
    if env:
        if env not in ("torch", "triton"):
            raise ValueError(f"SEMOE_MOE_BACKEND must be torch or triton, got {env!r}")
        return env
    if not torch.cuda.is_available():
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


class MoELayer(nn.Module):
    """Mixture-of-experts FFN block of ``spec``.

    Args:
        spec: the model (hidden, ffn, experts, top_k, gate, capacity, activation, bias, shared_experts).
        experts_impl: ``"grouped"`` (fast path) or ``"sequential"`` (the oracle); same weight names,
            so ``state_dict`` loads across them.
        grouped_impl: ``GroupedExperts`` kernel choice (``"auto"``, ``"grouped_mm"``, ``"bmm"``, ``"loop"``).
        layout: dispatcher layout, ``"contiguous"`` ``[N, D]`` or ``"padded"`` ``[E, C, D]``.
        backend: ``"torch"`` (pure PyTorch, any device), ``"triton"`` (kernels/moe_ffn.py: Triton
            permute, grouped GEMMs with fused GELU, weighted unpermute, deterministic; used for the
            local dispatcher with the contiguous layout and bias-free experts, the torch path
            otherwise) or ``"auto"`` (the default: triton on a CUDA GPU, else torch).
        gate: a prebuilt gate (default ``build_gate(spec)``).
        seed: seeds the expert init (routed experts ``seed``, shared experts ``seed + 1``).
        dtype, device: of all parameters (default: torch defaults; ``spec.dtype`` is applied by the model).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        experts_impl: ExpertsImpl = "grouped",
        grouped_impl: GroupedImpl = "auto",
        layout: Layout = "contiguous",
        backend: Backend = "auto",
        gate: nn.Module | None = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(spec, ModelSpec):
            raise ValueError(f"MoELayer: spec must be a ModelSpec, got {type(spec).__name__}")
        if experts_impl not in EXPERT_IMPLS:
            raise ValueError(f"MoELayer: experts_impl must be one of {tuple(EXPERT_IMPLS)}, got {experts_impl!r}")
        self.spec = spec
        self.experts_impl = experts_impl
        if backend not in BACKENDS:
            raise ValueError(f"MoELayer: backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = resolve_backend(backend)
        if gate is None:
            from reference.moe.router import build_gate  # the gate registry lives beside the dispatcher

            gate = build_gate(spec)
        self.gate = gate
        self.dispatcher, self.experts = self._build_backend(backend, experts_impl, grouped_impl, layout, seed)
        self.shared_experts: ExpertWeights | None = None
        if spec.shared_experts:
            # runs on [S, T, D] (every token to every shared expert): one bmm in GroupedExperts
            self.shared_experts = EXPERT_IMPLS[experts_impl](
                spec.shared_experts, spec.hidden, spec.ffn, **self._ffn_kwargs(seed + 1)
            )
        if dtype is not None or device is not None:
            self.to(dtype=dtype, device=device)

    def _ffn_kwargs(self, seed: int) -> dict:
        s = self.spec
        return {"activation": s.activation, "bias": s.bias, "num_layers": s.layers, "seed": seed}

    def _build_backend(
        self, backend: str, experts_impl: str, grouped_impl: str, layout: str, seed: int
    ) -> tuple[LocalDispatcher, ExpertWeights]:
        """The backend switch: which dispatcher (permute/unpermute) and expert GEMMs run."""
        s = self.spec
        dispatcher = LocalDispatcher(s.experts, layout=layout)
        extra = {"impl": grouped_impl} if experts_impl == "grouped" else {}
        experts = EXPERT_IMPLS[experts_impl](s.experts, s.hidden, s.ffn, **self._ffn_kwargs(seed), **extra)
        return dispatcher, experts

    def _fused_triton_path(self) -> bool:
        """The Triton backend replaces dispatch + experts + combine when they are the local ones."""
        return (
            self.backend == "triton"
            and type(self.dispatcher) is LocalDispatcher
            and self.dispatcher.layout == "contiguous"
            and isinstance(self.experts, GroupedExperts)
            and not self.experts.has_bias
        )

    def extra_repr(self) -> str:
        return f"experts_impl={self.experts_impl!r}, backend={self.backend!r}, dispatcher={self.dispatcher!r}"

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``x_BSD`` or ``x_TD`` (and ``token_ids`` of shape ``x.shape[:-1]`` for the hash gate) ->
        (output of ``x``'s shape, aux losses and stats)."""
        D = self.spec.hidden
        if x.dim() not in (2, 3) or x.shape[-1] != D:
            raise ValueError(f"MoELayer: expected x of shape [B, S, {D}] or [T, {D}], got {tuple(x.shape)}")
        if token_ids is not None and tuple(token_ids.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"MoELayer: token_ids shape {tuple(token_ids.shape)} must equal x.shape[:-1] {tuple(x.shape[:-1])}"
            )
        x_TD = x.reshape(-1, D)
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)

        routing = self.gate(x_TD, token_ids_T)
        if self._fused_triton_path():
            from kernels.moe_ffn import moe_ffn

            e = self.experts
            w1, w2, w3, xin = e.w1_EDF, e.w2_EFD, e.w3_EDF, x_TD
            dev = x_TD.device.type
            if torch.is_autocast_enabled(dev):
                # autocast does not reach custom autograd functions: cast as it would for a matmul, or the
                # kernels run in fp32 without tensor cores (fp32 master weights, fp32 residual stream)
                amp = torch.get_autocast_dtype(dev)
                w1, w2, xin = w1.to(amp), w2.to(amp), xin.to(amp)
                w3 = w3.to(amp) if w3 is not None else None
            y_TD = moe_ffn(
                xin, routing.expert_ids_TK, routing.weights_TK, w1, w2, w3,
                activation=self.spec.activation, kept_TK=routing.kept_TK,
            )
            tokens_per_expert_E = routing.counts_E
        else:
            x_routed, tokens_per_expert_E, meta = self.dispatcher.dispatch(x_TD, routing)
            y_routed = self.experts(x_routed, tokens_per_expert_E)
            y_TD = self.dispatcher.combine(y_routed, meta)
            tokens_per_expert_E = meta.tokens_per_expert_E
        if self.shared_experts is not None:
            S = self.shared_experts.num_experts
            y_TD = y_TD + self.shared_experts(x_TD.unsqueeze(0).expand(S, -1, -1)).sum(0)

        aux = dict(routing.aux_losses)
        aux["dropped_fraction"] = (~routing.kept_TK).to(torch.float32).mean().detach()
        aux["tokens_per_expert"] = tokens_per_expert_E.detach()
        return y_TD.view(x.shape), aux
