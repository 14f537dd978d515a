"""`semoe infer`: offloaded MoE generation (registered into the `semoe` app by semoe/cli.py when
"reference.infer_cli" is listed in its ``_PLUGIN_MODULES``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command()(infer)


def infer(
    model: str = typer.Option(..., "--model", help="store directory, or model preset / YAML with --init random"),
    gpu_budget_gb: Optional[float] = typer.Option(None, help="GPU memory budget in GB (default: free memory)"),
    mode: str = typer.Option("ring", help="ring, expert or resident"),
    batch: int = typer.Option(1, min=1, help="prompts per batch"),
    prompt_len: int = typer.Option(32, min=1, help="prompt tokens (random ids)"),
    gen_len: int = typer.Option(16, min=1, help="tokens to generate (greedy)"),
    out: Path = typer.Option(Path("runs/infer"), help="output directory (metrics.json, trace.csv, trace.json)"),
    slots: Optional[int] = typer.Option(None, help="ring slots K (default: from the budget)"),
    init: Optional[str] = typer.Option(None, help="'random': build a random-weight store for a preset"),
    store: Optional[Path] = typer.Option(None, help="where --init random writes the store (default OUT/store)"),
    layers: Optional[int] = typer.Option(None, min=1, help="override the preset's layers (scaled model)"),
    dtype: Optional[str] = typer.Option(None, help="override the model dtype (fp32, bf16, fp16)"),
    device: str = typer.Option("auto", help="cpu, cuda or auto"),
    seed: int = typer.Option(0, help="seed of the random weights and prompts"),
    fallback_frac: float = typer.Option(0.95, help="expert mode: ring when a pass touches this share of experts"),
    predict: bool = typer.Option(False, help="expert mode: prefetch the next block's experts one block ahead"),
    verify: bool = typer.Option(True, help="check every store file's sha256 on load"),
    quant: Optional[str] = typer.Option(None, help="int8 or fp8: expert weights quantized per output channel "
                                        "in host memory and device slots, dequantized on the device"),
    quant_kernel: str = typer.Option("dequant", help="quantized ring: dequant (bf16 workspace + GEMM) or fused "
                                     "(fp8 torch._scaled_mm / int8 Triton GEMM on the quantized bytes)"),
    compile: Optional[str] = typer.Option(None, "--compile", help="torch.compile the steps: default, "
                                          "reduce-overhead (CUDA graphs), max-autotune-no-cudagraphs, aot_eager"),
) -> None:
    """Prefill + greedy decode with experts offloaded to host memory (ring, expert-aware or resident)."""
    from reference.infer import InferArgs, run_infer, summary_line

    if init not in (None, "random"):
        raise ValueError(f"--init must be 'random', got {init!r}")
    if quant not in (None, "int8", "fp8"):
        raise ValueError(f"--quant must be int8 or fp8, got {quant!r}")
    a = InferArgs(
        model=model, mode=mode, gpu_budget_gb=gpu_budget_gb, slots=slots, batch=batch, prompt_len=prompt_len,
        gen_len=gen_len, out=out, init=init, store=store, layers=layers, dtype=dtype, device=device, seed=seed,
        verify=verify, fallback_frac=fallback_frac, predict=predict, quant=quant, quant_kernel=quant_kernel,
        compile=compile,
    )
    m = run_infer(a, log=lambda s: typer.echo(s, err=True))
    typer.echo(summary_line(m) + (f" ({quant} experts)" if quant else ""))
