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
    OPTIMIZER_BYTES,
    PARAM_BYTES,
    block_params,
    count_params,
    embedding_params,
    expert_params,
    state_bytes_per_tier,
)
from simulator import collectives as C
from simulator.engine import Sim
from simulator.workload import offload as O
from simulator.workload import routing
from simulator.workload.host_share import HostShare

CATS = ("compute", "comm", "copy", "optimizer")
ADAM_BYTES_PER_PARAM = 32  # read param+grad+master+m+v (16 B), write param+master+m+v (16 B)
# task hH: ``io_rates`` factors (beside / alone rate, dimensionless) of the CPU update while SSD I/O runs and of each
# part of the SSD I/O while the update runs (`simulator.workload.host_share`); none given: no contention (as before)
CONTENTION_KEYS = ("contention_cpu_adam", "contention_cpu_adam_read", "contention_cpu_adam_write", "contention_disk_read",
                   "contention_disk_write", "contention_ssd_write_prep")
SSD_PHASES = ("ssd_read", "ssd_write", "ssd_writeback")
CPU_ADAM_BYTES_PER_PARAM = 32  # assumption (no measurement): the same pass over DRAM, fused CPU AdamW
IMPLS = ("ideal", "reference")
# ---- reference.train's extra HBM traffic (bytes), from the aten ops it issues (see the module docstring)
REF_ACC_GRAD_BYTES = 4  # reference.offload: micro-batch gradients summed in fp32 (as AccumulateGrad), D2H in fp32
REF_CAST_BYTES = 6  # fp32 weight -> bf16 copy per forward (autocast), bf16 grad -> fp32 per backward
# torch.optim.AdamW(foreach) per fp32 parameter: mul_ (decay, r/w p 8) + lerp_ (m: r m g, w m 12)
# + mul_ (v 8) + addcmul_ (r v g, w v 12) + sqrt (r v, w s 8) + div_ (8) + add_ eps (8)
# + addcdiv_ (r p m s, w p 16) = 80
REF_ADAM_BYTES_PER_PARAM = 80
# torch.optim.AdamW(fused=True) per fp32 parameter: one multi-tensor kernel reads param, grad, m, v (16 B) and
# writes param, m, v (12 B)
REF_FUSED_ADAM_BYTES_PER_PARAM = 28
# capacity-limited gates (capacity_factor set): reference.moe.capacity ranks the assignments with a cumsum over
# a one-hot [T*k, E] int64 tensor along dim 0; torch's tensor_kernel_scan_outer_dim gives each of the E columns
# one thread that walks the T*k rows serially, so the kernel is latency-bound: time ~ rows x a per-row step.
# Per-row step from the H100 step profile (results/profiles/train_profile_h100.csv, runs 4ceddea and 4efec81:
# 4 calls, 5.70 / 5.81 ms per step at T*k = 8192 rows): 5.70e-3 / 4 / 8192 = 174 ns (a kernel rate, not fitted
# to a step time)
REF_RANK_SCAN_S_PER_ROW = 5.698e-3 / 4 / 8192
REF_OPTIMIZERS = {"foreach": REF_ADAM_BYTES_PER_PARAM, "fused": REF_FUSED_ADAM_BYTES_PER_PARAM}
EXPERT_KERNELS = (None, "torch", "triton")
# expert_kernels="torch": torch._grouped_mm's (and mm's) backward runs the same CUTLASS / cuBLAS GEMMs as the
# forward on transposed operands, so each of dX and dW costs one forward GEMM (factor 1, not the cost model's
# BACKWARD_GEMM_FACTOR, which was calibrated on our Triton dgrad / wgrad kernels): results/bench/offload/
# profile_a_gpu.txt has 192 _grouped_mm calls per step, 3 CUTLASS kernels x 64 calls (fwd, dgrad, wgrad of the
# two expert weights x 4 layers x 8 micro-batches), 476 ms in all at one average rate
TORCH_EXPERT_BWD_FACTOR = 1.0


def torch_expert_gemms(cm, rows: float, groups: int, hidden: int, ffn: int, mats: int, dtype: str) -> tuple[float, float]:
    """(forward, backward) seconds of the reference's ``torch._grouped_mm`` expert GEMMs for ``groups`` experts of
    ``rows`` rows each: the ``mats - 1`` input projections ``[rows, hidden] x [hidden, ffn]`` and the output projection
    ``[rows, ffn] x [ffn, hidden]``, each at its own profile curve (the two shapes differ ~5-10% on the H100). Backward:
    per projection the dgrad and wgrad GEMMs autograd issues, at the profile's ``grouped_gemm_dgrad`` /
    ``grouped_gemm_wgrad`` torch rows (``kernels/profile.py`` sweep ``grouped_torch``; on config a's shapes they run at
    ~1.8x the forward's time, not 2x); a profile without such rows prices them as ``2 x TORCH_EXPERT_BWD_FACTOR`` x
    the forward."""
    shapes = [(ffn, hidden)] * (mats - 1) + [(hidden, ffn)]  # (n, k) of each projection
    fwd = sum(cm.matmul(rows, n, k, dtype, groups=groups) for n, k in shapes)
    prof = cm.profile
    if prof is None or not all(any(key[0] == op for key in prof.curves)
                               for op in ("grouped_gemm_dgrad", "grouped_gemm_wgrad")):
        return fwd, 2.0 * TORCH_EXPERT_BWD_FACTOR * fwd
    bwd = sum(cm.matmul(rows, k, n, dtype, groups=groups, op="grouped_gemm_dgrad")
              + cm.matmul(rows, n, k, dtype, groups=groups, op="grouped_gemm_wgrad") for n, k in shapes)
    return fwd, bwd
# reference.moe.dispatcher's torch permute / unpermute run on the fp32 residual stream, per element of the
# [T*k, hidden] routed rows (bytes of HBM traffic, from the aten ops; the ideal model's gate term charges 8):
# forward index_select gather fp32 (r4 w4), GroupedExperts' cast to bf16 (r4 w2), unpermute's weight mul (r2 w2),
# zero-filled [T*k, D] buffer (w2), index_copy (r2 w2), sum over k (~r2 w1) = 27 -> 19 more than the ideal 8;
# backward: sum / index_copy / mul backward (~r8 w6), the cast's ToCopyBackward (r2 w4), IndexSelectBackward's
# zero-filled fp32 [T, D] (w4 / k) and index_add_ (r4 r4 w4) ~ 38 -> 17 more than the ideal 8 x 2 x 1.31 = 21.
# Not with the Triton backend (it casts before permuting and runs our permute kernels).
REF_DISPATCH_FWD_BYTES = 19
REF_DISPATCH_BWD_BYTES = 17
REF_CLIP_BYTES = 12  # clip_grad_norm_ (foreach): norm reads the fp32 grad (4), mul_ scales it (r/w 8)
# per token x hidden per block, fp32 residual stream: 2 layer norms (r4 w4) + 2 casts to bf16 for the
# next GEMM (r4 w2) + 2 residual adds (r4 r2 w4) = 48 B, vs the ideal model's 16 (8 x 2 B)
REF_RESIDUAL_BYTES = 48 - 16
# per logit: logits.float() (r2 w4) + log_softmax (r4 w4); backward: nll grad (zero-fill w4),
# log_softmax_backward (r4 r4 w4) + cast to bf16 (r4 w2)
REF_LOSS_FWD_BYTES = 14
REF_LOSS_BWD_BYTES = 22
REF_EMB_GRAD_BYTES = 16  # tied embedding: dense fp32 grad zero-filled (w4), head grad accumulated (r4 r4 w4)
# expert_impl="loop" (GroupedExperts' loop fallback, taken when the activations reaching the experts are fp32,
# as under autocast with fp32 masters and an fp32 residual stream): expert e's weight is the view w_EDF[e] of
# the stacked fp32 parameter, so autograd's SelectBackward materialises a zero-filled full [E, D, F] fp32
# gradient for every used expert (write 4 B x E x D x F) and copies the slice into it (r4 w4 per D x F), and
# the E full-size gradients of one parameter are summed before AccumulateGrad (r4 r4 w4 x E x D x F each
# after the first): per weight matrix, u used experts of E: u (4 E + 8) + (u - 1) 12 E bytes per D x F
REF_SELECT_ZERO_BYTES, REF_SELECT_COPY_BYTES, REF_SELECT_ACC_BYTES = 4, 8, 12
EXPERT_IMPLS = ("grouped", "loop")
# impl="reference": the dense layers' GEMMs are cuBLAS (torch.mm / linear) whatever the MoE backend; their
# backward runs the same GEMMs on transposed operands (dX, dW: one forward GEMM each). results/bench/offload/
# run_3bd5bc4/profile_a_gpu.txt: 312 aten::mm per step (qkv, o, router forward + 2 backward each, x 4 layers x 8
# micro-batches, + the head), 112.5 ms; forward x 3 of the profile's GEMM rates is 114 ms, x (1 + 2 x 1.31) 137
TORCH_DENSE_BWD_FACTOR = 1.0
# the category of each single-category compute phase (the mixed ones: TrainingIteration.parts)
PHASE_CATEGORY = {
    "experts_fwd": "expert_gemm", "experts_bwd": "expert_gemm", "expert_act_fwd": "expert_act",
    "expert_act_bwd": "expert_act", "dispatch_fp32_fwd": "dispatch", "dispatch_fp32_bwd": "dispatch",
    "act_cast": "act_cast", "weight_cast": "param_cast", "grad_cast": "param_cast", "loss_fwd": "loss",
    "loss_bwd": "loss", "embedding_fwd": "embedding", "embedding_bwd": "embedding", "optimizer": "optimizer",
    "grad_clip": "optimizer", "gate_rank_scan": "gate_elementwise", "ffn_fwd": "dense_gemm", "ffn_bwd": "dense_gemm",
    "expert_grad_select": "expert_grad_select",
    # the program's counted memory passes (``mem_passes``), one phase per class
    **{f"mem_{c}{sfx}": cat for c, cat in (("norm_fwd", "norm"), ("norm_bwd", "norm"), ("act", "expert_act"),
                                             ("gather", "dispatch"), ("scatter", "dispatch"), ("copy", "mem_copy"),
                                             ("elem", "elementwise")) for sfx in ("", "_bwd")},
}
# grad_sync=True (reference.parallel's GradSync, used whenever the trainer runs under a process group, even
# of one rank): every gradient is packed into a flat bucket (cat: r4 w4) and copied back after the
# reduction (r4 w4), and the MoE-aware clipping squares each gradient into a new tensor before summing
# (pow: r4 w4, sum: r4) then scales it (r4 w4)
REF_BUCKET_BYTES = 16
REF_CLIP_MOE_BYTES = 20
# the activation-cast parts of the constants above (bytes per element): with a host program that counts the
# casts (``act_casts``), these are taken out and the program's measured casts priced instead
REF_RESIDUAL_CAST_BYTES = 12  # 2 casts to bf16 for the next GEMM (r4 w2), in REF_RESIDUAL_BYTES
REF_DISPATCH_FWD_CAST_BYTES = 6  # GroupedExperts' cast to bf16 (r4 w2), in REF_DISPATCH_FWD_BYTES
REF_DISPATCH_BWD_CAST_BYTES = 6  # its ToCopyBackward (r2 w4), in REF_DISPATCH_BWD_BYTES
REF_LOSS_FWD_CAST_BYTES = 6  # logits.float() (r2 w4), in REF_LOSS_FWD_BYTES
REF_LOSS_BWD_CAST_BYTES = 6  # the gradient's cast to bf16 (r4 w2), in REF_LOSS_BWD_BYTES


class TrainingIteration:
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
        T, h, dt = self.T, m.hidden, m.dtype
        kv = m.n_kv_heads * m.head_dim
        # ---- per-phase compute times (same on every rank, except the experts)
        # each mixed phase's composition per call ({category: seconds}, `phase_parts`); its time is the sum
        self.parts = {
            "attention": {"dense_gemm": cm.matmul(T, h + 2 * kv, h, dt) + cm.matmul(T, h, h, dt),
                          "attention_core": cm.attention_core(T, w.seq_len, h, dt),
                          "norm_residual": cm.memory(8 * T * h * self.dtype_bytes)},
            "gate": {"dense_gemm": cm.matmul(T, m.experts, h, dt),
                     "gate_elementwise": cm.memory(4 * T * m.top_k * h * self.dtype_bytes)},
            "head": {"dense_gemm": cm.matmul(T, m.vocab, h, dt)},
        }
        self.t_attn = sum(self.parts["attention"].values())
        self.t_gate = sum(self.parts["gate"].values())
        mats = 3 if m.activation == "swiglu" else 2
        self.t_dense_ffn = mats * cm.matmul(T, m.dense_ffn_width, h, dt)
        self.t_head = self.parts["head"]["dense_gemm"]
        self.t_embed = cm.memory(2 * T * h * self.dtype_bytes)
        self.flops_attn = 2 * T * (2 * h * h + 2 * h * kv) + 4 * T * w.seq_len * h
        # ---- routing: per MoE block, dispatch matrices and tokens each rank's experts receive
        self.bpt = h * self.dtype_bytes
        self.a2a: dict[int, np.ndarray] = {}
        self.t_experts: dict[int, np.ndarray] = {}
        self.tokens_in: dict[int, np.ndarray] = {}
        self.tokens_out: dict[int, np.ndarray] = {}
        self.recv: dict[int, np.ndarray] = {}  # [W, local experts] tokens received
        self.t_expert_act: dict[int, tuple] = {}  # impl="reference": (fwd, bwd) activation pass per rank
        self.t_dispatch: dict[int, tuple] = {}  # impl="reference", torch permute: (fwd, bwd) fp32 extra passes
        self.t_experts_bwd: dict[int, np.ndarray] = {}  # expert backward GEMMs when not bwd x forward
        rng = sim.rng
        pop = routing.expert_popularity(m, w, rng) if m.moe_layers else None
        self.pop = pop  # the run's expert popularity (the cache's warm-up steps draw from it too)
        for i in range(m.layers):
            if not m.is_moe_layer(i):
                continue
            counts = routing.token_counts(m, w, self.W, rng, pop)
            mats_ = routing.alltoall_matrices(counts, self.EP, self.bpt)
            self.a2a[i] = mats_
            tin = (mats_.sum(axis=1) / self.bpt).reshape(-1)  # [W]
            self.tokens_in[i] = tin
            self.tokens_out[i] = counts.sum(axis=1).astype(float)
            self.recv[i] = O.received(counts, self.EP)
            ecm = self._expert_cost(cm)
            if impl == "reference" and expert_impl == "loop":  # one dense GEMM per local expert
                per_exp = {x: mats * self.local_experts * ecm.matmul(x / self.local_experts, m.ffn, h, dt)
                           for x in np.unique(tin)}
            elif impl == "reference" and expert_kernels == "torch":  # torch._grouped_mm: each projection's own curve
                pair = {x: torch_expert_gemms(ecm, x / self.local_experts, self.local_experts, h, m.ffn, mats, dt)
                        for x in np.unique(tin)}
                per_exp = {x: f for x, (f, _) in pair.items()}
                self.t_experts_bwd[i] = np.array([pair[x][1] for x in tin])
            else:
                per_exp = {x: mats * ecm.matmul(x / self.local_experts, m.ffn, h, dt, groups=self.local_experts)
                           for x in np.unique(tin)}
            self.t_experts[i] = np.array([per_exp[x] for x in tin])
            if impl == "reference" and expert_kernels == "torch" and i not in self.t_experts_bwd:  # the loop experts
                self.t_experts_bwd[i] = 2.0 * TORCH_EXPERT_BWD_FACTOR * self.t_experts[i]
            if impl == "reference" and expert_kernels != "triton":  # fp32 dispatch (REF_DISPATCH_*)
                el = self.tokens_out[i] * h  # routed rows x hidden, per rank
                cf = int(bool(host_program is not None if act_casts is None else act_casts))
                fb = REF_DISPATCH_FWD_BYTES - REF_DISPATCH_FWD_CAST_BYTES * cf
                bb = REF_DISPATCH_BWD_BYTES - REF_DISPATCH_BWD_CAST_BYTES * cf
                self.t_dispatch[i] = (np.array([cm.memory(fb * x) for x in el]),
                                      np.array([cm.memory(bb * x) for x in el]))
            if impl == "reference":  # the expert activation between the GEMMs (an HBM pass, profile's gelu rate)
                act = {x: self._expert_act_bytes(x) for x in np.unique(tin)}
                self.t_expert_act[i] = (np.array([cm.elementwise("gelu", act[x][0], dt) for x in tin]),
                                        np.array([cm.elementwise("gelu", act[x][1], dt) for x in tin]))
        # ---- parameter sizes
        self.dense_layer = [block_params(m, i)["dense"] for i in range(m.layers)]
        self.embed = embedding_params(m)
        self.expert_local_params = self.local_experts * expert_params(m) if m.moe_layers else 0
        self.zero3 = p.zero_stage == 3
        self.offload_experts = p.offload.expert_params != "gpu"
        self.offload_opt = p.offload.expert_optimizer != "gpu" and bool(self.a2a)
        self.ref = impl == "reference"
        self._host_setup(host_program, host_rates, act_casts, mem_passes)
        cast_off = self.act_casts  # the constants' cast parts are replaced by the program's counted casts
        if self.mem_passes:  # the counted memory passes replace every activation pass of the constants
            self.parts["attention"]["norm_residual"] = 0.0
            self.parts["gate"]["gate_elementwise"] = 0.0
            self.t_attn, self.t_gate = sum(self.parts["attention"].values()), sum(self.parts["gate"].values())
            self.t_dispatch, self.t_expert_act, self.t_embed = {}, {}, 0.0
        if self.ref:
            t_res = 0.0 if self.mem_passes else cm.memory((REF_RESIDUAL_BYTES - REF_RESIDUAL_CAST_BYTES * cast_off) * T * h)
            self.parts["attention"]["norm_residual"] += t_res
            self.t_attn += t_res
            V = m.vocab
            keep = 0.0 if self.mem_passes else 1.0
            self.t_loss_fwd = keep * cm.memory((REF_LOSS_FWD_BYTES - REF_LOSS_FWD_CAST_BYTES * cast_off) * T * V)
            self.t_loss_bwd = keep * cm.memory((REF_LOSS_BWD_BYTES - REF_LOSS_BWD_CAST_BYTES * cast_off) * T * V)
            self.t_emb_grad = cm.memory(REF_EMB_GRAD_BYTES * self.embed)
        # forward only, once per MoE block (the ranks are integers: no backward)
        self.t_rank_scan = (REF_RANK_SCAN_S_PER_ROW * T * m.top_k
                            if self.ref and m.moe_layers and m.capacity_factor is not None else 0.0)
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
            # 16-bit GEMM weights cast from their fp32 masters: the block's dense weights, its local experts
            # when they live on the GPU (offloaded experts arrive in 16 bits), the tied head once
            ex = 0 if self.offload_experts else self.expert_local_params
            self.t_cast = {i: self._cast_time(REF_CAST_BYTES * (self.dense_layer[i] + (ex if i in self.a2a else 0)))
                           for i in range(m.layers)}
            self.t_attn_head_cast = self._cast_time(REF_CAST_BYTES * self.embed)
            self.t_head += self.t_attn_head_cast
            self.parts["head"]["param_cast"] = self.t_attn_head_cast
            self.parts_bwd["head"]["param_cast"] = self.bwd * self.t_attn_head_cast
            self.t_head_bwd = sum(self.parts_bwd["head"].values())
            per_param = (REF_BUCKET_BYTES + REF_CLIP_MOE_BYTES) if grad_sync else REF_CLIP_BYTES
            self.t_clip = cm.memory(per_param * count_params(m).total / (self.W if p.zero_stage >= 2 else 1))
        self._static_memory()

    def _backward_parts(self, cm, seq: int) -> None:
        """The backward of the mixed phases (attention, gate, head) per category. ``impl="ideal"``: the
        forward times ``bwd`` (2 x the calibrated ``backward_gemm_factor``), every part. ``impl="reference"``
        (cuBLAS and cuDNN, what `reference.train` runs): the dense GEMMs' dX and dW are the same cuBLAS GEMMs
        on transposed operands (``TORCH_DENSE_BWD_FACTOR`` x 2 forward, as the torch expert GEMMs: the
        calibrated factor is our Triton dgrad / wgrad's); fused attention's backward at the profile's measured
        backward / forward ratio of SDPA (`CostModel.sdpa_backward_ratio`: flash backward recomputes the
        scores, ~3.2 x the forward on the H100, not 2.6); the memory passes keep ``bwd`` x forward."""
        fac = {k: self.bwd for k in ("dense_gemm", "attention_core", "norm_residual", "gate_elementwise",
                                     "param_cast")}
        if self.ref:
            fac["dense_gemm"] = 2.0 * TORCH_DENSE_BWD_FACTOR
            ratio = cm.sdpa_backward_ratio(seq, self.m.head_dim, self.m.heads, self.m.dtype)
            if ratio is not None:
                fac["attention_core"] = ratio
        self.parts_bwd = {ph: {c: fac[c] * t for c, t in parts.items()} for ph, parts in self.parts.items()}
        self.t_attn_bwd = sum(self.parts_bwd["attention"].values())
        self.t_gate_bwd = sum(self.parts_bwd["gate"].values())
        self.t_head_bwd = sum(self.parts_bwd["head"].values())

    def phase_parts(self) -> dict[str, dict[str, float]]:
        """Each compute phase's composition as fractions per category (`PHASE_CATEGORY` for single-category
        phases; attention / gate / head forward and backward split into their parts), for a device-time
        breakdown of the trace (`simulator.train_breakdown`)."""
        out = {ph: {cat: 1.0} for ph, cat in PHASE_CATEGORY.items()}
        for ph, parts in (("attention_fwd", self.parts["attention"]), ("attention_bwd", self.parts_bwd["attention"]),
                          ("gate_fwd", self.parts["gate"]), ("gate_bwd", self.parts_bwd["gate"]),
                          ("head_fwd", self.parts["head"]), ("head_bwd", self.parts_bwd["head"])):
            tot = sum(parts.values())
            out[ph] = {c: t / tot for c, t in parts.items()} if tot > 0 else {}
        return out

    def _expert_act_bytes(self, rows: float) -> tuple[float, float]:
        """HBM bytes of the expert activation over ``rows`` routed tokens, forward and backward: gelu reads
        and writes [rows, ffn] (2 x dtype bytes per element) and its backward reads the gradient and the
        input and writes the gradient (3 x); swiglu reads two [rows, ffn] and writes one (3 x), backward
        reads three and writes two (5 x)."""
        m = self.m
        el = rows * m.ffn * self.dtype_bytes
        return (3 * el, 5 * el) if m.activation == "swiglu" else (2 * el, 3 * el)

    def _expert_cost(self, cm):
        """The cost model for the expert GEMMs: ``cm`` with its profile re-read preferring the
        ``expert_kernels`` impl's rows (``cm`` itself when None or without a profile)."""
        if self.expert_kernels is None or cm.profile is None:
            return cm
        from simulator.cost import CostModel, _load_profile

        order = (self.expert_kernels,) + tuple(k for k in ("triton", "torch") if k != self.expert_kernels)
        prof = _load_profile(cm.profile.source, order, cm.profile.loglog)
        return CostModel(cm.gpu, prof, overlap_slowdown=cm.overlap_slowdown, launch_s=cm.launch_s,
                         backward_gemm_factor=cm.backward_gemm_factor)

    # ------------------------------------------------------------------ host program
    def _host_setup(self, prog, rates: dict | None, act_casts: bool | None, mem_passes: bool | None = None) -> None:
        """The host side (``host_program``): one `HostClock` per rank, the host seconds per kernel of the
        forward and of the backward / optimizer segments, the activation-cast time of each segment and its
        counted memory passes (``mem_passes``)."""
        from simulator.workload.host import HostClock

        if prog is not None and not self.ref:
            raise ValueError("TrainingIteration: host_program models the reference trainer: it needs impl='reference'")
        if act_casts and prog is None:
            raise ValueError("TrainingIteration: act_casts needs a host_program (the casts are counted there)")
        has_mem = prog is not None and any(sg.mem for sg in prog.segments)
        if mem_passes and not has_mem:
            raise ValueError("TrainingIteration: mem_passes needs a host_program with counted memory passes "
                             "(results/profiles/train_mem_bytes.csv)")
        self.prog = prog
        self.act_casts = bool(prog is not None and (True if act_casts is None else act_casts))
        self.mem_passes = bool(has_mem and (True if mem_passes is None else mem_passes) and self.act_casts)
        cm, m = self.sim.cost, self.m
        fwd = cm.host_op_impl("reference_triton" if self.expert_kernels == "triton" else "reference") or cm.host_op_s
        bwd = cm.host_op_impl("torch") or fwd
        if rates is None and prog is not None:  # measured beside the CUDA table, when it has been
            from simulator.train_host import host_rates

            rates = host_rates("triton" if self.expert_kernels == "triton" else "torch", self.ref_optimizer)
        rates = dict(rates or {})
        unknown = set(rates) - {"fwd", "bwd", "opt"}
        if unknown:
            raise ValueError(f"TrainingIteration: host_rates keys are fwd, bwd and opt, got {sorted(unknown)}")
        self.host_rate = {"fwd": float(rates.get("fwd", fwd)), "bwd": float(rates.get("bwd", bwd)),
                          "opt": float(rates.get("opt", bwd))}
        self.hc = [HostClock() for _ in range(self.W)]
        self.h_cur: list = [None] * self.W
        self.cast_s = np.zeros(self.W)
        self.h_mark = [(0.0, 0, 0.0) for _ in range(self.W)]  # host busy, syncs, sync wait at the last step's start
        self.segs = {sg.name: sg for sg in prog.segments} if prog is not None else {}
        widths = (m.hidden, m.ffn, m.vocab, m.experts)
        from simulator.train_host import mem_rates

        # the memory-pass classes' and the casts' measured bandwidths (with a host program and its counted casts:
        # the reference trainer; act_casts=False keeps the constants' pricing, as without a program)
        self._mem_rate_tab = mem_rates() if prog is not None and self.act_casts else None
        self.t_seg_cast = {n: self._cast_time(sg.cast_bytes(self.T, widths)) for n, sg in self.segs.items()
                           if self.act_casts and any(sg.casts)}
        self.t_seg_mem: dict[str, dict[str, float]] = {}
        if self.mem_passes:
            for n, sg in self.segs.items():
                t = {c: self._mem_time(c, k, b) for c, (k, b) in sg.mem_bytes(self.T, widths).items() if b > 0}
                if t:
                    self.t_seg_mem[n] = t

    def _cast_time(self, nbytes: float) -> float:
        """An fp32 <-> bf16 copy of ``nbytes`` (read + write): at the measured ``cast`` bandwidth
        (`simulator.train_host.mem_rates`, with a host program) when there is one, else the HBM roofline."""
        if nbytes > 0 and (getattr(self, "_mem_rate_tab", None) or {}).get("cast"):
            return self._mem_time("cast", 1.0, nbytes)
        return self.sim.cost.memory(nbytes)

    def _mem_time(self, cls: str, kernels: float, nbytes: float) -> float:
        """Seconds of ``kernels`` memory-pass kernels of class ``cls`` moving ``nbytes`` in all: at the class's
        measured bandwidth (`simulator.train_host.mem_rates`, interpolated in log bytes per kernel, the nearest
        end's rate outside the measured sizes), else the kernel profile's row-wise op for the class
        (`simulator.train_host.MEM_RATE_OPS`, the same way), else the HBM roofline."""
        from simulator.train_host import MEM_RATE_OPS

        per = nbytes / max(kernels, 1.0)
        curve = (self._mem_rate_tab or {}).get(cls)
        if curve is None and self.sim.cost.profile is not None:
            c = self.sim.cost.profile.mem_curves.get(MEM_RATE_OPS.get(cls, ("add", "bf16")))
            curve = list(zip(*c)) if c is not None else None
        if not curve:
            return self.sim.cost.memory(nbytes)
        xs, bs = np.log([x for x, _ in curve]), np.array([b for _, b in curve])
        return nbytes / float(np.interp(np.log(max(per, 1.0)), xs, bs))

    def _hgroup(self, base: str) -> list[str]:
        """Names of segment ``base`` and its pieces (split at syncs) in the host program; [] without one."""
        return [sg.name for sg in self.prog.group(base)] if self.prog is not None else []

    def _hseg(self, r, name, layer, mb):
        """The host issues segment ``name`` after everything before it; the device starts it no earlier than
        its first kernel is issued, beginning with the segment's activation casts (``act_cast``)."""
        if self.prog is None or name not in self.segs:
            return
        from simulator.train_host import TrainProgram

        sg = self.segs[name]
        op = self.host_rate[TrainProgram.part(name)]
        start, end = self.hc[r].issue(sg.kernels, op)
        self.h_cur[r] = (sg, end)
        # the segment's work starts once its first GEMM-class kernel is issued (its first kernel without one)
        yield from self._host_wait(r, layer, mb, start + min(sg.lead + 1, sg.kernels) * op)
        if name in self.t_seg_cast:
            self.cast_s[r] += self.t_seg_cast[name]
            yield from self.compute(r, layer, mb, "act_cast", self.t_seg_cast[name])
        sfx = "_bwd" if TrainProgram.part(name) == "bwd" else ""
        for cls, t in self.t_seg_mem.get(name, {}).items():
            yield from self.compute(r, layer, mb, f"mem_{cls}{sfx}", t)

    def _hend(self, r, layer, mb):
        """End of the current segment: the device cannot finish before its last kernel is issued; a sync
        makes the host wait until the device has drained."""
        if self.prog is None or self.h_cur[r] is None:
            return
        sg, end = self.h_cur[r]
        self.h_cur[r] = None
        yield from self._host_wait(r, layer, mb, end)
        if sg.sync:
            self.hc[r].sync(self.env.now)

    def _hrun(self, r, names, layer, mb):
        """Segments with no device work of their own (issued and, at syncs, waited for)."""
        for n in names:
            yield from self._hseg(r, n, layer, mb)
            yield from self._hend(r, layer, mb)

    def _host_wait(self, r, layer, mb, t):
        now = self.env.now
        if t > now:
            yield self.env.timeout(t - now)
            self.sim.record(r, layer, mb, "host_wait", now, t, 0, 0, "host")

    # ------------------------------------------------------------------ offload
    def _offload_setup(self, rng) -> None:
        """Which local experts the step uses, and (with a CPU cache) which the cache holds: the LFU cache
        is run over ``Workload.steps`` steps of routing draws (`simulator.workload.offload`)."""
        m, p, w = self.m, self.p, self.w
        self.used = {i: self.recv[i] > 0 for i in self.a2a}
        self.hit = None
        self.cache = None
        if not (self.offload_experts or self.offload_opt) or not self.a2a:
            return
        if p.cpu_cache_experts > 0:
            pop = self.pop
            history = []
            for _ in range(max(w.steps, 1) - 1):
                history.append({i: O.received(routing.token_counts(m, w, self.W, rng, pop), self.EP) for i in self.a2a})
            history.append(self.recv)
            cap = min(p.cpu_cache_experts, self.local_experts) * m.moe_layers
            self.cache = O.simulate_cache(p, history, cap)
            self.hit = self.cache.hit

    def _cached(self, r: int, i: int) -> np.ndarray:
        if self.hit is None:
            return np.zeros(self.local_experts, dtype=bool)
        return self.hit[r][i]

    def _count(self, phase: str, nbytes: float) -> None:
        self.bytes[phase] = self.bytes.get(phase, 0.0) + float(nbytes)

    def _engine(self, res, r, layer, phase, dur, nbytes, resource):
        with res.request() as req:
            yield req
            t0 = self.env.now
            if self.host_share is not None and (phase in SSD_PHASES or phase == "cpu_adam"):  # task hH
                if phase == "cpu_adam":  # (the ideal schedule's per-expert stages)
                    cls, beside = "adam", self._adam_beside(dur)
                else:
                    op = "disk_read" if phase == "ssd_read" else "disk_write"
                    cls, beside = f"io_{op[5:]}", {"adam": self._io_time(op, nbytes, contended=True)}
                yield from self.host_share[r // self.c.gpus_per_node].run(cls, dur, beside)
                dur = self.env.now - t0
            else:
                yield self.env.timeout(dur)
            self.busy[phase] = self.busy.get(phase, 0.0) + dur
            self.sim.record(r, layer, -1, phase, t0, self.env.now, nbytes, 0, resource)
        self._count(phase, nbytes)

    def _io_time(self, op: str, nbytes: float, contended: bool = False) -> float:
        """``disk_read`` / ``disk_write`` of ``nbytes``: ``io_rates``, else the profile, else the cluster spec.
        ``contended`` (task hH): beside the CPU update, each part at its rate times its ``contention_*`` factor."""
        if nbytes <= 0:
            return 0.0
        f = (lambda k: self.io_rates.get(f"contention_{k}") or 1.0) if contended else (lambda k: 1.0)
        # reference.offload serialises and checksums (crc32) a block on its I/O thread before writing it
        prep = (nbytes / (self.io_rates["ssd_write_prep"] * f("ssd_write_prep"))
                if op == "disk_write" and self.io_rates.get("ssd_write_prep") else 0.0)
        if self.io_rates.get(op):
            return prep + nbytes / (self.io_rates[op] * f(op))
        bw = self.c.ssd_read_GBps if op == "disk_read" else self.c.ssd_write_GBps
        return prep + self.sim.cost.transfer_time(op, nbytes, bw) / f(op)

    def _adam_beside(self, dur: float) -> dict[str, float]:
        """Task hH: the CPU update's duration beside the node's SSD reads / writes (``contention_cpu_adam_read`` /
        ``_write`` factors, else ``contention_cpu_adam``, else none)."""
        g = self.io_rates.get("contention_cpu_adam") or 1.0
        return {f"io_{k}": dur / (self.io_rates.get(f"contention_cpu_adam_{k}") or g) for k in ("read", "write")}

    def _ssd(self, r, kind, nbytes, layer, phase):
        """A read or write of ``nbytes`` on the rank's node SSD (one disk: reads and writes queue on it)."""
        node = r // self.c.gpus_per_node
        dur = self._io_time("disk_read" if kind == "read" else "disk_write", nbytes)
        return self._engine(self.ssd_r[node], r, layer, phase, dur, nbytes, "ssd")

    def cpu_adam_time(self, params: float) -> float:
        # with gradient accumulation reference.offload's CPU AdamW reads fp32 gradients (its accumulators)
        if self.w.micro_batches > 1 and self.io_rates.get("cpu_adam_fp32grad"):
            return params / self.io_rates["cpu_adam_fp32grad"]
        if self.io_rates.get("cpu_adam"):
            return params / self.io_rates["cpu_adam"]
        rate = self.sim.cost.profile.transfer_rate("cpu_adam", params) if self.sim.cost.profile is not None else None
        return params / (rate if rate else self.c.host_memory_GBps * 1e9 / CPU_ADAM_BYTES_PER_PARAM)

    def _fetch(self, r, key, layer, mb):
        """Pinned host mirror -> GPU of the layer's used local experts' 16-bit params (the host keeps a
        compute-dtype mirror of every offloaded expert, refreshed by the CPU optimizer; the SSD holds
        fp32 states only, as `reference.offload` does). Under the reference schedule the copy waits for
        the previous step's update of the layer."""
        P = expert_params(self.m)
        used = self.used[layer][r]
        n_used = int(used.sum())
        prev = self.adam_prev[r].get(layer)
        if prev is not None:
            yield prev
        if n_used:
            nb = PARAM_BYTES * P * n_used
            yield self.copy(r, "h2d", nb, layer, mb, "h2d_prefetch")
            self._count("h2d_prefetch", nb)

    def _h2d(self, r, state, key, layer, mb):
        if key in state or layer not in self.a2a:
            return
        if self.ref:  # reference.offload's slot pool: a layer still in its slot is a hit (no copy)
            slots, s = self.slots[r], layer % self.n_slots
            if slots[s] is not None and slots[s][0] == layer:
                state[key] = slots[s][1]
                return
        state[key] = self.env.process(self._fetch(r, key, layer, mb))
        if self.ref:
            self.slots[r][layer % self.n_slots] = (layer, state[key])

    def _expert_stage_chain(self, r, layer, stages):
        for res, phase, dur, nb, resource in stages:
            if dur > 0:
                yield from self._engine(res, r, layer, phase, dur, nb, resource)

    def _ssd_state_misses(self, r, layer) -> np.ndarray:
        """Local experts whose fp32 state is on the SSD (not in the CPU cache) this step: the optimizer
        updates every expert, used or not (as reference.offload's AdamW does)."""
        if self.p.offload.expert_optimizer != "ssd":
            return np.zeros(self.local_experts, dtype=bool)
        return ~self._cached(r, layer)

    def _read_states(self, r, layer):
        """Vertical prefetch (reference schedule, depth >= 1): the layer's missed states SSD -> host.
        reference.offload queues the staging task on its optimizer thread, behind the previous step's
        layer updates (one FIFO worker): the reads are issued once all of those are done."""
        n = int(self._ssd_state_misses(r, layer).sum())
        prev = [ev for ev in self.adam_prev[r].values() if not ev.processed]
        if n and prev:
            yield self.env.all_of(prev)
        if n:
            yield from self._ssd(r, "read", OPTIMIZER_BYTES * expert_params(self.m) * n, layer, "ssd_read")

    def _expert_optimizer(self, r, layer, d2h_ev, pre=None):
        """CPU optimizer of all of ``layer``'s local experts (AdamW updates unused experts too: their
        moments decay) once their gradients are on the host."""
        yield d2h_ev
        p, c, P = self.p, self.c, expert_params(self.m)
        node = r // c.gpus_per_node
        used = np.ones(self.local_experts, dtype=bool)
        miss = self._ssd_state_misses(r, layer)
        admitted = set(self.cache.admitted[r].get(layer, [])) if self.cache is not None else set()
        if pre is not None:  # the step's staged reads (taken by the caller: the next step stages its own)
            yield pre
        if self.ref_sched:
            # reference.offload: one task per layer on its single optimizer thread (``self.cpu``, FIFO in
            # layer order): the missed states read (on demand when not staged; through the one I/O queue,
            # behind earlier write-backs), one AdamW over all of the layer's experts, then the write-backs
            # queued on the I/O queue without waiting for them
            ex = np.flatnonzero(used)
            with self.cpu[node].request() as req:
                yield req
                rb = OPTIMIZER_BYTES * P * int(miss[ex].sum()) if pre is None else 0.0
                if rb:
                    yield from self._engine(self.ssd_r[node], r, layer, "ssd_read", self._io_time("disk_read", rb),
                                            rb, "ssd")
                if len(ex):
                    t0, dur = self.env.now, self.cpu_adam_time(P * len(ex))
                    if self.host_share is not None:  # task hH: slower while SSD I/O runs beside it
                        yield from self.host_share[node].run("adam", dur, self._adam_beside(dur))
                        dur = self.env.now - t0
                    else:
                        yield self.env.timeout(dur)
                    self.busy["cpu_adam"] = self.busy.get("cpu_adam", 0.0) + dur
                    self.sim.record(r, layer, -1, "cpu_adam", t0, self.env.now, 0, 0, "cpu")
                    self._count("cpu_adam", 0.0)
                wb = OPTIMIZER_BYTES * P * sum(1 for e in ex if miss[e] and e not in admitted)
                if wb:
                    self.env.process(self._engine(self.ssd_w[node], r, layer, "ssd_write",
                                                  self._io_time("disk_write", wb), wb, "ssd"))
        else:
            procs = []
            for e in np.flatnonzero(used):
                rb = OPTIMIZER_BYTES * P if miss[e] and pre is None else 0.0
                wb = OPTIMIZER_BYTES * P if miss[e] and e not in admitted else 0.0  # admitted: stays in the cache
                stages = [
                    (self.ssd_r[node], "ssd_read", self._io_time("disk_read", rb), rb, "ssd"),
                    (self.cpu[node], "cpu_adam", self.cpu_adam_time(P), 0.0, "cpu"),
                    (self.ssd_w[node], "ssd_write", self._io_time("disk_write", wb), wb, "ssd"),
                ]
                procs.append(self.env.process(self._expert_stage_chain(r, layer, stages)))
            if procs:
                yield self.env.all_of(procs)
        if p.offload.expert_params == "gpu" and used.any():  # ZeRO-Offload style: updated params back
            nb = PARAM_BYTES * P * int(used.sum())
            yield self.copy(r, "h2d", nb, layer, -1, "h2d_params")
            self._count("h2d_params", nb)
        if self.cache is not None and "ssd" in (p.offload.expert_params, p.offload.expert_optimizer):
            ev = self.cache.evicted[r].get(layer, [])
            if ev:
                nb = OPTIMIZER_BYTES * P * len(ev)
                wr = self._engine(self.ssd_w[node], r, layer, "ssd_writeback", self._io_time("disk_write", nb), nb, "ssd")
                if self.ref_sched:  # queued on the I/O queue like the other write-backs, not awaited
                    self.env.process(wr)
                else:
                    yield from wr

    def _select_time(self, r: int, i: int) -> float:
        """expert_impl="loop": the dense per-expert gradients of the stacked expert weights (``REF_SELECT_*``)."""
        u = int(self.used[i][r].sum())
        E = self.local_experts
        mats = 3 if self.m.activation == "swiglu" else 2
        pm = self.m.hidden * self.m.ffn
        per = u * (REF_SELECT_ZERO_BYTES * E + REF_SELECT_COPY_BYTES) + max(u - 1, 0) * REF_SELECT_ACC_BYTES * E
        return self.sim.cost.memory(mats * per * pm) if u else 0.0

    # ------------------------------------------------------------------ memory
    def _state_tiers(self) -> dict[str, float]:
        """Model-state bytes per tier (``gpu`` / ``cpu`` / ``ssd``) of one rank; subclasses adjust them."""
        return state_bytes_per_tier(self.m, self.p)

    def _static_memory(self) -> None:
        tiers = self._state_tiers()
        mem, t = self.sim.memory, 0.0
        self.state_tiers = tiers
        self.mem_model = None  # impl="reference": simulator.train_memory's step peak (None: the ideal model)
        self.act_freed: list[dict] = [{} for _ in range(self.W)]  # block -> saved bytes its backward released
        self.mem_note = ""
        if self.ref and self._ref_memory_setup():
            mem.alloc_all(t, "dram", "model_states", tiers["cpu"])
            mem.alloc_all(t, "ssd", "model_states", tiers["ssd"])
            return
        mem.alloc_all(t, "hbm", "model_states", tiers["gpu"])
        mem.alloc_all(t, "dram", "model_states", tiers["cpu"])
        mem.alloc_all(t, "ssd", "model_states", tiers["ssd"])
        # (reference.offload's pinned 16-bit mirror and gradient buffer of every offloaded expert are in
        # tiers["cpu"]: semoe.sizing counts them there)
        if self.p.fusion_bucket_bytes:
            mem.alloc_all(t, "hbm", "comm_buffers", 2 * self.p.fusion_bucket_bytes)

    def _ref_memory_setup(self) -> bool:
        """impl="reference": HBM as the reference trainer allocates it (`simulator.train_memory`: fp32 masters,
        gradients and AdamW moments, the offload engine's pool and accumulators, the counted saved activations,
        the loss buffers, the gradient buckets). False (the ideal model is kept, ``mem_note`` says why) for what
        that model does not cover (ZeRO stages 1-2, an uncounted code path, dense FFN blocks)."""
        from simulator.train_memory import saved_coeffs, step_peak

        rows = [float(self.tokens_in[i].max()) for i in sorted(self.a2a)]
        try:
            pk = step_peak(self.m, self.p, tokens=self.T, routed_rows=rows, micro_batches=self.w.micro_batches,
                           trainer=self.mem_trainer, optimizer=self.ref_optimizer,
                           process_group=self.grad_sync or self.W > 1)
            self.mem_coeffs = saved_coeffs(self.m)
        except (ValueError, FileNotFoundError) as e:
            self.mem_note = str(e)
            return False
        self.mem_model = pk
        P, mem = pk.parts, self.sim.memory
        mem.alloc_all(0.0, "hbm", "model_states", P["params"] + P["adam"] + P["expert_pool"])
        mem.alloc_all(0.0, "hbm", "logits", P["logits"])  # the previous step's ModelOutput
        # gradients of the previous step, alive in the forward until zero_grad (reference.train)
        self.grads_live = np.full(self.W, self.mem_trainer == "train")
        self.grads_grown = np.zeros(self.W)  # gradients created so far in this backward (blocks done)
        self.acc_bytes = np.zeros(self.W)  # the offload engine's gradient accumulators (emptied by its step)
        if self.mem_trainer == "train":
            mem.alloc_all(0.0, "hbm", "grads", P["grads"])
        return True

    def _mem_head_fwd(self, r: int, mb: int) -> None:
        """After the loss forward: the head's saved tensors, the new logits (the previous ones die when the
        forward returns), the fp32 loss copy alive inside the loss; zero_grad (reference.train) after it."""
        if self.mem_model is None:
            return
        from simulator.train_memory import head_saved_bytes

        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        mem.alloc(now, r, "hbm", "activations", head_saved_bytes(self.m, self.T, self.mem_coeffs))
        mem.alloc(now, r, "hbm", "logits", P["logits"] + P["loss_fwd_fp32"] + P["zero3_root"])
        mem.free(now, r, "hbm", "logits", P["loss_fwd_fp32"] + P["prev_logits"] + P["zero3_root"])
        if self.mem_trainer == "train" and mb == 0 and self.grads_live[r]:
            mem.free(now, r, "hbm", "grads", P["grads"])
            self.grads_live[r] = False

    def _mem_head_bwd(self, r: int) -> None:
        """The loss backward's fp32 [T, V] gradients beside the saved log-softmax, then the head's saved tensors
        released."""
        if self.mem_model is None:
            return
        from simulator.train_memory import head_saved_bytes

        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        mem.alloc(now, r, "hbm", "loss_grads", P["loss_bwd_fp32"] + P["zero3_root"])
        mem.free(now, r, "hbm", "loss_grads", P["loss_bwd_fp32"] + P["zero3_root"])
        mem.free(now, r, "hbm", "activations", head_saved_bytes(self.m, self.T, self.mem_coeffs))

    def _mem_expert_bwd(self, r: int, i: int, mb: int) -> None:
        """A MoE block's expert GEMM backward: its outputs beside its saved inputs and the gradients flowing
        (`simulator.train_memory`'s per-block ``transient``), the combine's saved rows already gone; then the
        gradients the block leaves: fp32 ones when this backward creates them, the offload engine's
        accumulators (a bf16 one in the first micro-batch, turned into fp32 in the second)."""
        if self.mem_model is None:
            return
        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        L = self.mem_model.layers[sorted(self.a2a).index(i)]
        nb = L["transient"] - L["combine_saved"]
        mem.alloc(now, r, "hbm", "bwd_transient", nb)
        mem.free(now, r, "hbm", "bwd_transient", nb)
        gone = L["combine_saved"] + L["expert_saved"]  # released by now (the rest when the block is done)
        mem.free(now, r, "hbm", "activations", gone)
        self.act_freed[r][i] = gone
        if not self.grads_live[r]:
            mem.alloc(now, r, "hbm", "grads", L["grad_growth"])
            self.grads_grown[r] += L["grad_growth"]
        if mb <= 1 and P["acc_layer_bf16"]:
            mem.alloc(now, r, "hbm", "expert_grad_acc", P["acc_layer_bf16"])
            self.acc_bytes[r] += P["acc_layer_bf16"]

    def _mem_backward_end(self, r: int, last: bool) -> None:
        """End of a micro-batch's backward: the gradients exist (fp32, and the engine's accumulators); after the
        last one every gradient bucket's flat copy is alive until the reduction is finished."""
        if self.mem_model is None:
            return
        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        if not self.grads_live[r]:  # the rest: the embedding's, the head's, the final norm's
            mem.alloc(now, r, "hbm", "grads", P["grads"] - self.grads_grown[r])
            self.grads_live[r] = True
            self.grads_grown[r] = 0.0
        if last:
            mem.alloc(now, r, "hbm", "buckets", P["buckets"])

    def _mem_optimizer(self, r: int) -> None:
        """The buckets are gone after ``finish()``, the engine's accumulators after its step (copied to the host);
        foreach AdamW's temporaries live during its step."""
        if self.mem_model is None:
            return
        mem, now, P = self.sim.memory, self.env.now, self.mem_model.parts
        mem.free(now, r, "hbm", "buckets", P["buckets"])
        mem.free(now, r, "hbm", "expert_grad_acc", self.acc_bytes[r])
        self.acc_bytes[r] = 0.0
        mem.alloc(now, r, "hbm", "adam_temp", P["adam_temp"])
        mem.free(now, r, "hbm", "adam_temp", P["adam_temp"])

    def _leaked_state_bytes(self) -> float:
        if self.mem_model is None:
            return 0.0
        from simulator.train_memory import leaked_state_bytes

        return leaked_state_bytes(self.m, self.p)

    def _act_bytes(self, r: int, i: int) -> float:
        if self.mem_model is not None:  # impl="reference": the counted saved tensors (simulator.train_mem_count)
            from simulator.train_memory import block_saved_bytes

            return block_saved_bytes(self.m, self.T, float(self.tokens_in[i][r]), self.local_experts,
                                     expert_casts=not (self.offload_experts or self.offload_opt),
                                     coeffs=self.mem_coeffs)
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
        if self.mem_model is None:  # (impl="reference": simulator.train_memory's zero3_root instead)
            self.sim.memory.alloc(self.env.now, r, "hbm", "gathered_params", nbytes * (W - 1) / W)

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
