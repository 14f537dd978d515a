"""simulator.workload.inference_diag: the GPU diagnostic's --quick mode runs every section on the CPU and
writes its tables (so the first GPU run does not die on a typo)."""

from __future__ import annotations

import pandas as pd

from simulator.workload import inference_diag as D


def test_quick_diagnostic_writes_every_table(tmp_path):
    assert D.main(["--out", str(tmp_path), "--quick"]) == 0
    cp = pd.read_csv(tmp_path / "copies.csv")
    assert list(cp["kind"]) == ["block", "experts", "experts", "experts"] and (cp["GBps"] > 0).all()
    assert (cp["bytes"] == cp["experts"] * cp["bytes"].iloc[0] / cp["experts"].iloc[0]).all()
    st = pd.read_csv(tmp_path / "steps.csv")
    assert list(st["case"]) == ["expert_nopred", "expert_nopred", "expert", "resident", "resident", "resident"]
    assert (st["decode_ms_per_step"] > 0).all() and (st.loc[st["case"] == "resident", "copies"] == 0).all()
    tl = pd.read_csv(tmp_path / "timeline.csv")
    assert {"pcie_h2d", "compute"} <= set(tl["resource"]) and (tl["end_s"] >= tl["start_s"]).all()
    for name in ("resident_prefill_B1", "resident_prefill_B4", "expert_decode_B1"):
        assert "Name" in (tmp_path / f"kernels_{name}.txt").read_text()


def test_bad_arguments_exit_2(capsys):
    assert D.main(["--out", "/tmp/x", "--gen-len", "1"]) == 2
    assert "--gen-len" in capsys.readouterr().err
