"""The store build / load benchmark's CPU smoke run (``--quick``): every case runs and writes its rows."""

from __future__ import annotations

import csv
import json

import pytest

from reference.inference import bench_store


def test_quick_store_bench_writes_rows(tmp_path):
    out = tmp_path / "out"
    assert bench_store.main(["--quick", "--out", str(out), "--load", "2:alloc,1:alloc,2:register"]) == 0
    rows = list(csv.DictReader((out / "store_bench.csv").open()))
    got = {(r["case"], r["workers"], r["pin_with"], r["metric"]): float(r["value"]) for r in rows}
    assert got[("build", "1", "-", "identical_to_first")] == got[("build", "2", "-", "identical_to_first")] == 1.0
    for case in (("load", "2", "alloc"), ("load", "1", "alloc"), ("load", "2", "register")):
        assert got[(*case, "seconds")] > 0
        assert got[(*case, "pinned")] == 0.0  # no CUDA here: nothing is pinned, whatever pin_with says
        assert got[(*case, "GB")] == pytest.approx(got[("build", "1", "-", "GB")])
    summary = json.loads((out / "store_bench.json").read_text())
    assert set(summary["cases"]) == {"build:1", "build:2", "load:2:alloc", "load:1:alloc", "load:2:register"}
    assert not (out / "store").exists()  # removed at the end


def test_bad_cases_are_rejected(tmp_path, capsys):
    for bad in (["--build", "0"], ["--load", "2:mlock"], ["--load", "x:alloc"]):
        with pytest.raises(SystemExit):
            bench_store.main(["--quick", "--out", str(tmp_path), *bad])
    assert "--load takes THREADS:alloc|register cases, got 'x:alloc'" in capsys.readouterr().err
