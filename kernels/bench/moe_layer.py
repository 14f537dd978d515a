"""MoE FFN layer benchmark: ours (Triton) vs torchtitan-style, Hugging Face-style, DeepSpeed-MoE, dense.

Implementations: ``ours`` (Triton gating + index maps + grouped GEMMs with fused gather/GELU +
unpermute), ``ours_notma`` (the same with pointer loads in the GEMMs), ``ours_torchgmm`` (our
kernels around ``torch._grouped_mm``), ``torch_grouped``, ``naive``, ``deepspeed``, ``dense``.
Every implementation runs the whole layer on bf16 inputs: router matmul, gating, dispatch, expert
FFNs (GELU), combine. TFLOP/s are counted on routed tokens: 2*2*T*k*H*F for the forward, three times
that for forward+backward (also for DeepSpeed, which drops tokens over capacity 1.0). ``dense`` is one
matmul pair of the same FLOPs (x [T*k, H] @ W1 [H, F] -> GELU -> @ W2 [F, H]): the ceiling.

Also times the two kernel-level goals of issue 3:
  ``gating_*``  our fused gating vs torch softmax + topk + renormalise + bincount (ms);
  ``permute_*`` permute + unpermute achieved bytes/s vs a device-to-device copy (gbps, ms).

Rows ``date,commit,device,config,impl,mode,metric,value`` are appended to ``--csv`` (tidy, one
number per row; mode in fwd/fwd_bwd, metric in tflops/ms/gbps). Run on a GPU:
``python -m kernels.bench.moe_layer --csv results/bench/moe_layer.csv``; plot with
``python -m kernels.bench.plot_moe_layer``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import reference as ref  # noqa: F401  (the oracle the tests use; imported for parity)
from semoe.io import git_commit  # noqa: F401 (re-exported)
from semoe.moe_layer_configs import MOE_LAYER_CONFIGS, MoELayerConfig

CSV_HEADER = ["date", "commit", "device", "config", "impl", "mode", "metric", "value"]


Config = MoELayerConfig  # the shared description (semoe/moe_layer_configs.py)
CONFIGS = MOE_LAYER_CONFIGS
IMPLS = ["dense", "ours", "ours_notma", "ours_torchgmm", "torch_grouped", "naive", "deepspeed"]


# ----------------------------------------------------------------------------------- implementations
class Layer(nn.Module):
    """Router + E expert FFNs in the [E, H, F] / [E, F, H] layout shared by ours and torch_grouped."""

    def __init__(self, c: Config, dtype=torch.bfloat16, device="cuda"):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(0)
        H, Fd, E = c.hidden, c.ffn, c.experts
        self.c = c
        self.wr = nn.Parameter(torch.randn(H, E, device=device, dtype=dtype, generator=g) / H**0.5)
        self.w1 = nn.Parameter(torch.randn(E, H, Fd, device=device, dtype=dtype, generator=g) / H**0.5)
        self.w2 = nn.Parameter(torch.randn(E, Fd, H, device=device, dtype=dtype, generator=g) / Fd**0.5)

    def route_torch(self, x):
        probs = torch.softmax((x @ self.wr).float(), dim=-1)
        w, ids = torch.topk(probs, self.c.top_k, dim=-1)
        if self.c.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return w, ids


class Ours(Layer):
    gemm = "triton"
    tma = True

    def forward(self, x):
        from kernels import grouped_gemm
        from kernels.gating import gating
        from kernels.moe_ffn import moe_ffn

        grouped_gemm.TMA_ENABLED = self.tma
        w, ids, _, _counts, _psum, _z = gating(x @ self.wr, self.c.top_k, renormalize=self.c.renormalize,
                                               write_probs=False)
        return moe_ffn(x, ids, w, self.w1, self.w2, gemm=self.gemm)


class OursNoTMA(Ours):
    """Our Triton GEMMs with pointer loads (cp.async) instead of TMA: the A/B of that choice."""

    tma = False


class OursTorchGemm(Ours):
    """Our gating, index maps, permute and unpermute kernels with torch._grouped_mm for the GEMMs."""

    gemm = "torch"


class TorchGrouped(Layer):
    """torchtitan style: topk, stable argsort, gather, torch._grouped_mm x2, weight, index_add."""

    def forward(self, x):
        w, ids = self.route_torch(x)
        k = self.c.top_k
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.c.experts)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        tok = order // k
        h = F.gelu(torch._grouped_mm(x[tok], self.w1, offs=offs))
        ys = torch._grouped_mm(h, self.w2, offs=offs)
        ys = ys * w.flatten()[order].to(ys.dtype)[:, None]
        return torch.zeros_like(x).index_add(0, tok, ys)


class Naive(Layer):
    """Hugging Face style: loop over experts, gather their tokens, index_add the weighted outputs."""

    def forward(self, x):
        w, ids = self.route_torch(x)
        out = torch.zeros_like(x)
        for e in range(self.c.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            h = F.gelu(x[tok] @ self.w1[e])
            y = (h @ self.w2[e]) * w[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        return out


class Dense(nn.Module):
    """One matmul pair with the routed FLOPs: the ceiling."""

    def __init__(self, c: Config, dtype=torch.bfloat16, device="cuda"):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(c.hidden, c.ffn, device=device, dtype=dtype, generator=g) / c.hidden**0.5)
        self.w2 = nn.Parameter(torch.randn(c.ffn, c.hidden, device=device, dtype=dtype, generator=g) / c.ffn**0.5)
        self.k = c.top_k

    def forward(self, x):  # x is [T*k, H] here
        return F.gelu(x @ self.w1) @ self.w2


def _init_dist():
    import torch.distributed as dist

    if not dist.is_initialized():
        for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
            os.environ.setdefault(k, v)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl")


class DeepSpeedMoE(nn.Module):
    """DeepSpeed-MoE ``deepspeed.moe.layer.MoE``: ep_size 1, capacity factor 1.0 (drops tokens)."""

    def __init__(self, c: Config, dtype=torch.bfloat16, device="cuda"):
        super().__init__()
        if c.top_k > 2:
            raise NotImplementedError(f"DeepSpeed-MoE gates support k <= 2, config has k={c.top_k}")
        _init_dist()
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(c.hidden, c.ffn, bias=False), nn.GELU(), nn.Linear(c.ffn, c.hidden, bias=False))
        self.moe = MoE(hidden_size=c.hidden, expert=expert, num_experts=c.experts, ep_size=1, k=c.top_k,
                       capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4, drop_tokens=True,
                       use_rts=False).to(device=device, dtype=dtype)
        self.moe.set_deepspeed_parallelism()

    def forward(self, x):
        y, _laux, _counts = self.moe(x[None])
        return y[0]


def build(impl: str, c: Config) -> nn.Module:
    return {"ours": Ours, "ours_notma": OursNoTMA, "ours_torchgmm": OursTorchGemm, "torch_grouped": TorchGrouped, "naive": Naive, "dense": Dense, "deepspeed": DeepSpeedMoE}[impl](c)


# ----------------------------------------------------------------------------------- timing
def bench_ms(fn, grad_to_none=None, warmup_ms=50, rep_ms=300) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))


def time_layer(impl: str, c: Config, modes: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    m = build(impl, c)
    rows = c.tokens * c.top_k if impl == "dense" else c.tokens
    x = torch.randn(rows, c.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(rows, c.hidden, device="cuda", dtype=torch.bfloat16)
    out = {}
    for mode in modes:
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    m(x)
            out[mode] = bench_ms(fn)
        else:
            params = [x, *m.parameters()]

            def fn():
                m(x).backward(gy)
            out[mode] = bench_ms(fn, grad_to_none=params)
    del m, x, gy
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_gating(T=16384, E=64, k=8) -> dict[str, float]:
    from kernels.gating import gating

    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)

    def torch_seq():
        probs = torch.softmax(logits.float(), dim=-1)
        w, i = torch.topk(probs, k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return w, i, torch.bincount(i.flatten(), minlength=E)

    return {
        "ours": bench_ms(lambda: gating(logits, k), rep_ms=200),
        "ours_no_probs": bench_ms(lambda: gating(logits, k, write_probs=False), rep_ms=200),
        "torch": bench_ms(torch_seq, rep_ms=200),
        # kernel time only (sum of device time of the launched kernels; no host overhead, no gaps)
        "ours_device_time": device_time_ms(lambda: gating(logits, k)),
        "torch_device_time": device_time_ms(torch_seq),
    }


def device_time_ms(fn, iters: int = 20) -> float:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.self_device_time_total for e in evs) / iters / 1e3


def bench_permute(T=16384, k=8, D=2048, E=64) -> dict[str, tuple[float, float]]:
    """(ms, GB/s): bytes = permute (read T*D, write M*D) + unpermute (read M*D, write T*D), bf16."""
    from kernels.permute import build_permutation, permute_fwd, unpermute_fwd

    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, E, (T, k), device="cuda")
    w = torch.rand(T, k, device="cuda")
    p = build_permutation(ids, E)
    M = T * k
    nbytes = 2 * (T * D + M * D) * x.element_size()

    def ours():
        y = permute_fwd(x, p.dest_TK, p.src_M)
        unpermute_fwd(y, p.dest_TK, w)

    def torch_seq():
        order = torch.argsort(ids.flatten(), stable=True)
        tok = order // k
        y = x[tok]
        torch.zeros_like(x).index_add_(0, tok, y * w.flatten()[order].to(y.dtype)[:, None])

    big = torch.empty(M * D, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(big)
    res = {}
    ms = bench_ms(ours, rep_ms=200)
    res["ours"] = (ms, nbytes / ms / 1e6)
    ms = bench_ms(lambda: build_permutation(ids, E), rep_ms=200)
    res["ours_index_maps"] = (ms, float("nan"))
    ms = bench_ms(torch_seq, rep_ms=200)
    res["torch"] = (ms, nbytes / ms / 1e6)
    ms = bench_ms(lambda: dst.copy_(big), rep_ms=200)
    res["d2d_copy"] = (ms, 2 * big.numel() * big.element_size() / ms / 1e6)
    return res


# ----------------------------------------------------------------------------------- CSV

class Writer:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists() or path.stat().st_size == 0
        self.f = open(path, "a", newline="")
        self.w = csv.writer(self.f)
        if new:
            self.w.writerow(CSV_HEADER)
        self.base = [dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), git_commit(),
                     torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"]

    def row(self, config, impl, mode, metric, value):
        self.w.writerow(self.base + [config, impl, mode, metric, f"{value:.6g}"])
        self.f.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=Path("results/bench/moe_layer.csv"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--modes", default="fwd,fwd_bwd")
    ap.add_argument("--skip-micro", action="store_true", help="skip the gating and permute micro-benchmarks")
    ap.add_argument("--micro-only", action="store_true", help="only the gating and permute micro-benchmarks")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_layer benchmark: needs a CUDA GPU (run it through the device tool)", file=sys.stderr)
        return 2
    out = Writer(args.csv)
    modes = args.modes.split(",")
    table = []
    if not args.skip_micro:
        g = bench_gating()
        for impl, ms in g.items():
            out.row("gating_T16384_E64_k8", impl, "fwd", "ms", ms)
        table.append(f"gating T16384 E64 k8: ours {g['ours']*1e3:.1f} us (no probs {g['ours_no_probs']*1e3:.1f}), "
                     f"torch {g['torch']*1e3:.1f} us -> {g['torch']/g['ours']:.2f}x; device time only: ours "
                     f"{g['ours_device_time']*1e3:.1f} us, torch {g['torch_device_time']*1e3:.1f} us -> "
                     f"{g['torch_device_time']/g['ours_device_time']:.2f}x")
        pr = bench_permute()
        for impl, (ms, gbps) in pr.items():
            out.row("permute_T16384_k8_D2048", impl, "fwd", "ms", ms)
            if gbps == gbps:
                out.row("permute_T16384_k8_D2048", impl, "fwd", "gbps", gbps)
        table.append("permute+unpermute T16384 k8 D2048: " + ", ".join(
            f"{k} {v[0]*1e3:.0f} us {v[1]:.0f} GB/s" for k, v in pr.items())
            + f" -> ours/copy {pr['ours'][1]/pr['d2d_copy'][1]:.2f}")
        print(table[-2], table[-1], sep="\n", flush=True)
    for cname in [] if args.micro_only else args.configs.split(","):
        c = CONFIGS[cname]
        res = {}
        for impl in args.impls.split(","):
            t0 = time.time()
            try:
                ms = time_layer(impl, c, modes)
            except Exception as exc:  # one failing impl must not lose the others' numbers
                print(f"{cname} {impl}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
                torch.cuda.empty_cache()
                continue
            for mode, v in ms.items():
                tf = c.flops(mode) / v / 1e9
                out.row(cname, impl, mode, "ms", v)
                out.row(cname, impl, mode, "tflops", tf)
                res[(impl, mode)] = tf
            print(f"{cname} {impl}: " + ", ".join(f"{m} {v:.2f} ms {c.flops(m)/v/1e9:.0f} TFLOP/s" for m, v in ms.items())
                  + f" ({time.time()-t0:.0f} s)", flush=True)
        for mode in modes:
            d = res.get(("dense", mode))
            if d:
                table.append(f"{cname} {mode}: " + ", ".join(
                    f"{i} {res[(i, mode)]:.0f} ({res[(i, mode)]/d:.2f})" for i in IMPLS if (i, mode) in res))
    try:  # which tile configs the autotuner picked, per key (for the notes)
        from kernels import grouped_gemm as gg

        for name in ("_gmm", "_wgrad"):
            for key, cfg in getattr(getattr(gg, name), "cache", {}).items():
                print(f"autotune {name} {key[:6]} -> {cfg}")
        print(f"TMA broken: {gg._TMA_BROKEN}")
    except Exception:  # noqa: BLE001
        pass
    print("\n".join(["", "TFLOP/s (fraction of dense):", *table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
