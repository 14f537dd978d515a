"""Offloaded MoE inference: memory plan, the three expert providers, prefill + greedy decode.

Shape legend: B batch, P prompt length, G generated tokens, T tokens of one forward, K top-k (routing)
or ring slots (memory), E experts, C device expert slots, L MoE blocks, D model dim, F expert width.

Modes (``InferConfig.mode``):

* ``ring``: :class:`reference.inference.ring.Ring` with K slots (from the GPU budget or given);
* ``expert``: expert-aware; a forward whose T tokens would touch most experts (expected distinct
  experts under uniform routing ``E (1 - (1 - K/E)^T) >= fallback_frac * E``, e.g. prefill) runs
  the ring over the same pool, a smaller one (decode) fetches only the routed experts into a GPU
  LRU cache of C expert slots;
* ``resident``: every block's experts on the device (a ring with K = L: loaded once, never again).

All three compute a block's experts with the same grouped FFN (:func:`grouped_ffn`, the
``GroupedExperts`` math on weight tensors supplied from the pool), so they give identical logits.

Quantized experts (``InferConfig.quant`` "int8" / "fp8", ring, expert and resident modes): the
pool's slots and host copy are quantized (:class:`reference.inference.ring.ExpertPool`), copies move
data + scales, and each block computes from its experts dequantized into a store-dtype workspace
(ring: the whole group; expert-aware: the fetched experts, routing remapped to workspace rows). Ring
and expert-aware therefore see the same dequantized weights and give identical logits with quant too.

Memory plan (bytes on the device, ``plan_memory``): dense weights + KV cache + an activation reserve
for the largest forward + the expert pool; the pool gets the rest of the budget:
``K = floor(pool / (E * expert_bytes))`` (ring), ``C = floor(pool / expert_bytes)`` (expert).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.inference.model import InferenceModel, KVCache, MoEDense
from reference.inference.quantize import FORMATS, quantized_expert_bytes
from reference.inference.ring import DeviceSync, ExpertPool, Ring, Timeline
from reference.inference.store import ModelStore
from reference.moe.dispatcher import LocalDispatcher
from reference.moe.experts import ffn, grouped_mm_supported
from reference.moe.routing import Routing

MODES = ("ring", "expert", "resident")
QUANT_KERNELS = ("dequant", "fused")
GB = 1e9


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


# ------------------------------------------------------------------------------- expert compute
def grouped_ffn(x_ND: Tensor, counts_G: Tensor, w: dict[str, Tensor]) -> Tensor:
    """Expert FFNs over expert-contiguous rows with weights ``w`` (``w1_EDF`` ... stacked over G
    groups): ``GroupedExperts._forward_grouped_mm`` / ``_forward_loop`` on supplied tensors."""
    w1, w2, w3 = w["w1_EDF"], w["w2_EFD"], w.get("w3_EDF")
    b1, b2, b3 = w.get("b1_EF"), w.get("b2_ED"), w.get("b3_EF")
    G = counts_G.shape[0]
    if grouped_mm_supported(x_ND, w1.shape[-1], num_groups=G):
        offs = torch.cumsum(counts_G, 0).to(torch.int32)
        expert_N = None
        if b1 is not None:
            expert_N = torch.repeat_interleave(torch.arange(G, device=x_ND.device), counts_G, output_size=x_ND.shape[0])

        def mm(a: Tensor, wt: Tensor, b: Tensor | None) -> Tensor:
            out = torch._grouped_mm(a, wt, offs=offs)
            return out if b is None else (out.float() + b.float().index_select(0, expert_N)).to(out.dtype)

        x_ND = x_ND.contiguous()
        h = mm(x_ND, w1, b1)
        h = F.gelu(h) if w3 is None else F.silu(h) * mm(x_ND, w3, b3)
        return mm(h, w2, b2)
    counts = counts_G.tolist()
    outs = []
    for g, chunk in enumerate(torch.split(x_ND, counts)):
        if chunk.shape[0]:
            pick = (lambda t: None if t is None else t[g])  # noqa: E731
            outs.append(ffn(chunk, w1[g], w2[g], pick(w3), pick(b1), pick(b2), pick(b3)))
    return torch.cat(outs) if outs else x_ND.new_zeros(0, x_ND.shape[-1])


def remap(routing: Routing, slot_E: Tensor, groups: int) -> Routing:
    """The same routing with expert ids replaced by device slots ``slot_E[id]`` over ``groups`` slots."""
    ids = slot_E[routing.expert_ids_TK]
    return Routing(
        expert_ids_TK=ids,
        weights_TK=routing.weights_TK,
        kept_TK=routing.kept_TK,
        counts_E=torch.bincount(ids[routing.kept_TK], minlength=groups),
        probs_TE=routing.probs_TE,
        capacity=routing.capacity,
        slots_TK=routing.slots_TK,
    )


# --------------------------------------------------------------------------------- memory plan
def activation_reserve_bytes(spec, tokens: int, batch: int, element_size: int) -> int:
    """Rough peak of one forward's activations (attention, dispatch, expert hidden, logits) x1.5."""
    k = spec.top_k
    per_token = 8 * spec.hidden + k * (3 * spec.ffn + 4 * spec.hidden)
    return int(1.5 * (tokens * per_token * element_size + batch * spec.vocab * 4))


@dataclass
class MemoryPlan:
    budget_bytes: int
    dense_bytes: int
    kv_bytes: int
    act_bytes: int
    expert_bytes: int  # one expert of one block
    experts_per_block: int
    moe_blocks: int
    pool_slots: int  # C
    ring_slots: int  # K
    quant: str | None = None  # expert_bytes are then quantized bytes (data + scales + biases)
    workspace_bytes: int = 0  # quantized: one block's dequantized experts (store dtype)

    @property
    def pool_bytes(self) -> int:
        return self.pool_slots * self.expert_bytes + self.workspace_bytes

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["pool_bytes"] = self.pool_bytes
        return d


def plan_memory(store: ModelStore, mode: str, budget_bytes: int, batch: int, max_len: int, tokens: int,
                slots: int | None = None, quant: str | None = None) -> MemoryPlan:
    """Split a device budget; ``slots`` (K) given overrides the budget for ring and expert mode.

    ``quant`` ("int8" / "fp8"): slots hold quantized experts (:func:`quantized_expert_bytes` each) and
    one block's dequantized experts (``E * store.expert_bytes``) are reserved as the workspace."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if quant is not None and quant not in FORMATS:
        raise ValueError(f"quant must be None or one of {FORMATS}, got {quant!r}")
    spec = store.spec
    esize = torch.empty((), dtype=store.dtype).element_size()
    E, L = spec.experts, len(store.moe_blocks)
    eb = store.expert_bytes if quant is None else quantized_expert_bytes(store.expert_table, E)
    ws = 0 if quant is None else E * store.expert_bytes
    dense = store.dense_bytes
    kv = KVCache.nbytes_for(spec, batch, max_len, esize)
    act = activation_reserve_bytes(spec, tokens, batch, esize)
    avail = budget_bytes - dense - kv - act - ws
    fixed = f"dense {fmt_bytes(dense)} + KV cache {fmt_bytes(kv)} + activations {fmt_bytes(act)}"
    if ws:
        fixed += f" + {quant} dequantization workspace {fmt_bytes(ws)}"
    if mode == "resident":
        C = L * E
        if avail < C * eb and slots is None:
            raise ValueError(
                f"gpu budget {fmt_bytes(budget_bytes)} too small for resident mode: {fixed} + experts "
                f"{fmt_bytes(C * eb)} (use --mode ring or expert)"
            )
        K = L
    elif slots is not None:
        if slots < 1:
            raise ValueError(f"slots (K) must be >= 1, got {slots}")
        K = min(slots, L)
        C = K * E
    else:
        C = max(0, avail // eb)
        K = min(C // E, L)
        if K < 1:
            raise ValueError(
                f"gpu budget {fmt_bytes(budget_bytes)} too small: {fixed} leave {fmt_bytes(max(avail, 0))}, "
                f"one block's experts need {fmt_bytes(E * eb)}"
            )
        if mode == "ring":
            C = K * E
        else:
            C = min(C, L * E, 1023)  # torch._grouped_mm takes < 1024 groups
            K = min(C // E, L)
    return MemoryPlan(budget_bytes, dense, kv, act, eb, E, L, C, K, quant, ws)


# ---------------------------------------------------------------------------------- the engine
@dataclass
class InferConfig:
    mode: str = "ring"
    gpu_budget_gb: float | None = None  # None: the device's free memory (CPU: unlimited)
    slots: int | None = None  # K ring slots; None: from the budget
    fallback_frac: float = 0.95  # expert mode: ring when a forward is expected to touch this share of experts
    # expert mode: prefetch the next MoE block's experts, routed from the current hidden state. Off by
    # default: on the H100 (Mixtral blocks, batch 1-8) decode is PCIe-bound and the prefetch moved
    # slightly more bytes for no overlap gain (results/bench/infer.csv: expert vs expert_nopred)
    predict: bool = False
    device: str = "auto"
    trace: bool = True
    # expert weights kept quantized in host memory and in the device slots ("int8" / "fp8" per output
    # channel, reference/inference/quantize.py): copies move ~half the bf16 bytes, each block's experts
    # are dequantized on the device into a store-dtype workspace before the grouped FFN. None: as stored
    quant: str | None = None
    # quantized ring groups: "dequant" (into the bf16 workspace, then the bf16 grouped GEMM) or "fused"
    # (GEMM from the quantized bytes: fp8 torch._scaled_(grouped_)mm, int8 Triton kernel with the scale
    # in the epilogue; reference/inference/qmatmul.py). Expert-aware passes always dequantize.
    quant_kernel: str = "dequant"
    # None: eager. Else compiled steps (reference/inference/static.py): an inductor mode ("default",
    # "reduce-overhead" = CUDA graphs for the resident decode, "max-autotune-no-cudagraphs") or a
    # backend ("aot_eager", "eager": graph capture without code generation, for CPU tests)
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.quant_kernel not in QUANT_KERNELS:
            raise ValueError(f"quant_kernel must be one of {QUANT_KERNELS}, got {self.quant_kernel!r}")
        if self.compile is not None:
            from reference.inference.static import compile_kwargs

            compile_kwargs(self.compile)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.quant is not None and self.quant not in FORMATS:
            raise ValueError(f"quant must be None or one of {FORMATS}, got {self.quant!r}")
        if self.gpu_budget_gb is not None and self.gpu_budget_gb <= 0:
            raise ValueError(f"gpu_budget_gb must be > 0, got {self.gpu_budget_gb}")
        if not 0 < self.fallback_frac <= 1:
            raise ValueError(f"fallback_frac must be in (0, 1], got {self.fallback_frac}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return torch.device(name)


@dataclass
class GenerateResult:
    tokens_BG: Tensor  # generated tokens (CPU)
    logits_BGV: Tensor | None  # logits that chose each generated token (CPU, float32), if kept
    prefill_s: float
    decode_s: float
    batch: int
    prompt_len: int
    gen_len: int
    stats: dict = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.batch * (self.gen_len - 1)
        return n / self.decode_s if self.decode_s > 0 and n else float("nan")


class Engine:
    """A model from a :class:`ModelStore` on one device with its experts offloaded per ``cfg.mode``."""

    def __init__(self, store: ModelStore, cfg: InferConfig, *, batch: int, max_len: int, prefill_tokens: int) -> None:
        self.store, self.cfg, self.spec = store, cfg, store.spec
        self.device = resolve_device(cfg.device)
        self.sync = DeviceSync(self.device)
        self.timeline = Timeline(self.sync, enabled=cfg.trace)
        if cfg.gpu_budget_gb is not None:
            budget = int(cfg.gpu_budget_gb * GB)
        elif self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.9)
        else:
            budget = 1 << 62
        self.plan = plan_memory(store, cfg.mode, budget, batch, max_len, prefill_tokens, cfg.slots, cfg.quant)
        with torch.device("meta"):  # no throwaway init of the dense weights: they come from the store
            model = InferenceModel(self.spec).to(dtype=store.dtype)
        self.model = model.to_empty(device=self.device)
        missing, unexpected = self.model.load_state_dict(store.dense_state, strict=False)
        if missing or unexpected:
            raise ValueError(f"store {store.root}: dense tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
        self.model.eval()
        self.pool = ExpertPool(store, self.plan.pool_slots, self.device, self.sync, self.timeline, quant=cfg.quant,
                               fused=cfg.quant_kernel == "fused")
        self._static: dict[int, object] = {}  # batch -> StaticRunner (cfg.compile)
        self.blocks = store.moe_blocks
        self.ring = Ring(self.pool, self.blocks, self.plan.ring_slots) if self.plan.ring_slots >= 1 else None
        self.dispatcher = LocalDispatcher(self.spec.experts)
        self.pool_dispatcher = LocalDispatcher(self.pool.capacity)
        self.pass_mode = "ring" if cfg.mode != "expert" else None
        self.max_len, self.batch = max_len, batch
        self.passes = {"ring": 0, "expert": 0}
        self._next_moe = {i: next((b for b in self.blocks if b > i), None) for i in range(self.spec.layers)}

    # ------------------------------------------------------------------------- per forward pass
    def expected_distinct(self, tokens: int) -> float:
        E, k = self.spec.experts, self.spec.top_k
        return E * (1.0 - (1.0 - k / E) ** tokens)

    def begin_pass(self, tokens: int) -> str:
        if self.cfg.mode != "expert":
            mode = "ring"
        else:
            want_ring = self.expected_distinct(tokens) >= self.cfg.fallback_frac * self.spec.experts
            mode = "ring" if want_ring and self.ring is not None else "expert"
            if mode != self.pass_mode:  # the other mechanism may have rewritten pool slots
                if mode == "ring":
                    self.ring.reset()
                else:
                    self.sync.cross_wait()
        self.pass_mode = mode
        self.passes[mode] += 1
        return mode

    def _experts(self, block: int, x_TD: Tensor, moe: MoEDense, token_ids_T: Tensor | None) -> Tensor:
        tl = self.timeline
        t0 = tl.mark(self.sync.compute)
        routing = moe.gate(x_TD, token_ids_T)
        if self.pass_mode == "ring":
            w = self.ring.acquire(block)
            y_TD = self._ring_compute(x_TD, routing, w)
            self.ring.release()
        else:
            needed = torch.unique(routing.expert_ids_TK[routing.kept_TK]).tolist()  # host sync
            slots = self.pool.fetch(block, needed)
            slot_E = torch.zeros(self.spec.experts, dtype=torch.long)
            if self.cfg.quant is None:
                slot_E[needed] = torch.tensor(slots, dtype=torch.long)
                r = remap(routing, slot_E.to(x_TD.device, non_blocking=True), self.pool.capacity)
                x_ND, counts_C, meta = self.pool_dispatcher.dispatch(x_TD, r)
                y_TD = self.pool_dispatcher.combine(grouped_ffn(x_ND, counts_C, self.pool.tensors), meta)
            else:  # workspace row i = dequantized slot of needed[i]: route expert needed[i] to row i
                w = self.pool.slot_weights(slots)
                slot_E[needed] = torch.arange(len(needed), dtype=torch.long)
                r = remap(routing, slot_E.to(x_TD.device, non_blocking=True), self.spec.experts)
                x_ND, counts_E, meta = self.dispatcher.dispatch(x_TD, r)
                y_TD = self.dispatcher.combine(grouped_ffn(x_ND, counts_E, w), meta)
        T = x_TD.shape[0]
        flops = 2 * T * self.spec.top_k * self.spec.hidden * self.spec.ffn * (3 if self.spec.activation == "swiglu" else 2)
        tl.add(t0, tl.mark(self.sync.compute), f"moe_{self.pass_mode}", block, "compute", 0, flops)
        return y_TD

    def _ring_compute(self, x_TD: Tensor, routing: Routing, w: dict[str, Tensor]) -> Tensor:
        """A ring group's experts on routed tokens: bf16 / dequantized workspace, or fused quantized."""
        x_ND, counts_E, meta = self.dispatcher.dispatch(x_TD, routing)
        if self.pool.fused:
            from reference.inference.qmatmul import quant_grouped_ffn

            return self.dispatcher.combine(quant_grouped_ffn(x_ND, counts_E, w, self.cfg.quant), meta)
        return self.dispatcher.combine(grouped_ffn(x_ND, counts_E, w), meta)

    def quant_moe(self, x_TD: Tensor, gate, w: dict[str, Tensor]) -> Tensor:
        """Compiled runner, quantized ring group: route and compute eagerly (see static.StaticRunner)."""
        return self._ring_compute(x_TD, gate(x_TD), w)

    def _predict(self, index: int, x_BSD: Tensor, token_ids_T: Tensor) -> None:
        """After block ``index``: route the residual stream through the next MoE block's norm2 and gate
        (its attention skipped) and prefetch the experts it picks (DeepSpeed-MoE / Pre-gated MoE style
        one-block-ahead prediction; a wrong guess costs bandwidth, never correctness)."""
        nxt = self._next_moe.get(index)
        if nxt is None:
            return
        blk = self.model.blocks[nxt]
        r = blk.ffn.gate(blk.norm2(x_BSD).reshape(-1, self.spec.hidden), token_ids_T)
        self.pool.prefetch(nxt, torch.unique(r.expert_ids_TK[r.kept_TK]).tolist())

    @torch.no_grad()
    def forward(self, idx_BS: Tensor, cache: KVCache | None = None, start: int = 0, all_logits: bool = True) -> Tensor:
        mode = self.begin_pass(idx_BS.numel())
        idx_BS = idx_BS.to(self.device)
        on_block = None
        if mode == "expert" and self.cfg.predict:
            ids = idx_BS.reshape(-1)
            on_block = lambda i, x: self._predict(i, x, ids)  # noqa: E731
        return self.model(idx_BS, self._experts, cache, start, all_logits, on_block=on_block)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(self.spec, batch, self.max_len, self.device, self.store.dtype)

    def close(self) -> None:
        """Wait for copies still in flight (prefetches for a next pass) before the pool is freed."""
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # phase boundary only (timing), never inside the loop

    @torch.no_grad()
    def generate(self, prompts_BP: Tensor, gen_len: int, keep_logits: bool = False) -> GenerateResult:
        """Prefill ``prompts_BP`` then greedy-decode ``gen_len`` tokens (the first from the prefill)."""
        B, P = prompts_BP.shape
        if gen_len < 1:
            raise ValueError(f"gen_len must be >= 1, got {gen_len}")
        if P + gen_len - 1 > self.max_len:
            raise ValueError(f"prompt {P} + gen {gen_len} exceeds the engine's max_len {self.max_len}")
        if self.cfg.compile is not None:
            return self._generate_static(prompts_BP, gen_len, keep_logits)
        cache = self.new_cache(B)
        idx = prompts_BP.to(self.device)
        tokens, logits = [], []
        self._sync()
        t0 = time.perf_counter()
        self.timeline.micro_batch = 0
        last = self.forward(idx, cache, 0, all_logits=False)[:, -1]
        nxt = last.argmax(-1)
        tokens.append(nxt)
        if keep_logits:
            logits.append(last.float())
        self._sync()
        t1 = time.perf_counter()
        for step in range(1, gen_len):
            self.timeline.micro_batch = step
            last = self.forward(nxt.unsqueeze(1), cache, P + step - 1, all_logits=False)[:, -1]
            nxt = last.argmax(-1)
            tokens.append(nxt)
            if keep_logits:
                logits.append(last.float())
        self._sync()
        t2 = time.perf_counter()
        return GenerateResult(
            tokens_BG=torch.stack(tokens, 1).cpu(),
            logits_BGV=torch.stack(logits, 1).cpu() if keep_logits else None,
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            batch=B,
            prompt_len=P,
            gen_len=gen_len,
            stats=self.stats(),
        )

    def static_runner(self, batch: int):
        from reference.inference.static import StaticRunner

        if batch not in self._static:
            self._static[batch] = StaticRunner(self, batch)
        return self._static[batch]

    @torch.no_grad()
    def _generate_static(self, prompts_BP: Tensor, gen_len: int, keep_logits: bool) -> GenerateResult:
        """:meth:`generate` with compiled steps (``cfg.compile``; the first call of a shape compiles)."""
        B, P = prompts_BP.shape
        run = self.static_runner(B)
        idx = prompts_BP.to(self.device)
        tokens, logits = [], []
        self._sync()
        t0 = time.perf_counter()
        last = run.prefill(idx)
        nxt = last.argmax(-1)
        tokens.append(nxt)
        if keep_logits:
            logits.append(last.float().clone())
        self._sync()
        t1 = time.perf_counter()
        for step in range(1, gen_len):
            last = run.decode(nxt.unsqueeze(1), P + step - 1)
            nxt = last.argmax(-1)
            tokens.append(nxt)
            if keep_logits:
                logits.append(last.float().clone())
        self._sync()
        t2 = time.perf_counter()
        return GenerateResult(
            tokens_BG=torch.stack(tokens, 1).cpu(),
            logits_BGV=torch.stack(logits, 1).cpu() if keep_logits else None,
            prefill_s=t1 - t0, decode_s=t2 - t1, batch=B, prompt_len=P, gen_len=gen_len, stats=self.stats(),
        )

    def stats(self) -> dict:
        s = {
            "mode": self.cfg.mode,
            "quant": self.cfg.quant,
            "quant_kernel": self.cfg.quant_kernel if self.cfg.quant else None,
            "compile": self.cfg.compile,
            "ring_slots": self.plan.ring_slots,
            "pool_slots": self.plan.pool_slots,
            "bytes_copied": self.pool.bytes_copied,
            "expert_hits": self.pool.hits,
            "expert_misses": self.pool.misses,
            "experts_prefetched": self.pool.prefetched,
            "prefetch_used": self.pool.prefetch_used,
            "ring_passes": self.passes["ring"],
            "expert_passes": self.passes["expert"],
            "plan": self.plan.as_dict(),
        }
        if self.device.type == "cuda":
            s["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return s


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=gen)


def ring_bound_s(layer_compute_s: list[float], layer_bytes: int, h2d_Bps: float) -> float:
    """Issue 7's bound: sum over MoE blocks of max(compute, expert bytes / pinned H2D bandwidth)."""
    return sum(max(c, layer_bytes / h2d_Bps) for c in layer_compute_s)


def expected_distinct_experts(E: int, k: int, tokens: int) -> float:
    return E * (1.0 - (1.0 - k / E) ** tokens) if E else math.nan
