"""The dense part of :class:`reference.model.MoEDecoder` with a KV-cache-aware forward.

Shape legend: B batch, S new tokens, P past tokens (cache length), D model dim, H heads, G key/value
heads, Dh head dim, V vocab, T = B*S tokens, E experts, N routed rows.

Built from the reference's own modules (``Attention``, ``DenseFFN``, norms, the gate registry) under
the same parameter names as ``MoEDecoder.state_dict()`` minus ``blocks.<i>.ffn.experts.*``, so a
store's dense file loads with ``load_state_dict(strict=True)``. The routed experts are not part of
this module: each MoE block asks an *expert provider* (ring, expert-aware or resident, see
:mod:`reference.inference.engine`) for the expert output.

Forward of S new tokens at positions P..P+S-1 (prefill: P = 0; decode: S = 1)::

    x = tok_emb(idx_BS) (+ pos_emb[P:P+S])
    per block i:  q, k, v = split(attn.qkv(norm1(x)));  RoPE at positions P..P+S-1
                  cache.k[i][:, :, P:P+S] = k;  cache.v[i][:, :, P:P+S] = v
                  y = sdpa(q, cache.k[i][:, :, :P+S], cache.v[i][:, :, :P+S], causal from P)
                  x = x + attn.proj(y);  x = x + ffn(norm2(x))
    logits = head(norm(x))   (all positions, or only the last)

With P = 0 and the full sequence this is exactly ``MoEDecoder.forward`` (same ops in the same order);
decoding with the cache gives the same logits up to floating-point reassociation in attention
(tested). Routing equivalence needs a per-token gate (dropless token choice: the default ``topk``
without ``capacity_factor``): with capacity or expert choice a token's experts depend on the other
tokens of the same forward call, which differ between a full forward and one decode step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from reference.model import Attention, DenseFFN, apply_rope, make_norm, rope_tables
from reference.moe.experts import GroupedExperts
from reference.moe.router import build_gate
from semoe.model_spec import ModelSpec


class MoEDense(nn.Module):
    """The resident part of an MoE block's FFN: the gate (router) and the shared experts."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.gate = build_gate(spec)
        self.shared_experts = None
        if spec.shared_experts:
            self.shared_experts = GroupedExperts(
                spec.shared_experts, spec.hidden, spec.ffn, activation=spec.activation, bias=spec.bias,
                num_layers=spec.layers, seed=1,
            )


class InferBlock(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.index = index
        self.is_moe = spec.is_moe_layer(index)
        self.norm1 = make_norm(spec)
        self.attn = Attention(spec)
        self.norm2 = make_norm(spec)
        self.ffn: nn.Module = MoEDense(spec) if self.is_moe else DenseFFN(spec)


class KVCache:
    """Keys and values of every block, ``[B, G, max_len, Dh]`` each, filled up to ``length``."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device, dtype: torch.dtype) -> None:
        shape = (batch, spec.n_kv_heads, max_len, spec.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(spec.layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(spec.layers)]
        self.batch, self.max_len, self.length = batch, max_len, 0

    @staticmethod
    def nbytes_for(spec: ModelSpec, batch: int, max_len: int, element_size: int) -> int:
        return 2 * spec.layers * batch * spec.n_kv_heads * max_len * spec.head_dim * element_size


# Attention over the KV cache (decode): the key length grows by one every step, and backends that
# build a plan per shape (cuDNN) would rebuild it every step; None: PyTorch's default choice.
DECODE_SDPA_BACKENDS: list[SDPBackend] | None = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
]

# MoE expert provider: (block index, normed hidden x_TD, the block's MoEDense, token ids) -> y_TD
ExpertFn = Callable[[int, Tensor, MoEDense, Tensor | None], Tensor]


class InferenceModel(nn.Module):
    """Everything of an MoEDecoder but the routed experts; see the module docstring."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.tok_emb = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_emb = nn.Embedding(spec.max_seq, spec.hidden) if spec.position == "learned" else None
        self.blocks = nn.ModuleList(InferBlock(spec, i) for i in range(spec.layers))
        self.norm = make_norm(spec)
        self.head = None if spec.tied_embeddings else nn.Linear(spec.hidden, spec.vocab, bias=False)
        self._rope: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> None:
        """MoEDecoder's init (GPT-2: N(0, 0.02), residual projections / sqrt(2 layers)), seeded."""
        gen = torch.Generator(device=self.tok_emb.weight.device).manual_seed(seed)
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
        for blk in self.blocks:
            blk.attn.proj.weight.normal_(0.0, std / (2 * self.spec.layers) ** 0.5, generator=gen)
            if isinstance(blk.ffn, DenseFFN):
                blk.ffn.w2.weight.normal_(0.0, std / (2 * self.spec.layers) ** 0.5, generator=gen)

    def rope(self, length: int, device) -> tuple[Tensor, Tensor] | None:
        if self.spec.position != "rope":
            return None
        if self._rope is None or self._rope[0].shape[0] < length or self._rope[0].device != torch.device(device):
            self._rope = rope_tables(max(length, 1), self.spec.head_dim, device=device)
        return self._rope

    def attention(self, blk: InferBlock, h_BSD: Tensor, cache: KVCache | None, start: int, rope) -> Tensor:
        attn = blk.attn
        B, S, D = h_BSD.shape
        kv = attn.kv_heads * attn.head_dim
        q, k, v = attn.qkv(h_BSD).split([D, kv, kv], dim=-1)
        q_BHSDh = q.view(B, S, attn.heads, attn.head_dim).transpose(1, 2)
        k_BGSDh = k.view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v_BGSDh = v.view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0][start : start + S], rope[1][start : start + S]
            q_BHSDh, k_BGSDh = apply_rope(q_BHSDh, cos, sin), apply_rope(k_BGSDh, cos, sin)
        gqa = attn.kv_heads != attn.heads
        if cache is not None:
            cache.k[blk.index][:, :, start : start + S] = k_BGSDh
            cache.v[blk.index][:, :, start : start + S] = v_BGSDh
        if start == 0:  # prefill: exactly the reference's call
            y = F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True, enable_gqa=gqa)
        else:
            keys, vals = cache.k[blk.index][:, :, : start + S], cache.v[blk.index][:, :, : start + S]
            mask = None
            if S > 1:  # new token i sees keys 0..start+i
                pos = torch.arange(start + S, device=h_BSD.device)
                mask = pos.unsqueeze(0) <= (start + torch.arange(S, device=h_BSD.device)).unsqueeze(1)
            ctx = sdpa_kernel(DECODE_SDPA_BACKENDS) if DECODE_SDPA_BACKENDS and h_BSD.is_cuda else contextlib.nullcontext()
            with ctx:
                y = F.scaled_dot_product_attention(q_BHSDh, keys, vals, attn_mask=mask, enable_gqa=gqa)
        return attn.proj(y.transpose(1, 2).reshape(B, S, D))

    def forward(
        self,
        idx_BS: Tensor,
        experts: ExpertFn,
        cache: KVCache | None = None,
        start: int = 0,
        all_logits: bool = True,
        on_block: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Logits ``[B, S, V]`` (``[B, 1, V]`` with ``all_logits=False``) of tokens at ``start..``.

        ``on_block(i, x_BSD)`` is called after block ``i`` (residual stream), e.g. to prefetch."""
        B, S = idx_BS.shape
        if start and cache is None:
            raise ValueError("InferenceModel: start > 0 needs a KV cache")
        if cache is not None and start + S > cache.max_len:
            raise ValueError(f"InferenceModel: {start + S} tokens exceed the KV cache ({cache.max_len})")
        if self.pos_emb is not None and start + S > self.spec.max_seq:
            raise ValueError(f"sequence length {start + S} exceeds max_seq ({self.spec.max_seq})")
        x = self.tok_emb(idx_BS)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + S, device=idx_BS.device))
        rope = self.rope(start + S, idx_BS.device)
        for blk in self.blocks:
            x = x + self.attention(blk, blk.norm1(x), cache, start, rope)
            h = blk.norm2(x)
            if blk.is_moe:
                y_TD = experts(blk.index, h.reshape(-1, self.spec.hidden), blk.ffn, idx_BS.reshape(-1))
                if blk.ffn.shared_experts is not None:
                    h_TD = h.reshape(-1, self.spec.hidden)
                    n = blk.ffn.shared_experts.num_experts
                    y_TD = y_TD + blk.ffn.shared_experts(h_TD.unsqueeze(0).expand(n, -1, -1)).sum(0)
                x = x + y_TD.view(h.shape)
            else:
                x = x + blk.ffn(h)
            if on_block is not None:
                on_block(blk.index, x)
        if cache is not None:
            cache.length = start + S
        if not all_logits:
            x = x[:, -1:]
        x = self.norm(x)
        return F.linear(x, self.tok_emb.weight) if self.head is None else self.head(x)
