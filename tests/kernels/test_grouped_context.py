"""kernels.grouped_context --quick on the CPU: every condition and op of the torch._grouped_mm context probe writes a row."""

import pandas as pd
import pytest
import torch

from kernels.grouped_context import CONDITIONS, OPS, main

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")


def test_quick_run_writes_every_condition_and_op(tmp_path):
    assert main(["--out", str(tmp_path), "--quick"]) == 0
    df = pd.read_csv(tmp_path / "grouped_context.csv")
    assert set(df.condition) == set(CONDITIONS) and set(df.op) == set(OPS)
    assert len(df) == len(CONDITIONS) * len(OPS) * 2  # two row counts of one shape
    assert (df.time_s > 0).all()
    bwd = df[df.op == "bwd"]
    assert (bwd.flop == 2 * 2 * 2 * bwd.m * bwd.k * bwd.n).all()  # dgrad + wgrad: twice the forward's FLOP
