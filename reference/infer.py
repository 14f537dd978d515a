"""Offloaded MoE generation on one process: ``semoe infer`` (reference/infer_cli.py) and
``python -m reference.infer`` call :func:`run_infer`.

Weights come from a store directory (``--model DIR``, see reference/inference/store.py) or, for a
preset or ModelSpec YAML, from ``--init random`` (built block by block into ``--store``, default
``<out>/store``, and reused when an identical store is there). Writes ``<out>/metrics.json``,
``<out>/trace.csv`` (semoe trace rows: ``moe_ring``/``moe_expert`` compute intervals and
``h2d_experts`` copies per MoE block) and ``<out>/trace.json`` (Perfetto).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from semoe.io import atomic_write_text


@dataclass
class InferArgs:
    model: str
    mode: str = "ring"
    gpu_budget_gb: float | None = None
    slots: int | None = None
    batch: int = 1
    prompt_len: int = 32
    gen_len: int = 16
    out: Path = Path("runs/infer")
    init: str | None = None  # "random" for presets / YAML
    store: Path | None = None
    layers: int | None = None  # override the preset's layer count (scaled models)
    dtype: str | None = None
    device: str = "auto"
    seed: int = 0
    verify: bool = True
    fallback_frac: float = 0.95
    predict: bool = False
    trace: bool = True
    quant: str | None = None  # "int8" / "fp8": quantized expert weights (reference/inference/quantize.py)
    quant_kernel: str = "dequant"  # "fused": GEMMs from the quantized bytes (reference/inference/qmatmul.py)
    compile: str | None = None  # torch.compile mode / backend (reference/inference/static.py); None: eager


def open_store(a: InferArgs, log=print):
    import torch

    from reference.inference.build import build_random_store
    from reference.inference.store import MANIFEST, TORCH_DTYPES, ModelStore
    from semoe.presets import load_model

    path = Path(a.model)
    if path.is_dir() or (path / MANIFEST).exists():
        if a.init is not None or a.layers is not None or a.dtype is not None:
            raise ValueError(f"--model {a.model} is a store directory: --init/--layers/--dtype do not apply")
        return ModelStore.load(path, verify=a.verify, progress=log)
    spec = load_model(a.model)
    if a.layers is not None:
        spec = spec.replace(layers=a.layers, moe_every=min(spec.moe_every, a.layers))
    if a.dtype is not None:
        spec = spec.replace(dtype=a.dtype)
    if a.init != "random":
        raise ValueError(f"no weights for model {a.model!r}: pass --init random (or --model STORE_DIR)")
    root = a.store or (a.out / "store")
    build_random_store(root, spec, TORCH_DTYPES[spec.dtype], seed=a.seed, progress=log)
    del torch
    return ModelStore.load(root, verify=a.verify, progress=log)


def run_infer(a: InferArgs, log=print) -> dict:
    import torch

    from reference.inference.engine import Engine, InferConfig, random_prompts
    from semoe.trace import write_chrome_trace, write_csv

    for name in ("batch", "prompt_len", "gen_len"):
        if getattr(a, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(a, name)}")
    store = open_store(a, log)
    cfg = InferConfig(mode=a.mode, gpu_budget_gb=a.gpu_budget_gb, slots=a.slots, device=a.device,
                      fallback_frac=a.fallback_frac, predict=a.predict, trace=a.trace, quant=a.quant,
                      quant_kernel=a.quant_kernel, compile=a.compile)
    max_len = a.prompt_len + a.gen_len
    eng = Engine(store, cfg, batch=a.batch, max_len=max_len, prefill_tokens=a.batch * a.prompt_len)
    if eng.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(eng.device)
    prompts = random_prompts(a.batch, a.prompt_len, store.spec.vocab, a.seed)
    compile_s = None
    if a.compile is not None:  # compile (prefill + decode graphs) outside the measured run
        t = time.perf_counter()
        eng.generate(prompts, min(a.gen_len, 3))
        compile_s = time.perf_counter() - t
    res = eng.generate(prompts, a.gen_len)
    rows = eng.timeline.rows()
    a.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, a.out / "trace.csv")
    write_chrome_trace(rows, a.out / "trace.json")
    metrics = {
        "model": store.spec.name,
        "store": str(store.root),
        "device": torch.cuda.get_device_name(eng.device) if eng.device.type == "cuda" else "cpu",
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        "prefill_tokens_per_s": res.prefill_tokens_per_s,
        "decode_tokens_per_s": res.decode_tokens_per_s,
        "expert_bytes_total": store.layer_bytes * len(store.moe_blocks),
        "tokens": res.tokens_BG.tolist(),
        "compile_warmup_s": compile_s,
        **res.stats,
    }
    atomic_write_text(a.out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def summary_line(m: dict) -> str:
    gpu = m.get("gpu_max_allocated_bytes")
    mem = f"{gpu / 1e9:.2f} GB GPU peak" if gpu is not None else "cpu"
    mode = m["mode"] + (f" compiled ({m['compile']})" if m.get("compile") else "")
    return (
        f"{m['model']} {mode} K={m['ring_slots']} C={m['pool_slots']}: prefill "
        f"{m['prefill_tokens_per_s']:,.1f} tok/s, decode {m['decode_tokens_per_s']:,.1f} tok/s, "
        f"{m['bytes_copied'] / 1e9:.2f} GB copied, {mem}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--mode", default="ring", choices=("ring", "expert", "resident"))
    p.add_argument("--gpu-budget-gb", type=float, default=None)
    p.add_argument("--slots", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/infer"))
    p.add_argument("--init", choices=("random",), default=None)
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quant", choices=("int8", "fp8"), default=None)
    p.add_argument("--quant-kernel", choices=("dequant", "fused"), default="dequant")
    p.add_argument("--compile", default=None, help="torch.compile: default, reduce-overhead, "
                   "max-autotune-no-cudagraphs, aot_eager, eager (reference/inference/static.py)")
    args = p.parse_args(argv)
    a = InferArgs(**{k: v for k, v in vars(args).items()})
    try:
        m = run_infer(a)
    except ValueError as e:
        print(f"infer: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(summary_line(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
