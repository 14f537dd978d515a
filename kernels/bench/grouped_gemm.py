"""Per-kernel A/B of the grouped GEMMs inside the MoE FFN: TMA vs pointer loads vs torch._grouped_mm.

``python -m kernels.bench.grouped_gemm`` times, for the mixtral_like and fine_grained shapes with the
routed row counts of a random top-k routing, each of the six GEMMs of one layer step (forward GEMM1
with gather + GELU epilogue, forward GEMM2, dgrad dz with GELU' epilogue, dgrad dx, wgrad w2, wgrad w1
with gather) and prints TFLOP/s; the torch column runs ``torch._grouped_mm`` on the same problem
(without the fused gather/epilogue). This is the profile behind the layer-level numbers.
"""

from __future__ import annotations

import sys

import torch

import kernels.grouped_gemm as gg
from kernels.bench.moe_layer import CONFIGS, bench_ms
from kernels.permute import build_permutation


def run(cname: str) -> list[str]:
    c = CONFIGS[cname]
    T, H, Fd, E, k = c.tokens, c.hidden, c.ffn, c.experts, c.top_k
    dt = torch.bfloat16
    ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(64)]).repeat(T // 64, 1)
    ids = ids[torch.randperm(T, device="cuda")]
    p = build_permutation(ids, E)
    tok = torch.where(p.src_M >= 0, p.src_M // k, 0)
    M = T * k
    x = torch.randn(T, H, device="cuda", dtype=dt)
    xm = x[tok.long()]
    w1 = torch.randn(E, H, Fd, device="cuda", dtype=dt) / H**0.5
    w2 = torch.randn(E, Fd, H, device="cuda", dtype=dt) / Fd**0.5
    h = torch.randn(M, Fd, device="cuda", dtype=dt)
    z = torch.randn(M, Fd, device="cuda", dtype=dt)
    gy = torch.randn(M, H, device="cuda", dtype=dt)
    cnt = p.counts_E
    offs = torch.cumsum(cnt, 0, dtype=torch.int32)
    flop1 = 2.0 * M * H * Fd
    cases = {
        "fwd1_gather_gelu": (lambda: gg.gmm_fwd(x, w1, cnt, gather=tok, act=gg.ACT_GELU, z=z),
                             lambda: torch._grouped_mm(xm, w1, offs=offs)),
        "fwd2": (lambda: gg.gmm_fwd(h, w2, cnt), lambda: torch._grouped_mm(h, w2, offs=offs)),
        "dgrad_dz_gelu": (lambda: gg.gmm_fwd(gy, w2, cnt, trans_b=True, act=gg.ACT_GELU_GRAD, z=z),
                          lambda: torch._grouped_mm(gy, w2.transpose(1, 2), offs=offs)),
        "dgrad_dx": (lambda: gg.gmm_fwd(h, w1, cnt, trans_b=True),
                     lambda: torch._grouped_mm(h, w1.transpose(1, 2), offs=offs)),
        "wgrad_w2": (lambda: gg.gmm_wgrad(h, gy, cnt),
                     lambda: torch._grouped_mm(h.t(), gy, offs=offs)),
        "wgrad_w1_gather": (lambda: gg.gmm_wgrad(x, h, cnt, gather=tok),
                            lambda: torch._grouped_mm(xm.t(), h, offs=offs)),
    }
    lines = [f"== {cname}: E={E} k={k} H={H} F={Fd} rows={M}; TFLOP/s (ms)   triton_tma   triton_ptr   torch"]
    for name, (ours, theirs) in cases.items():
        res = []
        for tma in (True, False):
            gg.TMA_ENABLED = tma
            ms = bench_ms(ours, rep_ms=150)
            res.append(f"{flop1 / ms / 1e9:6.0f} ({ms:6.2f})")
        gg.TMA_ENABLED = True
        try:
            ms = bench_ms(theirs, rep_ms=150)
            res.append(f"{flop1 / ms / 1e9:6.0f} ({ms:6.2f})")
        except Exception as exc:  # noqa: BLE001
            res.append(f"n/a ({type(exc).__name__})")
        lines.append(f"  {name:18s} " + "  ".join(res))
    lines.append(f"  TMA broken: {gg._TMA_BROKEN}")
    return lines


def main(argv=None) -> int:
    names = (argv or sys.argv[1:]) or ["mixtral_like", "fine_grained"]
    for n in names:
        print("\n".join(run(n)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
