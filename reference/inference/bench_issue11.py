"""Issue 11's suite of the inference bench (`reference.inference.bench`): eager vs compiled resident and ring, and
the bf16 ring against int8 / fp8 rings (dequantize-into-workspace and fused GEMMs) with their quality cost."""

from __future__ import annotations

import csv
import datetime as dt
import os
import time

import torch

from reference.inference.bench_device import CUDA, DEV, free_cuda, log, peak_GB, timed
from reference.inference.bench_probes import h2d_GBps, host_op_s
from reference.inference.bench_rows import COLUMNS
from reference.inference.build import build_random_store
from reference.inference.engine import Engine, InferConfig, random_prompts
from reference.inference.store import ModelStore
from semoe.presets import model_preset


def suite_issue11(a) -> int:
    """Issue 11 on one model, rows appended to OUT/infer_rows.csv after every measurement (module doc
    of this file for the schema). Order (a timeout loses only the tail):

    1. pinned H2D GB/s; bf16 resident eager prefill (B = max batch) and decode (each batch): the
       reference logits and tokens;
    2. ring over the same budget for bf16, int8 and fp8 experts, the quantized ones with the
       dequantize-into-workspace kernel (``ring_int8`` ...) and the fused one (``ring_int8_fused``):
       prefill and decode tokens/s, K, bytes copied per block and per forward, the copy time per block
       at the measured bandwidth, the compute time per block (the same experts resident, K = L) and,
       dequantize-into-workspace only, the dequant pass of one block alone (``dequant_ms_per_block``),
       speedup over the bf16 ring, and quality against bf16 resident (max / mean |logit diff| of the
       prefill's last position, greedy tokens equal, top-1 agreement);
    3. compiled resident (``compiled``: prefill with inductor, decode with ``--compile-mode``, CUDA
       graphs by default) vs eager in the same run, and compiled ring (``ring_compiled``).
    """
    import json

    from reference.inference import qmatmul

    quick = a.quick
    if quick:
        P, G = 8, 3
        batches = [int(b) for b in a.batches.split(",")]
        spec = model_preset("tiny").replace(layers=2, name="tiny-L2", dtype="bf16")
        how = "aot_eager"
        ring_slots = a.ring_slots or 1
    else:
        batches = [int(b) for b in a.batches.split(",")]
        P, G = a.prompt_len, a.gen_len
        spec = model_preset(a.preset).replace(layers=a.layers, name=f"{a.preset}-L{a.layers}", dtype="bf16")
        how = a.compile_mode
        ring_slots = a.ring_slots
    Bmax = max(batches)
    commit = os.environ.get("SEMOE_COMMIT", "unknown")
    device = torch.cuda.get_device_name() if CUDA else "cpu"
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    budget = None if quick else a.budget_gb
    config = f"{spec.name} bf16 budget={'K' + str(ring_slots) if budget is None else f'{budget:g}GB'} P={P} G={G}"
    rows: list[dict] = []
    a.out.mkdir(parents=True, exist_ok=True)
    out_csv = a.out / "infer_rows.csv"

    def row(mode: str, batch: int, metric: str, value: float) -> None:
        rows.append(dict(date=date, commit=commit, device=device, config=config, mode=mode, batch=batch,
                         metric=metric, value=f"{float(value):.6g}"))
        log(f"ROW {mode:18s} B={batch} {metric} = {float(value):.4g}")
        with out_csv.open("w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)

    store_dir = a.store if not quick else a.out / "store"
    log(f"building {spec.name} into {store_dir}")
    build_random_store(store_dir, spec, torch.bfloat16, seed=0, gen_device=DEV, progress=log)
    store = ModelStore.load(store_dir, progress=log)
    L, E = len(store.moe_blocks), spec.experts
    layer_bytes = store.expert_bytes * E
    bw = h2d_GBps(store)
    row("-", 0, "h2d_pinned_GBps", bw)
    row("-", 0, "host_op_us", 1e6 * host_op_s())
    row("-", 0, "expert_GB_total", L * layer_bytes / 1e9)
    row("-", 0, "moe_blocks", L)
    prompts = {B: random_prompts(B, P, spec.vocab, seed=B) for B in batches}

    def engine(mode, batch, **cfg) -> Engine:
        free_cuda()
        c = InferConfig(mode=mode, device=DEV, trace=False, **cfg)
        return Engine(store, c, batch=batch, max_len=P + G, prefill_tokens=batch * P)

    copied = {}

    def prefill_s(eng, B) -> tuple[float, torch.Tensor]:
        """Median prefill seconds after one warm-up pass; ``copied["per_forward"]``: bytes copied per
        timed pass (steady state: each of the L blocks once when K < L, none when resident)."""
        idx = prompts[B].to(DEV)
        last = eng.forward(idx, all_logits=False)[:, -1].float().cpu()
        b0 = eng.pool.bytes_copied
        t = timed(lambda: eng.forward(idx, all_logits=False), a.reps)
        copied["per_forward"] = (eng.pool.bytes_copied - b0) / a.reps
        return t, last

    # 1. bf16 resident eager: reference logits / tokens
    eng = engine("resident", Bmax)
    t, ref_last = prefill_s(eng, Bmax)
    comp_bf16 = t / L
    row("resident", Bmax, "prefill_tokens_per_s", Bmax * P / t)
    row("resident", Bmax, "block_compute_ms", 1e3 * comp_bf16)
    ref_tok = {}
    for B in batches:
        eng.generate(prompts[B], 2)
        r = eng.generate(prompts[B], G)
        ref_tok[B] = r.tokens_BG
        row("resident", B, "decode_tokens_per_s", r.decode_tokens_per_s)
        row("resident", B, "decode_ms_per_step", 1e3 * r.decode_s / max(1, G - 1))
    del eng

    # 2. ring: bf16, int8, fp8 (dequant, fused) over the same budget
    ring_tps = {}
    for quant, kern in () if a.skip_ring else ((None, "dequant"), ("int8", "dequant"), ("int8", "fused"), ("fp8", "dequant"), ("fp8", "fused")):
        name = "ring" if quant is None else f"ring_{quant}" + ("_fused" if kern == "fused" else "")
        try:
            if quant is not None:  # compute per block from resident quantized experts (K = L)
                eng = engine("resident", Bmax, quant=quant, quant_kernel=kern)
                t, _ = prefill_s(eng, Bmax)
                row(name, Bmax, "block_compute_ms", 1e3 * t / L)
                if kern == "dequant":  # the dequantize-into-workspace pass alone (one block's experts)
                    row(name, Bmax, "dequant_ms_per_block", 1e3 * timed(lambda: eng.pool.group_weights(0), a.reps))
                del eng
            else:
                row(name, Bmax, "block_compute_ms", 1e3 * comp_bf16)
            eng = engine("ring", Bmax, gpu_budget_gb=budget, slots=ring_slots, quant=quant, quant_kernel=kern)
            qb = eng.pool.expert_nbytes * E
            K = eng.plan.ring_slots
            row(name, Bmax, "ring_K", K)
            row(name, Bmax, "bytes_per_block", qb)
            row(name, Bmax, "copy_ms_per_block", 1e3 * qb / (bw * 1e9))
            t, last = prefill_s(eng, Bmax)
            row(name, Bmax, "bytes_copied_per_forward", copied["per_forward"])
            row(name, Bmax, "prefill_tokens_per_s", Bmax * P / t)
            row(name, Bmax, "prefill_ms_per_block", 1e3 * t / L)
            ring_tps[(name, "prefill")] = Bmax * P / t
            d = (last - ref_last).abs()
            row(name, Bmax, "logit_maxabs_vs_bf16_resident", float(d.max()))
            row(name, Bmax, "logit_meanabs_vs_bf16_resident", float(d.mean()))
            row(name, Bmax, "logit_rms_bf16_resident", float(ref_last.pow(2).mean().sqrt()))
            row(name, Bmax, "top1_agree_vs_bf16_resident", float((last.argmax(-1) == ref_last.argmax(-1)).float().mean()))
            same = []
            for B in batches:
                # untimed warm-up of this batch's decode shapes: the first fused int8 call at a new
                # M bucket autotunes the Triton dequant GEMM (kernels/dequant_gemm.py, key M_BUCKET);
                # without it the 344a526 run timed that autotune in ring_int8_fused B=1 (548 vs 207 ms/step)
                eng.generate(prompts[B], 2)
                r = eng.generate(prompts[B], G)
                row(name, B, "decode_tokens_per_s", r.decode_tokens_per_s)
                row(name, B, "decode_ms_per_step", 1e3 * r.decode_s / max(1, G - 1))
                ring_tps[(name, "decode", B)] = r.decode_tokens_per_s
                same.append(float((r.tokens_BG == ref_tok[B]).float().mean()))
            row(name, 0, "tokens_equal_frac_vs_bf16_resident", sum(same) / len(same))
            row(name, Bmax, "gpu_peak_GB", peak_GB())
            if quant is not None:
                row(name, Bmax, "prefill_speedup_vs_bf16_ring", ring_tps[(name, "prefill")] / ring_tps[("ring", "prefill")])
                for B in batches:
                    row(name, B, "decode_speedup_vs_bf16_ring", ring_tps[(name, "decode", B)] / ring_tps[("ring", "decode", B)])
                if kern == "fused":
                    log(f"{name}: fused implementation used: {qmatmul.IMPL_USED.get(quant)}; broken: {sorted(qmatmul._BROKEN)}")
                    (a.out / f"{name}_impl.json").write_text(json.dumps(
                        {"impl": qmatmul.IMPL_USED.get(quant), "broken": sorted(qmatmul._BROKEN)}))
            del eng
        except Exception as e:  # report, keep the other rows
            log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
            free_cuda()

    # 3. compiled vs eager (same run)
    if not a.skip_compile:
        for mode, kw, label in (("resident", {}, "compiled"), ("ring", dict(gpu_budget_gb=budget, slots=ring_slots), "ring_compiled")):
            try:
                c = how if mode == "resident" else ("default" if not quick else how)
                eng = engine(mode, Bmax, compile=c, **kw)
                B = Bmax
                tc = time.perf_counter()
                r = eng.generate(prompts[B], G)  # compiles prefill + decode
                row(label, B, "compile_s", time.perf_counter() - tc)
                r = eng.generate(prompts[B], G)
                pre = timed(lambda: eng.generate(prompts[B], 1), a.reps)
                row(label, B, "prefill_tokens_per_s", B * P / pre)
                r = eng.generate(prompts[B], G)
                row(label, B, "decode_tokens_per_s", r.decode_tokens_per_s)
                row(label, B, "decode_ms_per_step", 1e3 * r.decode_s / max(1, G - 1))
                row(label, 0, "tokens_equal_frac_vs_eager", float((r.tokens_BG == ref_tok[B]).float().mean()))
                base = "resident" if mode == "resident" else "ring"
                eager_pre = next((float(x["value"]) for x in rows if x["mode"] == base
                                  and x["metric"] == "prefill_tokens_per_s"), None)
                eager_dec = next((float(x["value"]) for x in rows if x["mode"] == base and x["batch"] == B
                                  and x["metric"] == "decode_tokens_per_s"), None)
                if eager_pre:  # the eager rows of the same run (absent with --skip-ring for the ring)
                    row(label, B, "prefill_speedup_vs_eager", (B * P / pre) / eager_pre)
                if eager_dec:
                    row(label, B, "decode_speedup_vs_eager", r.decode_tokens_per_s / eager_dec)
                del eng
            except Exception as e:
                log(f"{label} failed: {type(e).__name__}: {str(e)[:300]}")
                free_cuda()
    log(f"done: {len(rows)} rows in {out_csv}")
    return 0
