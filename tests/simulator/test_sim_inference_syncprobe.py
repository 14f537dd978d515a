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


def test_sync_shares_of_the_committed_h100_probe():
    """The H100 sync probe (b57d4eb, tiny widths): each of the 4 host syncs of a resident prefill block (router,
    aux statistics and dispatcher bincounts, the dispatcher's int()) takes a few % of the block's host time,
    ~15% together; none without the file."""
    sh = S.sync_shares()
    assert [seg for seg, _ in sh] == ["moe_0", "moe_1", "moe_3", "moe_4"]
    assert all(0.005 < v < 0.1 for _, v in sh) and 0.1 < sum(v for _, v in sh) < 0.2
    assert dict(sh)["moe_4"] < dict(sh)["moe_0"]  # int() of one value is the lightest
    assert S.sync_shares(S.RESULTS / "absent.csv") == ()


def test_sync_split_serialises_the_sync_latency():
    """`InferConfig.sync_split`: a resident prefill block's host seconds (the probe's) are split into the syncs'
    latency, paid after the device reached each sync, and the kernels' rest. A host-bound pass (device work 0)
    keeps its time; with device work before the router's sync, the latency of the 4 syncs after it lands in the
    serial chain, so the pass is longer by S x the kernels issued while the device was busy; decode unchanged."""
    from sim_helpers import make_cluster

    from semoe import ModelSpec, SpecError
    from simulator.engine import Sim
    from simulator.workload.inference import FixedCosts, InferConfig, InferenceRun
    from simulator.workload.inference_host import HostProbe, host_program

    m = ModelSpec(name="tiny-moe", layers=2, hidden=64, heads=4, vocab=128, max_seq=256, ffn=128, experts=4,
                  top_k=1, activation="swiglu", norm="rmsnorm", position="rope", dtype="bf16")
    prog = host_program(None, "resident", "prefill")
    pass_s = 10e-3
    probe = HostProbe(2, (("resident", "prefill", 1, pass_s, 0.0),))
    split = (("moe_0", 0.06), ("moe_1", 0.04), ("moe_3", 0.04), ("moe_4", 0.01))
    S_ = sum(v for _, v in split)

    def run(costs, sp):
        cfg = InferConfig(mode="resident", prompt_len=16, gen_len=3, host_probe=probe, sync_split=sp)
        return InferenceRun(m, cfg, Sim(make_cluster(gpn=1), profile=None), costs=costs).run()

    flat, cut = run(FixedCosts(0.0), ()), run(FixedCosts(0.0), split)
    assert flat.prefill_s == pytest.approx(pass_s, rel=1e-9)
    # host-bound: the same seconds, less the split of the embedding / head kernels (3 of the pass's)
    rate = pass_s / prog.kernels(2)
    assert cut.prefill_s == pytest.approx(pass_s - S_ * rate * (prog.embedding + prog.head), rel=1e-9)
    assert cut.decode_s == pytest.approx(flat.decode_s, rel=1e-12)  # decode: not split
    att = 5 * pass_s  # device-bound up to the router's sync: the host issued attention + moe_0 meanwhile
    flat, cut = run(FixedCosts(0.0, attention_s=att), ()), run(FixedCosts(0.0, attention_s=att), split)
    before = sum(s.kernels for s in prog.block[:2])  # attention, moe_0: issued under the device's work
    # (the embedding and head kernels, serial, at the split's lower per-kernel rate)
    extra = 2 * S_ * rate * before - S_ * rate * (prog.embedding + prog.head)
    assert cut.prefill_s - flat.prefill_s == pytest.approx(extra, rel=1e-6) and extra > 0
    with pytest.raises(SpecError, match="sync_split"):
        InferConfig(sync_split=(("moe_0", 0.6), ("moe_1", 0.5)))
