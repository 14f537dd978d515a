"""Constants of the training workload (`simulator.workload.training`): phase categories, the ideal and CPU AdamW byte
counts, and the reference trainer's extra HBM traffic (``REF_*``, each derived in its comment from the aten ops
`reference.train` issues), the torch GEMM backward factors and `torch_expert_gemms`."""

from __future__ import annotations

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
    if prof is None or not {"grouped_gemm_dgrad", "grouped_gemm_wgrad"} <= prof.curve_ops:
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
