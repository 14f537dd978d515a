"""A readable GPT-style decoder with MoE FFN blocks, built from a ModelSpec.

Shape legend: B batch, S sequence, D model dim, H heads, G key/value heads, Dh head dim, V vocab.

    idx_BS -> tok_emb (+ pos_emb) -> [Block] x layers -> norm -> head -> logits_BSV
    Block:  x = x + Attention(norm1(x));  x = x + FFN(norm2(x))   (pre-norm, GPT-2 / Llama style)
    FFN:    MoELayer every ``moe_every``-th block (semoe.ModelSpec.is_moe_layer), DenseFFN otherwise

Attention is causal ``scaled_dot_product_attention`` with grouped key/value heads (``kv_heads``) and
learned absolute positions or rotary embeddings (RoPE, Su et al. 2021). The parameter count equals
``semoe.sizing.count_params(spec).total`` exactly (tested).

The auxiliary losses of the MoE layers are returned by ``forward`` (never stored globally):
``aux_loss = sum_layers aux_loss_coef * (load_balance + other gate losses) + z_loss_coef * z_loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.moe.layer import STAT_KEYS, MoELayer
from semoe.model_spec import ModelSpec


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.hidden, eps=1e-6)
    return nn.LayerNorm(spec.hidden, bias=spec.bias)


def rope_tables(seq: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos/sin tables [S, Dh/2] for rotary embeddings (RoFormer, Su et al. 2021, eq. 34)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float64), inv)
    return ang.cos(), ang.sin()


def apply_rope(x_BHSDh: Tensor, cos_SDh2: Tensor, sin_SDh2: Tensor) -> Tensor:
    x1, x2 = x_BHSDh[..., 0::2], x_BHSDh[..., 1::2]
    cos, sin = cos_SDh2.to(x_BHSDh.dtype), sin_SDh2.to(x_BHSDh.dtype)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.n_kv_heads, spec.head_dim
        kv = self.kv_heads * self.head_dim
        self.qkv = nn.Linear(spec.hidden, spec.hidden + 2 * kv, bias=spec.bias)
        self.proj = nn.Linear(spec.hidden, spec.hidden, bias=spec.bias)

    def forward(self, x_BSD: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        B, S, D = x_BSD.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = self.qkv(x_BSD).split([D, kv, kv], dim=-1)
        q_BHSDh = q.view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k_BGSDh = k.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v_BGSDh = v.view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0][:S], rope[1][:S]
            q_BHSDh, k_BGSDh = apply_rope(q_BHSDh, cos, sin), apply_rope(k_BGSDh, cos, sin)
        y_BHSDh = F.scaled_dot_product_attention(
            q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        return self.proj(y_BHSDh.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    """The FFN of non-MoE blocks: GELU (w1, w2) or SwiGLU (w1, w3, w2), width ``dense_ffn``."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        width = spec.dense_ffn_width
        self.swiglu = spec.activation == "swiglu"
        self.w1 = nn.Linear(spec.hidden, width, bias=spec.bias)
        self.w3 = nn.Linear(spec.hidden, width, bias=spec.bias) if self.swiglu else None
        self.w2 = nn.Linear(width, spec.hidden, bias=spec.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.w1(x)) * self.w3(x) if self.swiglu else F.gelu(self.w1(x))
        return self.w2(h)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, index: int) -> None:
        super().__init__()
        self.index = index
        self.is_moe = spec.is_moe_layer(index)
        self.norm1 = make_norm(spec)
        self.attn = Attention(spec)
        self.norm2 = make_norm(spec)
        self.ffn: nn.Module = MoELayer(spec) if self.is_moe else DenseFFN(spec)

    def forward(
        self, x_BSD: Tensor, rope=None, token_ids_BS: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD), rope)
        h = self.norm2(x_BSD)
        if self.is_moe:
            y, aux = self.ffn(h, token_ids=token_ids_BS)
        else:
            y, aux = self.ffn(h), {}
        return x_BSD + y, aux


@dataclass
class ModelOutput:
    logits_BSV: Tensor
    loss: Tensor | None = None  # lm_loss + aux_loss (what to backpropagate)
    lm_loss: Tensor | None = None
    aux_loss: Tensor | None = None
    aux: list[dict[str, Tensor]] = field(default_factory=list)  # per MoE block, unscaled


class MoEDecoder(nn.Module):
    def __init__(self, spec: ModelSpec, seed: int | None = 0) -> None:
        super().__init__()
        self.spec = spec
        if seed is not None:
            torch.manual_seed(seed)
        self.tok_emb = nn.Embedding(spec.vocab, spec.hidden)
        self.pos_emb = nn.Embedding(spec.max_seq, spec.hidden) if spec.position == "learned" else None
        self.blocks = nn.ModuleList(Block(spec, i) for i in range(spec.layers))
        self.norm = make_norm(spec)
        self.head = None if spec.tied_embeddings else nn.Linear(spec.hidden, spec.vocab, bias=False)
        self._rope_cache: tuple[Tensor, Tensor] | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        std = 0.02
        for name, p in self.named_parameters():
            if ".ffn." in name and ".gate." not in name and ".router." not in name:
                continue  # MoE experts initialise themselves; dense FFN handled below
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.proj.weight, std=std / math.sqrt(2 * self.spec.layers))
            if isinstance(blk.ffn, DenseFFN):
                for lin in (blk.ffn.w1, blk.ffn.w3):
                    if lin is not None:
                        nn.init.normal_(lin.weight, std=std)
                nn.init.normal_(blk.ffn.w2.weight, std=std / math.sqrt(2 * self.spec.layers))

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def _rope(self, seq: int, device) -> tuple[Tensor, Tensor] | None:
        if self.spec.position != "rope":
            return None
        if self._rope_cache is None or self._rope_cache[0].shape[0] < seq or self._rope_cache[0].device != device:
            self._rope_cache = rope_tables(max(seq, 1), self.spec.head_dim, device=device)
        return self._rope_cache

    def forward(self, idx_BS: Tensor, targets_BS: Tensor | None = None) -> ModelOutput:
        B, S = idx_BS.shape
        if self.pos_emb is not None and S > self.spec.max_seq:
            raise ValueError(f"sequence length {S} exceeds max_seq ({self.spec.max_seq})")
        x = self.tok_emb(idx_BS)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(S, device=idx_BS.device))
        rope = self._rope(S, idx_BS.device)
        auxes: list[dict[str, Tensor]] = []
        for blk in self.blocks:
            x, aux = blk(x, rope, token_ids_BS=idx_BS)
            if blk.is_moe:
                auxes.append(aux)
        x = self.norm(x)
        logits = F.linear(x, self.tok_emb.weight) if self.head is None else self.head(x)
        out = ModelOutput(logits_BSV=logits, aux=auxes)
        if targets_BS is not None:
            # the loss in at least fp32 (bf16/fp16 logits are upcast; fp64 stays fp64)
            logits32 = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
            out.lm_loss = F.cross_entropy(logits32.flatten(0, 1), targets_BS.flatten())
            out.aux_loss = self.aux_loss(auxes, like=out.lm_loss)
            out.loss = out.lm_loss + out.aux_loss
        return out

    def aux_loss(self, auxes: list[dict[str, Tensor]], like: Tensor) -> Tensor:
        total = torch.zeros((), dtype=like.dtype, device=like.device)
        for aux in auxes:
            for key, val in aux.items():
                if key in STAT_KEYS:
                    continue  # statistics, not losses
                coef = self.spec.z_loss_coef if key == "z_loss" else self.spec.aux_loss_coef
                if coef:
                    total = total + coef * val.to(like.dtype)
        return total
