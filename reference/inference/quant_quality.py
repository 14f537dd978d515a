"""Quality cost of quantized expert weights on a TRAINED model, through the inference engine (issue 11).

The random-weight Mixtral bench (results/bench/infer.csv, ``logit_*_vs_bf16_resident``) measures the
error of int8 / fp8 experts on a model whose logits carry no information (near-ties everywhere), so its
top-1 agreement says little. Here a small Mixtral-shaped model (RMSNorm, RoPE, SwiGLU, top-2 of 8
experts) is trained on the byte corpus for ``--steps`` steps on the CPU (``reference.distill.train_model``:
AdamW, warm-up + cosine), saved as an expert store (bf16, as the bench's stores), and evaluated by
``reference.inference.Engine`` in **ring** mode (K = 1: every block's experts are copied from the host
store each pass, quantized ones dequantized into the workspace, exactly the bench's ``ring_int8`` /
``ring_fp8`` path) on fixed held-out windows (the last 10% of the corpus, never trained on):

* ``heldout_loss`` (next-byte cross-entropy, nats) for bf16 / int8 / fp8 experts and its change;
* logit error against the bf16 ring over every held-out position: ``logit_maxabs``, ``logit_meanabs``,
  both also relative to the bf16 logits' rms (``logit_rms``), and ``top1_agree`` (argmax equal);
* the same for the fp32 model (MoEDecoder) as context (``quant=fp32_model``: bf16 storage's own cost);
* per MoE block ``b<i>``: ``routing_changed_frac`` (tokens whose top-k expert set differs from the
  bf16 ring's) and ``moe_out_relerr`` (relative error of the block's MoE output): how the error grows
  with depth; ``<quant>_bf16_routing`` rows: the same run with every block's routing (ids and weights)
  forced to the bf16 run's, so the difference to the ``<quant>`` rows is what routing flips add.

``python -m reference.inference.quant_quality --out DIR`` appends rows to ``DIR/quant_quality.csv``
(``date,commit,device,config,quant,metric,value``; the committed table is
``results/bench/quant_quality.csv``) and prints them; ``--quick`` is the CI-sized run (seconds).
Default: 600 steps, ~25 s on 2 CPU cores; ``--steps 0`` evaluates the untrained (random-init) model.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

COLUMNS = ("date", "commit", "device", "config", "quant", "metric", "value")
QUANTS = ("none", "int8", "fp8")


def trained_spec(hidden: int = 128, ffn: int = 256, layers: int = 2, experts: int = 8, top_k: int = 2,
                 max_seq: int = 128):
    """Mixtral's block shape (RMSNorm, RoPE, GQA, SwiGLU, top-2) at a size the CPU trains in a minute."""
    from semoe.presets import model_preset

    return model_preset("mixtral-8x7b").replace(
        name=f"mixtral-shaped-h{hidden}-L{layers}-E{experts}", layers=layers, hidden=hidden, heads=4, kv_heads=2,
        ffn=ffn, vocab=256, max_seq=max_seq, experts=experts, top_k=top_k, dtype="fp32")


def train(spec, steps: int, seq_len: int, batch: int, seed: int = 0):
    """(model, held-out corpus, train seconds): ``spec`` trained ``steps`` steps on the byte corpus."""
    from reference.data import ByteCorpus
    from reference.distill import DistillConfig, split_corpus, train_model
    from reference.model import MoEDecoder

    cfg = DistillConfig(experts=spec.experts, steps=max(1, steps), batch_size=batch, seq_len=seq_len, seed=seed,
                        warmup_steps=max(1, steps // 20), lr=3e-3)
    train_data, held = split_corpus(ByteCorpus(None), cfg.heldout_frac)
    model = MoEDecoder(spec, seed=seed)
    secs = train_model(model, train_data, steps, cfg) if steps > 0 else 0.0
    model.eval()
    return model, held, secs


def heldout_windows(held, n: int, seq_len: int, seed: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return held.batch(n, seq_len, gen)


@torch.no_grad()
def engine_logits(store_dir: Path, quant: str | None, x, routings: list | None = None) -> tuple[torch.Tensor, list[dict]]:
    """All-position logits of ``x`` [B, S] from the engine in ring mode (K = 1), fp32, and per MoE block
    the routing, the routed expert ids ``[T, k]`` and the MoE output ``[T, D]`` (recorded around
    ``Engine._experts``). ``routings``: use these per-block routings (ids and weights) instead of the
    gate's (the reference run's: isolates the error of the expert weights from routing flips)."""
    from reference.inference.engine import Engine, InferConfig
    from reference.inference.store import ModelStore

    store = ModelStore.load(store_dir, pin=False)
    cfg = InferConfig(mode="ring", device="cpu", trace=False, quant=quant, slots=1)
    B, S = x.shape
    eng = Engine(store, cfg, batch=B, max_len=S, prefill_tokens=B * S)
    blocks: list[dict] = []
    inner = eng._experts

    def experts(block, x_TD, moe, ids):
        if routings is not None:
            forced = routings[len(blocks)]
            object.__setattr__(moe, "gate", lambda *a: forced)  # instance attribute shadows the module
            try:
                y = inner(block, x_TD, moe, ids)
            finally:
                del moe.__dict__["gate"]
            r = forced
        else:
            y = inner(block, x_TD, moe, ids)
            r = moe.gate(x_TD, ids)  # the same routing again (deterministic), recorded
        blocks.append({"routing": r, "ids": r.expert_ids_TK.sort(-1).values.cpu(), "y": y.float().cpu()})
        return y

    eng._experts = experts
    try:
        return eng.forward(x, all_logits=True).float(), blocks
    finally:
        eng.close()


def per_block(blocks, ref_blocks) -> dict[str, float]:
    """Per MoE block: share of tokens whose top-k expert set differs from the reference's, and the
    relative error of the block's MoE output (it grows with depth as errors and flips accumulate)."""
    out = {}
    for i, (b, r) in enumerate(zip(blocks, ref_blocks)):
        out[f"routing_changed_frac_b{i}"] = float((b["ids"] != r["ids"]).any(-1).float().mean())
        out[f"moe_out_relerr_b{i}"] = float((b["y"] - r["y"]).norm() / r["y"].norm().clamp_min(1e-30))
    return out


def compare(logits, ref, y) -> dict[str, float]:
    """Held-out loss of ``logits`` and its error against ``ref`` (both [B, S, V], fp32)."""
    V = logits.shape[-1]
    d = (logits - ref).abs()
    rms = float(ref.pow(2).mean().sqrt())
    out = {"heldout_loss": float(F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)))}
    out.update(logit_maxabs=float(d.max()), logit_meanabs=float(d.mean()), logit_rms=rms,
               logit_maxabs_rel=float(d.max()) / rms, logit_meanabs_rel=float(d.mean()) / rms,
               top1_agree=float((logits.argmax(-1) == ref.argmax(-1)).float().mean()))
    return out


def run(out: Path, steps: int = 600, seq_len: int = 64, batch: int = 16, eval_windows: int = 32, seed: int = 0,
        spec=None, log=print) -> list[dict]:
    from reference.distill import git_commit
    from reference.inference.store import save_model

    spec = spec or trained_spec()
    t0 = time.perf_counter()
    model, held, secs = train(spec, steps, seq_len, batch, seed)
    log(f"trained {spec.name} for {steps} steps in {secs:.1f} s")
    x, y = heldout_windows(held, eval_windows, seq_len)
    config = f"{spec.name} steps={steps} seq={seq_len} heldout={eval_windows}x{seq_len} ring K=1 bf16 store"
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    rows: list[dict] = []
    commit = git_commit()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quant_quality.csv"

    def emit(quant: str, metrics: dict[str, float]) -> None:
        new = [{"date": date, "commit": commit, "device": "cpu", "config": config, "quant": quant, "metric": k,
                "value": f"{v:.6g}"} for k, v in metrics.items()]
        rows.extend(new)
        fresh = not path.is_file()
        with path.open("a", newline="") as f:  # appended after every quant: a timeout loses only the tail
            w = csv.DictWriter(f, COLUMNS)
            if fresh:
                w.writeheader()
            w.writerows(new)
        for r in new:
            log(f"{quant:10s} {r['metric']:18s} {r['value']}")

    with torch.no_grad():
        fp32 = model(x).logits_BSV.float()
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "store"
        save_model(model, store, dtype=torch.bfloat16, origin={"init": "quant_quality", "steps": steps, "seed": seed})
        ref, ref_blocks = engine_logits(store, None, x)
        emit("fp32_model", compare(fp32, ref, y))
        base = compare(ref, ref, y)
        emit("none", base)
        for q in QUANTS[1:]:
            logits, blocks = engine_logits(store, q, x)
            m = compare(logits, ref, y)
            m["heldout_loss_delta"] = m["heldout_loss"] - base["heldout_loss"]
            m.update(per_block(blocks, ref_blocks))
            emit(q, m)
            # the same with the bf16 run's routing forced: what is left without routing flips
            logits, blocks = engine_logits(store, q, x, [b["routing"] for b in ref_blocks])
            m = compare(logits, ref, y)
            m["heldout_loss_delta"] = m["heldout_loss"] - base["heldout_loss"]
            m.update({k: v for k, v in per_block(blocks, ref_blocks).items() if k.startswith("moe_out")})
            emit(f"{q}_bf16_routing", m)
    emit("none", {"train_s": secs, "total_s": time.perf_counter() - t0})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory; rows appended to OUT/quant_quality.csv")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="CI size: a smaller model, 20 steps")
    a = ap.parse_args(argv)
    for name in ("steps", "seq_len", "batch", "eval_windows", "hidden", "ffn", "layers"):
        if getattr(a, name) < (0 if name == "steps" else 1):
            print(f"quant_quality: --{name.replace('_', '-')} must be positive", file=sys.stderr)
            return 2
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    if a.quick:
        run(a.out, steps=20, seq_len=32, batch=8, eval_windows=4, seed=a.seed,
            spec=trained_spec(hidden=64, ffn=128, experts=4))
    else:
        if a.hidden % 4:
            print("quant_quality: --hidden must be a multiple of 4 (4 heads)", file=sys.stderr)
            return 2
        run(a.out, a.steps, a.seq_len, a.batch, a.eval_windows, a.seed,
            spec=trained_spec(hidden=a.hidden, ffn=a.ffn, layers=a.layers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
