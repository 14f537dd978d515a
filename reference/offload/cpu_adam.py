"""AdamW for offloaded expert states on the CPU, over lists of flat fp32 views.

Two implementations of torch.optim.AdamW's math (decoupled weight decay, Loshchilov & Hutter 2019;
bias-corrected moments, Kingma & Ba 2015, Algorithm 1):

* ``exact``: the per-tensor sequence of ``torch.optim.adam._single_tensor_adam`` (what
  ``torch.optim.AdamW`` runs on CPU tensors), op for op. Every op is elementwise, so running it on an
  expert's slice of a stacked parameter gives the same bits as running it on the whole stacked
  parameter: the gpu / cpu / ssd placements train bit-identically on the CPU (tested).
* ``fused``: ``torch._fused_adamw_`` (one vectorised pass per tensor, parallel over
  ``torch.get_num_threads()`` intra-op threads): the fast path for GPU runs. Same formula, different
  rounding order (within ~1 ulp per step; tested against ``exact`` at 1e-6).

Grads may be bf16/fp16 (the GPU pool's dtype): they are upcast to fp32 first, as autocast's
backward would have done for an fp32 master parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

IMPLS = ("exact", "fused")


def adamw_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
           step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
           impl: str = "exact") -> None:
    """One AdamW step (``step`` counts from 1) on every (param, grad, m, v) quadruple, in place."""
    if impl not in IMPLS:
        raise ValueError(f"adamw_: impl must be one of {IMPLS}, got {impl!r}")
    if step < 1:
        raise ValueError(f"adamw_: step counts from 1, got {step}")
    grads = [g if g.dtype == p.dtype else g.to(p.dtype) for p, g in zip(params, grads)]
    if not params:
        return
    if impl == "fused":
        steps = [torch.tensor(float(step)) for _ in params]
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2 = 1 - beta2 ** float(step)
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
