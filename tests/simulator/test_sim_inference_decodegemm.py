"""The decode-shape expert FFN probe (``simulator.workload.inference_decodegemm``) on the CPU (plumbing only)."""

from __future__ import annotations

import pandas as pd
import pytest

from simulator.workload import inference_decodegemm as D


def test_routed_counts_are_top_k_distinct_per_token():
    c = D.routed_counts(16, 8, 2, seed=3)
    assert c.sum() == 32 and c.max() <= 16 and len(c) == 8
    assert D.routed_counts(16, 8, 2, seed=3).tolist() == c.tolist()  # seeded


def test_quick_run_rows(tmp_path):
    assert D.main(["--out", str(tmp_path), "--quick", "--batches", "1,4", "--seeds", "2", "--calls", "1"]) == 0
    d = pd.read_csv(tmp_path / "decode_gemm.csv")
    assert len(d) == 2 * 2 * 2 and set(d["call"]) == {"ring", "pool"}
    assert (d["rows"] == 2 * d["batch"]).all()  # top-2 of the tiny preset
    assert (d["groups"] <= d["rows"]).all() and (d["device_s"] > 0).all() and (d["sim_s"] > 0).all()
    assert (d.loc[d["call"] == "pool", "slots"] == 24).all()
    # the simulator's price grows with the experts the batch touches
    g = d[d["call"] == "ring"].groupby("groups")["sim_s"].mean()
    assert g.is_monotonic_increasing


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        D.main(["--out", str(tmp_path), "--quick", "--calls", "0"])


def test_quick_engine_steps(tmp_path):
    assert D.main(["--out", str(tmp_path), "--quick", "--batches", "1,2", "--seeds", "1", "--calls", "1",
                   "--engine-steps", "--store", str(tmp_path / "store"), "--steps", "2"]) == 0
    d = pd.read_csv(tmp_path / "decode_steps.csv")
    assert list(d["batch"]) == [1, 2] and (d["device_s_per_block"] > 0).all() and (d["wall_s_per_step"] > 0).all()
