"""One training iteration of a `semoe.Run`: GPT-MoE with data + expert parallelism, ZeRO, offload.

Groups: ``W`` ranks; expert-parallel groups are blocks of ``EP`` consecutive ranks (rank ``j`` of a
block owns experts ``j*E/EP ..``); expert-data-parallel groups are ranks with the same index in their
block. Dense parameters are data parallel over all ``W`` ranks, sharded ZeRO-style over all of them
(``zero_stage``, exactly as `semoe.sizing.dense_state_bytes_per_rank` counts).

Per rank and micro-batch, the compute stream runs (phase names as `semoe.trace` / the reference):

forward: [ZeRO-3: wait ``param_allgather`` of the embedding/head, kept until ``embedding_bwd``]
``embedding_fwd``; every block i: [ZeRO-3: wait ``param_allgather`` of i, prefetch i+1..i+prefetch_depth on
the comm stream] ``attention_fwd``; MoE blocks: ``gate_fwd``, ``dispatch_a2a`` (blocking, EP group),
[expert params offloaded: wait ``h2d_prefetch`` of i's local experts, prefetched ahead on the H2D
copy engine] ``experts_fwd``, ``combine_a2a``; dense blocks: ``ffn_fwd``. Then ``head_fwd``/``head_bwd``.
backward, blocks in reverse: [ZeRO-3: re-gather], ``combine_a2a_bwd``, ``experts_bwd``,
``dispatch_a2a_bwd``, ``gate_bwd``, ``attention_bwd``; in the last micro-batch the block's dense
gradients join a fusion bucket that is reduced on the comm stream when full (``grad_reduce_scatter``
for ZeRO >= 2, else ``grad_allreduce``), expert gradients are all-reduced over the expert-data-parallel
group (``expert_grad_allreduce``, when it has > 1 rank) and, when expert parameters are offloaded,
copied to the host (``d2h_grads``).
step end: wait for every gradient collective, then ``optimizer`` (dense on the GPU: 32 bytes of HBM
traffic per parameter of the local shard; on the CPU: the same bytes through the node's DRAM, shared by
its ranks), and the expert optimizer on its tier (``ssd``: fp32 states of uncached experts read and
written back, pipelined with the CPU update: ``max(read, update, write)``).

Backward costs 2 x forward for every matmul (`semoe.sizing`) times the cost model's calibrated
``backward_gemm_factor`` (applied to the whole backward phase). Activations kept for backward
(estimate after Korthikanti et al. 2022, 16-bit, flash attention): ``15 T h`` bytes per block for
attention and norms, plus for an expert FFN ``tokens_in * (3 h + 4 ffn)`` bytes and the dispatch
buffers ``(tokens_out + tokens_in) * 2 h``.
"""

from __future__ import annotations

import numpy as np
import simpy

from semoe import Run
from semoe.sizing import block_params, count_params, embedding_params, expert_params, state_bytes_per_tier
from simulator import collectives as C
from simulator.engine import Sim
from simulator.workload import routing

CATS = ("compute", "comm", "copy", "optimizer")
ADAM_BYTES_PER_PARAM = 32  # read param+grad+master+m+v (16 B), write param+master+m+v (16 B)


class TrainingIteration:
    def __init__(self, run: Run, sim: Sim) -> None:
        self.run_spec, self.sim = run, sim
        m, c, p, w = run.model, run.cluster, run.plan, run.workload
        self.m, self.c, self.p, self.w = m, c, p, w
        self.env = sim.env
        self.W = c.world_size
        self.EP = p.expert_parallel
        self.local_experts = m.experts // self.EP if m.moe_layers else 0
        self.T = w.micro_batch * w.seq_len
        self.dtype_bytes = m.dtype_bytes
        cm = sim.cost
        T, h, dt = self.T, m.hidden, m.dtype
        kv = m.n_kv_heads * m.head_dim
        # ---- per-phase compute times (same on every rank, except the experts)
        self.t_attn = (cm.matmul(T, h + 2 * kv, h, dt) + cm.attention_core(T, w.seq_len, h, dt)
                       + cm.matmul(T, h, h, dt) + cm.memory(8 * T * h * self.dtype_bytes))
        self.t_gate = cm.matmul(T, m.experts, h, dt) + cm.memory(4 * T * m.top_k * h * self.dtype_bytes)
        mats = 3 if m.activation == "swiglu" else 2
        self.t_dense_ffn = mats * cm.matmul(T, m.dense_ffn_width, h, dt)
        self.t_head = cm.matmul(T, m.vocab, h, dt)
        self.t_embed = cm.memory(2 * T * h * self.dtype_bytes)
        self.flops_attn = 2 * T * (2 * h * h + 2 * h * kv) + 4 * T * w.seq_len * h
        # ---- routing: per MoE block, dispatch matrices and tokens each rank's experts receive
        self.bpt = h * self.dtype_bytes
        self.a2a: dict[int, np.ndarray] = {}
        self.t_experts: dict[int, np.ndarray] = {}
        self.tokens_in: dict[int, np.ndarray] = {}
        self.tokens_out: dict[int, np.ndarray] = {}
        rng = sim.rng
        pop = routing.expert_popularity(m, w, rng) if m.moe_layers else None
        for i in range(m.layers):
            if not m.is_moe_layer(i):
                continue
            counts = routing.token_counts(m, w, self.W, rng, pop)
            mats_ = routing.alltoall_matrices(counts, self.EP, self.bpt)
            self.a2a[i] = mats_
            tin = (mats_.sum(axis=1) / self.bpt).reshape(-1)  # [W]
            self.tokens_in[i] = tin
            self.tokens_out[i] = counts.sum(axis=1).astype(float)
            per_exp = {x: mats * cm.matmul(x / self.local_experts, m.ffn, h, dt, groups=self.local_experts)
                       for x in np.unique(tin)}
            self.t_experts[i] = np.array([per_exp[x] for x in tin])
        # ---- parameter sizes
        self.dense_layer = [block_params(m, i)["dense"] for i in range(m.layers)]
        self.embed = embedding_params(m)
        self.expert_local_params = self.local_experts * expert_params(m) if m.moe_layers else 0
        self.zero3 = p.zero_stage == 3
        self.offload_experts = p.offload.expert_params != "gpu"
        self.ranks = np.arange(self.W)
        self.bwd = 2.0 * cm.backward_gemm_factor  # backward / forward time of a compute phase
        # ---- per-rank state
        env = self.env
        self.comm = [simpy.Resource(env, 1) for _ in range(self.W)]
        self.h2d = [simpy.Resource(env, 1) for _ in range(self.W)]
        self.d2h = [simpy.Resource(env, 1) for _ in range(self.W)]
        self.acc = np.zeros((self.W, len(CATS)))
        self.end = np.zeros(self.W)
        self._static_memory()

    # ------------------------------------------------------------------ memory
    def _static_memory(self) -> None:
        tiers = state_bytes_per_tier(self.m, self.p)
        mem, t = self.sim.memory, 0.0
        mem.alloc_all(t, "hbm", "model_states", tiers["gpu"])
        mem.alloc_all(t, "dram", "model_states", tiers["cpu"])
        mem.alloc_all(t, "ssd", "model_states", tiers["ssd"])
        self.state_tiers = tiers
        if self.p.fusion_bucket_bytes:
            mem.alloc_all(t, "hbm", "comm_buffers", 2 * self.p.fusion_bucket_bytes)

    def _act_bytes(self, r: int, i: int) -> float:
        h = self.m.hidden
        b = 15.0 * self.T * h
        if i in self.a2a:
            tin, tout = self.tokens_in[i][r], self.tokens_out[i][r]
            b += tin * (3 * h + 4 * self.m.ffn) + (tin + tout) * 2 * h
        elif self.m.moe_every:
            b += self.T * (3 * h + 4 * self.m.dense_ffn_width)
        return b

    # ------------------------------------------------------------------ primitives
    def compute(self, r, layer, mb, phase, dur, flops=0.0):
        if self.comm[r].count or self.h2d[r].count:
            dur *= self.sim.cost.overlap_slowdown
        t0 = self.env.now
        yield self.env.timeout(dur)
        self.acc[r, 0] += dur
        self.sim.record(r, layer, mb, phase, t0, t0 + dur, 0, flops, "compute")

    def wait(self, r, ev, cat: int):
        t0 = self.env.now
        yield ev
        self.acc[r, cat] += self.env.now - t0

    def blocking(self, r, key, group, factory, layer, mb, phase, nbytes):
        t0 = self.env.now
        yield self.sim.collective(key, r, len(group), factory)
        self.acc[r, 1] += self.env.now - t0
        self.sim.record(r, layer, mb, phase, t0, self.env.now, nbytes, 0, "a2a")

    def background(self, r, key, group, factory, layer, mb, phase, nbytes):
        return self.env.process(self._bg(r, key, group, factory, layer, mb, phase, nbytes))

    def _bg(self, r, key, group, factory, layer, mb, phase, nbytes):
        with self.comm[r].request() as req:
            yield req
            t0 = self.env.now
            yield self.sim.collective(key, r, len(group), factory)
            self.sim.record(r, layer, mb, phase, t0, self.env.now, nbytes, 0, "comm")

    def copy(self, r, kind, nbytes, layer, mb, phase):
        return self.env.process(self._copy(r, kind, nbytes, layer, mb, phase))

    def _copy(self, r, kind, nbytes, layer, mb, phase):
        res = self.h2d[r] if kind == "h2d" else self.d2h[r]
        with res.request() as req:
            yield req
            t0 = self.env.now
            yield self.sim.net.transfer_routes(self.sim.topo.device_route(kind, r), np.array([float(nbytes)]))
            self.sim.record(r, layer, mb, phase, t0, self.env.now, nbytes, 0, f"pcie_{kind}")

    # ------------------------------------------------------------------ collectives
    def _gather(self, r, state, key, layer, mb):
        """ZeRO-3: all-gather the fp16 params of block ``layer`` (-1: embedding/head) from W shards."""
        if key in state:
            return
        topo, W = self.sim.topo, self.W
        nbytes = 2.0 * (self.dense_layer[layer] if layer >= 0 else self.embed)
        group = self.ranks
        state[key] = self.background(r, ("ag",) + key, group, lambda: C.all_gather(topo, group, nbytes),
                                     layer, mb, "param_allgather", nbytes)
        self.sim.memory.alloc(self.env.now, r, "hbm", "gathered_params", nbytes * (W - 1) / W)

    def _h2d(self, r, state, key, layer, mb):
        if key in state or layer not in self.a2a:
            return
        nbytes = 2.0 * self.local_experts * expert_params(self.m)  # fp16 params of the local experts
        state[key] = self.copy(r, "h2d", nbytes, layer, mb, "h2d_prefetch")

    def _a2a(self, r, i, mb, phase, transpose: bool):
        EP, g = self.EP, r // self.EP
        group = np.arange(g * EP, (g + 1) * EP)
        M = self.a2a[i][g]
        M = M.T if transpose else M
        topo, algo = self.sim.topo, self.p.alltoall
        nbytes = float(M[r - g * EP].sum())
        return self.blocking(r, (phase, mb, i, g), group, lambda: C.all_to_all(topo, group, M, algo), i, mb, phase, nbytes)

    # ------------------------------------------------------------------ the rank program
    def process(self, r):
        env, m, p = self.env, self.m, self.p
        L, d = m.layers, p.prefetch_depth
        mem = self.sim.memory
        pending: list = []  # background gradient collectives
        copies_out: list = []  # gradient copies to the host
        bucket = [0.0]
        bucket_id = [0]
        dense_group = self.ranks
        topo = self.sim.topo
        EP = self.EP
        edp_group = np.arange(r % EP, self.W, EP)
        reduce = C.reduce_scatter if p.zero_stage >= 2 else C.all_reduce
        red_phase = "grad_reduce_scatter" if p.zero_stage >= 2 else "grad_allreduce"

        def flush(force: bool) -> None:
            if bucket[0] <= 0 or (not force and bucket[0] < max(p.fusion_bucket_bytes, 1)):
                return
            nb = bucket[0]
            bucket[0] = 0.0
            bucket_id[0] += 1
            pending.append(self.background(r, ("grad", bucket_id[0]), dense_group,
                                           lambda nb=nb: reduce(topo, dense_group, nb), -1, -1, red_phase, nb))

        def add_grads(layer: int, params: float, tensors: int) -> None:
            for _ in range(tensors if not p.fusion_bucket_bytes else 1):
                bucket[0] += 2.0 * params / (tensors if not p.fusion_bucket_bytes else 1)
                flush(force=not p.fusion_bucket_bytes)

        tensors_per_block = 8 if m.bias else 7  # q, k, v, o, 2 norms, router / ffn (unfused count)
        for mb in range(self.w.micro_batches):
            last = mb == self.w.micro_batches - 1
            gathered: dict = {}
            copies: dict = {}
            if self.zero3:
                self._gather(r, gathered, ("emb", mb), -1, mb)
                yield from self.wait(r, gathered[("emb", mb)], 1)
            yield from self.compute(r, -1, mb, "embedding_fwd", self.t_embed)
            for i in range(L):
                if self.zero3:
                    for j in range(i, min(L, i + d + 1)):
                        self._gather(r, gathered, ("fwd", mb, j), j, mb)
                if self.offload_experts:
                    for j in range(i, min(L, i + d + 1)):
                        self._h2d(r, copies, ("fwd", mb, j), j, mb)
                if self.zero3:
                    yield from self.wait(r, gathered[("fwd", mb, i)], 1)
                yield from self.compute(r, i, mb, "attention_fwd", self.t_attn, self.flops_attn)
                if i in self.a2a:
                    yield from self.compute(r, i, mb, "gate_fwd", self.t_gate)
                    yield from self._a2a(r, i, mb, "dispatch_a2a", False)
                    if self.offload_experts:
                        yield from self.wait(r, copies[("fwd", mb, i)], 2)
                    yield from self.compute(r, i, mb, "experts_fwd", self.t_experts[i][r])
                    yield from self._a2a(r, i, mb, "combine_a2a", True)
                else:
                    yield from self.compute(r, i, mb, "ffn_fwd", self.t_dense_ffn)
                mem.alloc(env.now, r, "hbm", "activations", self._act_bytes(r, i))
                if self.zero3:
                    mem.free(env.now, r, "hbm", "gathered_params", 2.0 * self.dense_layer[i] * (self.W - 1) / self.W)
            yield from self.compute(r, -1, mb, "head_fwd", self.t_head)
            yield from self.compute(r, -1, mb, "head_bwd", self.bwd * self.t_head)
            for i in reversed(range(L)):
                if self.zero3:
                    for j in range(i, max(-1, i - d - 1), -1):
                        self._gather(r, gathered, ("bwd", mb, j), j, mb)
                if self.offload_experts:
                    for j in range(i, max(-1, i - d - 1), -1):
                        self._h2d(r, copies, ("bwd", mb, j), j, mb)
                if self.zero3:
                    yield from self.wait(r, gathered[("bwd", mb, i)], 1)
                if i in self.a2a:
                    yield from self._a2a(r, i, mb, "combine_a2a_bwd", False)
                    if self.offload_experts:
                        yield from self.wait(r, copies[("bwd", mb, i)], 2)
                    yield from self.compute(r, i, mb, "experts_bwd", self.bwd * self.t_experts[i][r])
                    yield from self._a2a(r, i, mb, "dispatch_a2a_bwd", True)
                    yield from self.compute(r, i, mb, "gate_bwd", self.bwd * self.t_gate)
                else:
                    yield from self.compute(r, i, mb, "ffn_bwd", self.bwd * self.t_dense_ffn)
                yield from self.compute(r, i, mb, "attention_bwd", self.bwd * self.t_attn, 2 * self.flops_attn)
                mem.free(env.now, r, "hbm", "activations", self._act_bytes(r, i))
                if self.zero3:
                    mem.free(env.now, r, "hbm", "gathered_params", 2.0 * self.dense_layer[i] * (self.W - 1) / self.W)
                if last:
                    add_grads(i, self.dense_layer[i], tensors_per_block)
                    if i in self.a2a:
                        nb = 2.0 * self.local_experts * expert_params(m)
                        if len(edp_group) > 1:
                            pending.append(self.background(
                                r, ("egrad", i, r % EP), edp_group,
                                lambda nb=nb: C.all_reduce(topo, edp_group, nb), i, mb, "expert_grad_allreduce", nb))
                        if self.offload_experts:
                            copies_out.append(self.copy(r, "d2h", nb, i, mb, "d2h_grads"))
            yield from self.compute(r, -1, mb, "embedding_bwd", 2 * self.t_embed)
            if self.zero3:
                mem.free(env.now, r, "hbm", "gathered_params", 2.0 * self.embed * (self.W - 1) / self.W)
            if last:
                add_grads(-1, self.embed, 3)
                flush(force=True)
        for ev in pending:
            yield from self.wait(r, ev, 1)
        for ev in copies_out:
            yield from self.wait(r, ev, 2)
        yield from self.optimizer(r)
        self.end[r] = env.now

    def optimizer(self, r):
        env, p, c = self.env, self.p, self.c
        sim = self.sim
        pc = count_params(self.m)
        shard = pc.dense / (self.W if p.zero_stage >= 1 else 1)
        gpn = c.gpus_per_node
        t_gpu = 0.0
        t_host = 0.0
        if p.offload.dense_optimizer == "gpu":
            t_gpu += sim.cost.memory(ADAM_BYTES_PER_PARAM * shard)
        else:
            t_host += ADAM_BYTES_PER_PARAM * shard * gpn / (c.host_memory_GBps * 1e9)
        ep = self.expert_local_params * self.m.moe_layers
        t_ssd = 0.0
        if p.offload.expert_optimizer == "gpu":
            t_gpu += sim.cost.memory(ADAM_BYTES_PER_PARAM * ep)
        else:
            t_host += ADAM_BYTES_PER_PARAM * ep * gpn / (c.host_memory_GBps * 1e9)
            if p.offload.expert_optimizer == "ssd" and self.local_experts:
                cached = min(p.cpu_cache_experts, self.local_experts) / self.local_experts
                b = 12.0 * ep * (1 - cached) * gpn
                t_ssd = max(b / (c.ssd_read_GBps * 1e9), b / (c.ssd_write_GBps * 1e9))
        t_off = max(t_host, t_ssd)
        t0 = env.now
        dur = max(t_gpu, t_off)
        yield env.timeout(dur)
        self.acc[r, 3] += dur
        if t_gpu:
            sim.record(r, -1, -1, "optimizer", t0, t0 + t_gpu, 0, 0, "compute")
        if t_host:
            sim.record(r, -1, -1, "optimizer", t0, t0 + t_host, 0, 0, "cpu")
        if t_ssd:
            sim.record(r, -1, -1, "optimizer_ssd", t0, t0 + t_ssd, 0, 0, "ssd")

    # ------------------------------------------------------------------ driver
    def run(self) -> dict:
        for r in range(self.W):
            self.env.process(self.process(r))
        self.env.run()
        self.sim.check_all_joined()
        return self.summary()

    def summary(self) -> dict:
        step = float(self.end.max())
        tokens = self.W * self.w.tokens_per_rank_step
        from semoe.sizing import training_flops_per_token

        flops = training_flops_per_token(self.m, self.w.seq_len, self.p.recompute_experts) * tokens
        mem = self.sim.memory
        busy = self.acc.sum(axis=1)
        per_rank = {cat: self.acc[:, k] for k, cat in enumerate(CATS)}
        per_rank["idle"] = np.maximum(step - busy, 0.0)
        return {
            "step_time_s": step,
            "tokens_per_s": tokens / step if step > 0 else float("inf"),
            "mfu": flops / step / (self.W * self.c.gpu.bf16_tflops * 1e12) if step > 0 else 0.0,
            "peak_hbm_bytes": mem.peak_hbm(),
            "peak_dram_bytes": mem.peak_node("dram"),
            "peak_ssd_bytes": mem.peak_node("ssd"),
            "oom": "; ".join(mem.oom()),
            "breakdown": per_rank,
        }
