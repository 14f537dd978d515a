"""Static-shape forward of the inference model, for ``torch.compile`` (no graph breaks) and ``torch.export``.

Shape legend: B batch, S new tokens, L_max cache length (``max_len``), D model dim, H heads, G kv heads,
Dh head dim, V vocab, T = B*S tokens, K top-k, N = T*K routed rows, E experts, F expert width.

The eager engine (:mod:`reference.inference.engine`) has data-dependent shapes and host syncs: the
dispatcher counts kept rows on the host (``int(counts.sum())``), the gate's aux losses use
``bincount``, and decode slices the KV cache to a length that grows every step (a new shape per
step). A compiler sees a graph break or a recompilation at each of these. Here every shape depends
only on (B, S):

* routing (:func:`route_topk`): the ``topk`` gate's logits / softmax / top-k / renormalisation
  (``Gate._finish`` without capacity), no aux losses; every slot is kept (dropless token choice), so
  N = T*K is static;
* dispatch (:func:`moe_static`): stable sort of the T*K expert ids (the same order as
  ``LocalDispatcher``), ``counts_E`` by ``scatter_add`` (static [E]), gather rows, one grouped FFN
  (``torch._grouped_mm`` with device offsets, :func:`grouped_ffn_static`), weighted scatter back and
  sum over K: the ops of ``LocalDispatcher.dispatch/combine`` in the same order, minus the host sync;
* attention (:class:`StaticCache`, gpt-fast style): the KV cache is a module buffer
  ``[L, B, G, L_max, Dh]`` written with ``index_copy_`` at positions ``pos_S`` (a tensor); prefill
  (``pos = 0..S-1``) attends causally over its own keys exactly as the eager prefill; decode attends
  over the whole cache with the mask ``key <= pos`` (masked keys get probability exactly 0), so one
  decode graph serves every step and CUDA graphs (``mode="reduce-overhead"``) can replay it.

What is compiled (see NOTES.md "Static graph"):

* resident mode: the whole model, :class:`StaticModel` (prefill graph dynamic in S, decode graph S=1);
* ring / expert modes: per block, :func:`attention_block` (norm1, attention with the static cache,
  residual, norm2) and :func:`moe_static` on the weights the ring supplies; the Python between them
  (acquire: wait for the slot's copy; release: record the event, issue the next copy) stays eager.

``torch.export`` (:func:`export_model`): :class:`ExportModel`, the full-sequence forward without a
cache (``MoEDecoder.forward`` logits), with dynamic batch and sequence length (``torch.export.Dim``).

Supported models: the ``topk`` gate without capacity (the inference default). Other gates raise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reference.inference.model import DECODE_SDPA_BACKENDS, InferBlock, InferenceModel
from reference.model import apply_rope, rope_tables
from reference.moe.experts import ffn, grouped_mm_supported
from semoe.model_spec import ModelSpec

__all__ = [
    "StaticCache", "StaticModel", "ExportModel", "route_topk", "moe_static", "grouped_ffn_static",
    "attention_block", "check_static_spec", "export_model", "DECODE_SDPA_BACKENDS",
]


def check_static_spec(spec: ModelSpec) -> None:
    """The static forward needs the dropless ``topk`` gate (one line error otherwise)."""
    if spec.gate != "topk" or spec.capacity_factor is not None:
        raise ValueError(f"static graph: needs gate 'topk' without capacity_factor, got gate {spec.gate!r} "
                         f"capacity_factor {spec.capacity_factor}")


# ------------------------------------------------------------------------------------- MoE part
def route_topk(gate: nn.Module, x_TD: Tensor) -> tuple[Tensor, Tensor]:
    """``(ids_TK, weights_TK)`` of the ``topk`` gate: ``Gate.logits`` (fp32), softmax, top-k,
    renormalised over the k kept slots iff ``gate.renormalize`` (clamped by eps, as ``Gate._finish``)."""
    probs_TE = gate.logits(x_TD).softmax(dim=-1)
    w_TK, ids_TK = probs_TE.topk(gate.top_k, dim=-1)
    if gate.renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(w_TK.dtype).eps)
    return ids_TK, w_TK


def grouped_ffn_static(x_ND: Tensor, counts_E: Tensor, w: dict[str, Tensor], expert_fn=None) -> Tensor:
    """Expert FFNs over expert-sorted rows without host syncs. ``expert_fn(x_ND, counts_E, w)``
    overrides the matrix products (quantized experts); else ``torch._grouped_mm`` for bf16 (its meta
    function, which the compiler traces, takes bf16 only, though the CPU kernel runs fp32 too), or every
    expert over all rows masked to its own (E x the work: the fp32 / CPU path of the tests)."""
    if expert_fn is not None:
        return expert_fn(x_ND, counts_E, w)
    w1 = w["w1_EDF"]
    E = counts_E.shape[0]
    if x_ND.dtype == torch.bfloat16 and grouped_mm_supported(x_ND, w1.shape[-1], num_groups=E):
        from reference.inference.engine import grouped_ffn

        return grouped_ffn(x_ND, counts_E, w)
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=x_ND.shape[0])
    out = x_ND.new_zeros(x_ND.shape[0], w["w2_EFD"].shape[-1])
    for e in range(E):
        pick = {k: (None if w.get(k) is None else w[k][e]) for k in ("w3_EDF", "b1_EF", "b2_ED", "b3_EF")}
        y = ffn(x_ND, w1[e], w["w2_EFD"][e], pick["w3_EDF"], pick["b1_EF"], pick["b2_ED"], pick["b3_EF"])
        out = torch.where((expert_N == e).unsqueeze(-1), y, out)
    return out


def moe_static(x_TD: Tensor, gate: nn.Module, w: dict[str, Tensor], expert_fn=None) -> Tensor:
    """Routed experts of one block, static shapes: route, sort, grouped FFN, weighted combine."""
    ids_TK, w_TK = route_topk(gate, x_TD)
    T, K = ids_TK.shape
    E = gate.num_experts
    flat = ids_TK.reshape(-1)
    order_N = torch.sort(flat, stable=True).indices  # (expert, token, slot) order, as LocalDispatcher
    counts_E = torch.zeros(E, dtype=torch.long, device=x_TD.device).scatter_add_(0, flat, torch.ones_like(flat))
    x_ND = x_TD.index_select(0, torch.div(order_N, K, rounding_mode="floor"))
    y_ND = grouped_ffn_static(x_ND, counts_E, w, expert_fn)
    y_ND = y_ND * w_TK.reshape(-1)[order_N].to(y_ND.dtype).unsqueeze(-1)
    y_TKD = y_ND.new_zeros(T * K, y_ND.shape[-1]).index_copy(0, order_N, y_ND)
    return y_TKD.view(T, K, -1).sum(dim=1)


def shared_and_routed(blk: InferBlock, h_BSD: Tensor, w: dict[str, Tensor], expert_fn=None) -> Tensor:
    """A MoE block's FFN output (routed + shared experts) for normed ``h``, as ``InferenceModel.forward``."""
    D = h_BSD.shape[-1]
    h_TD = h_BSD.reshape(-1, D)
    y_TD = moe_static(h_TD, blk.ffn.gate, w, expert_fn)
    if blk.ffn.shared_experts is not None:
        n = blk.ffn.shared_experts.num_experts
        y_TD = y_TD + blk.ffn.shared_experts(h_TD.unsqueeze(0).expand(n, -1, -1)).sum(0)
    return y_TD.view(h_BSD.shape)


# ------------------------------------------------------------------------------------ attention
class StaticCache(nn.Module):
    """KV cache buffers ``k, v: [L, B, G, L_max, Dh]`` (module buffers: fixed addresses for CUDA graphs)."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, device, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (spec.layers, batch, spec.n_kv_heads, max_len, spec.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.batch, self.max_len = batch, max_len


def attention_block(blk: InferBlock, x_BSD: Tensor, k_cache: Tensor, v_cache: Tensor, pos_S: Tensor,
                    rope: tuple[Tensor, Tensor] | None, prefill: bool) -> tuple[Tensor, Tensor]:
    """``x + attn(norm1(x))`` and ``norm2`` of it; writes k, v at ``pos_S`` into ``k_cache``/``v_cache``
    (``[B, G, L_max, Dh]``). Prefill: causal over the S new keys (``pos_S = 0..S-1``, the eager
    prefill's call); decode: all L_max keys with ``key <= pos`` (static shape)."""
    attn = blk.attn
    B, S, D = x_BSD.shape
    kv = attn.kv_heads * attn.head_dim
    q, k, v = attn.qkv(blk.norm1(x_BSD)).split([D, kv, kv], dim=-1)
    q = q.view(B, S, attn.heads, attn.head_dim).transpose(1, 2)
    k = k.view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
    v = v.view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
    if rope is not None:
        cos, sin = rope[0].index_select(0, pos_S), rope[1].index_select(0, pos_S)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    gqa = attn.kv_heads != attn.heads
    k_cache.index_copy_(2, pos_S, k.to(k_cache.dtype))
    v_cache.index_copy_(2, pos_S, v.to(v_cache.dtype))
    if prefill:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        keys = torch.arange(k_cache.shape[2], device=x_BSD.device)
        mask = keys.unsqueeze(0) <= pos_S.unsqueeze(1)  # [S, L_max]
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=gqa)
    x_BSD = x_BSD + attn.proj(y.transpose(1, 2).reshape(B, S, D))
    return x_BSD, blk.norm2(x_BSD)


def embed(model: InferenceModel, idx_BS: Tensor, pos_S: Tensor) -> Tensor:
    x = model.tok_emb(idx_BS)
    if model.pos_emb is not None:
        x = x + model.pos_emb(pos_S)
    return x


def head(model: InferenceModel, x_BSD: Tensor, all_logits: bool) -> Tensor:
    if not all_logits:
        x_BSD = x_BSD[:, -1:]
    x_BSD = model.norm(x_BSD)
    return F.linear(x_BSD, model.tok_emb.weight) if model.head is None else model.head(x_BSD)


# ----------------------------------------------------------------------------- whole model
def register_experts(mod: nn.Module, experts: dict[int, dict[str, Tensor]]) -> dict[int, list[str]]:
    """Expert tensors as (non-persistent) buffers ``e{block}_{name}``: no copy, fixed addresses."""
    names = {}
    for i, w in experts.items():
        names[i] = sorted(k for k, t in w.items() if t is not None)
        for n in names[i]:
            mod.register_buffer(f"e{i}_{n}", w[n], persistent=False)
    return names


def block_experts(mod: nn.Module, i: int) -> dict[str, Tensor]:
    return {n: getattr(mod, f"e{i}_{n}") for n in mod.names[i]}


class StaticModel(nn.Module):
    """Resident model (dense part + every block's expert tensors) with a :class:`StaticCache`.

    ``experts[i]``: block i's expert tensors (``w1_EDF`` ...; e.g. the engine's resident pool views),
    registered as non-persistent buffers (not copied; static addresses for CUDA graphs). ``prefill(idx_BS)`` and ``decode(idx_B1, pos_1)`` return
    the logits of the last position ``[B, 1, V]`` and fill the cache; compile them with
    :meth:`compiled`."""

    def __init__(self, model: InferenceModel, experts: dict[int, dict[str, Tensor]], batch: int, max_len: int,
                 dtype: torch.dtype | None = None, expert_fn=None) -> None:
        super().__init__()
        check_static_spec(model.spec)
        self.model, self.spec = model, model.spec
        self.expert_fn = expert_fn
        self.names = register_experts(self, experts)
        dev = model.tok_emb.weight.device
        self.cache = StaticCache(model.spec, batch, max_len, dev, dtype or model.tok_emb.weight.dtype)
        if dev.type == "cuda":  # CUDA graphs: no copy of these into graph-owned memory per replay
            for t in (*self.buffers(),):
                torch._dynamo.mark_static_address(t)
        if model.spec.position == "rope":
            cos, sin = rope_tables(max_len, model.spec.head_dim, device=dev)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.max_len = max_len

    def _rope(self):
        return None if self.rope_cos is None else (self.rope_cos, self.rope_sin)

    def _forward(self, idx_BS: Tensor, pos_S: Tensor, prefill: bool, all_logits: bool) -> Tensor:
        x = embed(self.model, idx_BS, pos_S)
        rope = self._rope()
        for blk in self.model.blocks:
            i = blk.index
            x, h = attention_block(blk, x, self.cache.k[i], self.cache.v[i], pos_S, rope, prefill)
            if blk.is_moe:
                x = x + shared_and_routed(blk, h, block_experts(self, i), self.expert_fn)
            else:
                x = x + blk.ffn(h)
        return head(self.model, x, all_logits)

    def prefill(self, idx_BS: Tensor, all_logits: bool = False) -> Tensor:
        pos = torch.arange(idx_BS.shape[1], device=idx_BS.device)
        return self._forward(idx_BS, pos, True, all_logits)

    def decode(self, idx_B1: Tensor, pos_1: Tensor) -> Tensor:
        return self._forward(idx_B1, pos_1, False, False)

    def compiled(self, backend: str = "inductor", mode: str | None = None, fullgraph: bool = True):
        """``(prefill, decode)`` compiled (``fullgraph``: a graph break is an error). Prefill has
        ``dynamic=None`` (a second prompt length recompiles it once with S symbolic) and never uses CUDA
        graphs; decode has static shapes, so ``mode`` (e.g. reduce-overhead) applies to it."""
        kw = {"backend": backend, "fullgraph": fullgraph}
        if mode is not None and backend == "inductor":
            kw["mode"] = mode
        pre = torch.compile(self.prefill, dynamic=None, **{k: v for k, v in kw.items() if k != "mode"})
        dec = torch.compile(self.decode, **kw)
        return pre, dec

    @torch.no_grad()
    def generate(self, prompts_BP: Tensor, gen_len: int, prefill_fn=None, decode_fn=None) -> Tensor:
        """Greedy tokens ``[B, gen_len]`` (the first from the prefill), with eager or compiled steps."""
        prefill_fn, decode_fn = prefill_fn or self.prefill, decode_fn or self.decode
        B, P = prompts_BP.shape
        if P + gen_len - 1 > self.max_len:
            raise ValueError(f"prompt {P} + gen {gen_len} exceeds the static cache ({self.max_len})")
        nxt = prefill_fn(prompts_BP)[:, -1].argmax(-1)
        out = [nxt]
        for step in range(1, gen_len):
            pos = torch.full((1,), P + step - 1, dtype=torch.long, device=prompts_BP.device)
            nxt = decode_fn(nxt.unsqueeze(1), pos)[:, -1].argmax(-1)
            out.append(nxt)
        return torch.stack(out, 1)


class ExportModel(nn.Module):
    """The full-sequence forward without a cache (``MoEDecoder.forward``'s logits ``[B, S, V]``) with
    resident experts registered as buffers: what :func:`export_model` exports."""

    def __init__(self, model: InferenceModel, experts: dict[int, dict[str, Tensor]]) -> None:
        super().__init__()
        check_static_spec(model.spec)
        self.model = model
        self.names = register_experts(self, experts)
        if model.spec.position == "rope":
            cos, sin = rope_tables(model.spec.max_seq, model.spec.head_dim, device=model.tok_emb.weight.device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def forward(self, idx_BS: Tensor) -> Tensor:
        B, S = idx_BS.shape
        pos = torch.arange(S, device=idx_BS.device)
        x = embed(self.model, idx_BS, pos)
        rope = None if self.rope_cos is None else (self.rope_cos, self.rope_sin)
        for blk in self.model.blocks:
            attn = blk.attn
            D = x.shape[-1]
            kv = attn.kv_heads * attn.head_dim
            q, k, v = attn.qkv(blk.norm1(x)).split([D, kv, kv], dim=-1)
            q = q.view(B, S, attn.heads, attn.head_dim).transpose(1, 2)
            k = k.view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
            v = v.view(B, S, attn.kv_heads, attn.head_dim).transpose(1, 2)
            if rope is not None:
                q, k = apply_rope(q, rope[0][:S], rope[1][:S]), apply_rope(k, rope[0][:S], rope[1][:S])
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=attn.kv_heads != attn.heads)
            x = x + attn.proj(y.transpose(1, 2).reshape(B, S, D))
            h = blk.norm2(x)
            if blk.is_moe:
                x = x + shared_and_routed(blk, h, block_experts(self, blk.index))
            else:
                x = x + blk.ffn(h)
        return head(self.model, x, True)


def export_model(model: ExportModel, example_BS: Tensor, max_batch: int = 64, strict: bool = False):
    """``torch.export.export`` with dynamic batch (1..max_batch) and sequence length (2..max_seq)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max_batch)
    seq = Dim("seq", min=2, max=model.model.spec.max_seq)
    return torch.export.export(model, (example_BS,), dynamic_shapes={"idx_BS": {0: batch, 1: seq}}, strict=strict)


def resident_experts(engine) -> dict[int, dict[str, Tensor]]:
    """Every MoE block's expert tensors from a resident-mode :class:`Engine` (pool views, no copy):
    loads the pool (all L blocks, ring slot i = block ``blocks[i]``) and orders compute after it."""
    ring = engine.ring
    if ring is None or ring.K < len(engine.blocks):
        raise ValueError("static graph: whole-model compile needs every block's experts resident (mode resident)")
    if engine.pool.quant is not None:
        raise ValueError("static graph: whole-model compile takes unquantized experts (quant is for ring/expert)")
    ring._issue()
    for ev in ring.load_done:
        engine.sync.wait(engine.sync.compute, ev)
    return {b: engine.pool.group_views(k) for k, b in enumerate(engine.blocks)}


# ------------------------------------------------------------------------------ engine runner
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "aot_eager", "eager")


def compile_kwargs(how: str) -> dict:
    """``torch.compile`` arguments for ``InferConfig.compile``: an inductor mode, or a backend name
    ("aot_eager" / "eager": the CPU tests' way to check graph capture without a C++ compile)."""
    if how not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {how!r}")
    if how in ("aot_eager", "eager"):
        return {"backend": how, "fullgraph": True}
    return {"backend": "inductor", "fullgraph": True, **({} if how == "default" else {"mode": how})}


class _NoCudnnSdpa:
    """cuDNN attention off while tracing/running (issue 7 NOTES: per-shape plans, run-to-run ties)."""

    def __enter__(self):
        self.old = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)

    def __exit__(self, *exc):
        torch.backends.cuda.enable_cudnn_sdp(self.old)


class StaticRunner:
    """Compiled prefill / decode steps for an :class:`Engine` at one batch size.

    * resident mode (unquantized): the whole model, :class:`StaticModel` (prefill compiled without
      CUDA graphs, decode with ``cfg.compile``'s mode, e.g. ``reduce-overhead``);
    * otherwise (ring, expert, quantized resident) piecewise: :func:`attention_block` and
      :func:`moe_static` are compiled (no CUDA graphs: the ring hands a different slot's tensors to
      every block); the ring's acquire / release (event waits, copy issue) and expert-aware fetches
      (the router's choice is needed on the host) run eagerly between them.
    """

    def __init__(self, engine, batch: int) -> None:
        self.eng, self.batch = engine, batch
        how = engine.cfg.compile
        kw = compile_kwargs(how)
        model = engine.model
        self.whole = engine.cfg.mode == "resident" and engine.cfg.quant is None
        if self.whole:
            self.static = StaticModel(model, resident_experts(engine), batch, engine.max_len, engine.store.dtype)
            nocg = {k: v for k, v in kw.items() if k != "mode"}
            self.prefill_fn = torch.compile(self.static.prefill, dynamic=None, **nocg)
            self.decode_fn = torch.compile(self.static.decode, **kw)
            self.cudagraphs = kw.get("mode") == "reduce-overhead"
        else:
            check_static_spec(engine.spec)
            nocg = {k: v for k, v in kw.items() if k != "mode" or "cudagraphs" in v}
            self.cache = StaticCache(engine.spec, batch, engine.max_len, engine.device, engine.store.dtype)
            if engine.spec.position == "rope":
                self.rope = rope_tables(engine.max_len, engine.spec.head_dim, device=engine.device)
            else:
                self.rope = None
            self.attn = torch.compile(attention_block, **nocg)
            self.moe = torch.compile(moe_static, **nocg)
            self.dense_ffn = torch.compile(_dense_ffn, **nocg)
            self.embed = torch.compile(embed, **nocg)
            self.head = torch.compile(head, **nocg)
            self.prefill_fn = lambda idx: self._piecewise(idx, torch.arange(idx.shape[1], device=idx.device), True)
            self.decode_fn = lambda idx, pos: self._piecewise(idx, pos, False)
            self.cudagraphs = False

    def _piecewise(self, idx_BS: Tensor, pos_S: Tensor, prefill: bool) -> Tensor:
        eng, model = self.eng, self.eng.model
        mode = eng.begin_pass(idx_BS.numel())
        D = eng.spec.hidden
        x = self.embed(model, idx_BS, pos_S)
        for blk in model.blocks:
            i = blk.index
            x, h = self.attn(blk, x, self.cache.k[i], self.cache.v[i], pos_S, self.rope, prefill)
            if not blk.is_moe:
                x = x + self.dense_ffn(blk, h)
                continue
            h_TD = h.reshape(-1, D)
            if mode == "ring" and eng.cfg.quant is None:
                w = eng.ring.acquire(i)
                y = self.moe(h_TD, blk.ffn.gate, w)
                eng.ring.release()
            elif mode == "ring":  # quantized: the engine's (fused or dequantizing) expert compute, eager
                w = eng.ring.acquire(i)
                y = eng.quant_moe(h_TD, blk.ffn.gate, w)
                eng.ring.release()
            else:
                y = eng._experts(i, h_TD, blk.ffn, idx_BS.reshape(-1))
            if blk.ffn.shared_experts is not None:
                n = blk.ffn.shared_experts.num_experts
                y = y + blk.ffn.shared_experts(h_TD.unsqueeze(0).expand(n, -1, -1)).sum(0)
            x = x + y.view(h.shape)
        return self.head(model, x, False)

    def _call(self, fn, *args) -> Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        ctx = _NoCudnnSdpa() if self.eng.device.type == "cuda" else _nullctx()
        with ctx:
            return fn(*args)

    def prefill(self, idx_BP: Tensor) -> Tensor:
        return self._call(self.prefill_fn, idx_BP)[:, -1]

    def decode(self, idx_B1: Tensor, pos: int) -> Tensor:
        p = torch.full((1,), pos, dtype=torch.long, device=idx_B1.device)
        return self._call(self.decode_fn, idx_B1, p)[:, -1]


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _dense_ffn(blk: InferBlock, h_BSD: Tensor) -> Tensor:
    return blk.ffn(h_BSD)
