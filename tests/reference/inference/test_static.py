"""Static graph (reference/inference/static.py): compiled / exported models equal eager.

CPU, fp32, tiny models; ``aot_eager`` checks graph capture (``fullgraph=True``: any graph break is an
error) without generating C++; one inductor test compiles for real.
"""

from __future__ import annotations

import pytest
import torch

from reference.inference.engine import Engine, InferConfig, random_prompts
from reference.inference.static import (
    ExportModel,
    StaticModel,
    export_model,
    resident_experts,
)
from reference.inference.store import ModelStore, save_model
from reference.model import MoEDecoder
from semoe.presets import model_preset

B, P, G = 2, 9, 6
ROPE_KW = dict(position="rope", kv_heads=2, activation="swiglu", bias=True, norm="rmsnorm",
               tied_embeddings=False, shared_experts=1, moe_every=2, top_k=2)


def setup(tmp_path, **kw):
    spec = model_preset("tiny").replace(layers=4, experts=8, dtype="fp32", **kw)
    model = MoEDecoder(spec, seed=0).eval()
    save_model(model, tmp_path / "store")
    return model, ModelStore.load(tmp_path / "store")


def engine(store, **cfg) -> Engine:
    return Engine(store, InferConfig(**cfg), batch=B, max_len=P + G, prefill_tokens=B * P)


@pytest.mark.parametrize("kw", [ROPE_KW], ids=["rope_gqa_swiglu_shared"])  # learned/GELU: CLI test
def test_compiled_fullgraph_equals_eager(tmp_path, kw):
    model, store = setup(tmp_path, **kw)
    eng = engine(store, mode="resident")
    prompts = random_prompts(B, P, store.spec.vocab)
    ref = eng.generate(prompts, G, keep_logits=True)
    sm = StaticModel(eng.model, resident_experts(eng), B, P + G)
    with torch.no_grad():
        # eager static forward: the engine's logits (same ops; decode attends over the masked cache)
        assert torch.equal(sm.generate(prompts, G), ref.tokens_BG)
        full = sm.prefill(prompts, all_logits=True)
        assert torch.allclose(full, model(prompts).logits_BSV, atol=1e-5, rtol=1e-5)
        # no graph break anywhere in prefill or decode
        for fn, args in ((sm.prefill, (prompts,)), (sm.decode, (prompts[:, :1], torch.tensor([P])))):
            ex = torch._dynamo.explain(fn)(*args)
            assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
        pre, dec = sm.compiled(backend="aot_eager", fullgraph=True)
        eager_last = [sm.prefill(prompts)[:, -1]]
        nxt = eager_last[0].argmax(-1)
        comp_last = [pre(prompts)[:, -1]]
        for s in range(1, G):
            pos = torch.tensor([P + s - 1])
            eager_last.append(sm.decode(nxt.unsqueeze(1), pos)[:, -1])
            comp_last.append(dec(nxt.unsqueeze(1), pos)[:, -1])
            nxt = eager_last[-1].argmax(-1)
    e, c = torch.stack(eager_last), torch.stack(comp_last)
    assert torch.allclose(c, e, atol=1e-5, rtol=1e-5), float((c - e).abs().max())
    r = ref.logits_BGV.transpose(0, 1)
    assert torch.allclose(e, r, atol=1e-5, rtol=1e-5), float((e - r).abs().max())


def test_decode_compiles_once(tmp_path):
    """One decode graph serves every step (position is a tensor; the cache keeps its shape)."""
    _, store = setup(tmp_path)
    eng = engine(store, mode="resident")
    sm = StaticModel(eng.model, resident_experts(eng), B, P + G)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dec = torch.compile(sm.decode, backend=counting, fullgraph=True)
    prompts = random_prompts(B, P, store.spec.vocab)
    with torch.no_grad():
        tok = sm.prefill(prompts)[:, -1].argmax(-1)
        for s in range(1, G):
            tok = dec(tok.unsqueeze(1), torch.tensor([P + s - 1]))[:, -1].argmax(-1)
    assert len(graphs) == 1


@pytest.mark.parametrize("kw", [ROPE_KW], ids=["rope_gqa_swiglu_shared"])
def test_export_dynamic_batch_and_seq(tmp_path, kw):
    model, store = setup(tmp_path, **kw)
    eng = engine(store, mode="resident")
    em = ExportModel(eng.model, resident_experts(eng))
    with torch.no_grad():
        ep = export_model(em, random_prompts(B, P, store.spec.vocab))
        for b, s in ((1, 5), (3, 17), (B, P)):
            idx = random_prompts(b, s, store.spec.vocab, seed=b + s)
            out = ep.module()(idx)
            assert out.shape == (b, s, store.spec.vocab)
            assert torch.allclose(out, model(idx).logits_BSV, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,quant", [("resident", None), ("ring", None), ("expert", None), ("ring", "fp8")])
def test_engine_compile_option_equals_eager(tmp_path, mode, quant):
    _, store = setup(tmp_path, **ROPE_KW)
    prompts = random_prompts(B, P, store.spec.vocab)
    ref = engine(store, mode=mode, slots=1 if mode != "resident" else None, quant=quant).generate(prompts, G, keep_logits=True)
    eng = engine(store, mode=mode, slots=1 if mode != "resident" else None, quant=quant, compile="aot_eager",
                 quant_kernel="fused" if quant else "dequant")
    out = eng.generate(prompts, G, keep_logits=True)
    assert torch.equal(out.tokens_BG, ref.tokens_BG)
    tol = 1e-5 if quant is None else 1e-4
    assert torch.allclose(out.logits_BGV, ref.logits_BGV, atol=tol, rtol=tol), float((out.logits_BGV - ref.logits_BGV).abs().max())
    if mode != "resident":
        assert out.stats["bytes_copied"] > 0


@pytest.mark.slow
def test_inductor_cpu_compile(tmp_path):
    """A real inductor compile (C++ on the CPU, ~45 s on 2 cores) of the decode step equals eager."""
    _, store = setup(tmp_path)
    eng = engine(store, mode="resident")
    sm = StaticModel(eng.model, resident_experts(eng), B, P + G)
    prompts = random_prompts(B, P, store.spec.vocab)
    with torch.no_grad():
        tok = sm.prefill(prompts)[:, -1].argmax(-1)
        ref = sm.decode(tok.unsqueeze(1), torch.tensor([P]))
        sm.cache.k.zero_()
        sm.cache.v.zero_()
        sm.prefill(prompts)
        out = torch.compile(sm.decode, fullgraph=True)(tok.unsqueeze(1), torch.tensor([P]))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_unsupported_gate_raises(tmp_path):
    _, store = setup(tmp_path, gate="switch", top_k=1)
    with pytest.raises(ValueError, match="needs gate 'topk'"):
        engine(store, mode="resident", compile="aot_eager").generate(random_prompts(B, P, store.spec.vocab), 2)
    with pytest.raises(ValueError, match="compile must be one of"):
        InferConfig(compile="fast")


def test_cli_compile_and_fused_flags(tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from reference.infer_cli import register

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    register(app)
    common = ["--model", "tiny", "--init", "random", "--layers", "2", "--batch", "2", "--prompt-len", "5",
              "--gen-len", "3", "--device", "cpu", "--store", str(tmp_path / "store"), "--mode", "ring", "--slots", "1"]
    toks = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"]),
                        ("fused", ["--quant", "fp8", "--quant-kernel", "fused", "--compile", "aot_eager"])):
        res = CliRunner().invoke(app, ["infer", *common, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        toks[name] = m["tokens"]
        if name != "eager":
            assert m["compile"] == "aot_eager" and "compiled (aot_eager)" in res.output
    assert toks["compiled"] == toks["eager"]
    assert m["quant_kernel"] == "fused"


def test_bench_issue11_quick(tmp_path, monkeypatch):
    """The GPU benchmark's code path on a tiny CPU model (so the first GPU run does not die on a typo)."""
    import csv

    from reference.inference import bench

    monkeypatch.setattr("kernels._common.use_triton", lambda *t: False)  # no interpreter: speed
    assert bench.main(["--quick", "--out", str(tmp_path), "--reps", "1", "--batches", "1"]) == 0
    rows = list(csv.DictReader((tmp_path / "infer_rows.csv").open()))
    modes = {r["mode"] for r in rows}
    assert {"resident", "ring", "ring_int8", "ring_int8_fused", "ring_fp8", "ring_fp8_fused", "compiled",
            "ring_compiled"} <= modes
    got = {(r["mode"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("compiled", "tokens_equal_frac_vs_eager")] == 1.0
    assert got[("ring_int8", "bytes_per_block")] < 0.6 * got[("ring", "bytes_per_block")]
    for m in ("ring", "ring_int8", "ring_fp8_fused"):  # K = 1 < L: every block copied once per pass
        assert got[(m, "bytes_copied_per_forward")] == got[("-", "moe_blocks")] * got[(m, "bytes_per_block")]
    assert got[("ring_fp8", "logit_maxabs_vs_bf16_resident")] > 0  # quantization changes the logits a little
    assert set(rows[0]) == set(bench.COLUMNS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("how,mode", [("reduce-overhead", "resident"), ("default", "ring")])
def test_gpu_compiled_equals_eager(tmp_path, how, mode):
    spec = model_preset("tiny").replace(layers=4, experts=8, dtype="bf16", hidden=128, ffn=256, **ROPE_KW)
    save_model(MoEDecoder(spec, seed=0).eval(), tmp_path / "store", dtype=torch.bfloat16)
    store = ModelStore.load(tmp_path / "store")
    prompts = random_prompts(4, 32, spec.vocab)
    kw = dict(mode=mode, device="cuda", slots=1 if mode == "ring" else None)
    ref = Engine(store, InferConfig(**kw), batch=4, max_len=40, prefill_tokens=128).generate(prompts, 8, keep_logits=True)
    eng = Engine(store, InferConfig(compile=how, **kw), batch=4, max_len=40, prefill_tokens=128)
    eng.generate(prompts, 8)  # compile
    out = eng.generate(prompts, 8, keep_logits=True)
    d = (out.logits_BGV - ref.logits_BGV).abs()
    assert float(d[:, 0].max()) < 0.05 * float(ref.logits_BGV.abs().max())  # bf16: fusion changes rounding
    assert float((out.tokens_BG == ref.tokens_BG).float().mean()) >= 0.9
