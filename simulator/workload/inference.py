"""Offloaded MoE inference on one GPU: prefill + greedy decode of a `semoe.ModelSpec`, with the experts
of every MoE block in host memory and three ways of bringing them to the GPU (``reference/inference``).

Resources (SimPy processes, one GPU of the cluster):

* the **host** thread, which issues kernels in program order, ``launch_s`` per kernel (HARDWARE.md:
  ~8 us per small eager PyTorch op), and blocks at host synchronisations;
* the **compute stream**, which runs kernels in issue order; a phase of ``n`` kernels with GPU work
  ``w`` issued from host time ``h`` starts when the stream is free and its inputs are ready, and ends
  at ``max(start + w, h + n * launch_s)`` (it cannot end before its last kernel was issued);
* the **copy stream** (the H2D copy engine): ``nbytes / pcie_bandwidth + pcie_latency`` per copy call,
  ``ClusterSpec.pcie`` (``h100-single``: the measured 53.5 GB/s pinned).
Streams are ordered only by events (CUDA events in the reference).

Per MoE block (``reference/inference/model.py`` + ``engine.py``), host program order::

    attention phase   norm1, qkv GEMM, RoPE, KV-cache write, SDPA, proj GEMM, residual, norm2
    gate phase        router GEMM, softmax/top-k, aux statistics, dispatch (permute)
    host sync         torch.bincount on CUDA reads the max id back (router counts, dispatcher):
                      the host waits until the compute stream has finished the gate phase;
                      expert-aware mode also reads the needed expert ids (``.tolist()``) here
    expert provider   ring:      wait load_done[slot], experts, release: compute_done[slot], issue
                                 the copy of the block K ahead into the slot (copy stream waits
                                 compute_done[slot]) ("compute, release, load", SEMOE.md)
                      expert:    LRU over (block, expert) in C device slots (`ExpertCache`, the
                                 reference's ``ExpertPool`` registry); misses are copied after all
                                 compute queued so far, the experts wait for the copy
                      resident:  experts already on the GPU
    experts phase     grouped FFN (w1, w3, w2 grouped GEMMs, SiLU * mul), combine, residual

Ring memory: K slots; a pass over L blocks (prologue: blocks 0..K-1) costs ``L * max(compute, copy)``
in steady state when K >= 2 and ``L * (compute + copy)`` with K = 1 (no overlap). A forward pass
issues the loads of the next pass's first K blocks, so timed passes after a warm-up start with them
resident, as in the reference's bench.

Expert-aware mode: a forward with T tokens uses the ring when the expected number of distinct experts
under uniform top-k routing, ``E (1 - (1 - k/E)^T)``, reaches ``fallback_frac * E`` (the reference's
rule, fallback_frac 0.95); otherwise each block's tokens are routed by sampling (seeded): every token
picks ``top_k`` distinct experts without replacement with probabilities from the workload's expert
popularity (`simulator.workload.routing`: uniform, zipf, lognormal, histogram; Gumbel top-k), and the
LRU cache decides hits and misses. ``predict=True`` models the reference's one-block-ahead prefetch as
a perfect predictor (an upper bound; the reference measured 92-99% of prefetched experts used): after
block i the host routes block i+1 (a gate phase and a host sync) and copies its misses at once.

Compute times come from `simulator.cost.CostModel` (the GPU profile with ``impl`` torch, which is what
the reference runs: ``torch._grouped_mm``, cuBLAS, SDPA; FLOP/s interpolated as a power law in the
rows ``m`` between measured points; roofline with a warning outside the measured range). The
reference's torch dispatcher (argsort, gather, weighted index-add) runs at the measured
``TORCH_PERMUTE_GBPS``. Host kernel counts per segment (``BLOCK_PROGRAM``) were counted, not fitted: every non-view
ATen op dispatched by ``reference.inference`` for a small Mixtral-shaped model on the CPU
(``python -m simulator.validate_infer --count-ops``); each is taken as one kernel launch of
``launch_s``, and the host blocks at each sync op until the compute stream has caught up.

Memory (bytes on the GPU, as ``reference/inference/engine.plan_memory``): dense weights + KV cache +
an activation reserve (1.5 x the activation estimate) + the expert pool; ring ``K = pool // (E *
expert_bytes)``, expert ``C = pool // expert_bytes``. Peak HBM reported: dense + KV + pool + the
activation estimate of the largest forward (without the 1.5 reserve factor). Host DRAM holds every
block's experts (pinned), the SSD their store files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from semoe import ModelSpec, SpecError, Workload
from semoe.expert_slots import ExpertSlots
from semoe.sizing import count_params, expert_params
from simulator.cost import CostModel
from simulator.workload import routing

MODES = ("ring", "expert", "resident")
LAUNCH_S = 8e-6  # HARDWARE.md: PyTorch eager op overhead ~8 us per small op (measured on the H100 machine)
# Host program of one MoE block: (segment, kernels issued, host sync at its end), counted on the
# reference (non-view ATen ops dispatched by reference.inference for a Mixtral-shaped block; the sync
# ops are torch.bincount (CUDA reads the max back), .item() / .tolist() and torch.unique):
#   attention: norm1, qkv, RoPE, cache write, SDPA, proj, residual, norm2 (39 decode / 41 prefill) + the
#              router GEMM, softmax, top-k (4) -> bincount of the aux-loss statistics
#   gate:      aux losses, weights, counts (16) -> bincount of counts_E
#   dispatch:  sort / index maps (4) -> bincount in the dispatcher; offsets (2) -> .item()
#   experts:   grouped GEMMs, activation, combine, residual (14)
# expert-aware mode adds, after the gate: torch.unique of the ids (2) -> .tolist() (the copies of the
# misses are issued here), then the remap to slots (5) -> bincount.
BLOCK_PROGRAM = {
    "prefill": [("attention", 45, True), ("gate", 16, True), ("dispatch", 4, True), ("dispatch", 2, True),
                ("experts", 14, False)],
    "decode": [("attention", 43, True), ("gate", 16, True), ("dispatch", 4, True), ("dispatch", 2, True),
               ("experts", 14, False)],
}
EXPERT_AWARE_EXTRA = [("route", 2, True), ("remap", 5, True)]  # between gate and dispatch
HOST_OPS_FORWARD = {"embedding": 9, "head": 9}  # embedding + RoPE tables; final norm + head
# results/bench/moe_layer.csv, permute_T16384_k8_D2048 impl torch (H100, 2026-11-24): argsort + gather +
# index_add round trip, 351.4 GB/s (our Triton permute: 2695 GB/s); reference/inference dispatches with torch
TORCH_PERMUTE_GBPS = 351.4
COPIES_PER_EXPERT = 3  # w1, w3, w2: one copy_ call each (ExpertPool.fetch / copy_block)


@dataclass(frozen=True)
class InferConfig:
    """One simulated ``semoe infer`` run (the reference's InferConfig plus the generation sizes)."""

    mode: str = "ring"
    batch: int = 1
    prompt_len: int = 256
    gen_len: int = 8
    gpu_budget_bytes: float | None = None  # None: the GPU's memory
    slots: int | None = None  # ring slots K (None: from the budget)
    fallback_frac: float = 0.95
    predict: bool = False
    launch_s: float = LAUNCH_S
    plan_batch: int | None = None  # batch the engine's memory plan was made for (default: batch)
    warmup_passes: int = 1  # prefill passes before the timed one (the bench warms up once)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecError(f"InferConfig.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("batch", "prompt_len", "gen_len"):
            if getattr(self, name) < 1:
                raise SpecError(f"InferConfig.{name}: {name} ({getattr(self, name)}) must be >= 1")
        if self.slots is not None and self.slots < 1:
            raise SpecError(f"InferConfig.slots: slots ({self.slots}) must be >= 1")
        if not 0 < self.fallback_frac <= 1:
            raise SpecError(f"InferConfig.fallback_frac: fallback_frac ({self.fallback_frac}) must be in (0, 1]")
        if self.gpu_budget_bytes is not None and self.gpu_budget_bytes <= 0:
            raise SpecError(f"InferConfig.gpu_budget_bytes: must be > 0, got {self.gpu_budget_bytes}")


# ------------------------------------------------------------------------------------ memory plan
def activation_estimate_bytes(m: ModelSpec, tokens: int, batch: int) -> float:
    """Activations of one forward (attention, dispatch, expert hidden, fp32 logits of the last token):
    the reference's ``activation_reserve_bytes`` without its 1.5 safety factor."""
    per_token = 8 * m.hidden + m.top_k * (3 * m.ffn + 4 * m.hidden)
    return tokens * per_token * m.dtype_bytes + batch * m.vocab * 4


def kv_cache_bytes(m: ModelSpec, batch: int, max_len: int) -> int:
    return 2 * m.layers * batch * m.n_kv_heads * max_len * m.head_dim * m.dtype_bytes


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: float
    dense_bytes: int
    kv_bytes: int
    act_bytes: float  # estimate (peak); the plan reserves 1.5x
    expert_bytes: int  # one expert of one block
    experts: int
    blocks: int
    pool_slots: int  # C
    ring_slots: int  # K

    @property
    def pool_bytes(self) -> int:
        return self.pool_slots * self.expert_bytes

    @property
    def peak_hbm_bytes(self) -> float:
        return self.dense_bytes + self.kv_bytes + self.pool_bytes + self.act_bytes


def plan_memory(m: ModelSpec, mode: str, budget_bytes: float, batch: int, max_len: int, tokens: int,
                slots: int | None = None) -> MemoryPlan:
    """``reference/inference/engine.plan_memory`` on specs (raises SpecError when the budget is too small)."""
    eb = expert_params(m) * m.dtype_bytes
    E, L = m.experts, m.moe_layers
    pc = count_params(m)
    dense = pc.dense * m.dtype_bytes
    kv = kv_cache_bytes(m, batch, max_len)
    act = activation_estimate_bytes(m, tokens, batch)
    avail = budget_bytes - dense - kv - int(1.5 * act)
    if mode == "resident":
        C, K = L * E, L
        if avail < C * eb and slots is None:
            raise SpecError(f"InferConfig.gpu_budget_bytes: {budget_bytes / 1e9:.2f} GB too small for resident mode "
                            f"(experts {C * eb / 1e9:.2f} GB, available {max(avail, 0) / 1e9:.2f} GB)")
    elif slots is not None:
        K = min(slots, L)
        C = K * E
    else:
        C = int(max(0, avail // eb))
        K = min(C // E, L)
        if K < 1:
            raise SpecError(f"InferConfig.gpu_budget_bytes: {budget_bytes / 1e9:.2f} GB too small: "
                            f"{max(avail, 0) / 1e9:.2f} GB left, one block's experts need {E * eb / 1e9:.2f} GB")
        if mode == "ring":
            C = K * E
        else:
            C = min(C, L * E, 1023)
            K = min(C // E, L)
    return MemoryPlan(budget_bytes, dense, kv, act, eb, E, L, C, K)


# ------------------------------------------------------------------------------------ costs
class BlockCosts:
    """GPU work (seconds) of the phases of one block, from a `CostModel` (see the module docstring)."""

    def __init__(self, m: ModelSpec, cost: CostModel) -> None:
        self.m, self.cm = m, cost

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
        T, h, k, b = tokens, m.hidden, m.top_k, m.dtype_bytes
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

    def experts(self, tokens: int, groups: int) -> float:
        """Grouped SwiGLU/GELU FFN of ``tokens * top_k`` routed rows over ``groups`` experts with rows
        (the grouped GEMM's empty groups cost nothing), the activation and the combine."""
        m, cm, dt = self.m, self.cm, self.m.dtype
        rows = tokens * m.top_k
        if rows <= 0 or groups <= 0:
            return 0.0
        per = rows / groups
        mats = 3 if m.activation == "swiglu" else 2
        t = (mats - 1) * cm.matmul(per, m.ffn, m.hidden, dt, groups=groups)  # w1 (and w3)
        t += cm.matmul(per, m.hidden, m.ffn, dt, groups=groups)  # w2
        t += cm.elementwise("add", (mats) * rows * m.ffn * m.dtype_bytes, dt)  # act (* gate)
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

    def __init__(self, experts_s: float, attention_s: float = 0.0, gate_s: float = 0.0) -> None:
        self.experts_s, self.attention_s, self.gate_s = experts_s, attention_s, gate_s

    def attention(self, batch, q_len, kv_len):
        return self.attention_s

    def gate(self, tokens):
        return self.gate_s

    def experts(self, tokens, groups):
        return self.experts_s

    def head(self, batch):
        return 0.0

    def embed(self, tokens):
        return 0.0


# ------------------------------------------------------------------------------------ expert cache
class ExpertCache(ExpertSlots):
    """The reference's ``ExpertPool`` registry without tensors (``semoe.expert_slots``), counting
    hits and misses; ring slot k is slots ``[k*E, (k+1)*E)``."""

    def __init__(self, capacity: int, experts: int) -> None:
        super().__init__(capacity, experts)
        self.hits = self.misses = 0

    def load_block(self, block: int, k: int) -> None:
        self.assign_block(block, k)

    def fetch(self, block: int, needed: list[int], count: bool = True) -> list[tuple[int, int]]:
        """Make ``needed`` experts of ``block`` resident; returns the missed keys (to copy)."""
        keys = [(block, e) for e in needed]
        miss = [k for k in keys if k not in self.where]
        if count:
            self.hits += len(keys) - len(miss)
            self.misses += len(miss)
        for k in keys:
            if k in self.where:
                self.lru.move_to_end(k)
        for key, slot in zip(miss, self.victims(len(miss), set(keys))):
            self.assign(slot, key)
        return miss


def expected_distinct_experts(E: int, k: int, tokens: int) -> float:
    """Uniform top-k routing: expected number of distinct experts ``T`` tokens touch."""
    return E * (1.0 - (1.0 - k / E) ** tokens)


def sample_topk(p: np.ndarray, tokens: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[tokens, k] distinct experts per token, drawn without replacement with probabilities ``p``
    (Gumbel top-k = successive sampling without replacement)."""
    g = np.log(np.maximum(p, 1e-300))[None, :] + rng.gumbel(size=(tokens, p.size))
    return np.argsort(-g, axis=1)[:, :k]


# ------------------------------------------------------------------------------------ the simulation
@dataclass
class _Item:
    dur: float
    waits: tuple
    min_end: float
    done: simpy.Event
    phase: str
    layer: int
    nbytes: float = 0.0


class _Stream:
    """A CUDA stream: runs submitted items in order, each after its wait events."""

    def __init__(self, env: simpy.Environment, name: str, record) -> None:
        self.env, self.name, self.record = env, name, record
        self.queue = simpy.Store(env)
        self.last: simpy.Event | None = None
        self.busy = 0.0
        env.process(self._run())

    def submit(self, dur: float, phase: str, layer: int, waits=(), min_end: float = 0.0, nbytes: float = 0.0) -> simpy.Event:
        ev = self.env.event()
        self.queue.put(_Item(dur, tuple(w for w in waits if w is not None), min_end, ev, phase, layer, nbytes))
        self.last = ev
        return ev

    def _run(self):
        env = self.env
        while True:
            it = yield self.queue.get()
            for w in it.waits:
                if not w.processed:
                    yield w
            t0 = env.now
            end = max(t0 + it.dur, it.min_end)
            if end > t0:
                yield env.timeout(end - t0)
            self.busy += end - t0
            self.record(it.layer, it.phase, t0, end, it.nbytes, self.name)
            it.done.succeed()


@dataclass
class InferenceResult:
    prefill_s: float
    decode_s: float
    batch: int
    prompt_len: int
    gen_len: int
    plan: MemoryPlan
    bytes_copied_decode: float
    hits: int
    misses: int
    passes: dict = field(default_factory=dict)
    compute_busy_s: float = 0.0
    copy_busy_s: float = 0.0
    oom: str = ""

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.batch * (self.gen_len - 1)
        return n / self.decode_s if self.decode_s > 0 and n else float("nan")

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    def summary(self) -> dict:
        p = self.plan
        steps = max(1, self.gen_len - 1)
        return {
            "step_time_s": self.prefill_s + self.decode_s,
            "tokens_per_s": self.decode_tokens_per_s,
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_bytes_copied_per_step": self.bytes_copied_decode / steps,
            "hit_rate": self.hit_rate,
            "ring_slots": p.ring_slots,
            "pool_slots": p.pool_slots,
            "peak_hbm_bytes": p.peak_hbm_bytes,
            "peak_dram_bytes": float(p.blocks * p.experts * p.expert_bytes),
            "peak_ssd_bytes": float(p.blocks * p.experts * p.expert_bytes),
            "oom": self.oom,
            "compute_busy_s": self.compute_busy_s,
            "copy_busy_s": self.copy_busy_s,
        }


class InferenceRun:
    """Simulate ``semoe infer`` (``reference.inference.Engine.generate``) of ``model`` on GPU 0 of
    ``sim``'s cluster: ``cfg.warmup_passes`` untimed prefill passes, a timed prefill pass (the bench's
    ``timed(forward)``), then ``generate``: a prefill and ``gen_len - 1`` timed decode steps."""

    def __init__(self, model: ModelSpec, cfg: InferConfig, sim, workload: Workload | None = None,
                 costs=None) -> None:
        if not model.moe_layers:
            raise SpecError("ModelSpec.experts: the inference workload needs an MoE model")
        self.m, self.cfg, self.sim = model, cfg, sim
        self.env = sim.env
        c = sim.cluster
        budget = cfg.gpu_budget_bytes if cfg.gpu_budget_bytes is not None else c.gpu.memory_bytes
        pb = cfg.plan_batch or cfg.batch
        self.max_len = cfg.prompt_len + cfg.gen_len
        self.plan = plan_memory(model, cfg.mode, budget, pb, self.max_len, pb * cfg.prompt_len, cfg.slots)
        self.costs = costs if costs is not None else BlockCosts(model, sim.cost)
        self.blocks = [i for i in range(model.layers) if model.is_moe_layer(i)]
        self.L, self.E, self.K = len(self.blocks), model.experts, self.plan.ring_slots
        self.cache = ExpertCache(self.plan.pool_slots, self.E)
        self.bw = c.pcie.bandwidth_GBps * 1e9
        self.pcie_lat = c.pcie.latency_s
        self.workload = workload or Workload(kind="infer", seq_len=cfg.prompt_len, gen_len=cfg.gen_len)
        self.rng = np.random.default_rng(self.workload.seed)
        self.popularity = routing.expert_popularity(model, self.workload, self.rng)
        self.compute = _Stream(self.env, "compute", self._record)
        self.copy = _Stream(self.env, "pcie_h2d", self._record)
        # ring state (Ring in the reference): global block counters, per-slot events
        self.g_load = self.g_compute = 0
        self.load_done: list = [None] * max(self.K, 1)
        self.compute_done: list = [None] * max(self.K, 1)
        self.pass_mode: str | None = "ring" if cfg.mode != "expert" else None
        self.passes = {"ring": 0, "expert": 0}
        self.bytes_copied = 0.0
        self.step = -1
        mem, p = sim.memory, self.plan
        mem.alloc(0.0, 0, "hbm", "dense_params", p.dense_bytes)
        mem.alloc(0.0, 0, "hbm", "kv_cache", p.kv_bytes)
        mem.alloc(0.0, 0, "hbm", "expert_pool", p.pool_bytes)
        mem.alloc(0.0, 0, "hbm", "activations", p.act_bytes)
        mem.alloc(0.0, 0, "dram", "experts_pinned", p.blocks * p.experts * p.expert_bytes)
        mem.alloc(0.0, 0, "ssd", "expert_store", p.blocks * p.experts * p.expert_bytes)
        if cfg.mode == "resident":  # loaded before the run: every block resident in its own slot
            for k, b in enumerate(self.blocks):
                self.cache.load_block(b, k)
            self.g_load = self.L

    # -------------------------------------------------------------------------- helpers
    def _record(self, layer, phase, t0, t1, nbytes, resource):
        self.sim.record(0, layer, self.step, phase, t0, t1, nbytes, 0, resource)

    def _issue(self, n_ops: int):
        """Host issues ``n_ops`` kernels; returns the host time after the last one."""
        d = n_ops * self.cfg.launch_s
        if d > 0:
            yield self.env.timeout(d)

    def _phase(self, n_ops: int, work: float, phase: str, layer: int, waits=()):
        """Issue a phase of ``n_ops`` kernels with ``work`` seconds of GPU time on the compute stream."""
        ev = self.compute.submit(work, phase, layer, waits, min_end=self.env.now + n_ops * self.cfg.launch_s)
        yield from self._issue(n_ops)
        return ev

    def _copy(self, nbytes: float, calls: int, layer: int, phase: str, waits=()):
        dur = nbytes / self.bw + calls * self.pcie_lat
        self.bytes_copied += nbytes
        return self.copy.submit(dur, phase, layer, waits, nbytes=nbytes)

    def _sync_all(self):
        """torch.cuda.synchronize(): both streams drained."""
        for s in (self.compute, self.copy):
            if s.last is not None and not s.last.processed:
                yield s.last

    # -------------------------------------------------------------------------- ring
    def _ring_issue(self):
        """Issue loads up to K blocks ahead of the block being computed (Ring._issue)."""
        eb = self.plan.expert_bytes
        while self.g_load < self.g_compute + self.K:
            k, b = self.g_load % self.K, self.blocks[self.g_load % self.L]
            if not self.cache.group_holds(k, b):
                self.cache.load_block(b, k)
                self.load_done[k] = self._copy(self.E * eb, COPIES_PER_EXPERT, b, "h2d_experts",
                                               waits=(self.compute_done[k],))
                yield from self._issue(COPIES_PER_EXPERT)
            self.g_load += 1

    def _ring_reset(self):
        self.g_load = self.g_compute
        self.load_done = [self.compute.last] * self.K  # cross_wait: after the other mechanism's work
        self.compute_done = [self.compute.last] * self.K

    # -------------------------------------------------------------------------- one forward
    def forward(self, batch: int, q_len: int, start: int):
        cfg, m, costs = self.cfg, self.m, self.costs
        T = batch * q_len
        program = BLOCK_PROGRAM["prefill" if q_len > 1 else "decode"]
        if cfg.mode == "expert":
            want_ring = expected_distinct_experts(self.E, m.top_k, T) >= cfg.fallback_frac * self.E
            mode = "ring" if want_ring and self.K >= 1 else "expert"
            if mode != self.pass_mode and mode == "ring":
                self._ring_reset()
        else:
            mode = "ring"
        self.pass_mode = mode
        self.passes[mode] += 1
        if mode == "expert":
            program = program[:2] + EXPERT_AWARE_EXTRA + program[2:]
        yield from self._phase(HOST_OPS_FORWARD["embedding"], costs.embed(T), "embedding_fwd", -1)
        predicted: dict[int, np.ndarray] = {}
        # experts with rows (the grouped GEMM skips empty groups): expected distinct experts of T tokens
        q = np.minimum(1.0, m.top_k * self.popularity)
        groups = max(1, min(self.E, round(float(np.sum(1.0 - (1.0 - q) ** T)))))
        for idx, b in enumerate(self.blocks):
            wait = None  # the expert weights this block's dispatch waits for (ring load / expert copies)
            k = None
            for seg, n_ops, sync in program:
                if seg == "attention":
                    work, phase = costs.attention(batch, q_len, start + q_len), "attention_fwd"
                elif seg == "gate":
                    work, phase = costs.gate(T), "gate_fwd"
                elif seg == "experts":
                    work, phase = costs.experts(T, groups), "experts_fwd"
                else:
                    work, phase = 0.0, f"{seg}_fwd"
                if seg == "dispatch" and mode == "ring" and cfg.mode != "resident" and k is None:
                    yield from self._ring_issue()  # Ring.acquire
                    k = self.g_compute % self.K
                    wait = self.load_done[k]
                ev = yield from self._phase(n_ops, work, phase, b, waits=(wait,))
                wait = None
                if seg == "experts" and k is not None:  # Ring.release: compute_done, load the block K ahead
                    self.compute_done[k] = ev
                    self.g_compute += 1
                    yield from self._ring_issue()
                if sync and not ev.processed:
                    yield ev
                if seg == "route":  # expert-aware: ids known on the host; copy the misses
                    ids = predicted.pop(b) if b in predicted else sample_topk(self.popularity, T, m.top_k, self.rng)
                    needed = sorted(set(int(e) for e in np.unique(ids)))
                    groups = len(needed)
                    miss = self.cache.fetch(b, needed)
                    if miss:
                        wait = self._copy(len(miss) * self.plan.expert_bytes, COPIES_PER_EXPERT * len(miss), b,
                                          "h2d_experts", waits=(self.compute.last,))
                        yield from self._issue(COPIES_PER_EXPERT * len(miss))
            if mode == "expert" and cfg.predict and idx + 1 < self.L:
                # one block ahead: the next block's gate on this block's output (+ unique, .tolist()),
                # its misses copied now (perfect prediction)
                nxt = self.blocks[idx + 1]
                gev = yield from self._phase(4 + 2, costs.gate(T), "gate_predict", nxt)
                if not gev.processed:
                    yield gev
                ids_n = sample_topk(self.popularity, T, m.top_k, self.rng)
                predicted[nxt] = ids_n
                miss_n = self.cache.fetch(nxt, sorted(set(int(e) for e in np.unique(ids_n))), count=False)
                if miss_n:
                    self._copy(len(miss_n) * self.plan.expert_bytes, COPIES_PER_EXPERT * len(miss_n), nxt,
                               "h2d_prefetch", waits=(self.compute.last,))
                    yield from self._issue(COPIES_PER_EXPERT * len(miss_n))
        yield from self._phase(HOST_OPS_FORWARD["head"], costs.head(batch), "head_fwd", -1)

    # -------------------------------------------------------------------------- the program
    def program(self, out: dict):
        cfg = self.cfg
        B, P, G = cfg.batch, cfg.prompt_len, cfg.gen_len
        env = self.env
        for _ in range(cfg.warmup_passes):
            yield from self.forward(B, P, 0)
            yield from self._sync_all()
        t0 = env.now
        yield from self.forward(B, P, 0)
        yield from self._sync_all()
        out["prefill_s"] = env.now - t0
        # generate(): prefill (untimed here; its own time equals the timed pass), then decode steps
        self.step = 0
        yield from self.forward(B, P, 0)
        yield from self._sync_all()
        h0, m0, c0 = self.cache.hits, self.cache.misses, self.bytes_copied
        t1 = env.now
        for s in range(1, G):
            self.step = s
            yield from self.forward(B, 1, P + s - 1)
        yield from self._sync_all()
        out["decode_s"] = env.now - t1
        out["hits"], out["misses"] = self.cache.hits - h0, self.cache.misses - m0
        out["bytes_decode"] = self.bytes_copied - c0

    def run(self) -> InferenceResult:
        out: dict = {}
        self.env.process(self.program(out))
        self.env.run()
        if "decode_s" not in out:
            raise RuntimeError("inference simulation did not finish (deadlock)")
        return InferenceResult(
            prefill_s=out["prefill_s"], decode_s=out["decode_s"], batch=self.cfg.batch, prompt_len=self.cfg.prompt_len,
            gen_len=self.cfg.gen_len, plan=self.plan, bytes_copied_decode=out["bytes_decode"], hits=out["hits"],
            misses=out["misses"], passes=dict(self.passes), compute_busy_s=self.compute.busy, copy_busy_s=self.copy.busy,
        )


def simulate_inference(model: ModelSpec, cluster, cfg: InferConfig, workload: Workload | None = None,
                       profile="auto", costs=None, trace: bool = True, impl: tuple[str, ...] = ("torch", "triton")):
    """One call: ``(sim, InferenceResult)``; the cost model reads ``results/profiles/<gpu>.csv`` (impl
    torch first) when ``profile == "auto"``."""
    from simulator.engine import Sim

    sim = Sim(cluster, seed=(workload.seed if workload else 0), profile=None, trace=trace)
    if isinstance(profile, str) and profile == "auto":
        sim.cost = CostModel.auto(cluster.gpu, impl=impl, loglog=True)
    elif profile is not None:
        sim.cost = CostModel(cluster.gpu, profile)
    res = InferenceRun(model, cfg, sim, workload, costs).run()
    oom = "; ".join(sim.memory.oom())
    if cfg.gpu_budget_bytes is not None and res.plan.peak_hbm_bytes > cfg.gpu_budget_bytes:
        oom = "; ".join(x for x in (oom, f"HBM: peak {res.plan.peak_hbm_bytes / 1e9:.2f} GB > budget "
                                          f"{cfg.gpu_budget_bytes / 1e9:.2f} GB") if x)
    res.oom = oom
    return sim, res
