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
backward would have done for an fp32 master parameter. `adamw_layer_` can upcast a whole layer's gradients
into a reused fp32 ``scratch`` (one parallel copy per tensor, no allocation; the same values bit for bit)
instead of one freshly allocated fp32 copy per expert slice (issue 6, task hB: 16-64 MB allocations per slice,
page-faulted anew whenever the allocator returned them to the OS, made the bf16 update erratic).

Threads (task hB): the engine runs this update on its own worker thread while the training thread launches GPU
work (and spin-waits in CUDA syncs) and the SSD I/O thread checksums and copies blocks. With torch's default
intra-op team (one thread per core) those two busy threads oversubscribe the cores, and every parallel region
of the update waits at its barrier for a descheduled team member. `adam_threads` is the engine's rule: the
cores this process may run on minus `RESERVED_THREADS`. ``torch.set_num_threads`` sets the calling thread's
OpenMP team size (and the default of threads that start later), so the engine sets it inside its worker.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

IMPLS = ("exact", "fused")
# host threads the offload engine keeps busy beside its optimizer: the training thread (kernel launches,
# spin-waits in CUDA syncs) and the SSD I/O thread (crc32, copies between the page cache and host buffers)
RESERVED_THREADS = 2


def host_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def adam_threads(cores: int | None = None, reserved: int = RESERVED_THREADS) -> int:
    """Intra-op threads of the engine's CPU AdamW: ``cores`` (default `host_cores`) minus ``reserved``, at least 1."""
    cores = host_cores() if cores is None else int(cores)
    if cores < 1 or reserved < 0:
        raise ValueError(f"adam_threads: need cores >= 1 and reserved >= 0, got {cores} and {reserved}")
    return max(1, cores - reserved)


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


def expert_layout(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, int]], dict[str, bool], int]:
    """Where each tensor of one expert sits in its flat fp32 vector, as `reference.offload.engine` lays it out:
    ``shapes`` (name -> per-expert shape, in the engine's tensor order) -> (``offsets`` name -> (offset, numel),
    ``decay`` name -> weight decay on / off, ``P`` parameters per expert)."""
    offsets, decay, off = {}, {}, 0
    for n, shape in shapes.items():
        k = 1
        for d in shape:
            k *= int(d)
        offsets[n] = (off, k)
        decay[n] = len(shape) >= 1  # the engine's rule: the stacked [E, ...] parameter has >= 2 dims
        off += k
    return offsets, decay, off


def adamw_layer_(states: list[tuple[int, Tensor]], grads: dict[str, Tensor], mirror: dict[str, Tensor],
                 offsets: dict[str, tuple[int, int]], decay: dict[str, bool], *, step: int, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, impl: str = "exact",
                 scratch: dict[str, Tensor] | None = None) -> None:
    """One MoE layer's expert update, the exact work of the offload engine's per-layer host task
    (``ExpertOffload._adam``): AdamW on the ``[3, P]`` fp32 states ``states`` (``(expert, state)`` pairs; rows
    master, m, v), one call per weight-decay group over per-expert, per-tensor slices, the gradients
    ``grads[name][expert]`` (host buffers ``[E, ...]``: bf16 are upcast, allocating, as `adamw_` does), then
    the refresh of the weight mirror ``mirror[name][expert]`` (the compute dtype the H2D copies read).

    ``offsets`` (name -> (offset, numel) in the flat vector, in the engine's tensor order) and ``decay`` (name ->
    bool) as `expert_layout` makes them. ``scratch``: a dict the caller keeps between calls (one per thread); low
    precision gradients are then upcast whole into its fp32 buffers (kept, reused) instead of per slice. The
    benchmark times this function as the engine's CPU AdamW rate."""
    if scratch is not None:
        up = {}
        for n, g in grads.items():
            if g.dtype in (torch.bfloat16, torch.float16):
                buf = scratch.get(n)
                if buf is None or buf.shape != g.shape:
                    buf = scratch[n] = torch.empty(g.shape, dtype=torch.float32)
                up[n] = buf.copy_(g)
            else:
                up[n] = g
        grads = up
    groups: dict[bool, tuple[list, list, list, list]] = {True: ([], [], [], []), False: ([], [], [], [])}
    for e, st in states:
        for n, (o, k) in offsets.items():
            g = groups[decay[n]]
            g[0].append(st[0, o : o + k])
            g[1].append(grads[n][e].reshape(k))
            g[2].append(st[1, o : o + k])
            g[3].append(st[2, o : o + k])
    for dec, (p, g, m, v) in groups.items():
        adamw_(p, g, m, v, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
               weight_decay=weight_decay if dec else 0.0, impl=impl)
    for e, st in states:
        for n, (o, k) in offsets.items():
            mirror[n][e].reshape(k).copy_(st[0, o : o + k])
