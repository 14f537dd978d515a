"""GPU diagnostic of the inference workload's remaining misses (issue 7): where the reference engine's
expert-aware decode and small-batch resident prefill spend the time the simulator does not see.

``python -m simulator.workload.inference_diag --out DIR`` (the GPU machine, repository root, ~2-3 min on the
H100: a random Mixtral-8x7B store of ``--layers`` blocks is built and loaded pinned first) writes, flushed
after every measurement:

* ``DIR/copies.csv`` (``kind,experts,bytes,seconds,GBps``): pinned host -> device copies timed with CUDA
  events on a side stream: a whole block (one memcpy per expert tensor, as the ring and bench.h2d_GBps),
  and 1, 2 and 4 experts copied as ``ExpertPool.fetch`` copies them (one ``copy_`` per expert tensor of
  each expert into pool slots); is the per-expert copy slower than the block copy the simulator prices?
* ``DIR/timeline.csv`` (``case,phase,layer,step,start_s,end_s,bytes,resource``): the engine's own
  ``Timeline`` (CUDA events; trace on) of ``generate`` in expert-aware mode without prediction at batch 1
  and 2 (pool sized as the bench's 10 GB budget of 8 blocks: ``--pool-slots``), and with prediction at
  batch 1: every fetch's copy span (bytes, seconds) and the MoE compute spans between them;
* ``DIR/steps.csv`` (``case,batch,decode_ms_per_step,prefill_ms,copies,bytes_copied``): wall times of the
  same runs and of resident prefill / decode at batch 1, 2, 4 (the bench's rows, for comparison);
* ``DIR/kernels_<case>.txt``: ``torch.profiler`` kernel tables (CUDA time) of one resident prefill
  forward at batch 1, 2 and 4 (are the expert GEMMs at 64-256 routed rows per expert slower than the
  profile's rows?) and of two expert-aware decode steps at batch 1.

``--quick`` runs every section on the tiny preset on the CPU (CI smoke test; wall-clock spans).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

COPY_COLS = ("kind", "experts", "bytes", "seconds", "GBps")
TL_COLS = ("case", "phase", "layer", "step", "start_s", "end_s", "bytes", "resource")
STEP_COLS = ("case", "batch", "decode_ms_per_step", "prefill_ms", "copies", "bytes_copied")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Writer:
    """Appends rows to ``DIR/<name>.csv`` and flushes each one (a timeout loses nothing)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.files: dict = {}

    def row(self, name: str, cols: tuple, **kw) -> None:
        if name not in self.files:
            f = (self.out / f"{name}.csv").open("w", newline="")
            w = csv.DictWriter(f, cols)
            w.writeheader()
            self.files[name] = (f, w)
        f, w = self.files[name]
        w.writerow({c: kw.get(c, "") for c in cols})
        f.flush()

    def close(self) -> None:
        for f, _ in self.files.values():
            f.close()


def copy_probe(store, dev: str, w: Writer, reps: int) -> None:
    """Block copies vs per-expert copies (pinned -> device, side stream, CUDA events; wall on the CPU)."""
    import torch

    from reference.inference.quantize import raw

    cuda = dev == "cuda"
    b = store.moe_blocks[0]
    E = store.spec.experts
    views = store.layer_views(b)
    pool = {n: torch.empty_like(t, device=dev) for n, t in views.items()}  # E slots, as one ring group
    s = torch.cuda.Stream() if cuda else None

    def timed(fn) -> float:
        ts = []
        for _ in range(reps + 1):
            if cuda:
                a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(s):
                    a.record(s)
                    fn()
                    z.record(s)
                z.synchronize()
                ts.append(a.elapsed_time(z) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:])

    def block():
        for n, d in pool.items():
            raw(d).copy_(raw(views[n]), non_blocking=True)

    def experts(k):
        def fn():
            for e in range(k):
                for n, d in pool.items():
                    raw(d[e]).copy_(raw(views[n][e]), non_blocking=True)
        return fn

    eb = store.expert_bytes
    for kind, k, fn in [("block", E, block)] + [("experts", k, experts(k)) for k in (1, 2, 4) if k <= E]:
        t = timed(fn)
        w.row("copies", COPY_COLS, kind=kind, experts=k, bytes=k * eb, seconds=f"{t:.6g}", GBps=f"{k * eb / t / 1e9:.4g}")
        log(f"copy {kind} x{k}: {k * eb / 1e6:.0f} MB in {t * 1e3:.3f} ms = {k * eb / t / 1e9:.2f} GB/s")


def run_case(store, dev: str, w: Writer, case: str, mode: str, B: int, P: int, G: int, pool_slots: int | None,
             predict: bool) -> None:
    """``generate`` with the engine's timeline on: spans to timeline.csv, wall times to steps.csv."""
    import torch

    from reference.inference.engine import (
        Engine,
        InferConfig,
        plan_memory,
        random_prompts,
    )

    kw: dict = {"gpu_budget_gb": None}
    if mode == "expert":
        p = plan_memory(store, "expert", 1 << 50, B, P + G, B * P)
        kw["gpu_budget_gb"] = (p.dense_bytes + p.kv_bytes + p.act_bytes + pool_slots * p.expert_bytes
                               + p.expert_bytes // 2) / 1e9
    eng = Engine(store, InferConfig(mode=mode, device=dev, trace=True, predict=predict, **kw), batch=B, max_len=P + G,
                 prefill_tokens=B * P)
    prompts = random_prompts(B, P, store.spec.vocab, seed=B)
    eng.generate(prompts, 2)  # warm-up (first-call costs), spans dropped below
    eng.timeline.spans.clear()
    c0, b0 = eng.pool.copies, eng.pool.bytes_copied
    r = eng.generate(prompts, G)
    steps = max(1, G - 1)
    w.row("steps", STEP_COLS, case=case, batch=B, decode_ms_per_step=f"{1e3 * r.decode_s / steps:.4f}",
          prefill_ms=f"{1e3 * r.prefill_s:.4f}", copies=eng.pool.copies - c0, bytes_copied=eng.pool.bytes_copied - b0)
    for t in eng.timeline.rows():
        w.row("timeline", TL_COLS, case=case, phase=t.phase, layer=t.layer, step=t.micro_batch,
              start_s=f"{t.start_s:.7f}", end_s=f"{t.end_s:.7f}", bytes=t.bytes, resource=t.resource)
    log(f"{case} B={B}: decode {1e3 * r.decode_s / steps:.2f} ms/step, prefill {1e3 * r.prefill_s:.2f} ms, "
        f"{eng.pool.copies - c0} copies")
    eng.close()
    del eng
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def kernel_tables(store, dev: str, out: Path, P: int, batches: list[int], pool_slots: int) -> None:
    """torch.profiler tables of resident prefill forwards and expert-aware decode steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from reference.inference.engine import (
        Engine,
        InferConfig,
        plan_memory,
        random_prompts,
    )

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    sort = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
    Bmax = max(batches)
    eng = Engine(store, InferConfig(mode="resident", device=dev, trace=False), batch=Bmax, max_len=P + 8,
                 prefill_tokens=Bmax * P)
    for B in batches:
        idx = random_prompts(B, P, store.spec.vocab, seed=B).to(dev)
        eng.forward(idx, all_logits=False)
        with profile(activities=acts) as prof:
            eng.forward(idx, all_logits=False)
            if dev == "cuda":
                torch.cuda.synchronize()
        (out / f"kernels_resident_prefill_B{B}.txt").write_text(
            prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
        log(f"kernel table: resident prefill B={B}")
    eng.close()
    del eng
    p = plan_memory(store, "expert", 1 << 50, 1, P + 8, P)
    budget = (p.dense_bytes + p.kv_bytes + p.act_bytes + pool_slots * p.expert_bytes + p.expert_bytes // 2) / 1e9
    eng = Engine(store, InferConfig(mode="expert", device=dev, trace=False, gpu_budget_gb=budget), batch=1,
                 max_len=P + 8, prefill_tokens=P)
    idx = random_prompts(1, P, store.spec.vocab, seed=1).to(dev)
    cache = eng.new_cache(1)
    eng.forward(idx, cache, 0, all_logits=False)
    nxt = idx[:, -1:]
    eng.forward(nxt, cache, P, all_logits=False)
    with profile(activities=acts) as prof:
        for s in range(2):
            eng.forward(nxt, cache, P + 1 + s, all_logits=False)
        if dev == "cuda":
            torch.cuda.synchronize()
    (out / "kernels_expert_decode_B1.txt").write_text(
        prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))
    log("kernel table: expert-aware decode B=1")
    eng.close()


def probe_model(quick: bool, layers: int):
    """(device, model) of a GPU probe of the engine: the bench's ``mixtral-8x7b`` geometry at ``layers`` blocks,
    bf16, on CUDA; ``quick``: the ``tiny`` preset on the CPU (CI smoke test)."""
    import torch

    from semoe.presets import model_preset

    if quick:
        return "cpu", model_preset("tiny").replace(dtype="bf16")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return dev, model_preset("mixtral-8x7b").replace(layers=layers, name=f"mixtral-8x7b-L{layers}", dtype="bf16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--store", type=Path, default=Path("/tmp/semoe_diag_store"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--pool-slots", type=int, default=24, help="expert-aware pool (the bench's 10 GB budget: 24)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny preset on the CPU (CI smoke test)")
    a = ap.parse_args(argv)
    if a.layers < 1 or a.prompt_len < 1 or a.gen_len < 2 or a.pool_slots < 1 or a.reps < 1:
        print("inference_diag: --layers, --prompt-len, --pool-slots, --reps must be >= 1, --gen-len >= 2",
              file=sys.stderr)
        return 2
    import torch

    from reference.inference.build import build_random_store
    from reference.inference.store import ModelStore

    dev, spec = probe_model(a.quick, a.layers)
    if a.quick:
        a.prompt_len, a.gen_len, a.reps, a.pool_slots = 8, 3, 1, 6  # 1.5 blocks of 4 experts
    store_dir = a.out / "store" if a.quick else a.store
    t0 = time.perf_counter()
    w = Writer(a.out)
    log(f"building {spec.name} into {store_dir} on {dev}")
    build_random_store(store_dir, spec, torch.bfloat16, seed=0, gen_device=dev, progress=log)
    store = ModelStore.load(store_dir, progress=log)
    P, G = a.prompt_len, a.gen_len
    copy_probe(store, dev, w, a.reps)
    for case, B, predict in (("expert_nopred", 1, False), ("expert_nopred", 2, False), ("expert", 1, True)):
        run_case(store, dev, w, case, "expert", B, P, G, a.pool_slots, predict)
    for B in (1, 2, 4):
        run_case(store, dev, w, "resident", "resident", B, P, G, None, False)
    kernel_tables(store, dev, a.out, P, [1, 2, 4], a.pool_slots)
    w.close()
    log(f"done in {time.perf_counter() - t0:.0f} s: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
