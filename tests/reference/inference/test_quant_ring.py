"""Quantized expert weights in the ring / expert-aware / resident modes (``InferConfig(quant=...)``).

CPU, tiny models. What is checked:

* exactness: the quantized ring computes with exactly the weights of the quantize-dequantize round
  trip, i.e. its logits equal ``MoEDecoder`` with ``quantize_model_experts_`` applied (bitwise);
* error vs the unquantized ring within a tolerance derived from the format's bound (see
  :func:`logit_tol`), int8 finer than fp8, and greedy tokens identical wherever the unquantized
  top-1/top-2 margin exceeds twice that tolerance;
* bytes: every copy moves the quantized data + fp32 scales (+ biases), ~half of bf16;
* expert-aware (with and without prediction / fallback) and resident equal the ring exactly with quant;
* ``semoe infer --quant``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from reference.inference.engine import Engine, InferConfig, plan_memory, random_prompts
from reference.inference.quantize import FORMATS, FP8_REL_ERR, INT8_MAX, quantize_model_experts_, quantize_store
from reference.inference.store import ModelStore, save_model
from reference.model import MoEDecoder
from semoe.model_spec import ModelSpec
from semoe.presets import model_preset

BATCH, PROMPT, GEN = 2, 9, 6
MAX_LEN = PROMPT + GEN
ROPE_KW = dict(position="rope", kv_heads=2, activation="swiglu", bias=True, norm="rmsnorm",
               tied_embeddings=False, shared_experts=1, moe_every=2, top_k=2)
ARCHS = pytest.mark.parametrize("kw", [{}, ROPE_KW], ids=["learned_gelu", "rope_gqa_swiglu_shared"])


def tiny(**kw) -> ModelSpec:
    base = dict(layers=4, experts=8, dtype="fp32")
    base.update(kw)
    return model_preset("tiny").replace(**base)


def make_store(tmp_path, spec: ModelSpec, seed: int = 0, dtype: torch.dtype | None = None):
    model = MoEDecoder(spec, seed=seed).eval()
    save_model(model, tmp_path / "store", dtype=dtype)
    return model, ModelStore.load(tmp_path / "store")


def engine(store: ModelStore, batch: int = BATCH, prompt: int = PROMPT, **cfg) -> Engine:
    return Engine(store, InferConfig(**cfg), batch=batch, max_len=prompt + GEN, prefill_tokens=batch * prompt)


def budget_gb(store: ModelStore, expert_slots: int, quant: str | None) -> float:
    p = plan_memory(store, "ring", 1 << 50, BATCH, MAX_LEN, BATCH * PROMPT, quant=quant)
    return (p.dense_bytes + p.kv_bytes + p.act_bytes + p.workspace_bytes + expert_slots * p.expert_bytes + 1) / 1e9


def rel_bound(fmt: str) -> float:
    """The format's worst-case weight error relative to the weight's column max (module doc of
    quantize.py): int8 ``scale / 2 = amax / 254``; fp8 ``2^-4 |w| <= 2^-4 amax`` (normal range; the
    subnormal bound ``2^-10 scale`` is far smaller)."""
    return 0.5 / INT8_MAX if fmt == "int8" else FP8_REL_ERR


def logit_tol(fmt: str, ref_logits: torch.Tensor, moe_blocks: int) -> float:
    """First-order error budget: each MoE block's expert weights carry a relative error <= rel_bound,
    so its contribution to the residual stream errs by at most that fraction of its size; over
    ``moe_blocks`` blocks and carried (to first order linearly) to the logits this is
    ``moe_blocks * rel_bound * max|logits|``. A budget, not a rigorous bound (norms and attention can
    amplify); the tests also check the exact round-trip equality that makes the budget meaningful."""
    return moe_blocks * rel_bound(fmt) * float(ref_logits.abs().max())


def margin(logits: torch.Tensor) -> torch.Tensor:
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


# ------------------------------------------------------------------------------- accuracy
@ARCHS
def test_quant_ring_equals_round_trip_and_within_bound(tmp_path, kw):
    spec = tiny(**kw)
    model, store = make_store(tmp_path, spec)
    L = len(store.moe_blocks)
    idx = random_prompts(BATCH, PROMPT, spec.vocab, seed=3)
    base = engine(store, mode="ring", slots=2)
    ref = base.forward(idx)
    ref_gen = base.generate(idx, GEN, keep_logits=True)
    errs = {}
    for fmt in FORMATS:
        eng = engine(store, mode="ring", slots=2, quant=fmt)
        logits = eng.forward(idx)
        # exactly the weights of the quantize-dequantize round trip (same dequantized values)
        qmodel = copy.deepcopy(model)
        quantize_model_experts_(qmodel, fmt)
        with torch.no_grad():
            assert torch.equal(logits, qmodel(idx).logits_BSV), fmt
        tol = logit_tol(fmt, ref, L)
        errs[fmt] = float((logits - ref).abs().max())
        assert 0 < errs[fmt] <= tol, (fmt, errs[fmt], tol)
        # greedy choice unchanged wherever the unquantized margin exceeds twice the tolerance
        safe = margin(ref) > 2 * tol
        assert torch.equal(logits.argmax(-1)[safe], ref.argmax(-1)[safe]), fmt
        # generation (KV-cache decode): same bound per step; tokens identical where the margin allows
        gen = eng.generate(idx, GEN, keep_logits=True)
        if float(margin(ref_gen.logits_BGV).min()) > 2 * tol:
            assert torch.equal(gen.tokens_BG, ref_gen.tokens_BG), fmt
            assert float((gen.logits_BGV - ref_gen.logits_BGV).abs().max()) <= tol, fmt
        else:  # a near tie somewhere: tokens may flip, the first step (same prompt) still obeys the bound
            assert float((gen.logits_BGV[:, 0] - ref_gen.logits_BGV[:, 0]).abs().max()) <= tol, fmt
    assert errs["int8"] < errs["fp8"]  # 7-bit per-channel grid is finer than e4m3's 3 mantissa bits


def test_quant_tokens_identical_when_margin_allows(tmp_path):
    """int8 on the learned/GELU tiny at batch 1: the margin does allow it, so tokens must agree."""
    spec = tiny()
    _, store = make_store(tmp_path, spec, seed=1)
    idx = random_prompts(1, PROMPT, spec.vocab, seed=0)
    ref = engine(store, batch=1, mode="ring", slots=1).generate(idx, GEN, keep_logits=True)
    tol = logit_tol("int8", ref.logits_BGV, len(store.moe_blocks))
    assert float(margin(ref.logits_BGV).min()) > 2 * tol  # the premise of this test (seeded)
    q = engine(store, batch=1, mode="ring", slots=1, quant="int8").generate(idx, GEN, keep_logits=True)
    assert torch.equal(q.tokens_BG, ref.tokens_BG)
    assert 0 < float((q.logits_BGV - ref.logits_BGV).abs().max()) <= tol


# ---------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_bytes_copied(tmp_path, fmt):
    spec = tiny(dtype="bf16")
    _, store = make_store(tmp_path, spec, dtype=torch.bfloat16)
    L, E = len(store.moe_blocks), spec.experts
    qlayer_bytes = next(iter(quantize_store(store, fmt).values())).nbytes  # data + fp32 scales
    bf16_layer = store.expert_bytes * E
    idx = random_prompts(BATCH, PROMPT, spec.vocab)
    for K in (1, 2):
        eng = engine(store, mode="ring", slots=K, quant=fmt)
        eng.generate(idx, GEN)
        assert eng.pool.expert_nbytes * E == qlayer_bytes
        assert eng.pool.copies == GEN * L + K
        assert eng.pool.bytes_copied == (GEN * L + K) * qlayer_bytes
        h2d = [r for r in eng.timeline.rows() if r.phase == "h2d_experts"]
        assert len(h2d) == GEN * L + K and all(r.bytes == qlayer_bytes for r in h2d)
        plain = engine(store, mode="ring", slots=K)
        plain.generate(idx, GEN)
        ratio = plain.pool.bytes_copied / eng.pool.bytes_copied
        D, F = spec.hidden, spec.ffn  # w1 (I=D, O=F), w2 (I=F, O=D): bf16 2*I*O vs I*O + 4*O each
        assert ratio == pytest.approx(2 * 2 * D * F / (2 * D * F + 4 * (F + D)))
        assert 1.85 < ratio < 2.0
        # device pool: quantized slots (1 byte per weight) + one block's bf16 workspace
        assert eng.pool.tensors["w1_EDF"].element_size() == 1
        assert eng.pool.workspace["w1_EDF"].dtype == torch.bfloat16
        assert eng.plan.quant == fmt and eng.plan.workspace_bytes == bf16_layer
    # a budget of K bf16 blocks: quantized, one bf16 block goes to the workspace, the rest to slots of
    # quantized blocks (~1.9x as many per byte)
    for K in (2, 3, 4):
        gb = budget_gb(store, K * E, None)
        assert engine(store, mode="ring", gpu_budget_gb=gb).plan.ring_slots == K
        want = min(L, (K - 1) * bf16_layer // qlayer_bytes)
        assert engine(store, mode="ring", gpu_budget_gb=gb, quant=fmt).plan.ring_slots == want


# ---------------------------------------------------------------------- mode equivalence
@ARCHS
@pytest.mark.parametrize("fmt", FORMATS)
def test_expert_aware_equals_ring_with_quant(tmp_path, kw, fmt):
    spec = tiny(**kw)
    _, store = make_store(tmp_path, spec, seed=2)
    E, L = spec.experts, len(store.moe_blocks)
    idx = random_prompts(BATCH, PROMPT, spec.vocab, seed=3)
    cfgs = {
        "ring_K1": dict(mode="ring", slots=1),
        "ring_K2": dict(mode="ring", slots=2),
        "expert_small": dict(mode="expert", gpu_budget_gb=budget_gb(store, E + 2, fmt), fallback_frac=1.0),
        "expert_predict": dict(mode="expert", gpu_budget_gb=budget_gb(store, E + 3, fmt), fallback_frac=1.0,
                               predict=True),
        "expert_fallback": dict(mode="expert", gpu_budget_gb=budget_gb(store, 2 * E + 1, fmt)),
        "resident": dict(mode="resident"),
    }
    results, engines = {}, {}
    for name, c in cfgs.items():
        eng = engines[name] = engine(store, quant=fmt, **c)
        results[name] = eng.generate(idx, GEN, keep_logits=True)
    assert engines["expert_small"].plan.pool_slots == E + 2
    assert results["expert_small"].stats["expert_passes"] == GEN  # every pass expert-aware
    assert results["expert_fallback"].stats["ring_passes"] >= 1
    first = results["ring_K1"]
    for name, r in results.items():
        assert r.stats["quant"] == fmt
        assert torch.equal(r.tokens_BG, first.tokens_BG), name
        assert torch.equal(r.logits_BGV, first.logits_BGV), name
    # expert-aware copies count quantized experts too
    s = results["expert_small"].stats
    assert s["bytes_copied"] == (s["expert_misses"] + s["experts_prefetched"]) * engines["expert_small"].pool.expert_nbytes
    assert engines["expert_small"].pool.expert_nbytes * E * 1.5 < store.expert_bytes * E  # fp32 store: ~1/4
    del L


def test_bad_quant_format(tmp_path):
    _, store = make_store(tmp_path, tiny())
    with pytest.raises(ValueError, match="quant must be None or one of"):
        InferConfig(quant="int4")
    with pytest.raises(ValueError, match="quant must be None or one of"):
        plan_memory(store, "ring", 1 << 40, 1, 8, 8, quant="nf4")


# -------------------------------------------------------------------------------------- CLI
def test_cli_quant_flag(tmp_path):
    from reference.infer_cli import register

    app = typer.Typer(pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    register(app)
    common = ["--model", "tiny", "--init", "random", "--layers", "2", "--dtype", "bf16", "--batch", "2",
              "--prompt-len", "5", "--gen-len", "3", "--device", "cpu", "--store", str(tmp_path / "store")]
    metrics = {}
    for q in (None, "int8", "fp8"):
        out = tmp_path / f"run_{q}"
        args = ["infer", *common, "--out", str(out), "--mode", "ring", "--slots", "1"]
        if q:
            args += ["--quant", q]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert (f"({q} experts)" in res.output) == bool(q)
        metrics[q] = json.loads((out / "metrics.json").read_text())
        assert metrics[q]["quant"] == q and metrics[q]["plan"]["quant"] == q
    for q in FORMATS:
        assert metrics[None]["bytes_copied"] / metrics[q]["bytes_copied"] > 1.8
    # expert-aware with --quant
    res = CliRunner().invoke(app, ["infer", *common, "--out", str(tmp_path / "e"), "--mode", "expert", "--quant", "int8"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["infer", *common, "--out", str(tmp_path / "bad"), "--quant", "int4"])
    assert isinstance(res.exception, ValueError) and "--quant" in str(res.exception)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_quant_modes_identical(tmp_path):
    """CUDA, bf16, pinned host: quantized ring / expert-aware / resident bitwise identical; close to
    the unquantized ring; ~half the bytes copied."""
    spec = tiny(hidden=256, heads=4, ffn=512, layers=6, experts=8, dtype="bf16", **{
        k: v for k, v in ROPE_KW.items() if k not in ("bias",)})
    model = MoEDecoder(spec, seed=0).to(dtype=torch.bfloat16).eval()
    save_model(model, tmp_path / "store")
    store = ModelStore.load(tmp_path / "store")
    assert store.pinned
    E = spec.experts
    idx = random_prompts(BATCH, PROMPT, spec.vocab, seed=3)
    plain = engine(store, mode="ring", slots=2)
    ref = plain.forward(idx).float().cpu()
    plain_bytes = plain.pool.bytes_copied
    for fmt in FORMATS:
        assert all(t.is_pinned() for ql in store.quantized_layers(fmt).values() for t in ql.host_tensors().values())
        cfgs = {
            "ring_K1": dict(mode="ring", slots=1),
            "ring_K2": dict(mode="ring", slots=2),
            "expert_small": dict(mode="expert", gpu_budget_gb=budget_gb(store, E + 2, fmt), fallback_frac=1.0),
            "expert_predict": dict(mode="expert", gpu_budget_gb=budget_gb(store, E + 3, fmt), fallback_frac=1.0,
                                   predict=True),
            "expert_fallback": dict(mode="expert", gpu_budget_gb=budget_gb(store, 2 * E + 1, fmt)),
            "resident": dict(mode="resident"),
        }
        results = {}
        for name, c in cfgs.items():
            eng = engine(store, quant=fmt, **c)
            assert eng.device.type == "cuda" and eng.pool.tensors["w1_EDF"].is_cuda
            if name == "ring_K2":
                logits = eng.forward(idx).float().cpu()
                # the bf16 logits' own rounding (2e-2) on top of the format's budget
                tol = logit_tol(fmt, ref, len(store.moe_blocks)) + 2e-2
                assert float((logits - ref).abs().max()) <= tol, fmt
                assert 1.8 < plain_bytes / eng.pool.bytes_copied < 2.0
            results[name] = eng.generate(idx, GEN, keep_logits=True)
            eng.close()
        first = results["ring_K1"]
        for name, r in results.items():
            assert torch.equal(r.tokens_BG, first.tokens_BG), (fmt, name)
            assert torch.equal(r.logits_BGV, first.logits_BGV), (fmt, name)
