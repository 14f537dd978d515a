"""kernels.collective_host: the host-dispatch probe of back-to-back collective calls, on the CPU (gloo, world 1)."""

from __future__ import annotations

import pandas as pd
import pytest

from kernels import collective_host as H
from kernels.profile import COLUMNS


def test_quick_probe_on_gloo_world_one(tmp_path, monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    assert H.main(["--out", str(tmp_path), "--backend", "gloo", "--quick", "--bytes", "1000"]) == 0
    df = pd.read_csv(tmp_path / "collective_host.csv")
    assert list(df.columns) == COLUMNS
    want = {f"host_{kind}_{c}" for kind in ("call", "issue") for c in H.COLLECTIVES}
    assert set(df["op"]) == want and len(df) == len(want)
    assert (df["impl"] == "gloo").all() and (df["n"] == 1).all() and (df["k"] == 5).all()
    assert (df["m"] == 1000).all()  # 250 fp32 elements: whole elements per rank
    assert (df["time_s"] > 0).all() and (df["time_s"] < 0.05).all()
    # on the CPU the interval is the host's: both clocks give the same number
    t = dict(zip(df["op"], df["time_s"]))
    for c in H.COLLECTIVES:
        assert t[f"host_call_{c}"] == pytest.approx(t[f"host_issue_{c}"])


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert H.main(["--out", str(tmp_path), "--collectives", "all_reduce,broadcast"]) == 2
    assert "unknown collective 'broadcast'" in capsys.readouterr().err
    assert H.main(["--out", str(tmp_path), "--calls", "0"]) == 2
    assert not (tmp_path / "collective_host.csv").exists()
