"""semoe plan-inference: resident EP when the model fits the GPUs, offload when it does not, quantised
candidates move fewer bytes, one-line errors (exit 2) on bad input."""

from __future__ import annotations

import json
import math
import warnings

import pandas as pd
import pytest

from semoe import SpecError
from semoe.cli import main
from semoe.presets import model_preset
from simulator.plan_inference import PlanRequest, a2a_seconds, plan

warnings.filterwarnings("ignore", category=UserWarning)
MIX = model_preset("mixtral-8x7b")  # 90 GB of bf16 experts


def by(cands, plan_, quant):
    return next(c for c in cands if c.plan == plan_ and c.quant == quant)


def test_picks_resident_ep_when_the_model_fits():
    cands, best = plan(PlanRequest(MIX, gpus=2, gpu_mem_gb=80, batch=8, gen_len=4, quants=("none",)))
    ep = by(cands, "resident_ep", "none")
    assert ep.fits and ep.gpu_mem_GB < 80 and ep.decode_GB_copied_per_step == 0
    assert best is ep
    assert best.decode_tokens_per_s > 5 * by(cands, "ring", "none").decode_tokens_per_s


def test_picks_offload_when_it_does_not_fit():
    cands, best = plan(PlanRequest(MIX, gpus=1, gpu_mem_gb=40, batch=1, gen_len=4, quants=("none",)))
    assert not by(cands, "resident_ep", "none").fits
    assert best is not None and best.plan in ("ring", "expert") and best.fits
    assert best.plan == "expert"  # decode at batch 1: only the routed experts are copied
    _, best_p = plan(PlanRequest(MIX, gpus=1, gpu_mem_gb=40, batch=1, gen_len=4, quants=("none",),
                                 objective="prefill"))
    assert best_p.plan in ("ring", "expert")


def test_quantised_candidates_move_fewer_bytes():
    cands, best = plan(PlanRequest(MIX.replace(layers=8), gpus=1, gpu_mem_gb=12, batch=2, gen_len=4))
    for mode in ("ring", "expert"):
        bf, i8, f8 = (by(cands, mode, q) for q in ("none", "int8", "fp8"))
        assert i8.host_mem_GB < 0.51 * bf.host_mem_GB and f8.host_mem_GB == pytest.approx(i8.host_mem_GB)
        assert i8.decode_GB_copied_per_step < bf.decode_GB_copied_per_step
    assert by(cands, "ring", "int8").prefill_tokens_per_s > 1.5 * by(cands, "ring", "none").prefill_tokens_per_s
    assert best.quant in ("int8", "fp8")


def test_nothing_fits():
    cands, best = plan(PlanRequest(MIX, gpus=1, gpu_mem_gb=2, quants=("none",), gen_len=4))
    assert best is None and not any(c.fits for c in cands)
    assert all(math.isnan(c.decode_tokens_per_s) or not c.fits for c in cands)


def test_all_to_all_grows_with_bytes():
    from semoe import cluster_preset

    c = cluster_preset("dgx-h100")
    assert a2a_seconds(c, 1, 1e6) == 0.0
    assert 0 < a2a_seconds(c, 8, 1e6) < a2a_seconds(c, 8, 1e8)


def test_cli_writes_table_and_files(tmp_path, capsys):
    out = tmp_path / "plan.csv"
    rc = main(["plan-inference", "--model", "mixtral-8x7b", "--gpus", "2", "--gpu-mem-gb", "80", "--batch", "4",
               "--gen-len", "4", "--quant", "int8", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "recommended (objective: decode tokens/s)" in text and "resident_ep" in text
    d = pd.read_csv(out)
    assert len(d) == 3 and d["recommended"].sum() == 1 and set(d["quant"]) == {"int8"}
    js = tmp_path / "plan.json"
    assert main(["plan-inference", "--model", "mixtral-8x7b", "--gpus", "1", "--gpu-mem-gb", "40", "--gen-len", "4",
                 "--quant", "fp8", "--objective", "prefill", "--out", str(js)]) == 0
    j = json.loads(js.read_text())
    assert j["recommended"]["plan"] in ("ring", "expert", "resident_ep") and len(j["candidates"]) == 3


@pytest.mark.parametrize("args, word", [
    (["--gpus", "0", "--gpu-mem-gb", "80"], "gpus"),
    (["--gpus", "1", "--gpu-mem-gb", "-5"], "gpu-mem-gb"),
    (["--gpus", "1", "--gpu-mem-gb", "80", "--quant", "int4"], "quant"),
    (["--gpus", "1", "--gpu-mem-gb", "80", "--objective", "latency"], "objective"),
    (["--gpus", "1", "--gpu-mem-gb", "80", "--gen-len", "1"], "gen-len"),
    (["--gpus", "1", "--gpu-mem-gb", "80", "--out", "x.txt"], "out"),
])
def test_bad_input_one_line_exit_2(args, word, capsys):
    assert main(["plan-inference", "--model", "mixtral-8x7b", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and word in err


def test_unknown_model_exit_2(capsys):
    assert main(["plan-inference", "--model", "nope", "--gpus", "1", "--gpu-mem-gb", "80"]) == 2


def test_request_validation():
    with pytest.raises(SpecError, match="MoE"):
        PlanRequest(_dense(), 1, 80)


def _dense():
    class Dense:  # a model without MoE layers (ModelSpec forbids experts = 0)
        name, moe_layers = "dense", 0

    return Dense()


def test_dequant_path_and_expert_parallel_dequant():
    kw = {"gpus": 4, "gpu_mem_gb": 40, "batch": 8, "gen_len": 4, "quants": ("int8",)}
    ws, _ = plan(PlanRequest(MIX, **kw))
    fu, _ = plan(PlanRequest(MIX, dequant="fused", **kw))
    ep_ws, ep_fu = by(ws, "resident_ep", "int8"), by(fu, "resident_ep", "int8")
    assert ep_fu.decode_tokens_per_s > ep_ws.decode_tokens_per_s  # no dequant pass
    assert ep_fu.gpu_mem_GB == pytest.approx(ep_ws.gpu_mem_GB)  # the workspace is reserved either way
    # a GPU of the EP group dequantises its 2 of 8 experts: far cheaper than one GPU dequantising 8
    one = by(plan(PlanRequest(MIX, gpus=1, gpu_mem_gb=80, batch=2, gen_len=4, quants=("int8",)))[0], "resident_ep", "int8")
    assert ep_ws.prefill_tokens_per_s / 4 > 0.9 * one.prefill_tokens_per_s
    with pytest.raises(SpecError, match="dequant"):
        PlanRequest(MIX, 1, 80, dequant="magic")
