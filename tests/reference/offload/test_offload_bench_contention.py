"""The bench's contention probe (task hH): the engine's AdamW call and its SSD I/O cycle, alone and at the same time,
on the CPU."""

from __future__ import annotations

import csv

import pytest

from reference.offload import bench

SHAPES = {"w1_EDF": (8, 32), "w2_EFD": (32, 8)}


def test_contention_probe_runs_the_update_beside_the_io_cycle(tmp_path):
    adam = bench.AdjacentAdam(2, SHAPES, "bf16", reps=2)
    p = bench.ContentionProbe(adam, tmp_path / "con", 1 << 14, blocks=2, window_s=0.05, reps=2)
    try:
        assert sorted(f.name for f in (tmp_path / "con").iterdir()) == ["L000_E00000.bin", "L000_E00001.bin"]
        assert p.io_threads == 1  # the engine's I/O executor's intra-op threads
        step0 = adam.step
        got = p.measure()
        assert set(got) == set(bench.CONTENTION_PAIRS) and len(got) == 9
        assert all(v > 0 for v in got.values())
        # alone: adam.measure() (1 + 2 calls); beside the reads, then the writes: a warm-up call + >= reps calls each
        assert adam.step - step0 >= 3 + 2 * (1 + 2)
        # the I/O ran: every block read back and written back over its old version (the files' crc still reads)
        p.store.read((0, 1), __import__("torch").empty(1 << 14))
        step1 = adam.step
        got = p.measure(adam_alone=123.0)  # the caller's idle probe is the "alone" rate: no alone calls here
        assert got[("adam", "alone")] == 123.0 and adam.step - step1 >= 2 * 3
    finally:
        p.close()
        adam.close()
    assert not (tmp_path / "con").exists()
    for bad in ({"blocks": 0}, {"window_s": 0.0}, {"reps": 0}):
        with pytest.raises(ValueError, match="contention probe needs"):
            bench.ContentionProbe(None, tmp_path / "x", 16, **bad)


def test_io_rates_over_a_window_take_the_ops_inside_it_else_those_centred_in_it():
    ops = [("read", 2e9, 0.0, 1.0), ("read", 1e9, 1.0, 2.0), ("write", 3e9, 1.5, 3.5), ("prep", 1e9, 3.5, 4.0)]
    assert bench.ContentionProbe._rates(ops) == pytest.approx({"io_read": 1.5, "io_write": 1.5, "io_prep": 2.0})
    # window 0.9..2.6: the second read lies inside it; no write does, the one centred at 2.5 counts
    assert bench.ContentionProbe._rates(ops, 0.9, 2.6) == pytest.approx({"io_read": 1.0, "io_write": 1.5})


def test_contention_metric_names_and_the_recorder_rows(tmp_path):
    assert (bench.contention_metric("before", "adam", "beside_write")
            == "contention_before_adam_beside_write_Mparams_per_s")
    assert bench.contention_metric("after", "io_prep", "alone") == "contention_after_io_prep_alone_GBps"
    with pytest.raises(ValueError, match="position"):
        bench.contention_metric("during", "adam", "alone")
    for q, c in (("io", "alone"), ("adam", "beside"), ("io_read", "beside_write")):
        with pytest.raises(ValueError, match="quantity, condition"):
            bench.contention_metric("before", q, c)
    from simulator.validate_offload import CONTENTION_RE

    for q, c in bench.CONTENTION_PAIRS:
        m = CONTENTION_RE.match(bench.contention_metric("after", q, c))
        assert m and (m[1], m[2], m[3]) == ("after", q, c)

    class Idle:
        E, P, grad, threads = 2, 512, "bf16", 1

        def measure(self):
            return 1000.0

    class Con:
        def __init__(self, fail):
            self.fail, self.seen = fail, []

        def measure(self, alone):
            self.seen.append(alone)
            if self.fail:
                raise OSError("disk gone")
            return {("adam", "alone"): alone, ("adam", "beside_read"): 600.0, ("io_read", "beside"): 0.5}

    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    ok, broken = Con(False), Con(True)
    bench.adjacent_recorder(rows, Idle(), "a_x L2", "ssd", "on", ok)("before")
    bench.adjacent_recorder(rows, Idle(), "a_x L2", "ssd", "off", broken)("after")
    bench.adjacent_recorder(rows, Idle(), "a_x L2", "cpu", "on")("after")
    rows.close()
    assert ok.seen == [1000.0] and broken.seen == [1000.0]
    with open(tmp_path / "rows.csv", newline="") as f:
        got = [(r["prefetch"], r["placement"], r["metric"], float(r["value"])) for r in csv.DictReader(f)]
    assert got == [("on", "ssd", "cpu_adam_adjacent_before_Mparams_per_s", 1000.0),
                   ("on", "ssd", "contention_before_adam_alone_Mparams_per_s", 1000.0),
                   ("on", "ssd", "contention_before_adam_beside_read_Mparams_per_s", 600.0),
                   ("on", "ssd", "contention_before_io_read_beside_GBps", 0.5),
                   ("off", "ssd", "cpu_adam_adjacent_after_Mparams_per_s", 1000.0),
                   ("off", "ssd", "contention_probe_error", 1.0),
                   ("on", "cpu", "cpu_adam_adjacent_after_Mparams_per_s", 1000.0)]
