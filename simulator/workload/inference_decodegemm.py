"""GPU probe of the decode-shape expert FFN (issue 7): the device seconds of the reference's own ``grouped_ffn``
call at decode batches, against the simulator's price of it.

At B = 8 / 16 the resident decode sits near the host / device balance: in the simulator, 1.5x the attention and
expert device costs turns 2550f63's resident B = 16 decode from +11.6% to -11.6% (B = 8: +5.5% to -8.8%), while
B = 1-4 move by < 3%. The simulator prices a decode block's grouped GEMMs at the cost model's memory-bound rate
(~2.63 TB/s of expert weights: ``BlockCosts.gemms``; the profile's routed rows start at 64 rows per expert), never
measured at 1-4 rows per expert; the one measured decode table (``results/bench/infer_diag``, expert-aware B = 1,
under torch.profiler) has 107 us per ``_grouped_mm`` where the simulator charges 89 us. This probe measures it.

``python -m simulator.workload.inference_decodegemm --out DIR`` (the GPU machine, repository root; ~1 min on the
H100, no store: random weights on the device) writes ``DIR/decode_gemm.csv`` (`COLUMNS`), flushed after every
row: for the bench model's block (Mixtral geometry, bf16) and each decode batch B (``--batches``) and routing seed,
the call form ``ring`` (``grouped_ffn`` over the E experts, as resident and ring decode call it) and ``pool``
(over ``--pool-slots`` slots with the routed experts in the first ones, as the expert-aware decode calls it):
the routed rows per group as the engine makes them (each token's top-k distinct experts, uniform), and the device
seconds per call (CUDA events around ``--calls`` back-to-back calls after a warm-up: each call's few kernels are
queued far faster than the device runs them), with the simulator's ``BlockCosts.gemms`` + activation for the same
(tokens, groups) beside it (``sim_s``). ``--quick``: the tiny preset on the CPU (a CI test of the plumbing; wall
clock, meaningless times).

``--engine-steps``: also the whole resident decode step of the reference engine (a random store of
``--engine-layers`` blocks in ``--store``, `Engine` in resident mode, a prefill of ``--prompt-len`` then decode
steps): ``DIR/decode_steps.csv`` (`STEP_COLUMNS`): per batch, the device seconds per block of a decode step (the sum
of every kernel's device time under ``torch.profiler`` over ``--steps`` steps, over the steps and blocks), its
kernels per block, the share of the ``_grouped_mm`` kernels, and the step's wall seconds unprofiled
(``wall_s_per_step``): is the step's device work what the simulator prices (the FFN above plus attention, router,
dispatch and the small kernels)?
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

COLUMNS = ("batch", "seed", "call", "groups", "rows", "slots", "device_s", "sim_s", "weights_GB", "TBps")
STEP_COLUMNS = ("batch", "steps", "blocks", "device_s_per_block", "kernels_per_block", "grouped_mm_share",
                "wall_s_per_step")


def engine_steps(out: Path, spec, batches: list[int], store_dir: Path, prompt_len: int, steps: int, cuda: bool) -> None:
    """``decode_steps.csv`` (module doc): the resident engine's decode step, device seconds per block."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from reference.inference.build import build_random_store
    from reference.inference.engine import Engine, InferConfig, random_prompts
    from reference.inference.store import ModelStore

    dt = torch.bfloat16 if cuda else torch.float32
    build_random_store(store_dir, spec, dt, seed=0, gen_device="cuda" if cuda else "cpu")
    store = ModelStore.load(store_dir)
    L = len(store.moe_blocks)
    rows = []
    for B in batches:
        eng = Engine(store, InferConfig(mode="resident", gpu_budget_gb=None, device="cuda" if cuda else "cpu",
                                        trace=False), batch=B, max_len=prompt_len + 2 * steps + 4,
                     prefill_tokens=B * prompt_len)
        prompts = random_prompts(B, prompt_len, spec.vocab, seed=B)
        eng.generate(prompts, 2)  # warm-up
        cache = eng.new_cache(B)
        nxt = eng.forward(prompts, cache, 0, all_logits=False)[:, -1].argmax(-1)
        pos = prompt_len

        def step():
            nonlocal nxt, pos
            nxt = eng.forward(nxt.unsqueeze(1), cache, pos, all_logits=False)[:, -1].argmax(-1)
            pos += 1

        step()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / steps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        def dev_us(e) -> float:  # a kernel's device microseconds (the attribute's name moved across releases)
            for name in ("self_device_time_total", "self_cuda_time_total", "device_time_total", "cuda_time_total"):
                v = getattr(e, name, None)
                if v:
                    return float(v)
            return 0.0

        avgs = [k for k in prof.key_averages() if cuda and dev_us(k) > 0]
        kern = [k for k in avgs if getattr(k, "device_type", None) == torch.autograd.DeviceType.CUDA] or avgs
        dev = sum(dev_us(k) for k in kern) / 1e6 if cuda else wall
        gmm = sum(dev_us(k) for k in kern if "cutlass" in k.key.lower() or "grouped" in k.key.lower()) / 1e6
        n_kern = sum(k.count for k in kern)
        rows.append({"batch": B, "steps": steps, "blocks": L, "device_s_per_block": f"{dev / steps / L:.6g}",
                     "kernels_per_block": f"{n_kern / steps / L:.4g}",
                     "grouped_mm_share": f"{gmm / dev if dev else 0:.4g}", "wall_s_per_step": f"{wall:.6g}"})
        with (out / "decode_steps.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, STEP_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        print(f"[{time.strftime('%H:%M:%S')}] engine B={B}: device {1e3 * dev / steps / L:.3f} ms per block, "
              f"{n_kern / steps / L:.1f} kernels per block, wall {1e3 * wall:.2f} ms per step", flush=True)
        if cuda:  # the next batch's engine replaces this one (the closure keeps it until then)
            torch.cuda.empty_cache()


def routed_counts(tokens: int, experts: int, top_k: int, seed: int):
    """Rows per expert of ``tokens`` tokens each picking ``top_k`` distinct experts uniformly (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
    return torch.bincount(ids.flatten(), minlength=experts)


def block_costs(spec):
    """The simulator's `BlockCosts` of ``spec`` on the ``h100-single`` preset (its profile), as validate_infer's."""
    from semoe import cluster_preset
    from simulator.cost import CostModel
    from simulator.workload.inference_costs import BlockCosts

    return BlockCosts(spec, CostModel.auto(cluster_preset("h100-single").gpu, impl=("torch", "triton"), loglog=True))


def sim_ffn_s(costs, tokens: int, groups: int) -> float:
    """The simulator's device seconds of what ``grouped_ffn`` runs for ``tokens`` decode tokens over ``groups``
    experts with rows (``costs``: `block_costs`): ``BlockCosts.gemms`` plus ``BlockCosts.activation``."""
    return costs.gemms(tokens, groups) + costs.activation(tokens)


def main(argv: list[str] | None = None) -> int:
    import torch

    from reference.inference.engine import grouped_ffn
    from reference.inference.store import expert_tensor_shapes
    from semoe.presets import model_preset

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--pool-slots", type=int, default=24, help="the expert-aware pool's slots (2550f63: 19-24)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--engine-steps", action="store_true", help="also the resident engine's decode step (module doc)")
    p.add_argument("--engine-layers", type=int, default=2)
    p.add_argument("--store", type=Path, default=Path("/dev/shm/semoe_decodegemm_store"))
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)
    if a.seeds < 1 or a.calls < 1 or a.pool_slots < 1:
        p.error("--seeds, --calls and --pool-slots must be >= 1")
    cuda = torch.cuda.is_available() and not a.quick
    dev = "cuda" if cuda else "cpu"
    spec = model_preset("tiny" if a.quick else a.preset).replace(dtype="bf16")
    dt = torch.bfloat16 if cuda else torch.float32
    E, k = spec.experts, spec.top_k
    C = max(a.pool_slots, E)
    shapes = expert_tensor_shapes(spec)
    w_pool = {n: torch.randn((C, *s[1:]), device=dev, dtype=dt) * 0.02 for n, s in shapes.items() if n.startswith("w")}
    w_ring = {n: t[:E] for n, t in w_pool.items()}
    per_expert_GB = sum(t[0].numel() * t.element_size() for t in w_pool.values()) / 1e9
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "decode_gemm.csv"
    rows: list[dict] = []
    costs = block_costs(spec)  # the profile read once

    def timed(fn) -> float:
        fn()
        if not cuda:
            t = time.perf_counter()
            for _ in range(a.calls):
                fn()
            return (time.perf_counter() - t) / a.calls
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(a.calls):
            fn()
        e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3 / a.calls

    for B in (int(b) for b in a.batches.split(",")):
        for s in range(a.seeds):
            counts_E = routed_counts(B, E, k, seed=1000 * B + s)
            groups = int((counts_E > 0).sum())
            x = torch.randn(int(counts_E.sum()), spec.hidden, device=dev, dtype=dt)
            counts_C = torch.zeros(C, dtype=counts_E.dtype)
            counts_C[:groups] = counts_E[counts_E > 0]
            sim = sim_ffn_s(costs, B, groups)
            for call, w, cnt in (("ring", w_ring, counts_E), ("pool", w_pool, counts_C)):
                cnt = cnt.to(dev)
                sec = timed(lambda: grouped_ffn(x, cnt, w))
                rows.append({"batch": B, "seed": s, "call": call, "groups": groups, "rows": int(counts_E.sum()),
                             "slots": cnt.numel(), "device_s": f"{sec:.6g}", "sim_s": f"{sim:.6g}",
                             "weights_GB": f"{groups * per_expert_GB:.6g}",
                             "TBps": f"{groups * per_expert_GB / sec / 1e3:.4g}"})
                with path.open("w", newline="") as f:
                    wr = csv.DictWriter(f, COLUMNS)
                    wr.writeheader()
                    wr.writerows(rows)
                print(f"[{time.strftime('%H:%M:%S')}] B={B} seed={s} {call}: {groups} groups, {1e3 * sec:.3f} ms "
                      f"(sim {1e3 * sim:.3f} ms)", flush=True)
    if a.engine_steps:
        del w_pool, w_ring
        espec = spec.replace(layers=a.engine_layers) if not a.quick else spec
        engine_steps(a.out, espec, [int(b) for b in a.batches.split(",")], a.store, 8 if a.quick else a.prompt_len,
                     a.steps, cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
