"""simulator.workload.inference_syncprobe: the GPU probe's --quick mode runs on the CPU and writes its tables
(so the first GPU run does not die on a typo)."""

from __future__ import annotations

import pandas as pd
import pytest

from simulator.workload import inference_syncprobe as S


def test_quick_probe_marks_every_sync_of_every_block(tmp_path):
    assert S.main(["--out", str(tmp_path), "--quick"]) == 0
    sy = pd.read_csv(tmp_path / "sync.csv")
    assert list(sy.columns) == list(S.SYNC_COLS)
    for (width, B), g in sy.groupby(["width", "batch"]):
        blocks = g[g["block"] >= 0].groupby("block")["marker"].apply(list)
        assert len(blocks) == 2  # the tiny preset's blocks
        for marks in blocks:  # per block: 3 bincount syncs (router, aux statistics, dispatcher), int(n_kept), GEMMs
            assert marks[0] == "block" and marks.count("bincount_call") == 3 and marks.count("int_call") == 1
            assert marks.count("gmm_call") >= 2 and marks.index("int_ret") < marks.index("gmm_call")
        assert (g["host_s"].diff().dropna() >= 0).all()  # markers in host order
    assert set(sy["width"]) == {"tiny", "run"}
    ps = pd.read_csv(tmp_path / "passes.csv")
    assert len(ps) == 4 and (ps[["plain_ms", "instrumented_ms"]] > 0).all().all()
    import torch

    assert torch.bincount.__name__ == "bincount"  # the patches are undone
    sm = S.summarise(tmp_path / "sync.csv")
    for _, g in sm.groupby(["width", "batch"]):
        assert list(g["span"]) == [n for n, _, _ in S.SPANS]  # every span between the syncs, in program order
        assert (g["host_ms"] >= 0).all() and (g["dev_ms"] >= 0).all()
    assert S.main(["--out", str(tmp_path), "--summary"]) == 0


def test_summary_spans_by_hand(tmp_path):
    """Two blocks of hand-placed markers (ms): each span's host and device milliseconds, the last block's rest (it
    ends in the pass's final sync) left out."""
    marks = ["block", "bincount_call", "bincount_ret", "bincount_call", "bincount_ret", "bincount_call",
             "bincount_ret", "int_call", "int_ret", "gmm_call", "gmm_ret", "gmm_call", "gmm_ret"]
    rows, t = [("r", 2, 0, -1, "start", 0.0, 0.0)], 0.0
    for blk in range(2):
        for i, mk in enumerate(marks):
            t += 1.0 + blk  # host: 1 ms between markers in block 0, 2 ms in block 1
            rows.append(("r", 2, 0, blk, mk, t / 1e3, (t + 0.5 * i) / 1e3))  # device lags more at each marker
    rows.append(("r", 2, 0, 1, "end", (t + 5) / 1e3, (t + 9) / 1e3))
    pd.DataFrame(rows, columns=list(S.SYNC_COLS)).to_csv(tmp_path / "sync.csv", index=False)
    sm = S.summarise(tmp_path / "sync.csv").set_index("span")
    assert list(sm.index) == [n for n, _, _ in S.SPANS]
    assert sm.loc["moe_0 sync", "host_ms"] == pytest.approx(1.5)  # mean of 1 and 2 ms
    assert sm.loc["moe_0 sync", "dev_ms"] == pytest.approx(2.0)  # + 0.5 ms device lag per marker
    assert sm.loc["attention+moe_0 issue", "host_ms"] == pytest.approx(1.5)
    # block 0's gmm_call#0 (10 ms; device 14.5) -> block 1's start (10 + 3 x 1 + 2 = 15 ms; device 15); block 1's
    # own rest left out
    assert sm.loc["ffn rest + post issue", "host_ms"] == pytest.approx(5.0)
    assert sm.loc["ffn rest + post issue", "dev_ms"] == pytest.approx(0.5)


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert S.main(["--out", "/tmp/x", "--batches", "0,1"]) == 2
    assert "--batches" in capsys.readouterr().err
    assert S.main(["--out", str(tmp_path), "--summary"]) == 2
    assert "sync.csv not found" in capsys.readouterr().err
