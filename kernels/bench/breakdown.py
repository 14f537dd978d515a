"""Per-kernel time breakdown of one MoE layer forward+backward (torch.profiler, CUDA activity).

``python -m kernels.bench.breakdown --configs mixtral_like --impls ours,torch_grouped,dense`` prints,
per (config, impl), the CUDA kernels sorted by total device time over ``--iters`` steps, and the sum.
This is the profile that explains a missed speed goal: which kernel takes the time, and at what rate.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from kernels.bench.moe_layer import CONFIGS, build


def breakdown(cname: str, impl: str, iters: int = 3, top: int = 14) -> str:
    c = CONFIGS[cname]
    m = build(impl, c)
    rows = c.tokens * c.top_k if impl == "dense" else c.tokens
    x = torch.randn(rows, c.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn_like(x)
    for _ in range(3):  # warm up (compile, autotune)
        m(x).backward(gy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            m(x).backward(gy)
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in evs) / iters
    lines = [f"== {cname} {impl}: device time per step {total / 1e3:.2f} ms (fwd_bwd flops "
             f"{c.flops('fwd_bwd') / 1e12:.2f} TFLOP -> {c.flops('fwd_bwd') / (total * 1e6):.0f} TFLOP/s busy)"]
    for e in sorted(evs, key=lambda e: -e.self_device_time_total)[:top]:
        t = e.self_device_time_total / iters
        lines.append(f"  {t / 1e3:8.3f} ms {100 * t / total:5.1f}%  x{e.count // iters:<3d} {e.key[:110]}")
    del m, x, gy
    torch.cuda.empty_cache()
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--impls", default="ours,torch_grouped,dense")
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)
    for cname in args.configs.split(","):
        for impl in args.impls.split(","):
            try:
                print(breakdown(cname, impl, args.iters), flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"== {cname} {impl}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
