"""Measure one MoE FFN layer (torchtitan style) on a CUDA GPU; torch only, no semoe import.

    python simulator/calibration_gpu.py OUT.csv

Writes ``config,mode,ms,tflops`` rows (median of 20 timed runs after 5 warm-ups, CUDA events).
"""

import csv
import sys

import torch
import torch.nn.functional as Fn

CONFIGS = {  # name: experts, top_k, hidden, ffn, tokens (same as simulator/calibration.py)
    "mixtral_like": (8, 2, 4096, 14336, 16384),
    "hetu_switch_b32": (8, 1, 2048, 2048, 32 * 1024),
    "fine_grained": (64, 8, 2048, 1408, 16384),
}


def layer(x, wr, w1, w2, k):
    T = x.shape[0]
    scores = torch.softmax(x @ wr, dim=-1, dtype=torch.float32)
    topv, topi = torch.topk(scores, k, dim=-1)
    topv = (topv / topv.sum(-1, keepdim=True)).to(x.dtype)
    flat = topi.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0])
    offs = torch.cumsum(counts, 0).to(torch.int32)
    src = order // k
    xs = x[src]
    h = torch._grouped_mm(xs, w1.transpose(-2, -1), offs=offs)
    h = Fn.gelu(h)
    y = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    y = y * topv.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, src, y)


def bench(fn, reps=20, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main(out):
    dev = "cuda"
    rows = []
    for name, (E, k, H, F, T) in CONFIGS.items():
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        wr = (torch.randn(H, E, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
        w1 = (torch.randn(E, F, H, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
        w2 = (torch.randn(E, H, F, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
        flops = 2 * 2 * T * k * H * F
        with torch.no_grad():
            ms = bench(lambda: layer(x, wr, w1, w2, k))
        rows.append((name, "fwd", ms, flops / ms / 1e9))
        gout = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g)

        def fb():
            layer(x, wr, w1, w2, k).backward(gout)

        ms = bench(fb)
        rows.append((name, "fwd_bwd", ms, 3 * flops / ms / 1e9))
        print(rows[-2], rows[-1], flush=True)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "mode", "ms", "tflops"])
        w.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1])
