"""Offloaded MoE inference on one GPU: prefill + greedy decode of a `semoe.ModelSpec`, with the experts
of every MoE block in host memory and three ways of bringing them to the GPU (``reference/inference``).

Resources (SimPy processes, one GPU of the cluster):

* the **host** thread, which issues kernels in program order, ``host_op_s`` per kernel
  (`CostModel.host_op_s`: the profile's ``host_op`` row measured by ``kernels/profile.py`` sweep
  ``host``, else HARDWARE.md's ~8 us per eager op; ``InferConfig.launch_s`` overrides it), and blocks
  at host synchronisations. Where the bench run measured the engine's own passes (``InferConfig.host_probe``,
  `inference_host.HostProbe`: the host program measured at tiny widths in the same run, per mode, phase
  and batch), a pass's kernels cost that probe's seconds over the counted kernels of the probed pass (the
  median over the probed batches of the same mechanism: `HostProbe.rate`)
  (scaled per block when the probe model has another block count; bf16 experts only). Resident prefill passes
  with ``InferConfig.sync_split`` (`inference_syncprobe.sync_shares`: the H100 sync probe's per-sync shares of a
  block's host time at tiny widths, ~15% for the 4 syncs) pay each host sync's share of the block's host seconds
  as a latency after the device reached the sync (the bincount's device-to-host round trip: the device idles),
  and the kernels the rest, instead of spreading it evenly over the kernels (where the part issued while the
  device runs the previous block's expert GEMMs was hidden);
* the **compute stream**, which runs kernels in issue order; a segment of ``n`` kernels with GPU work
  ``w`` issued from host time ``h`` starts when the stream is free and its inputs are ready, and ends
  at ``max(start + w, h + n * host_op_s)`` (it cannot end before its last kernel was issued). So a
  step takes ``max(device time, host time)`` between host syncs: eager decode of small batches is
  host-bound, and a sync (the host waits for the stream) stops the host running ahead;
* the **copy stream** (the H2D copy engine): ``nbytes / pcie_bandwidth + pcie_latency`` per copy call,
  ``ClusterSpec.pcie`` (``h100-single``: the measured 53.5 GB/s pinned).
Streams are ordered only by events (CUDA events in the reference).

Host program (`simulator.workload.inference_host`): the kernels the reference engine issues per
segment of a forward, where it syncs, and where it copies or dequantises experts, counted from the
reference code itself on the H100 (``results/profiles/op_counts_cuda.csv``, the CPU-counted
``op_counts.csv`` for paths not measured there; ``python -m simulator.op_counts``; never fitted). Per
MoE block, e.g. ring / resident::

    attention   norm1, qkv GEMM, RoPE, KV-cache write, SDPA, proj GEMM, residual, norm2
    moe_0       router GEMM, softmax, top-k ... -> torch.bincount (a host sync on CUDA: it reads the
                maximum back)                                         GPU work: the gate
    moe_1       aux-loss statistics, counts -> bincount
    (acquire)   ring: load the blocks up to K ahead, the compute stream waits for this block's copy
                (and, quantised, dequantises it into the workspace)
    moe_3, 4    dispatch: sort / index maps -> bincount; offsets -> .item()
    moe_5       grouped FFN (w1, w3, w2 grouped GEMMs, SiLU * mul), combine   GPU work: the experts
    (release)   ring: compute_done[slot], load the block K ahead into the slot ("compute, release,
                load", SEMOE.md)
    post        residual
Expert-aware passes add ``torch.unique`` of the routed ids (a sync), then ``fetch``: the misses of the
LRU cache (`ExpertCache`, the reference's ``ExpertPool`` registry) are copied after all compute
queued so far and the remap (-> bincount) waits for the copy. Copies issue ``copy_block`` kernels per
ring block and ``copy_expert`` per copied expert.

Quantised experts (``InferConfig.quant`` int8 / fp8, `simulator.workload.inference_quant`): the pool
holds and the copies move the quantised bytes (1 byte per weight + fp32 per-output-channel scales);
``dequant="workspace"`` (the reference's default) dequantises the block's (ring, resident) or the
fetched (expert-aware) experts on the compute stream, memory-bound, before the grouped FFN, into a
reserved workspace; ``dequant="fused"`` (the reference's fused kernels) has no pass for ring and
resident groups (fp8 GEMMs at the fp8 rate); the host program of the fused GEMM is taken as that of
the dequant path without its dequant kernels (the CPU cannot run the fused kernels to count them).

Ring memory: K slots; a pass over L blocks (prologue: blocks 0..K-1) costs ``L * max(compute, copy)``
in steady state when K >= 2 and ``L * (compute + copy)`` with K = 1 (no overlap). A forward pass
issues the loads of the next pass's first K blocks, so timed passes after a warm-up start with them
resident, as in the reference's bench.

Expert-aware mode: a forward with T tokens uses the ring when the expected number of distinct experts
under uniform top-k routing, ``E (1 - (1 - k/E)^T)``, reaches ``fallback_frac * E`` (the reference's
rule, fallback_frac 0.95); otherwise each block's tokens are routed by sampling (seeded): every token
picks ``top_k`` distinct experts without replacement with probabilities from the workload's expert
popularity (`simulator.workload.routing`: uniform, zipf, lognormal, histogram; Gumbel top-k), and the
LRU cache decides hits and misses. ``route_persist`` q > 0 correlates consecutive decode steps: each of a token's
top-k experts at a block repeats its previous step's with probability q (`inference_persist`, measured on an
engine trace; 0: independent draws). ``predict=True`` models the reference's one-block-ahead prefetch with a
predictor of accuracy ``predict_accuracy`` (1.0 perfect; `mispredict`: each expert it names for a token is
the token's true one with that probability, else another expert; validate_infer takes it from the engine
diagnostic, results/bench/infer_diag): a wrong guess is a wasted prefetch copy (and evicts an LRU entry)
and the true expert is a miss fetched on demand after the prefetches (``prefetch_used`` counts the
prefetched experts their block used, as ``ExpertPool.prefetch_used``): after
block i the host routes block i+1 (a gate phase and a host sync) and copies its misses at once, after the
compute queued so far (``ExpertPool.prefetch``); block i+1's fetch makes the compute stream wait for those
copies when it uses a prefetched expert (``ExpertPool.fetch``: ``inflight`` / ``inflight_event``), so its
remap's host sync waits for them too and the next prediction's copies start only after block i+1's
compute: one block's copies overlap nothing but that block's attention and router.
``InferenceResult.fetch_bytes_decode`` / ``prefetched`` count the expert-aware copies alone (the
reference's pool statistics): a decode batch that falls back to the ring copies through the ring, and
those stay 0. The pool's bookkeeping (`ExpertCache`) is ``ExpertPool.fetch`` / ``prefetch`` statement for
statement: the LRU moves (a prefetch's resident predicted experts in the engine's set order), at most
``capacity - E`` experts prefetched per block (none with a one-block pool), the in-flight prefetched keys
counted as used at most once and cleared by a used prefetch or a miss copy; `replay_pool_trace` runs a
routing the engine traced (``reference/inference/bench.py`` ``trace_pool_calls``) through it, and gives the
engine's hits, misses and prefetches (tests/simulator/test_sim_inference_replay.py).

Compute times come from `simulator.cost.CostModel` (the GPU profile with ``impl`` torch, which is what
the reference runs: ``torch._grouped_mm``, cuBLAS, SDPA; FLOP/s interpolated as a power law in the
rows ``m`` between measured points; roofline with a warning outside the measured range; the bf16 expert
GEMMs at the profile's ``grouped_gemm_fwd_routed`` rows, torch._grouped_mm on uneven routed groups, inside
their measured rows per expert: `inference_costs.BlockCosts.routed_gemms`). The
reference's torch dispatcher (argsort, gather, weighted index-add) runs at the measured
``TORCH_PERMUTE_GBPS``. Every counted kernel of a segment but the grouped GEMMs also occupies the compute
stream ``BlockCosts.kernel_s`` (`inference_costs.KERNEL_DEVICE_S`: the small kernels' fixed device time, from
the engine's profiled prefill), and the grouped-FFN segment is issued as its lead (``BlockCosts.ffn_lead``: the
dispatch permute and the offsets, `inference_costs.FFN_LEAD_KERNELS`) and then the GEMMs: right after the
dispatcher's sync the stream idles while the host issues the lead, and the GEMMs start after it (a
``dispatch_fwd`` trace span).

Memory (bytes on the GPU, as ``reference/inference/engine.plan_memory``): dense weights + KV cache +
an activation reserve (1.5 x the activation estimate) + the expert pool; ring ``K = pool // (E *
expert_bytes)``, expert ``C = pool // expert_bytes`` (quantised: quantised expert bytes, and the
workspace reserved first). Peak HBM reported: dense + KV + pool + the
activation estimate of the largest forward (without the 1.5 reserve factor). Host DRAM holds every
block's experts (pinned), the SSD their store files.

Modules: this one holds `InferenceRun` (set-up, the forward pass, the timed program) and `simulate_inference`;
`inference_config` (`InferConfig`), `inference_pool` (`ExpertCache`, `replay_pool_trace`, the sampled routing),
`inference_streams` (the streams, the copies and the ring), `inference_pass` (a pass's mechanism, host program,
host rate and routing) and `inference_result` (`InferenceResult`); the costs, host program, memory plan,
quantisation and routing persistence live in the other `inference_*` modules.
"""

from __future__ import annotations

import numpy as np

from semoe import ModelSpec, SpecError, Workload
from simulator.cost import CostModel
from simulator.workload import routing
from simulator.workload.inference_config import MODES, InferConfig
from simulator.workload.inference_costs import (  # noqa: F401
    TORCH_PERMUTE_GBPS,
    BlockCosts,
    FixedCosts,
)
from simulator.workload.inference_host import HostProbe, host_program  # noqa: F401 (HostProbe re-exported)
from simulator.workload.inference_memory import (  # noqa: F401 (re-exported)
    MemoryPlan,
    activation_estimate_bytes,
    kv_cache_bytes,
    plan_memory,
)
from simulator.workload.inference_pass import InferencePassMixin
from simulator.workload.inference_pool import (  # noqa: F401 (re-exported)
    ExpertCache,
    expected_distinct_experts,
    mispredict,
    replay_pool_trace,
    sample_topk,
)
from simulator.workload.inference_result import InferenceResult
from simulator.workload.inference_streams import InferenceStreamsMixin, Stream


class InferenceRun(InferencePassMixin, InferenceStreamsMixin):
    """Simulate ``semoe infer`` (``reference.inference.Engine.generate``) of ``model`` on GPU 0 of
    ``sim``'s cluster: ``cfg.warmup_passes`` untimed prefill passes, a timed prefill pass (the bench's
    ``timed(forward)``), then ``generate``: a prefill and ``gen_len - 1`` timed decode steps.

    The host issues each segment of the reference's host program (`inference_host`, counted from the
    reference code) at ``host_op_s`` per kernel; the compute stream runs a segment's GPU work no earlier
    than its inputs are ready and no earlier than its last kernel was issued, so a step takes
    ``max(device time, host time)`` between host syncs, and a sync makes the host wait for the device."""

    def __init__(self, model: ModelSpec, cfg: InferConfig, sim, workload: Workload | None = None,
                 costs=None, op_counts=None, counts_device: str = "cuda") -> None:
        if not model.moe_layers:
            raise SpecError("ModelSpec.experts: the inference workload needs an MoE model")
        self.m, self.cfg, self.sim = model, cfg, sim
        self.env = sim.env
        c = sim.cluster
        budget = cfg.gpu_budget_bytes if cfg.gpu_budget_bytes is not None else c.gpu.memory_bytes
        pb = cfg.plan_batch or cfg.batch
        self.max_len = cfg.prompt_len + cfg.gen_len
        self.plan = plan_memory(model, cfg.mode, budget, pb, self.max_len, pb * cfg.prompt_len, cfg.slots,
                                cfg.quant, cfg.dequant)
        self.host_op_s = cfg.launch_s if cfg.launch_s is not None else sim.cost.host_op_s
        self.base_host_op_s = self.host_op_s
        # the run's host probe of this code path (bf16 experts only: the probe does not quantise)
        self.probe_key = None
        if cfg.host_probe is not None and cfg.quant is None:
            self.probe_key = ("expert" if cfg.predict else "expert_nopred") if cfg.mode == "expert" else cfg.mode
        self.rates: dict = {}
        # op_counts: one table's path; else the CUDA-measured counts (the simulated GPU is a CUDA GPU),
        # the CPU table for paths not measured there; counts_device "cpu": the CPU table only
        self.programs = {(mode, phase): host_program(cfg.quant, mode, phase, op_counts, counts_device)
                         for mode in MODES for phase in ("prefill", "decode")}
        # dequant passes: ring / resident groups unless the GEMMs are fused; expert-aware always
        self.dequant_ring = cfg.quant is not None and cfg.dequant == "workspace"
        self.dequant_expert = cfg.quant is not None
        self.blocks = [i for i in range(model.layers) if model.is_moe_layer(i)]
        self.L, self.E, self.K = len(self.blocks), model.experts, self.plan.ring_slots
        self.cache = ExpertCache(self.plan.pool_slots, self.E)
        self.bw = c.pcie.bandwidth_GBps * 1e9
        self.pcie_lat = c.pcie.latency_s
        self.workload = workload or Workload(kind="infer", seq_len=cfg.prompt_len, gen_len=cfg.gen_len)
        self.rng = np.random.default_rng(self.workload.seed)
        self.popularity = routing.expert_popularity(model, self.workload, self.rng)
        self.costs = costs if costs is not None else BlockCosts(model, sim.cost, cfg.quant, cfg.dequant,
                                                                popularity=self.popularity)
        self.compute = Stream(self.env, "compute", self._record)
        self.copy = Stream(self.env, "pcie_h2d", self._record)
        # ring state (Ring in the reference): global block counters, per-slot events
        self.g_load = self.g_compute = 0
        self.load_done: list = [None] * max(self.K, 1)
        self.compute_done: list = [None] * max(self.K, 1)
        self.pass_mode: str | None = "ring" if cfg.mode != "expert" else None
        self.passes = {"ring": 0, "expert": 0}
        self.bytes_copied = 0.0
        self.fetch_bytes = 0.0
        # ExpertPool.inflight_event: the copy stream's event after the last prefetch; a fetch that uses a key
        # still in flight (``ExpertCache.inflight``) makes the compute stream wait for it
        self.inflight_event = None
        self.last_copy_s = 0.0  # the latest block's expert copy seconds (`InferConfig.host_after_copy`)
        self.host_ops = 0
        self.sync_wait_s = 0.0  # host seconds of the syncs' own latency (`InferConfig.sync_split`)
        self.step = -1
        self.prev_route: dict = {}  # block -> the last decode step's routing [tokens, k] (route_persist)
        mem, p = sim.memory, self.plan
        host_bytes = p.blocks * p.experts * p.expert_bytes
        mem.alloc(0.0, 0, "hbm", "dense_params", p.dense_bytes)
        mem.alloc(0.0, 0, "hbm", "kv_cache", p.kv_bytes)
        mem.alloc(0.0, 0, "hbm", "expert_pool", p.pool_bytes)
        mem.alloc(0.0, 0, "hbm", "activations", p.act_bytes)
        mem.alloc(0.0, 0, "dram", "experts_pinned", host_bytes)
        mem.alloc(0.0, 0, "ssd", "expert_store", host_bytes)
        if cfg.mode == "resident":  # loaded before the run: every block resident in its own slot
            for k, b in enumerate(self.blocks):
                self.cache.load_block(b, k)
            self.g_load = self.L

    # -------------------------------------------------------------------------- one forward
    def forward(self, batch: int, q_len: int, start: int):
        cfg, m, costs = self.cfg, self.m, self.costs
        T = batch * q_len
        mode, reset = self._begin_pass(T)
        if reset:
            self._ring_reset()
        phase_name = "prefill" if q_len > 1 else "decode"
        self.host_op_s = self._host_rate(phase_name, batch)
        prog = self._program(mode, phase_name)
        sync_lat: dict = {}
        if cfg.sync_split and cfg.mode == "resident" and phase_name == "prefill":
            # the syncs' latency in the serial chain (after the device reached them), the kernels the rest of the
            # block's host seconds: a block's host total is unchanged, so a host-bound (tiny width) pass is too
            block_s = self.host_op_s * prog.block_kernels
            sync_lat = {seg: sh * block_s for seg, sh in cfg.sync_split}
            self.host_op_s *= 1.0 - sum(sh for _, sh in cfg.sync_split)
        resident = cfg.mode == "resident"
        yield from self._phase(prog.embedding, costs.embed(T) + costs.kernels(prog.embedding), "embedding_fwd", -1)
        predicted: dict[int, np.ndarray] = {}
        # experts with rows (the grouped GEMM skips empty groups): expected distinct experts of T tokens
        q = np.minimum(1.0, m.top_k * self.popularity)
        groups = max(1, min(self.E, round(float(np.sum(1.0 - (1.0 - q) ** T)))))
        segs = prog.block
        # the segment holding the grouped FFN: the last one with kernels (before "post")
        ffn_i = max(i for i, s in enumerate(segs) if s.name.startswith("moe_") and s.kernels > 0)
        base_host = self.host_op_s
        after_copy = cfg.host_after_copy if mode == "expert" and q_len == 1 else ()

        def after_copy_rate() -> float:  # `InferConfig.host_after_copy` after the latest expert copies
            return base_host * (1.0 + after_copy[0] + after_copy[1] * self.last_copy_s)

        for idx, b in enumerate(self.blocks):
            wait = None  # the expert weights the next segment waits for (ring load / expert copies)
            k = None
            if after_copy:  # the spans before the fetch: after the previous block's copies
                self.host_op_s = after_copy_rate()
            for i, seg in enumerate(segs):
                n, lead = seg.kernels, 0
                if seg.name == "attention":
                    work, phase = costs.attention(batch, q_len, start + q_len), "attention_fwd"
                elif seg.name == "moe_0":
                    work, phase = costs.gate(T), "gate_fwd"
                elif i == ffn_i:
                    work, phase = costs.experts(T, groups, fused=mode == "ring"), "experts_fwd"
                    n -= costs.ffn_gemms  # priced by `experts`
                    lead = min(seg.kernels, costs.ffn_lead(fused=mode == "ring"))
                else:
                    work, phase = 0.0, f"{seg.name}_fwd"
                if lead:  # the dispatch and offsets: issued (and run) before the first grouped GEMM can start
                    yield from self._phase(lead, costs.kernels(lead), "dispatch_fwd", b, waits=(wait,))
                    n -= lead
                    ev = yield from self._phase(seg.kernels - lead, work + costs.kernels(n), phase, b)
                else:
                    ev = yield from self._phase(seg.kernels, work + costs.kernels(n), phase, b, waits=(wait,))
                if seg.kernels or work:
                    wait = None
                if seg.sync and not ev.processed:
                    yield ev
                if seg.sync and sync_lat.get(seg.name):
                    self.sync_wait_s += sync_lat[seg.name]
                    yield self.env.timeout(sync_lat[seg.name])
                if seg.marker == "acquire" and mode == "ring":  # Ring.acquire: loads, wait, dequant
                    if not resident:
                        yield from self._ring_issue(prog)
                    k = self.g_compute % self.K
                    wait = None if resident else self.load_done[k]
                    if self.dequant_ring:
                        yield from self._dequant(prog, self.E, b, waits=(wait,))
                        wait = None
                elif seg.marker == "release" and k is not None:  # Ring.release: load the block K ahead
                    self.compute_done[k] = self.compute.last
                    self.g_compute += 1
                    if not resident:
                        yield from self._ring_issue(prog)
                elif seg.marker == "fetch" and mode == "expert":  # ids on the host: copy the misses
                    needed, miss, used = self._fetch_block(b, T, q_len, predicted)
                    groups = len(needed)
                    if used:
                        # ExpertPool.fetch: a prefetched expert is used, the compute stream waits for the
                        # prefetch copies (one event covers every earlier copy on the copy stream)
                        wait = self.inflight_event
                    if after_copy:  # the spans after the fetch: after this block's copies
                        self.last_copy_s = len(miss) * self.plan.expert_bytes / self.bw
                        self.host_op_s = after_copy_rate()
                    if miss:  # the misses' copy follows every earlier copy
                        wait = yield from self._copy_misses(prog, b, miss, "h2d_experts")
                    if self.dequant_expert:
                        yield from self._dequant(prog, len(needed), b, waits=(wait,))
                        wait = None
            if mode == "expert" and cfg.predict and idx + 1 < self.L:
                # one block ahead: the next block's norm2 + gate on this block's output (+ unique,
                # .tolist(): the host waits), its misses copied now (perfect prediction)
                nxt = self.blocks[idx + 1]
                gev = yield from self._phase(prog.unit("predict"), costs.gate(T), "gate_predict", nxt)
                if not gev.processed:
                    yield gev
                miss_n = self._prefetch_block(nxt, T, q_len, predicted)  # the routing block nxt will use
                if miss_n:
                    self.inflight_event = yield from self._copy_misses(prog, nxt, miss_n, "h2d_prefetch")
                    if after_copy:
                        self.last_copy_s += len(miss_n) * self.plan.expert_bytes / self.bw
        self.host_op_s = base_host
        # the head's GEMM is priced by `costs.head`; its norm (and any other kernel) carries the per-kernel time
        yield from self._phase(prog.head, costs.head(batch) + costs.kernels(prog.head - 1), "head_fwd", -1)

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
        h0, m0, c0, f0 = self.cache.hits, self.cache.misses, self.bytes_copied, self.fetch_bytes
        t1 = env.now
        for s in range(1, G):
            self.step = s
            yield from self.forward(B, 1, P + s - 1)
        yield from self._sync_all()
        out["decode_s"] = env.now - t1
        out["hits"], out["misses"] = self.cache.hits - h0, self.cache.misses - m0
        out["bytes_decode"] = self.bytes_copied - c0
        out["fetch_decode"] = self.fetch_bytes - f0

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
            fetch_bytes_decode=out["fetch_decode"], prefetched=self.cache.prefetched, prefetch_used=self.cache.prefetch_used,
            host_op_s=dict(self.rates),
        )


def simulate_inference(model: ModelSpec, cluster, cfg: InferConfig, workload: Workload | None = None,
                       profile="auto", costs=None, trace: bool = True, impl: tuple[str, ...] = ("torch", "triton"),
                       op_counts=None, counts_device: str = "cuda"):
    """One call: ``(sim, InferenceResult)``; the cost model reads ``results/profiles/<gpu>.csv`` (impl
    torch first) when ``profile == "auto"``; ``op_counts`` / ``counts_device``: the host-program table
    (`inference_host.host_program`; default the CUDA-measured counts, CPU counts as the fallback)."""
    from simulator.engine import Sim

    sim = Sim(cluster, seed=(workload.seed if workload else 0), profile=None, trace=trace)
    if isinstance(profile, str) and profile == "auto":
        sim.cost = CostModel.auto(cluster.gpu, impl=impl, loglog=True)
    elif profile is not None:
        sim.cost = CostModel(cluster.gpu, profile)
    res = InferenceRun(model, cfg, sim, workload, costs, op_counts, counts_device).run()
    oom = "; ".join(sim.memory.oom())
    if cfg.gpu_budget_bytes is not None and res.plan.peak_hbm_bytes > cfg.gpu_budget_bytes:
        oom = "; ".join(x for x in (oom, (f"HBM: peak {res.plan.peak_hbm_bytes / 1e9:.2f} GB > budget "
                                          f"{cfg.gpu_budget_bytes / 1e9:.2f} GB")) if x)
    res.oom = oom
    return sim, res
