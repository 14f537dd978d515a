"""simulator.workload.inference_decodeprobe: the GPU probe's --quick mode runs on the CPU and writes its tables
(so the first GPU run does not die on a typo); the per-block split computed from hand-placed markers."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from simulator.workload import inference_decodeprobe as D

# program order of one expert-aware decode block's markers (each pair: its call before its return)
ORDER = ("block", "experts_call", "unique_call", "tolist_ret", "fetch_call", "fetch_ret", "remap_call", "remap_ret",
         "gmm_call", "experts_ret")


def test_quick_probe_marks_every_block_of_every_step(tmp_path):
    import torch

    import reference.inference.engine as engine_mod

    orig = (torch.unique, torch.Tensor.tolist, engine_mod.remap, torch.bincount, torch._grouped_mm)
    assert D.main(["--out", str(tmp_path), "--quick"]) == 0
    sy = pd.read_csv(tmp_path / "decode_sync.csv")
    assert list(sy.columns) == list(D.SYNC_COLS)
    assert set(sy["width"]) == {"tiny", "run"} and set(sy["mode"]) == set(D.MODES) and set(sy["batch"]) == {1, 2}
    for (width, mode, B, rep), g in sy.groupby(["width", "mode", "batch", "rep"]):
        assert (g["host_s"].diff().dropna() >= 0).all()  # markers in host order
        assert g["marker"].iloc[0] == "start" and g["marker"].iloc[-1] == "end"
        assert list(g.loc[g["marker"] == "step", "step"]) == [1, 2]  # --quick: gen-len 3, 2 decode steps
        blocks = g[g["block"] >= 0].groupby(["step", "block"], sort=False)
        assert len(blocks) == 4  # the tiny preset's 2 blocks x 2 steps
        for (step, blk), b in blocks:
            marks = list(b["marker"])
            idx = [marks.index(m) for m in ORDER]
            assert idx == sorted(idx), marks  # the block's markers in program order
            assert marks.count("fetch_call") == 1 and marks.count("remap_call") == 1 and marks.count("int_call") == 1
            assert marks.count("bincount_call") == marks.count("bincount_ret") >= 3  # router, remap, dispatcher
            n = b.loc[b["marker"] == "fetch_ret", "n_copied"]
            assert n.notna().all() and (n >= 0).all()
            assert b["n_copied"].notna().sum() == marks.count("fetch_ret") + marks.count("prefetch_ret")
            # mode expert: block 0 predicts and prefetches block 1 after its MoE; the last block has no next
            assert marks.count("prefetch_call") == (1 if mode == "expert" and blk == 0 else 0)
            if mode == "expert" and blk == 0:
                assert marks.index("prefetch_call") > marks.index("experts_ret")
    assert (torch.unique, torch.Tensor.tolist, engine_mod.remap, torch.bincount, torch._grouped_mm) == orig
    assert "tolist" not in torch.Tensor.__dict__  # the patches are undone

    ps = pd.read_csv(tmp_path / "decode_passes.csv")
    assert list(ps.columns) == list(D.PASS_COLS) and len(ps) == 8
    assert (ps[["plain_ms_per_step", "instrumented_ms_per_step"]] > 0).all().all()
    # the same prompts through a fresh engine: the same routing, the same copies; markers count all of them
    assert (ps["plain_experts_copied"] == ps["instrumented_experts_copied"]).all()
    assert ps["plain_experts_copied"].sum() > 0
    fetched = sy[sy["marker"].isin(["fetch_ret", "prefetch_ret"])].groupby(["width", "mode", "batch"])["n_copied"].sum()
    assert dict(fetched) == dict(ps.set_index(["width", "mode", "batch"])["instrumented_experts_copied"])

    tl = pd.read_csv(tmp_path / "decode_timeline.csv")
    assert list(tl.columns) == list(D.TL_COLS)
    assert set(tl["phase"]) >= {"moe_expert", "h2d_experts"} and (tl["end_s"] >= tl["start_s"]).all()
    assert tl.loc[tl["resource"] == "pcie_h2d", "bytes"].gt(0).all()

    sm = D.summarise(tmp_path / "decode_sync.csv")
    for (width, mode, B), g in sm.groupby(["width", "mode", "batch"]):
        names = [n for n in g["span"] if not n.endswith("(step boundary)")]
        want = [n for n in D.SPAN_NAMES if mode == "expert" or n != "predict+prefetch"]
        assert names == want  # every span, in program order
        assert (g["host_ms"] >= 0).all() and (g["dev_ms"] >= 0).all()
    sp = D.split(tmp_path / "decode_sync.csv", tmp_path / "decode_timeline.csv")
    assert list(sp.columns) == list(D.SPLIT_COLS) and len(sp) == 8
    assert (sp["blocks"] == 3).all()  # 4 blocks but the pass's last
    for c in ("before_fetch_ms", "fetch_call_ms", "post_copy_wait_ms", "post_copy_host_ms", "gap_next_ms"):
        assert (sp[c] >= 0).all() and (sp[c] < sp["block_ms"]).all()
    assert (sp["copy_ms"] > 0).any()
    assert D.main(["--out", str(tmp_path), "--summary"]) == 0
    assert (tmp_path / "summary.txt").read_text().count("per-block split") == 1


def _hand_pass(tmp_path):
    """One pass (mode expert, 2 steps x 2 blocks) of hand-placed markers in ms: host 1 ms apart, the device 0.5 ms
    behind, 3 ms behind at the fetch's return (the copies) and 4 ms at the MoE's return; block 0 prefetches 1
    expert for block 1; each step's block 0 fetches 2 experts (copy span 2 ms, 2 MB), block 1 none."""
    b0 = ("block", "experts_call", "unique_call", "unique_ret", "tolist_call", "tolist_ret", "fetch_call",
          "fetch_ret", "remap_call", "remap_ret", "gmm_call", "gmm_ret", "experts_ret", "prefetch_call", "prefetch_ret")
    lag = {"fetch_ret": 3.0, "remap_call": 3.0, "remap_ret": 3.0, "gmm_call": 3.0, "gmm_ret": 3.0,
           "experts_ret": 4.0, "prefetch_call": 4.0, "prefetch_ret": 4.0}
    key = ("r", "expert", 1, 0)
    rows, tl = [(*key, 0, -1, "start", 0.0, 0.0, None)], []
    for step in (1, 2):
        base = 40.0 * (step - 1)
        rows.append((*key, step, -1, "step", (base + 0.1) / 1e3, (base + 0.6) / 1e3, None))
        for blk in (0, 1):
            t0 = base + 15 * blk  # block 0: 1..15 ms, block 1: 16..28 ms
            for i, mk in enumerate(b0 if blk == 0 else b0[:-2]):
                h = t0 + 1 + i
                n = {"fetch_ret": 2 if blk == 0 else 0, "prefetch_ret": 1}.get(mk)
                rows.append((*key, step, blk, mk, h / 1e3, (h + lag.get(mk, 0.5)) / 1e3, n))
        rows.append((*key, step, 1, "step_ret", (base + 29) / 1e3, (base + 33.5) / 1e3, None))
        tl.append((*key, step, 0, "h2d_experts", "pcie_h2d", (base + 8.2) / 1e3, (base + 10.2) / 1e3, 2_000_000))
        tl.append((*key, step, 0, "moe_expert", "compute", (base + 2.5) / 1e3, (base + 17) / 1e3, 0))
        tl.append((*key, step, 1, "h2d_prefetch", "pcie_h2d", (base + 14.1) / 1e3, (base + 15.1) / 1e3, 1_000_000))
    rows.append((*key, 2, 1, "end", 70 / 1e3, 74 / 1e3, None))
    pd.DataFrame(rows, columns=list(D.SYNC_COLS)).to_csv(tmp_path / "decode_sync.csv", index=False)
    pd.DataFrame(tl, columns=list(D.TL_COLS)).to_csv(tmp_path / "decode_timeline.csv", index=False)


def test_summary_spans_by_hand(tmp_path):
    _hand_pass(tmp_path)
    sm = D.summarise(tmp_path / "decode_sync.csv").set_index("span")
    assert sm.loc["fetch call", "host_ms"] == pytest.approx(1.0) and sm.loc["fetch call", "blocks"] == 4
    assert sm.loc["fetch call", "dev_ms"] == pytest.approx(3.5)  # the device passed the copies' wait 3.5 ms later
    assert sm.loc["remap (1st sync after copies)", "host_ms"] == pytest.approx(1.0)
    assert sm.loc["predict+prefetch", "blocks"] == 2 and sm.loc["predict+prefetch", "host_ms"] == pytest.approx(2.0)
    # within a step: block 0's MoE return (13 ms) -> block 1 (16 ms); across: step 1's block 1 (28) -> 40 + 1 ms
    assert sm.loc["gap to next block", "host_ms"] == pytest.approx(3.0) and sm.loc["gap to next block", "blocks"] == 2
    assert sm.loc["gap to next block (step boundary)", "host_ms"] == pytest.approx(13.0)
    assert sm.loc["gap to next block (step boundary)", "blocks"] == 1
    assert sm.loc["block total", "host_ms"] == pytest.approx(15.0)
    assert list(sm.index[:3]) == ["attention issue", "router issue+syncs", "unique+tolist sync"]


def test_split_by_hand(tmp_path):
    _hand_pass(tmp_path)
    sp = D.split(tmp_path / "decode_sync.csv", tmp_path / "decode_timeline.csv")
    assert len(sp) == 1
    r = sp.iloc[0]
    assert r["blocks"] == 3  # step 1's blocks, step 2's block 0 (step 2's block 1 has no next block)
    assert r["experts_copied"] == pytest.approx(5 / 3)  # 2 fetched; 1 prefetched for step 1's block 1; 2
    assert r["before_fetch_ms"] == pytest.approx(6.0)  # block (1 ms) -> fetch call (7 ms)
    assert r["fetch_call_ms"] == pytest.approx(1.0)
    assert r["post_copy_wait_ms"] == pytest.approx(2.0)  # fetch return (8) -> remap return (10)
    assert r["post_copy_host_ms"] == pytest.approx(5.0)  # fetch return (8) -> MoE return (13)
    assert r["post_copy_dev_ms"] == pytest.approx(6.0)  # device: 8 + 3 -> 13 + 4
    # block 0 -> block 1: 3 ms; step 1's block 1 (MoE return 28 ms) -> step 2's block 0 (41 ms): 13 ms
    assert r["gap_next_ms"] == pytest.approx((3 + 13 + 3) / 3)
    assert r["block_ms"] == pytest.approx((15 + 25 + 15) / 3)
    assert r["copy_ms"] == pytest.approx(5 / 3)  # 2 ms, the 1 ms prefetch for block 1, 2 ms
    assert r["copy_GBps"] == pytest.approx(1.0)  # 5 MB in 5 ms
    assert r["copy_wait_dev_ms"] == pytest.approx(0.8)  # copy end 10.2 ms, the device at the fetch's return 11
    assert r["non_copy_ms"] == pytest.approx(r["block_ms"] - r["copy_ms"])
    no_tl = D.split(tmp_path / "decode_sync.csv").iloc[0]
    assert no_tl["copy_ms"] == 0 and math.isnan(no_tl["copy_GBps"]) and math.isnan(no_tl["copy_wait_dev_ms"])


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert D.main(["--out", str(tmp_path), "--batches", "0,1"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert D.main(["--out", str(tmp_path), "--gen-len", "1"]) == 2
    assert "--gen-len" in capsys.readouterr().err
    assert D.main(["--out", str(tmp_path), "--modes", "ring"]) == 2
    assert "--modes" in capsys.readouterr().err
    assert D.main(["--out", str(tmp_path), "--summary"]) == 2
    assert "decode_sync.csv not found" in capsys.readouterr().err


def test_tiny_wait_delays_each_copied_expert(tmp_path):
    """Width tiny_wait: every fetch holds its copies --wait-ms-per-expert per copied expert (on the CPU the host
    sleeps inside the fetch call), the engine and its routing otherwise the tiny width's."""
    assert D.main(["--out", str(tmp_path), "--quick", "--widths", "tiny_wait", "--modes", "expert_nopred",
                   "--wait-ms-per-expert", "5"]) == 0
    sy = pd.read_csv(tmp_path / "decode_sync.csv")
    assert set(sy["width"]) == {"tiny_wait"}
    calls = sy[sy["marker"] == "fetch_call"].reset_index(drop=True)
    rets = sy[sy["marker"] == "fetch_ret"].reset_index(drop=True)
    ms = 1e3 * (rets["host_s"] - calls["host_s"])
    assert (rets["n_copied"] > 0).any()
    assert (ms >= 5.0 * rets["n_copied"] - 1e-6).all()  # n x 5 ms at least
    assert (ms[rets["n_copied"] == 0] < 5.0).all()  # no copy, no delay
    assert D.main(["--out", str(tmp_path), "--wait-ms-per-expert", "-1"]) == 2
