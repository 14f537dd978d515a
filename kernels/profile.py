"""GPU operation profiles for the simulator: ``python -m kernels.profile`` -> results/profiles/<gpu>.csv.

Schema (one row per measurement; units in the column names)
-----------------------------------------------------------
======== ===========================================================================================
gpu      device name as torch reports it, e.g. ``NVIDIA H100 80GB HBM3``
op       what was timed (list below)
impl     ``triton`` (our kernels), ``torch`` (PyTorch/cuBLAS/cuDNN/FlashAttention), ``os`` (disk)
dtype    ``bf16`` / ``fp32`` / ``int64`` element type, or ``bytes`` for copies and disk
batch    batch size (sdpa); 1 otherwise
m        rows: tokens per expert (grouped GEMMs), M (gemm), sequence length (sdpa), tokens (others)
n        output columns N (GEMMs), experts E (gating), model dim D (permute, norms), head dim (sdpa)
k        reduction dim K (GEMMs), top-k (gating, permute), heads (sdpa); 0 where unused
groups   experts E (grouped GEMMs); 1 otherwise
io_bytes bytes the op must move at least (inputs read once + outputs written once), in bytes
flop     floating-point operations counted for the op (0 for data movement), in FLOP
time_s   median time of one call, in seconds (CUDA events via triton.testing.do_bench; wall clock
         with fsync for disk)
TFLOPps  flop / time_s / 1e12, in TFLOP/s (0 for data movement)
GBps     io_bytes / time_s / 1e9, in GB/s
======== ===========================================================================================

Ops
---
- ``grouped_gemm_fwd`` / ``grouped_gemm_dgrad`` / ``grouped_gemm_wgrad``: E experts with m tokens each,
  ``[E*m, K] @ [E, K, N]`` (dgrad: ``[E*m, N] @ [E, K, N]^T`` -> reported with k=N, n=K as computed;
  wgrad: ``[E*m, K]^T @ [E*m, N]`` per expert, k=m); impl ``triton`` (ours) and ``torch``
  (``torch._grouped_mm``, sweep ``grouped_torch``: the forward and the dgrad / wgrad GEMMs its autograd issues,
  `sweep_grouped_torch`); flop = 2*E*m*K*N.
- ``gemm``: dense ``[m, k] @ [k, n]`` (torch.matmul); flop = 2*m*n*k.
- ``sdpa_fwd`` / ``sdpa_fwd_bwd``: causal ``F.scaled_dot_product_attention`` on [batch, k heads, m, n];
  flop = 2*batch*k*m*m*n (causal forward: half of 4*b*h*s^2*d), fwd_bwd = 3.5x that.
- ``gating``: fused softmax + top-k + counts + statistics from logits [m, n] (impl triton), and the
  torch sequence softmax + topk + renormalise + bincount (impl torch).
- ``permute`` / ``unpermute``: [m, n] tokens to [m*k, n] expert-sorted rows and back (weighted sum).
- ``layernorm`` / ``rmsnorm`` / ``gelu`` / ``add``: row-wise ops on [m, n] (io_bytes: read + write).
- ``copy_h2d_pinned`` / ``copy_h2d_pageable`` / ``copy_d2h_pinned`` / ``copy_d2h_pageable`` /
  ``copy_d2d``: m bytes (io_bytes = m for host copies, 2*m for device-to-device: read + write).
- ``host_op``: host seconds per dispatched aten operator (`reference.op_count`), impl ``torch``: a loop of
  10000 in-place adds on a 1-element tensor (m = 1); impl ``reference`` (``reference_triton``): the reference ``tiny``
  model's eager forward with the torch (Triton) MoE backend at batch 1, sequence 1 (bf16 autocast, no grad), 200 calls timed as one interval after
  warm-up, divided by its operator count (m = operators per forward). The GPU work of both is negligible,
  so the time is the host's.
- ``dequant`` / ``qgemm_fwd`` / ``grouped_gemm_fwd_routed`` / ``host_call_gating`` / ``host_call_permute``
  (sweep ``infer``, what the simulator's inference workload and ``semoe validate`` read besides the
  rows above; `sweep_infer`):
  ``dequant`` (impl ``torch``, dtype ``int8`` / ``fp8``): ``reference.inference.quantize.dequantize_into``
  of m = E experts' quantised ``[E, k=I, n=O]`` weight (k-major 1-byte data, the reference pool's
  layout) into a bf16 workspace, exactly the ring's workspace dequant (a strided copy then a scale
  pass); io_bytes = read 1 byte + write 2 per weight + the fp32 scales.
  ``qgemm_fwd`` (impl = the implementation ``reference.inference.qmatmul.quant_mm`` ran: ``scaled_grouped_mm``
  for fp8 on the H100, ``triton_dequant_gemm`` for int8): the fused quantised grouped GEMM of m rows
  per expert, as the ring's fused groups call it (fp8 includes the per-row activation quantisation);
  flop = 2*E*m*K*N.
  ``grouped_gemm_fwd_routed`` (impl ``torch``): ``torch._grouped_mm`` with the per-expert rows of
  seeded uniform top-``k`` routing (m = mean rows per expert, so the groups are uneven and not tile
  aligned, as in the reference's prefill), beside the aligned ``grouped_gemm_fwd`` rows.
  ``host_call_gating`` / ``host_call_permute`` (impl ``triton``): host seconds per call of
  ``kernels.gating.gating`` / ``permute_fwd`` + ``unpermute_fwd`` issued back to back (200 calls, one
  sync; the GPU work is shorter than the host's, so the time is the host's launch chain).
- ``disk_write`` / ``disk_read``: a file of m bytes in the temporary directory (write ends with fsync;
  read after posix_fadvise DONTNEED, which the page cache may still serve).

Shapes cover tokens-per-expert 16..32768 and the hidden/FFN sizes of the presets in
:mod:`semoe.presets` (mixtral 4096/14336, fine-grained 2048/1408, switch 2048/2048, 4096/16384).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

COLUMNS = ["gpu", "op", "impl", "dtype", "batch", "m", "n", "k", "groups", "io_bytes", "flop", "time_s",
           "TFLOPps", "GBps"]
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# (E, H, F) of the presets; tokens per expert swept over TOKENS_PER_EXPERT
# (8, 1024, 4096): the offload bench's config a (first, so that a budget-capped run measures it)
GROUPED_SHAPES = [(8, 1024, 4096), (8, 4096, 14336), (64, 2048, 1408), (8, 2048, 2048), (8, 4096, 16384)]
TOKENS_PER_EXPERT = [16, 64, 256, 1024, 4096, 16384, 32768]
MAX_ROWS_X_COLS = 2**33  # skip a grouped GEMM whose largest operand would exceed 16 GiB in bf16


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3' (the file name under results/profiles/)."""
    s = re.sub(r"[^a-z0-9]+", "_", name.lower().replace("nvidia", "")).strip("_")
    return s or "gpu"


class Profile:
    def __init__(self, gpu: str, budget_s: float):
        self.gpu = gpu
        self.rows: list[dict] = []
        self.t0 = time.time()
        self.budget_s = budget_s

    def over_budget(self) -> bool:
        return time.time() - self.t0 > self.budget_s

    def add(self, op, impl, dtype, *, m, n=0, k=0, batch=1, groups=1, io_bytes=0, flop=0, time_s):
        self.rows.append(dict(
            gpu=self.gpu, op=op, impl=impl, dtype=dtype, batch=batch, m=m, n=n, k=k, groups=groups,
            io_bytes=int(io_bytes), flop=int(flop), time_s=f"{time_s:.6g}",
            TFLOPps=f"{flop / time_s / 1e12:.4g}" if flop else "0",
            GBps=f"{io_bytes / time_s / 1e9:.4g}" if io_bytes else "0",
        ))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(path)


def _ms(fn, rep=60, warmup=20, grad_to_none=None) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


# ----------------------------------------------------------------------------------- sweeps
def sweep_grouped_gemm(p: Profile, dtype=torch.bfloat16) -> None:
    """Our Triton grouped GEMM (forward, dgrad, wgrad) on every ``GROUPED_SHAPES`` entry; ``torch._grouped_mm``'s rows
    of the same shapes come from `sweep_grouped_torch` (sweep ``grouped_torch``)."""
    from kernels.grouped_gemm import gmm_fwd, gmm_wgrad

    dt = _DT[dtype]
    for E, H, Fd in GROUPED_SHAPES:
        for m in TOKENS_PER_EXPERT:
            if p.over_budget():
                return
            M = E * m
            if M * max(H, Fd) > MAX_ROWS_X_COLS:
                continue
            counts = torch.full((E,), m, device="cuda", dtype=torch.int32)
            for K, N in ((H, Fd), (Fd, H)):
                a = torch.randn(M, K, device="cuda", dtype=dtype)
                b = torch.randn(E, K, N, device="cuda", dtype=dtype) / K**0.5
                g = torch.randn(M, N, device="cuda", dtype=dtype)
                flop = 2 * M * K * N
                io = (M * K + E * K * N + M * N) * a.element_size()
                shape = dict(m=m, n=N, k=K, groups=E, io_bytes=io, flop=flop)
                p.add("grouped_gemm_fwd", "triton", dt, **shape, time_s=_ms(lambda: gmm_fwd(a, b, counts)) / 1e3)
                p.add("grouped_gemm_dgrad", "triton", dt, m=m, n=K, k=N, groups=E, io_bytes=io, flop=flop,
                      time_s=_ms(lambda: gmm_fwd(g, b, counts, trans_b=True)) / 1e3)
                p.add("grouped_gemm_wgrad", "triton", dt, **shape,
                      time_s=_ms(lambda: gmm_wgrad(a, g, counts)) / 1e3)
                del a, b, g
            torch.cuda.empty_cache()
        print(f"  grouped gemm E={E} H={H} F={Fd} done ({time.time() - p.t0:.0f} s)", flush=True)


def sweep_grouped_torch(p: Profile, dtype=torch.bfloat16, device: str = "cuda", shapes=None, rows=None,
                        timer=None) -> None:
    """``torch._grouped_mm`` forward and the two backward GEMMs autograd issues for it (``dgrad``: ``g @ b^T`` ->
    [E*m, K]; ``wgrad``: ``a^T @ g`` per group -> [E, K, N]), impl ``torch``, on the reference's ``GroupedExperts``
    layout (``b`` [E, K, N] as stored; ``a^T`` / ``b^T`` strided views as autograd passes them), both projections
    of every ``GROUPED_SHAPES`` entry at every ``TOKENS_PER_EXPERT``. Row keys as the Triton rows of
    `sweep_grouped_gemm` (dgrad with n=K, k=N). ``shapes`` / ``rows`` / ``timer`` / ``device``: the CPU test's
    tiny sizes."""
    dt = _DT[dtype]
    timer = timer or (lambda fn: _ms(fn) / 1e3)
    for E, H, Fd in shapes or GROUPED_SHAPES:
        for m in rows or TOKENS_PER_EXPERT:
            if p.over_budget():
                return
            M = E * m
            if M * max(H, Fd) > MAX_ROWS_X_COLS:
                continue
            offs = torch.cumsum(torch.full((E,), m, device=device, dtype=torch.int32), 0, dtype=torch.int32)
            for K, N in ((H, Fd), (Fd, H)):
                a = torch.randn(M, K, device=device, dtype=dtype)
                b = torch.randn(E, K, N, device=device, dtype=dtype) / K**0.5
                g = torch.randn(M, N, device=device, dtype=dtype)
                flop = 2 * M * K * N
                io = (M * K + E * K * N + M * N) * a.element_size()
                bt, at = b.transpose(-2, -1), a.t()
                try:
                    p.add("grouped_gemm_fwd", "torch", dt, m=m, n=N, k=K, groups=E, io_bytes=io, flop=flop,
                          time_s=timer(lambda: torch._grouped_mm(a, b, offs=offs)))
                    p.add("grouped_gemm_dgrad", "torch", dt, m=m, n=K, k=N, groups=E, io_bytes=io, flop=flop,
                          time_s=timer(lambda: torch._grouped_mm(g, bt, offs=offs)))
                    p.add("grouped_gemm_wgrad", "torch", dt, m=m, n=N, k=K, groups=E, io_bytes=io, flop=flop,
                          time_s=timer(lambda: torch._grouped_mm(at, g, offs=offs)))
                except Exception as exc:  # noqa: BLE001
                    print(f"torch._grouped_mm {E}x{m} {K}x{N}: {exc}".splitlines()[0], flush=True)
                del a, b, g, bt, at
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"  grouped torch E={E} H={H} F={Fd} done ({time.time() - p.t0:.0f} s)", flush=True)


def append_to(base: Path, new: Path) -> int:
    """Rows of profile ``new`` appended to profile ``base`` (rewritten in place). A shape measured again keeps both
    rows: the cost model takes the mean time of a shape's measurements (`simulator.cost.Profile`). Returns the count."""
    def read(path):
        with Path(path).open(newline="") as f:
            return list(csv.DictReader(f))

    old, fresh = read(base), read(new)
    prof = Profile("", 0)
    prof.rows = old + fresh
    prof.write(Path(base))
    return len(fresh)


def sweep_gemm(p: Profile, dtype=torch.bfloat16) -> None:
    shapes = [(8192, 8192, 8192)]
    for H, Fd in ((1024, 4096), (4096, 14336), (2048, 1408), (2048, 2048), (4096, 16384)):
        for M in (128, 512, 2048, 8192, 32768):
            shapes += [(M, Fd, H), (M, H, Fd), (M, 3 * H, H), (M, H, H)]
    for M, N, K in dict.fromkeys(shapes):
        if p.over_budget():
            return
        a = torch.randn(M, K, device="cuda", dtype=dtype)
        b = torch.randn(K, N, device="cuda", dtype=dtype)
        p.add("gemm", "torch", _DT[dtype], m=M, n=N, k=K, io_bytes=(M * K + K * N + M * N) * 2, flop=2 * M * N * K,
              time_s=_ms(lambda: a @ b) / 1e3)
    torch.cuda.empty_cache()


def sweep_sdpa(p: Profile, dtype=torch.bfloat16) -> None:
    for heads in (16, 32):
        for seq in (512, 1024, 2048, 4096, 8192):
            if p.over_budget():
                return
            d = 128
            batch = max(1, 16384 // seq)
            q, k, v = (torch.randn(batch, heads, seq, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            flop = 2 * batch * heads * seq * seq * d
            io = 4 * batch * heads * seq * d * 2
            shape = dict(batch=batch, m=seq, n=d, k=heads, io_bytes=io)
            p.add("sdpa_fwd", "torch", _DT[dtype], **shape, flop=flop, time_s=_ms(
                lambda: F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)) / 1e3)
            go = torch.randn_like(q)
            p.add("sdpa_fwd_bwd", "torch", _DT[dtype], **shape, flop=int(3.5 * flop), time_s=_ms(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go),
                grad_to_none=[q, k, v]) / 1e3)
            del q, k, v, go
    torch.cuda.empty_cache()


def sweep_gating_permute(p: Profile) -> None:
    from kernels.gating import gating
    from kernels.permute import build_permutation, permute_fwd, unpermute_fwd

    for T in (4096, 16384, 65536):
        for E, k in ((8, 1), (8, 2), (64, 8)):
            if p.over_budget():
                return
            logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
            io = T * E * 2 + T * k * 12 + T * E * 4
            p.add("gating", "triton", "bf16", m=T, n=E, k=k, io_bytes=io, time_s=_ms(lambda: gating(logits, k)) / 1e3)

            def torch_seq():
                pr = torch.softmax(logits.float(), -1)
                w, i = torch.topk(pr, k, -1)
                return w / w.sum(-1, keepdim=True), torch.bincount(i.flatten(), minlength=E)

            p.add("gating", "torch", "bf16", m=T, n=E, k=k, io_bytes=io, time_s=_ms(torch_seq) / 1e3)
        for D in (2048, 4096):
            for E, k in ((8, 2), (64, 8)):
                x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
                ids = torch.randint(0, E, (T, k), device="cuda")
                w = torch.rand(T, k, device="cuda")
                perm = build_permutation(ids, E)
                y = permute_fwd(x, perm.dest_TK, perm.src_M)
                io = (T + T * k) * D * 2
                p.add("permute", "triton", "bf16", m=T, n=D, k=k, io_bytes=io,
                      time_s=_ms(lambda: permute_fwd(x, perm.dest_TK, perm.src_M)) / 1e3)
                p.add("unpermute", "triton", "bf16", m=T, n=D, k=k, io_bytes=io,
                      time_s=_ms(lambda: unpermute_fwd(y, perm.dest_TK, w)) / 1e3)
                p.add("permutation_maps", "triton", "int64", m=T, n=E, k=k, io_bytes=T * k * 16,
                      time_s=_ms(lambda: build_permutation(ids, E)) / 1e3)
                del x, y
    torch.cuda.empty_cache()


def sweep_elementwise(p: Profile) -> None:
    for T in (4096, 16384, 65536):
        for D in (2048, 4096):
            if p.over_budget():
                return
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            y = torch.randn_like(x)
            wt = torch.ones(D, device="cuda", dtype=torch.bfloat16)
            io = 2 * T * D * 2
            sh = dict(m=T, n=D, io_bytes=io)
            p.add("layernorm", "torch", "bf16", **sh, time_s=_ms(lambda: F.layer_norm(x, (D,), wt, wt)) / 1e3)
            if hasattr(F, "rms_norm"):
                p.add("rmsnorm", "torch", "bf16", **sh, time_s=_ms(lambda: F.rms_norm(x, (D,), wt)) / 1e3)
            p.add("gelu", "torch", "bf16", **sh, time_s=_ms(lambda: F.gelu(x)) / 1e3)
            p.add("add", "torch", "bf16", m=T, n=D, io_bytes=3 * T * D * 2, time_s=_ms(lambda: x + y) / 1e3)


def sweep_copies(p: Profile) -> None:
    for nbytes in (2**20, 2**22, 2**24, 2**26, 2**28, 2**30):
        if p.over_budget():
            return
        n = nbytes // 2
        dev = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
        dev2 = torch.empty_like(dev)
        pinned = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
        pageable = torch.empty(n, dtype=torch.bfloat16)
        pageable.fill_(1.0)
        rep = 100 if nbytes <= 2**26 else 300
        p.add("copy_h2d_pinned", "torch", "bytes", m=nbytes, io_bytes=nbytes,
              time_s=_ms(lambda: dev.copy_(pinned, non_blocking=True), rep=rep) / 1e3)
        p.add("copy_d2h_pinned", "torch", "bytes", m=nbytes, io_bytes=nbytes,
              time_s=_ms(lambda: pinned.copy_(dev, non_blocking=True), rep=rep) / 1e3)
        p.add("copy_h2d_pageable", "torch", "bytes", m=nbytes, io_bytes=nbytes,
              time_s=_ms(lambda: dev.copy_(pageable), rep=rep) / 1e3)
        p.add("copy_d2h_pageable", "torch", "bytes", m=nbytes, io_bytes=nbytes,
              time_s=_ms(lambda: pageable.copy_(dev), rep=rep) / 1e3)
        p.add("copy_d2d", "torch", "bytes", m=nbytes, io_bytes=2 * nbytes,
              time_s=_ms(lambda: dev2.copy_(dev), rep=rep) / 1e3)
        del dev, dev2, pinned, pageable
    torch.cuda.empty_cache()


def sweep_disk(p: Profile, directory: str | None = None) -> None:
    d = Path(directory or tempfile.gettempdir())
    for nbytes in (2**24, 2**26, 2**28, 2**30):
        if p.over_budget():
            return
        buf = os.urandom(2**20) * (nbytes // 2**20)
        path = d / f"semoe_profile_{os.getpid()}.bin"
        wt, rt = [], []
        try:
            for _ in range(3):
                t = time.perf_counter()
                with open(path, "wb") as f:
                    f.write(buf)
                    f.flush()
                    os.fsync(f.fileno())
                wt.append(time.perf_counter() - t)
                fd = os.open(path, os.O_RDONLY)
                try:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    t = time.perf_counter()
                    while os.read(fd, 2**24):
                        pass
                    rt.append(time.perf_counter() - t)
                finally:
                    os.close(fd)
        finally:
            path.unlink(missing_ok=True)
        p.add("disk_write", "os", "bytes", m=nbytes, io_bytes=nbytes, time_s=statistics.median(wt))
        p.add("disk_read", "os", "bytes", m=nbytes, io_bytes=nbytes, time_s=statistics.median(rt))


def sweep_host(p: Profile, device: str = "cuda") -> None:
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    x = torch.zeros(1, device=device)
    for _ in range(200):
        x.add_(1.0)
    sync()
    n = 10000
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    sync()
    bare = (time.perf_counter() - t) / n
    p.add("host_op", "torch", "fp32", m=1, time_s=bare)
    print(f"host_op: bare add {bare * 1e6:.2f} us", flush=True)

    wanted = os.environ.get("SEMOE_HOST_BACKENDS", "torch,triton").split(",")
    for backend, impl in (("torch", "reference"), ("triton", "reference_triton")):
        if backend not in wanted or (backend == "triton" and device != "cuda"):
            continue
        from reference.moe.layer import moe_backend_env

        with moe_backend_env(backend):
            _host_reference(p, device, impl, sync)


def _host_reference(p: Profile, device: str, impl: str, sync) -> None:
    from reference.model import MoEDecoder
    from reference.op_count import count_ops
    from semoe.presets import model_preset

    model = MoEDecoder(model_preset("tiny"), seed=0).to(device).eval()
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)

    def fwd():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            return model(ids)

    for _ in range(20):
        fwd()
    _, ops = count_ops(fwd)
    sync()
    calls = 200
    t = time.perf_counter()
    for _ in range(calls):
        fwd()
    sync()
    per_call = (time.perf_counter() - t) / calls
    p.add("host_op", impl, "bf16", m=ops.kernels, n=ops.total, k=ops.syncs,
          time_s=per_call / max(1, ops.kernels))
    print(f"host_op: {impl} tiny forward {per_call * 1e6:.0f} us "
          f"for {ops.kernels} kernels ({ops.syncs} syncs)", flush=True)


# sweep infer: the expert matrices of the inference bench's model (mixtral: w1 / w3 D->F, w2 F->D) for all
# E experts of a block (ring / resident groups) and for one expert (expert-aware fetches)
INFER_DEQUANT_SHAPES = [(8, 4096, 14336), (8, 14336, 4096), (1, 4096, 14336), (1, 14336, 4096)]
INFER_QGEMM_ROWS = [16, 64, 256, 512, 1024, 4096]  # rows per expert (decode .. prefill of B x 256 tokens)
INFER_ROUTED_ROWS = [64, 128, 256, 512, 1024, 2048]  # mean rows per expert of the routed grouped GEMMs
INFER_TOP_K = 2  # routing of the routed rows (the bench model's top-2)
INFER_QUICK = {"shapes": [(2, 64, 96), (2, 96, 64)], "rows": [8], "routed": [8, 24]}


def _timer(device: str):
    """Seconds per call: do_bench (CUDA events, L2 flushed) on a GPU, else the median wall time of a few
    calls (the CPU --quick path, which only checks the plumbing)."""
    if device == "cuda":
        return lambda fn: _ms(fn) / 1e3

    def wall(fn, reps: int = 3) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    return wall


def _host_per_call(fn, sync, calls: int) -> float:
    """Host seconds per call of ``fn`` issued back to back (one sync at the end)."""
    for _ in range(5):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) / calls


def routed_counts(experts: int, rows_per_expert: int, top_k: int, device, seed: int = 0) -> torch.Tensor:
    """Per-expert rows of seeded uniform top-``k`` routing of ``experts * rows_per_expert / top_k`` tokens
    (each token picks ``top_k`` distinct experts): uneven, not tile-aligned groups summing to E*m."""
    g = torch.Generator().manual_seed(seed)
    tokens = experts * rows_per_expert // top_k
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
    counts = torch.bincount(ids.flatten(), minlength=experts)
    counts[0] += experts * rows_per_expert - int(counts.sum())  # E*m rows exactly (top_k divides E*m here)
    return counts.to(device=device, dtype=torch.int32)


def _add_row(p: Profile, *args, **kw) -> None:
    """``p.add`` and the row printed at once (``ROW`` + CSV), so a run stopped by its time limit still
    shows every measurement it made."""
    p.add(*args, **kw)
    print("ROW " + ",".join(str(p.rows[-1][c]) for c in COLUMNS), flush=True)


def sweep_infer(p: Profile, device: str = "cuda", quick: bool = False) -> None:
    """Rows the inference workload needs beyond the training sweeps (module docstring: ``host_call_gating``,
    ``host_call_permute``, ``dequant``, ``qgemm_fwd``, ``grouped_gemm_fwd_routed``, in that order of
    priority), each call exactly as ``reference/inference`` and ``kernels/bench/moe_layer.py`` make it.
    ``quick``: tiny shapes (a CPU test of the plumbing; its times mean nothing)."""
    from reference.inference import qmatmul
    from reference.inference.quantize import dequantize_into, quantize

    timed = _timer(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _host_calls(p, device, sync, quick)
    shapes = INFER_QUICK["shapes"] if quick else INFER_DEQUANT_SHAPES
    act = torch.bfloat16 if device == "cuda" else torch.float32  # the Triton interpreter computes fp32 only

    def quantised(E, In, Out, fmt):
        w = torch.randn(E, In, Out, device=device, dtype=torch.bfloat16) * 0.02
        return quantize(w, fmt)  # k-major 1-byte data + fp32 scales [E, 1, O]: the pool's layout

    for fmt in ("int8", "fp8"):  # the workspace dequant (ring / resident groups: E = 8; expert-aware: 1)
        for E, In, Out in shapes:
            if p.over_budget():
                return
            q = quantised(E, In, Out, fmt)
            out = torch.empty(E, In, Out, device=device, dtype=torch.bfloat16)
            _add_row(p, "dequant", "torch", fmt, m=E, n=Out, k=In, groups=E, io_bytes=E * In * Out * 3 + 4 * E * Out,
                     time_s=timed(lambda: dequantize_into(out, q)))
            del q, out
        print(f"  infer: dequant {fmt} done ({time.time() - p.t0:.0f} s)", flush=True)
    for fmt in ("int8", "fp8"):  # fused GEMMs from the quantised bytes (ring / resident groups)
        for E, In, Out in shapes:
            if E == 1:
                continue
            q = quantised(E, In, Out, fmt)
            for m in INFER_QUICK["rows"] if quick else INFER_QGEMM_ROWS:
                if p.over_budget():
                    return
                x = torch.randn(E * m, In, device=device, dtype=act)
                counts = torch.full((E,), m, device=device, dtype=torch.int64)
                call = lambda: qmatmul.quant_mm(x, q.data, q.scale, counts, fmt)
                call()  # first call: the implementation is chosen and checked (qmatmul._try)
                _add_row(p, "qgemm_fwd", qmatmul.IMPL_USED.get(fmt, "unknown"), fmt, m=m, n=Out, k=In, groups=E,
                         io_bytes=E * m * (In + Out) * 2 + E * In * Out, flop=2 * E * m * In * Out, time_s=timed(call))
                del x
            del q
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"  infer: qgemm {fmt} done ({time.time() - p.t0:.0f} s)", flush=True)
    if hasattr(torch, "_grouped_mm"):
        for E, K, N in shapes[:2]:
            for m in INFER_QUICK["routed"] if quick else INFER_ROUTED_ROWS:
                if p.over_budget():
                    return
                counts = routed_counts(E, m, min(INFER_TOP_K, E), device, seed=m)
                offs = torch.cumsum(counts, 0, dtype=torch.int32)
                a = torch.randn(E * m, K, device=device, dtype=torch.bfloat16)
                b = torch.randn(E, K, N, device=device, dtype=torch.bfloat16) / K**0.5
                try:
                    t = timed(lambda: torch._grouped_mm(a, b, offs=offs))
                except Exception as exc:  # noqa: BLE001 - e.g. a CPU build without the grouped GEMM
                    print(f"  infer: routed torch._grouped_mm failed: {str(exc).splitlines()[0][:200]}", flush=True)
                    return
                _add_row(p, "grouped_gemm_fwd_routed", "torch", "bf16", m=m, n=N, k=K, groups=E,
                         io_bytes=(E * m * K + E * K * N + E * m * N) * 2, flop=2 * E * m * K * N, time_s=t)
                del a, b
        print(f"  infer: routed grouped GEMMs done ({time.time() - p.t0:.0f} s)", flush=True)


def _host_calls(p: Profile, device: str, sync, quick: bool) -> None:
    from kernels.gating import gating
    from kernels.permute import build_permutation, permute_fwd, unpermute_fwd

    T, E, k = (64, 8, 2) if quick else (16384, 64, 8)  # the kernels bench's gating_T16384_E64_k8 call
    logits = torch.randn(T, E, device=device, dtype=torch.bfloat16)
    calls = 2 if quick else 200
    _add_row(p, "host_call_gating", "triton", "bf16", m=T, n=E, k=k, time_s=_host_per_call(lambda: gating(logits, k), sync, calls))
    T, D = (64, 32) if quick else (512, 2048)  # small: the GPU work stays below the host's
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, E, (T, k), device=device)
    wts = torch.rand(T, k, device=device)
    perm = build_permutation(ids, E)

    def both():
        unpermute_fwd(permute_fwd(x, perm.dest_TK, perm.src_M), perm.dest_TK, wts)

    _add_row(p, "host_call_permute", "triton", "bf16", m=T, n=D, k=k, time_s=_host_per_call(both, sync, calls))
    print(f"  infer: host calls done ({time.time() - p.t0:.0f} s)", flush=True)


SWEEPS = {
    "grouped_gemm": sweep_grouped_gemm,
    "grouped_torch": sweep_grouped_torch,
    "gemm": sweep_gemm,
    "sdpa": sweep_sdpa,
    "gating_permute": sweep_gating_permute,
    "elementwise": sweep_elementwise,
    "copies": sweep_copies,
    "disk": sweep_disk,
    "host": sweep_host,
    "infer": sweep_infer,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default: results/profiles/<gpu>.csv")
    ap.add_argument("--sweeps", default=",".join(SWEEPS))
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new shapes after this many seconds")
    ap.add_argument("--append-to", type=Path, default=None, metavar="PROFILE",
                    help="no measuring: append the rows of --out to PROFILE (a shape measured again keeps both rows)")
    args = ap.parse_args(argv)
    if args.append_to is not None:
        if args.out is None:
            ap.error("--append-to needs --out (the profile whose rows to append)")
        print(f"{args.append_to}: {append_to(args.append_to, args.out)} rows appended from {args.out}")
        return 0
    if not torch.cuda.is_available():
        print("kernels.profile: needs a CUDA GPU (run it through the device tool)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    out = args.out or Path("results/profiles") / f"{gpu_slug(gpu)}.csv"
    p = Profile(gpu, args.budget_s)
    # write after every sweep, so a run stopped by its time limit keeps what it measured
    for name in args.sweeps.split(","):
        t = time.time()
        try:
            SWEEPS[name](p)
        except Exception as exc:  # noqa: BLE001 - one sweep failing must not lose the others
            print(f"sweep {name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
        p.write(out)
        print(f"sweep {name}: {time.time() - t:.0f} s, {len(p.rows)} rows -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
