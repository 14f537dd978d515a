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

Offloaded expert states (`simulator.workload.offload` decides which local experts a step uses and which
the LFU CPU cache holds; tiers from ``plan.offload``; the layout is `reference.offload`'s): the host keeps a
pinned compute-dtype mirror of every offloaded expert's weights (and its gradient buffer); the SSD tier
holds the fp32 states (master, m, v: 12 bytes per parameter) of the experts the CPU cache does not hold.
Before ``experts_fwd`` and again before ``experts_bwd`` of every micro-batch (the GPU keeps ``depth + 1``
layer slots, SEMOE.md), the layer's used experts' 16-bit params cross PCIe (``h2d_prefetch`` on the
rank's H2D copy engine). ``prefetch_depth`` d >= 1 issues layers i+1..i+d while layer i computes (2D
prefetch); d = 0 fetches on demand when the experts are needed, so compute waits for the copy. Gradients
of every local expert go to the host (``d2h_grads`` on the D2H engine, concurrent with H2D: PCIe is full
duplex) and the CPU optimizer (one per-node engine, ``cpu_adam``) updates every local expert (unused
ones too, as AdamW does); for ``expert_optimizer == ssd`` each uncached state is read (``ssd_read``) before
and written back (``ssd_write``) after its update, except experts the cache admits this step (kept, dirty);
experts it evicts are written back (``ssd_writeback``); one disk per node serves reads and writes in
turn. The stages are pipelined over experts (each holds its engine). With ``expert_params == gpu``
(ZeRO-Offload style) the updated params are copied back (``h2d_params``). Schedule: ``impl="ideal"``
starts a layer's D2H and update as soon as its backward is done (the last micro-batch) and the step waits
for them; ``impl="reference"`` follows `reference.offload`: D2H and updates after the backward and the
clipping, one task per layer on one optimizer thread (FIFO, layer order: read the layer's missed states,
one AdamW over its experts, queue the write-backs without awaiting them), the next step's fetch of layer i
waiting for layer i's update (so later layers' updates overlap the next forward) and, with d >= 1, the SSD
state reads of layer i staged at its first forward of the step, once the previous step's updates are done
(the staging task waits on the same thread); the reads and writes share one I/O queue; the GPU pool has
``max(2, d + 1)`` slots (layer i in slot i % S) and a layer still in its slot is not copied again until
the step's update; with gradient accumulation the D2H ships fp32 accumulators (``REF_ACC_GRAD_BYTES``);
three steps are simulated and the last (steady state) is reported. Host contention (task hH, with the
``io_rates`` factors ``contention_*``): while a node's CPU update and its SSD I/O (reads, write-backs and their
crc32 / serialisation) both run, each proceeds at its measured rate beside the other
(`simulator.workload.host_share`). SSD bandwidths:
``io_rates`` (a bench run's own measurement), else the profile's ``disk_read`` / ``disk_write`` rows
(`CostModel.transfer_time`), else the cluster spec's. CPU optimizer throughput: ``io_rates['cpu_adam']``,
else the profile's ``cpu_adam`` row (parameters/s), else an assumption: AdamW over flat fp32 buffers is
DRAM-bound, ``CPU_ADAM_BYTES_PER_PARAM`` = 32 bytes per parameter (read param, grad, m, v; write param,
m, v and the 16-bit mirror) at the node's ``host_memory_GBps`` (h100-single: 50 GB/s -> 1.6 G params/s).

Implementation overheads (``impl="reference"``: what `reference.train` executes on top of the ideal
mixed-precision step above; ``impl="ideal"``, the default, leaves them out): fp32 master parameters under
bf16 autocast, so every 16-bit GEMM weight is cast each forward (``weight_cast``: read 4, write 2 bytes per
parameter) and its gradient cast back to fp32 in backward (``grad_cast``, 6 bytes); a residual stream
and layer norms in fp32 (``REF_RESIDUAL_BYTES`` per token x hidden per block instead of the ideal 16-bit
pass); the loss over the vocabulary in fp32 (``loss_fwd`` / ``loss_bwd``: ``REF_LOSS_FWD_BYTES`` /
``REF_LOSS_BWD_BYTES`` per logit); the tied embedding's dense fp32 gradient (``REF_EMB_GRAD_BYTES`` per
parameter); with a capacity-limited gate, the slot ranks' one-hot cumsum (``gate_rank_scan``, latency-bound:
``REF_RANK_SCAN_S_PER_ROW`` per routed row, from the H100 step profile); the expert activation between the
expert GEMMs (``expert_act_fwd`` / ``expert_act_bwd``: `_expert_act_bytes` at the profile's ``gelu`` rate);
with the torch MoE backend (``expert_kernels="torch"``) the permutes on fp32 rows (``dispatch_fp32_fwd`` /
``_bwd``: ``REF_DISPATCH_*``) and expert GEMMs per projection, backward at the profile's torch dgrad / wgrad rows
(`torch_expert_gemms`); global-norm gradient clipping (``grad_clip``: ``REF_CLIP_BYTES`` per parameter); torch's
AdamW over fp32 states: ``ref_optimizer="foreach"`` (the default; torch's foreach AdamW,
``REF_ADAM_BYTES_PER_PARAM`` = 80 instead of 32) or ``"fused"`` (torch's fused AdamW, one kernel that reads
param, grad, m, v and writes param, m, v: ``REF_FUSED_ADAM_BYTES_PER_PARAM`` = 28; what
`reference.train.make_optimizer` uses on CUDA since 42307ef); with
``expert_impl="loop"`` (GroupedExperts' torch fallback, which the reference takes when its experts see fp32
activations) a dense zero-filled gradient of the whole stacked expert weight per used expert, summed
(``expert_grad_select``, ``REF_SELECT_*``), and its expert GEMMs are one dense GEMM per expert (``mm``)
instead of a grouped GEMM. ``expert_kernels`` picks the profile rows the expert GEMMs are read from:
``"torch"`` (``torch._grouped_mm`` / ``mm``: the reference's torch MoE backend), ``"triton"`` (this repo's
grouped GEMM kernels: the Triton MoE backend), ``None`` (the cost model's own preference). All are HBM passes at
the profile's achieved bandwidth (`CostModel.memory`); the byte counts are derived in the constants'
comments from the aten ops the reference issues. With ``host_ops`` (aten operators per step, counted by
`reference.op_count` on the reference code), the step is at least ``CostModel.host_time(host_ops)``.

Host program (``host_program``, `simulator.train_host`; replaces the ``host_ops`` floor): the reference
trainer's step as the host issues it, counted on the reference code per segment (`simulator.train_op_counts`:
embedding; per block the attention part, the FFN split at its host syncs, the residual; head and loss; the
backward per block; clipping; AdamW; the bias update; the loss read-back). Each rank has a host thread
(`simulator.workload.host.HostClock`) that issues the segments in program order at ``host_rates`` seconds
per kernel (forward / backward / optimizer parts: measured on the GPU by ``train_op_counts --device cuda``,
else the profile's ``host_op`` rows) and waits only at syncs. The device (this rank's process) starts a
segment's work no earlier than the host has issued the kernels before its first GEMM-class kernel
(``lead``), cannot finish the segment before its last kernel is issued, and at a sync the host waits until
the device has drained. So a stretch between syncs takes max(device, host), and after each sync (the torch
MoE backend's ``bincount``s and routed-row count in every MoE layer, the loss read-back) the GPU idles while
the host issues the next kernels (``host_wait`` trace rows). The MoE layer's pieces: the router's device work
in the first, the capacity ranks in the second (when there are more than two), dispatch, experts and
combine in the last. With ``act_casts`` (default with a program) the activation casts between the fp32
residual stream and the bf16 GEMMs (and back, and in the backward) that the program counted (``cast_D`` ...
bytes per token per unit width) are HBM passes at each segment's start (``act_cast``), and the cast parts
of the constants above (``REF_*_CAST_BYTES``) are taken out so nothing is counted twice. Expert-parallel
routed rows are taken as the rank's ``T`` tokens (the program was counted on one rank); micro-batches repeat
the forward and backward segments, the optimizer part and the read-back run once per step.

Memory passes (``mem_passes``, default with a host program whose table counted them: `train_op_counts` records,
per segment, every kernel that is neither GEMM-class nor a counted activation cast, with the bytes of its
activation-shaped tensors read and written per token per unit width, by class: ``norm_fwd``, ``norm_bwd``,
``act``, ``gather``, ``scatter``, ``copy``, ``elem``; `results/profiles/train_mem_bytes.csv`): each
segment's classes run at its start (``mem_<class>[_bwd]`` phases), at the class's achieved bandwidth measured on
the GPU (`simulator.train_host.mem_rates`, `train_op_counts.time_mem_classes`: the reference's own kernels,
fp32 layer norms and permute rows, the atomic ``index_add_`` of the permute's backward, ...), else the kernel
profile's row-wise op for the class (`simulator.train_host.MEM_RATE_OPS`), else the HBM roofline. They replace
every activation pass of the constants (the attention block's ideal 16-bit passes and ``REF_RESIDUAL_BYTES``,
the gate's, ``REF_DISPATCH_*``, the expert activation, the loss, the embedding); the parameter passes (weight
and gradient casts, clipping, AdamW, the tied embedding's gradient) stay per parameter; the counted activation
casts and the weight / gradient casts run at the measured fp32 <-> bf16 ``cast`` bandwidth when there is one
(`_cast_time`, else the HBM roofline). Why: the H100 profile
of offload config a (`results/validation/train_breakdown_a.md`) has 580 ms of memory-bound kernels per step
against 425 ms of constants at the copy rate; the bytes the reference moves match the constants' order, the
kernels' achieved bandwidths do not (layer-norm backward 1.5 TB/s, the fp32 ``index_add_`` 1.1 TB/s).

Backward costs 2 x forward for every matmul (`semoe.sizing`) times the cost model's calibrated
``backward_gemm_factor`` (applied to the whole backward phase); with ``impl="reference"`` the attention,
gate and head phases are split into their parts (`TrainingIteration.parts`): the cuBLAS dense GEMMs' backward is
``TORCH_DENSE_BWD_FACTOR`` x 2 forward and cuDNN attention's the profile's measured SDPA backward / forward
ratio (`CostModel.sdpa_backward_ratio`, 3.16 at sequence 2048), the memory passes keep the factor.

Memory (HBM per rank, `simulator.memory.MemoryTracker`): ``impl="ideal"``: the model states of
`semoe.sizing.state_bytes_per_tier` (16-bit params and grads, fp32 optimizer states) and activations kept for
backward estimated after Korthikanti et al. 2022 (16-bit, flash attention): ``15 T h`` bytes per block for
attention and norms, plus for an expert FFN ``tokens_in * (3 h + 4 ffn)`` bytes and the dispatch buffers
``(tokens_out + tokens_in) * 2 h``. ``impl="reference"``: what the reference trainer allocates
(`simulator.train_memory`): fp32 masters, fp32 gradients and AdamW moments, the offload engine's GPU pool and
gradient accumulators, the saved activations counted from the reference model's autograd graph
(`simulator.train_mem_count`), the loss buffers, the gradient buckets and ZeRO-3's gathered root unit, allocated
and freed at the step's points (gradients: freed by ``zero_grad`` after the forward with ``trainer="train"``, at the
step's start with ``"bench"``); the peak equals `simulator.train_memory.step_peak`'s (the summary's ``hbm_points``).
A structure that model does not cover keeps the ideal one (``hbm_model`` / ``hbm_model_note`` in the summary).
"""

from __future__ import annotations

import numpy as np
import simpy

from semoe import Run
from semoe.sizing import (
    GRAD_BYTES,
    block_params,
    count_params,
    embedding_params,
    expert_params,
)
from simulator import collectives as C
from simulator.engine import Sim
from simulator.workload.host_share import HostShare
from simulator.workload.training_constants import (  # noqa: F401  (re-exported: other modules and tests import them here)
    ADAM_BYTES_PER_PARAM,
    CATS,
    CONTENTION_KEYS,
    CPU_ADAM_BYTES_PER_PARAM,
    EXPERT_IMPLS,
    EXPERT_KERNELS,
    IMPLS,
    PHASE_CATEGORY,
    REF_ACC_GRAD_BYTES,
    REF_ADAM_BYTES_PER_PARAM,
    REF_BUCKET_BYTES,
    REF_CAST_BYTES,
    REF_CLIP_BYTES,
    REF_CLIP_MOE_BYTES,
    REF_DISPATCH_BWD_BYTES,
    REF_DISPATCH_BWD_CAST_BYTES,
    REF_DISPATCH_FWD_BYTES,
    REF_DISPATCH_FWD_CAST_BYTES,
    REF_EMB_GRAD_BYTES,
    REF_FUSED_ADAM_BYTES_PER_PARAM,
    REF_LOSS_BWD_BYTES,
    REF_LOSS_BWD_CAST_BYTES,
    REF_LOSS_FWD_BYTES,
    REF_LOSS_FWD_CAST_BYTES,
    REF_OPTIMIZERS,
    REF_RANK_SCAN_S_PER_ROW,
    REF_RESIDUAL_BYTES,
    REF_RESIDUAL_CAST_BYTES,
    REF_SELECT_ACC_BYTES,
    REF_SELECT_COPY_BYTES,
    REF_SELECT_ZERO_BYTES,
    SSD_PHASES,
    TORCH_DENSE_BWD_FACTOR,
    TORCH_EXPERT_BWD_FACTOR,
    torch_expert_gemms,
)
from simulator.workload.training_costs import TrainingCostsMixin
from simulator.workload.training_host import TrainingHostMixin
from simulator.workload.training_memory import TrainingMemoryMixin
from simulator.workload.training_offload import TrainingOffloadMixin
from simulator.workload.training_primitives import TrainingPrimitivesMixin


class TrainingIteration(TrainingCostsMixin, TrainingHostMixin, TrainingOffloadMixin, TrainingMemoryMixin,
                        TrainingPrimitivesMixin):
    def __init__(self, run: Run, sim: Sim, impl: str = "ideal", host_ops: float = 0.0,
                 measured_steps: int | None = None, expert_impl: str = "grouped", grad_sync: bool = False,
                 io_rates: dict | None = None, ref_optimizer: str = "foreach",
                 expert_kernels: str | None = None, host_program=None, host_rates: dict | None = None,
                 act_casts: bool | None = None, mem_passes: bool | None = None, trainer: str = "train") -> None:
        """``measured_steps``: the last steps of ``Workload.steps`` over which ``cache_hit_rate_measured``
        counts hits (a bench's counters after its warm-up; default all). ``expert_impl`` (with
        ``impl="reference"``): ``grouped`` (one GEMM per stacked weight, one gradient per stacked tensor)
        or ``loop`` (the reference's torch fallback for fp32 activations: a loop over experts indexing the
        stacked fp32 parameter, see ``REF_SELECT_*``). ``grad_sync`` (with ``impl="reference"``): the run
        went through ``reference.parallel``'s GradSync (``REF_BUCKET_BYTES``, ``REF_CLIP_MOE_BYTES``).
        ``io_rates``: measured host-side rates that take precedence over the profile and the cluster spec:
        ``disk_read`` / ``disk_write`` (bytes/s), ``cpu_adam`` (parameters/s, 16-bit gradients),
        ``cpu_adam_fp32grad`` (parameters/s with fp32 gradients: used when ``micro_batches > 1``); ``ssd_write_prep`` (bytes/s,
        no default: 0 cost): the host work before each SSD block write on the same I/O queue (serialise +
        crc32 in `reference.offload.ssd`); ``contention_cpu_adam_read`` / ``contention_cpu_adam_write`` (else
        ``contention_cpu_adam``) / ``contention_disk_read`` / ``contention_disk_write`` / ``contention_ssd_write_prep``
        (task hH; factors, beside / alone rate): while the node's CPU update runs beside an SSD read (write), the
        update proceeds at its rate times the ``_read`` (``_write``) factor and the read (each part of the write) at
        its rate times its factor (a rate switch, `simulator.workload.host_share`; the busy times and trace rows are
        the elapsed ones); none given: no contention. ``ref_optimizer`` (with ``impl="reference"``): the GPU AdamW of
        the reference, ``foreach`` (``REF_ADAM_BYTES_PER_PARAM``) or ``fused``
        (``REF_FUSED_ADAM_BYTES_PER_PARAM``). ``expert_kernels``: ``torch`` / ``triton`` profile rows for the
        expert GEMMs (None: the cost model's preference). ``host_program`` (`simulator.train_host.TrainProgram`,
        with ``impl="reference"``): the host issues the step's segments and syncs (see "Host program" in the
        module docstring; it replaces the ``host_ops`` floor); ``host_rates``: ``{"fwd", "bwd", "opt"}`` host
        seconds per kernel of the step's parts (default: `simulator.train_host.host_rates`, measured on the
        GPU, else the profile's ``host_op`` rows); ``act_casts`` (default: with a host
        program): price the program's counted activation casts instead of the constants' cast parts;
        ``mem_passes`` (default: with a host program whose table counted them, and ``act_casts``): price the
        program's counted memory passes (every non-GEMM kernel's activation bytes, per class at the class's
        measured bandwidth) instead of the constants' activation passes (see "Memory passes" in the module
        docstring). ``trainer`` (memory only, with ``impl="reference"``): the loop whose HBM the peak models,
        ``"train"`` (`reference.train`: zero_grad after the forward) or ``"bench"`` (`reference.offload.bench`:
        zero_grad, then the micro-batches); see "Memory" in the module docstring."""
        if trainer not in ("train", "bench"):
            raise ValueError(f"TrainingIteration: trainer must be 'train' or 'bench', got {trainer!r}")
        self.mem_trainer = trainer
        if ref_optimizer not in REF_OPTIMIZERS:
            raise ValueError(f"TrainingIteration: ref_optimizer must be one of {tuple(REF_OPTIMIZERS)}, got {ref_optimizer!r}")
        if expert_kernels not in EXPERT_KERNELS:
            raise ValueError(f"TrainingIteration: expert_kernels must be one of {EXPERT_KERNELS}, got {expert_kernels!r}")
        self.ref_optimizer, self.expert_kernels = ref_optimizer, expert_kernels
        self.io_rates = dict(io_rates or {})
        self.grad_sync = grad_sync
        if impl not in IMPLS:
            raise ValueError(f"TrainingIteration: impl must be one of {IMPLS}, got {impl!r}")
        if expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"TrainingIteration: expert_impl must be one of {EXPERT_IMPLS}, got {expert_impl!r}")
        self.expert_impl = expert_impl
        self.impl, self.host_ops = impl, float(host_ops)
        self.measured_steps = run.workload.steps if measured_steps is None else min(measured_steps, run.workload.steps)
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
        rng = sim.rng
        self._phase_times(cm, rng, impl, expert_impl, expert_kernels, host_program, act_casts)
        # ---- parameter sizes
        self.dense_layer = [block_params(m, i)["dense"] for i in range(m.layers)]
        self.embed = embedding_params(m)
        self.expert_local_params = self.local_experts * expert_params(m) if m.moe_layers else 0
        self.zero3 = p.zero_stage == 3
        self.offload_experts = p.offload.expert_params != "gpu"
        self.offload_opt = p.offload.expert_optimizer != "gpu" and bool(self.a2a)
        self.ref = impl == "reference"
        self._host_setup(host_program, host_rates, act_casts, mem_passes)
        self._activation_pass_times(cm)
        self._offload_setup(rng)
        self.ranks = np.arange(self.W)
        self.bwd = 2.0 * cm.backward_gemm_factor  # backward / forward time of a compute phase
        self._backward_parts(cm, w.seq_len)
        # ---- per-rank state
        env = self.env
        self.comm = [simpy.Resource(env, 1) for _ in range(self.W)]
        self.h2d = [simpy.Resource(env, 1) for _ in range(self.W)]
        self.d2h = [simpy.Resource(env, 1) for _ in range(self.W)]
        nodes = c.nodes
        # one disk per node: reads and writes share it (one request at a time)
        self.ssd_r = [simpy.Resource(env, 1) for _ in range(nodes)]
        self.ssd_w = self.ssd_r
        self.cpu = [simpy.Resource(env, 1) for _ in range(nodes)]
        # task hH: the CPU update and the SSD I/O slow each other while both run (``io_rates`` contention factors)
        self.host_share = ([HostShare(env) for _ in range(nodes)]
                           if any(self.io_rates.get(k) for k in CONTENTION_KEYS) else None)
        self.bytes: dict[str, float] = {}  # per phase, summed over ranks
        self.busy: dict[str, float] = {}  # seconds per host-side engine phase (cpu_adam, ssd_*), summed
        self.opt_procs: list[list] = [[] for _ in range(self.W)]
        # impl="reference" with a CPU expert optimizer: reference.offload's schedule (the update runs after
        # the backward and clipping and overlaps the next step's forward): three steps are simulated and the
        # last one is reported (steady state; write-backs are not awaited, they delay the next step)
        self.ref_sched = self.ref and self.offload_opt
        self.n_iter = 3 if self.ref_sched else 1
        self.adam_prev: list[dict] = [{} for _ in range(self.W)]  # layer -> previous step's update
        self.adam_cur: list[dict] = [{} for _ in range(self.W)]
        self.state_reads: list[dict] = [{} for _ in range(self.W)]  # layer -> prefetched SSD state read
        # impl="reference": reference.offload's GPU pool, S = max(2, depth + 1) slots, layer i in slot i % S;
        # a request for a layer still in its slot at this step's weight version copies nothing
        self.n_slots = max(2, p.prefetch_depth + 1)
        self.slots: list[list] = [[None] * self.n_slots for _ in range(self.W)]  # slot -> (layer, fetch event)
        self.t0 = np.zeros(self.W)
        self.acc = np.zeros((self.W, len(CATS)))
        self.end = np.zeros(self.W)
        if self.ref:
            self._param_pass_times(cm, grad_sync)
        self._static_memory()

    # ------------------------------------------------------------------ the rank program
    def process(self, r):
        for it in range(self.n_iter):
            if it == self.n_iter - 1:
                self.t0[r] = self.env.now
                self.acc[r] = 0.0
                hc = self.hc[r]
                self.h_mark[r] = (hc.busy_s, hc.syncs, hc.sync_wait_s)
                self.cast_s[r] = 0.0
            self.adam_prev[r], self.adam_cur[r] = self.adam_cur[r], {}
            yield from self.step(r)
        self.end[r] = self.env.now

    def step(self, r):
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
        if self.mem_model is not None and self.mem_trainer == "bench" and self.grads_live[r]:  # zero_grad first
            mem.free(env.now, r, "hbm", "grads", self.mem_model.parts["grads"])
            self.grads_live[r] = False

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
        self.slots[r] = [None] * self.n_slots  # the step's update makes every slot stale (new weight version)
        for mb in range(self.w.micro_batches):
            last = mb == self.w.micro_batches - 1
            gathered: dict = {}
            copies: dict = {}
            if self.zero3:
                self._gather(r, gathered, ("emb", mb), -1, mb)
                yield from self.wait(r, gathered[("emb", mb)], 1)
            yield from self._hseg(r, "embedding", -1, mb)
            yield from self.compute(r, -1, mb, "embedding_fwd", self.t_embed)
            yield from self._hend(r, -1, mb)
            for i in range(L):
                kind = "moe" if i in self.a2a else "dense"
                ffn_segs = self._hgroup(f"{kind}.ffn")
                if self.zero3:
                    for j in range(i, min(L, i + d + 1)):
                        self._gather(r, gathered, ("fwd", mb, j), j, mb)
                if self.offload_experts and d > 0:
                    for j in range(i, min(L, i + d + 1)):
                        self._h2d(r, copies, ("fwd", mb, j), j, mb)
                # reference.offload stages a layer's SSD state reads at its first forward of the step
                if self.ref_sched and d > 0 and mb == 0 and i in self.a2a and i not in self.state_reads[r]:
                    self.state_reads[r][i] = env.process(self._read_states(r, i))
                if self.zero3:
                    yield from self.wait(r, gathered[("fwd", mb, i)], 1)
                yield from self._hseg(r, f"{kind}.attn", i, mb)
                if self.ref:
                    yield from self.compute(r, i, mb, "weight_cast", self.t_cast[i])
                yield from self.compute(r, i, mb, "attention_fwd", self.t_attn, self.flops_attn)
                yield from self._hend(r, i, mb)
                # the FFN's pieces (split at the host syncs): the router in the first, the capacity ranks in the
                # second when there are more than two, dispatch / experts / combine in the last
                if ffn_segs:
                    yield from self._hseg(r, ffn_segs[0], i, mb)
                if i in self.a2a:
                    yield from self.compute(r, i, mb, "gate_fwd", self.t_gate)
                    if len(ffn_segs) > 2:
                        yield from self._hend(r, i, mb)
                        yield from self._hseg(r, ffn_segs[1], i, mb)
                    if self.t_rank_scan:
                        yield from self.compute(r, i, mb, "gate_rank_scan", self.t_rank_scan)
                if len(ffn_segs) > 1:
                    yield from self._hend(r, i, mb)
                    yield from self._hrun(r, ffn_segs[2 if len(ffn_segs) > 2 else 1:-1], i, mb)
                    yield from self._hseg(r, ffn_segs[-1], i, mb)
                if i in self.a2a:
                    yield from self._a2a(r, i, mb, "dispatch_a2a", False)
                    if self.offload_experts:
                        self._h2d(r, copies, ("fwd", mb, i), i, mb)  # on demand when not prefetched
                        yield from self.wait(r, copies[("fwd", mb, i)], 2)
                    elif i in self.adam_prev[r]:  # resident experts updated on the CPU (ZeRO-Offload style)
                        yield from self.wait(r, self.adam_prev[r][i], 2)
                    if i in self.t_dispatch:
                        yield from self.compute(r, i, mb, "dispatch_fp32_fwd", self.t_dispatch[i][0][r])
                    yield from self.compute(r, i, mb, "experts_fwd", self.t_experts[i][r])
                    if i in self.t_expert_act:
                        yield from self.compute(r, i, mb, "expert_act_fwd", self.t_expert_act[i][0][r])
                    yield from self._a2a(r, i, mb, "combine_a2a", True)
                else:
                    yield from self.compute(r, i, mb, "ffn_fwd", self.t_dense_ffn)
                yield from self._hend(r, i, mb)
                yield from self._hrun(r, self._hgroup(f"{kind}.post"), i, mb)
                mem.alloc(env.now, r, "hbm", "activations", self._act_bytes(r, i))
                if self.zero3 and self.mem_model is None:
                    mem.free(env.now, r, "hbm", "gathered_params", 2.0 * self.dense_layer[i] * (self.W - 1) / self.W)
            yield from self._hseg(r, "head", -1, mb)
            yield from self.compute(r, -1, mb, "head_fwd", self.t_head)
            if self.ref:
                yield from self.compute(r, -1, mb, "loss_fwd", self.t_loss_fwd)
            yield from self._hend(r, -1, mb)
            self._mem_head_fwd(r, mb)
            yield from self._hrun(r, self._hgroup("zero_grad") if mb == 0 else [], -1, mb)
            yield from self._hseg(r, "bwd_head", -1, mb)
            if self.ref:
                yield from self.compute(r, -1, mb, "loss_bwd", self.t_loss_bwd)
            yield from self.compute(r, -1, mb, "head_bwd", self.t_head_bwd)
            yield from self._hend(r, -1, mb)
            self._mem_head_bwd(r)
            for i in reversed(range(L)):
                bwd_segs = self._hgroup(f"{'moe' if i in self.a2a else 'dense'}.bwd")
                if bwd_segs:  # the block's backward work in the first piece (the table has no syncs there)
                    yield from self._hseg(r, bwd_segs[0], i, mb)
                if self.zero3:
                    for j in range(i, max(-1, i - d - 1), -1):
                        self._gather(r, gathered, ("bwd", mb, j), j, mb)
                if self.offload_experts and d > 0:
                    for j in range(i, max(-1, i - d - 1), -1):
                        self._h2d(r, copies, ("bwd", mb, j), j, mb)
                if self.zero3:
                    yield from self.wait(r, gathered[("bwd", mb, i)], 1)
                if i in self.a2a:
                    yield from self._a2a(r, i, mb, "combine_a2a_bwd", False)
                    if self.offload_experts:
                        self._h2d(r, copies, ("bwd", mb, i), i, mb)
                        yield from self.wait(r, copies[("bwd", mb, i)], 2)
                    if i in self.t_dispatch:
                        yield from self.compute(r, i, mb, "dispatch_fp32_bwd", self.t_dispatch[i][1][r])
                    yield from self.compute(r, i, mb, "experts_bwd", self.t_experts_bwd[i][r] if i in self.t_experts_bwd
                                            else self.bwd * self.t_experts[i][r])
                    if i in self.t_expert_act:
                        yield from self.compute(r, i, mb, "expert_act_bwd", self.t_expert_act[i][1][r])
                    self._mem_expert_bwd(r, i, mb)
                    yield from self._a2a(r, i, mb, "dispatch_a2a_bwd", True)
                    yield from self.compute(r, i, mb, "gate_bwd", self.t_gate_bwd)
                else:
                    yield from self.compute(r, i, mb, "ffn_bwd", (2.0 * TORCH_DENSE_BWD_FACTOR if self.ref else self.bwd)
                                            * self.t_dense_ffn)
                yield from self.compute(r, i, mb, "attention_bwd", self.t_attn_bwd, 2 * self.flops_attn)
                if self.ref:
                    yield from self.compute(r, i, mb, "grad_cast", self.t_cast[i])
                    if self.expert_impl == "loop" and i in self.a2a and not self.offload_experts:
                        yield from self.compute(r, i, mb, "expert_grad_select", self._select_time(r, i))
                yield from self._hend(r, i, mb)
                yield from self._hrun(r, bwd_segs[1:], i, mb)
                mem.free(env.now, r, "hbm", "activations", self._act_bytes(r, i) - self.act_freed[r].pop(i, 0.0))
                if self.zero3 and self.mem_model is None:
                    mem.free(env.now, r, "hbm", "gathered_params", 2.0 * self.dense_layer[i] * (self.W - 1) / self.W)
                if last:
                    add_grads(i, self.dense_layer[i], tensors_per_block)
                    if i in self.a2a:
                        nb = 2.0 * self.local_experts * expert_params(m)
                        if len(edp_group) > 1:
                            pending.append(self.background(
                                r, ("egrad", i, r % EP), edp_group,
                                lambda nb=nb: C.all_reduce(topo, edp_group, nb), i, mb, "expert_grad_allreduce", nb))
                        if (self.offload_experts or self.offload_opt) and not self.ref_sched:
                            ng = GRAD_BYTES * self.local_experts * expert_params(m)
                            ev = self.copy(r, "d2h", ng, i, mb, "d2h_grads")
                            self._count("d2h_grads", ng)
                            copies_out.append(ev)
                            if self.offload_opt:
                                self.opt_procs[r].append(self.env.process(self._expert_optimizer(r, i, ev)))
            yield from self._hseg(r, "bwd_embedding", -1, mb)
            yield from self.compute(r, -1, mb, "embedding_bwd", 2 * self.t_embed + (self.t_emb_grad if self.ref else 0.0))
            yield from self._hend(r, -1, mb)
            if self.zero3 and self.mem_model is None:
                mem.free(env.now, r, "hbm", "gathered_params", 2.0 * self.embed * (self.W - 1) / self.W)
            self._mem_backward_end(r, last)
            if last:
                add_grads(-1, self.embed, 3)
                flush(force=True)
        for ev in pending:
            yield from self.wait(r, ev, 1)
        for ev in copies_out:
            yield from self.wait(r, ev, 2)
        if self.ref:
            yield from self._hseg(r, "clip", -1, -1)
            yield from self.compute(r, -1, -1, "grad_clip", self.t_clip)
            yield from self._hend(r, -1, -1)
        if self.ref_sched:  # reference.offload: D2H of every layer's gradients, then one CPU task per layer
            for i in sorted(self.a2a):
                # the layer's gradient buffer: 16-bit, or the fp32 accumulator with gradient accumulation
                gb = GRAD_BYTES if self.w.micro_batches == 1 else REF_ACC_GRAD_BYTES
                ng = gb * self.local_experts * expert_params(m)
                ev = self.copy(r, "d2h", ng, i, -1, "d2h_grads")
                self._count("d2h_grads", ng)
                self.adam_cur[r][i] = env.process(self._expert_optimizer(r, i, ev, self.state_reads[r].pop(i, None)))
        yield from self._hseg(r, "optimizer", -1, -1)
        self._mem_optimizer(r)
        yield from self.optimizer(r)
        yield from self._hend(r, -1, -1)
        for ev in self.opt_procs[r]:  # the CPU expert optimizer, started during the backward
            yield from self.wait(r, ev, 3)
        self.opt_procs[r] = []
        # the gate's bias update and the loss read-back (a sync: the host waits for the whole step)
        yield from self._hrun(r, self._hgroup("after_step") + self._hgroup("readback"), -1, -1)

    def optimizer(self, r):
        env, p, c = self.env, self.p, self.c
        sim = self.sim
        pc = count_params(self.m)
        shard = pc.dense / (self.W if p.zero_stage >= 1 else 1)
        gpn = c.gpus_per_node
        t_gpu = 0.0
        t_host = 0.0
        adam = REF_OPTIMIZERS[self.ref_optimizer] if self.ref else ADAM_BYTES_PER_PARAM
        if p.offload.dense_optimizer == "gpu":
            t_gpu += sim.cost.memory(adam * shard)
        else:
            t_host += ADAM_BYTES_PER_PARAM * shard * gpn / (c.host_memory_GBps * 1e9)
        ep = self.expert_local_params * self.m.moe_layers
        t_ssd = 0.0
        if p.offload.expert_optimizer == "gpu":
            t_gpu += sim.cost.memory(adam * ep)
        # offloaded expert optimizer: per layer, overlapped with the backward (_expert_optimizer)
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
        device_step = float((self.end - self.t0).max())
        if self.prog is not None:  # the host program's issue time of the reported step (its waits are in the step)
            host_s = float(max(hc.busy_s - mk[0] for hc, mk in zip(self.hc, self.h_mark)))
        else:
            host_s = self.sim.cost.host_time(self.host_ops)
        step = max(device_step, host_s)
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
            # impl="reference": simulator.train_memory's parts and high points (rank of the largest routed rows)
            "hbm_model": "reference" if self.mem_model is not None else "ideal",
            "hbm_model_note": self.mem_note,
            "hbm_parts": dict(self.mem_model.parts) if self.mem_model is not None else {},
            "hbm_points": dict(self.mem_model.points) if self.mem_model is not None else {},
            "routed_rows": [float(self.tokens_in[i].max()) for i in sorted(self.a2a)],
            # what a finished reference.train run of this plan can leave allocated in its process
            # (simulator.train_memory.leaked_state_bytes: the multi-GPU bench trains its variants in one process)
            "leaked_state_bytes": self._leaked_state_bytes(),
            "peak_dram_bytes": mem.peak_node("dram"),
            "peak_ssd_bytes": mem.peak_node("ssd"),
            "oom": "; ".join(mem.oom()),
            "breakdown": per_rank,
            "device_step_s": device_step,
            "host_s": host_s,
            "host_program": self.prog.source if self.prog is not None else "",
            "host_syncs": int(max(hc.syncs - mk[1] for hc, mk in zip(self.hc, self.h_mark))) if self.prog else 0,
            "host_sync_wait_s": float(max(hc.sync_wait_s - mk[2] for hc, mk in zip(self.hc, self.h_mark)))
            if self.prog else 0.0,
            "act_cast_s": float(self.cast_s.max()),  # per step, the program's activation casts
            "cache_enabled": self.cache is not None,
            "cache_hit_rate": self.cache.last_hit_rate if self.cache is not None else float("nan"),
            "cache_hit_rate_all_steps": self.cache.hit_rate if self.cache is not None else float("nan"),
            "cache_hit_rate_measured": (self.cache.hit_rate_since(self.w.steps - self.measured_steps)
                                        if self.cache is not None else float("nan")),
            "cache_evictions": self.cache.evictions if self.cache is not None else 0,
            "bytes": {k: v / self.n_iter for k, v in self.bytes.items()},
            "busy_s": {k: v / self.n_iter / self.W for k, v in self.busy.items()},  # per rank and step
        }
