"""Where a training step of the reference trainer spends its time: per-kernel CUDA time by category,
host operators, and step wall time, for checking the simulator's training model phase by phase.

``PYTHONPATH=. python -m reference.train_profile --out DIR [--preset paper-13.9b --layers 4 --hidden 2048 ...]``
builds the model and optimizer exactly as `reference.train` does (AdamW over fp32 master weights, bf16
autocast on CUDA, gradient clipping, the per-step loss read-back), runs ``--warmup`` steps, then:

1. times ``--steps`` steps (wall clock, synchronised per step) -> ``step_ms``;
2. counts the aten operators of one step (forward, backward, clip, optimizer) with `reference.op_count`;
3. runs ``--profile-steps`` steps under ``torch.profiler`` and sums the device time of every kernel, by
   kernel name and by category (``gemm``, ``attention``, ``optimizer``, ``norm``, ``elementwise``,
   ``reduction``, ``copy``, ``other``), per step.

Writes ``DIR/train_profile.csv`` (``date,commit,device,config,part,name,count_per_step,ms_per_step``; part is
``step`` / ``category`` / ``kernel`` / ``ops``) and prints a summary. Runs on the CPU too (``--quick``, tiny
model; the profiler then reports CPU time), which is what the test does.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import re
import statistics
import time
from pathlib import Path

import torch

from reference.model import MoEDecoder
from reference.op_count import count_ops
from reference.train import TrainConfig, after_step, make_optimizer
from semoe.presets import load_model
from semoe.io import git_commit  # noqa: F401 (re-exported)

COLUMNS = ["date", "commit", "device", "config", "part", "name", "count_per_step", "ms_per_step"]
# kernel name -> category, first match wins
CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|softmax_warp"),
    ("optimizer", r"adam|multi_tensor|foreach|_amp_|lerp|addcdiv|addcmul"),
    ("gemm", r"gemm|cutlass|sm90_xmma|sm80_xmma|cublas|nvjet|wgmma|matmul|grouped_mm|_mm_"),
    ("norm", r"layer_norm|layernorm|rms_norm|rmsnorm|norm_kernel"),
    ("copy", r"memcpy|memset|copy_kernel|CatArrayBatchedCopy|to_copy|direct_copy|index|gather|scatter"),
    ("reduction", r"reduce|sum_kernel|max_kernel|norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|gelu|silu|mul|add|fill"),
]


def categorise(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other"



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper-13.9b")
    for name in ("layers", "hidden", "heads", "ffn", "experts", "top-k"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model on whatever device there is")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.batch_size, a.seq_len, a.warmup, a.steps, a.profile_steps = "tiny", 2, 32, 1, 2, 1
    spec = load_model(a.preset)
    over = {k.replace("-", "_"): getattr(a, k.replace("-", "_")) for k in ("layers", "hidden", "heads", "ffn", "experts", "top-k")}
    over = {k: v for k, v in over.items() if v is not None}
    if over:
        spec = spec.replace(**over, name=f"{spec.name}-scaled")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    cfg = TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len, lr=3e-4, progress=False)
    torch.manual_seed(0)
    model = MoEDecoder(spec, seed=0).to(device=device, dtype=torch.float32)
    opt = make_optimizer(model, cfg)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.dtype) if cuda else None
    gen = torch.Generator().manual_seed(0)

    def batch():
        x = torch.randint(0, spec.vocab, (a.batch_size, a.seq_len + 1), generator=gen)
        return x[:, :-1].to(device, non_blocking=True), x[:, 1:].to(device, non_blocking=True)

    def step(x, y) -> float:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        after_step(model, out, cfg)
        return float(out.loss.detach())  # the trainer reads the loss back every step

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(a.warmup):
        step(*batch())
    sync()
    times = []
    for _ in range(a.steps):
        x, y = batch()
        t = time.perf_counter()
        step(x, y)
        sync()
        times.append(time.perf_counter() - t)
    x, y = batch()
    _, ops = count_ops(step, x, y)
    sync()

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.profile_steps):
            step(*batch())
        sync()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        else:
            if e.cpu_children:  # leaf CPU ops only, so nothing is counted twice
                continue
            us = e.cpu_time
        k = kernels.setdefault(e.name, [0, 0.0])
        k[0] += 1
        k[1] += us / 1e3
    n = a.profile_steps
    cats: dict[str, list[float]] = {}
    for name, (cnt, ms) in kernels.items():
        c = cats.setdefault(categorise(name), [0, 0.0])
        c[0] += cnt
        c[1] += ms

    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    from reference.moe.layer import resolve_backend

    fused = any(g.get("fused") for g in opt.param_groups) or bool(getattr(opt, "defaults", {}).get("fused"))
    config = (f"{spec.name} L{spec.layers} D{spec.hidden} E{spec.experts} k{spec.top_k} F{spec.ffn} {spec.dtype} "
              f"B{a.batch_size} S{a.seq_len} moe-{resolve_backend('auto')} adamw-{'fused' if fused else 'default'}")
    base = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "commit": git_commit(),
            "device": dev_name, "config": config}
    rows = [dict(base, part="step", name="wall_median", count_per_step=1, ms_per_step=statistics.median(times) * 1e3),
            dict(base, part="step", name="device_total", count_per_step=sum(c for c, _ in kernels.values()) / n,
                 ms_per_step=sum(ms for _, ms in kernels.values()) / n),
            dict(base, part="ops", name="aten_kernels", count_per_step=ops.kernels, ms_per_step=0.0),
            dict(base, part="ops", name="aten_views", count_per_step=ops.views, ms_per_step=0.0),
            dict(base, part="ops", name="host_syncs", count_per_step=ops.syncs, ms_per_step=0.0)]
    for cat, (cnt, ms) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        rows.append(dict(base, part="category", name=cat, count_per_step=cnt / n, ms_per_step=ms / n))
    for name, (cnt, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:60]:
        rows.append(dict(base, part="kernel", name=name[:200], count_per_step=cnt / n, ms_per_step=ms / n))
    for name, cnt in ops.by_name.most_common(40):
        rows.append(dict(base, part="ops", name=name, count_per_step=cnt, ms_per_step=0.0))
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "train_profile.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    tokens = a.batch_size * a.seq_len
    print(f"{config} on {dev_name}: step {rows[0]['ms_per_step']:.1f} ms wall ({tokens / statistics.median(times):.0f} "
          f"tokens/s), device busy {rows[1]['ms_per_step']:.1f} ms, {ops.kernels} aten kernels, {ops.syncs} syncs")
    for cat, (cnt, ms) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        print(f"  {cat:12s} {ms / n:9.2f} ms  {cnt / n:7.0f} kernels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
