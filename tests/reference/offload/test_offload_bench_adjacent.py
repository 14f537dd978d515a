"""The bench's adjacent AdamW probes (task hB3): the engine probe ``alone@worker`` right before and after each
offloaded case, on the CPU."""

from __future__ import annotations

import csv
import re

import pytest

from reference.offload import bench

SHAPES = {"w1_EDF": (8, 32), "w2_EFD": (32, 8)}


def test_adjacent_probe_measures_the_engines_update_on_the_case_layer():
    p = bench.AdjacentAdam(2, SHAPES, "fp32", reps=3)
    try:
        assert (p.E, p.P, p.grad) == (2, 512, "fp32")
        assert all(g.dtype == __import__("torch").float32 for g in p.grads.values())
        w0 = p.state[:, 0].clone()
        rate = p.measure()
        assert rate > 0 and p.step == 4  # one warm-up call + 3 timed ones, each one AdamW step
        assert not p.state[:, 0].equal(w0)  # the update ran on the master weights
        p.measure()
        assert p.step == 8
    finally:
        p.close()
    assert p.state is None
    with pytest.raises(ValueError, match="gradient dtype"):
        bench.AdjacentAdam(2, SHAPES, "fp16")
    with pytest.raises(ValueError, match="reps"):
        bench.AdjacentAdam(2, SHAPES, "bf16", reps=0)
    assert (bench.case_grad(8), bench.case_grad(1)) == ("fp32", "bf16")


def test_a_failing_probe_becomes_a_row_not_the_cases_failure(tmp_path):
    rows = bench.Rows(tmp_path / "rows.csv", "cpu")

    class Broken:
        E, P, grad, threads = 2, 512, "bf16", 1

        def measure(self):
            raise RuntimeError("boom")

    assert bench.adjacent_recorder(rows, None, "cfg", "cpu", "on") is None
    bench.adjacent_recorder(rows, Broken(), "a_x L2", "cpu", "on")("before")
    ok = bench.AdjacentAdam(2, SHAPES, "bf16", reps=1)
    bench.adjacent_recorder(rows, ok, "a_x L2", "ssd", "off")("after")
    ok.close()
    rows.close()
    with open(tmp_path / "rows.csv", newline="") as f:
        got = [(r["config"], r["placement"], r["prefetch"], r["metric"]) for r in csv.DictReader(f)]
    assert got == [("a_x L2", "cpu", "on", "adjacent_probe_error"),
                   ("a_x L2", "ssd", "off", "cpu_adam_adjacent_after_Mparams_per_s")]


@pytest.mark.parametrize("placement", ["cpu", "gpu"])
def test_run_case_probes_with_the_engine_idle_right_before_the_counted_step_and_after_the_last(tmp_path, capsys,
                                                                                             placement):
    from semoe.presets import load_model

    spec = load_model("tiny").replace(name="adj", layers=2)
    seen, out = [], []

    def adjacent(position):  # where run_case is when it calls: the steps it has run (logged) so far
        out.append(capsys.readouterr().out)
        seen.append((position, [int(s) for s in re.findall(r"step (\d+): ", "".join(out))]))

    res = bench.run_case(spec, 2, 16, placement, 1, 0, 2, 1, tmp_path / "ssd", None, lambda: 100.0, 1,
                         adjacent=adjacent)
    assert res["steps"] == 2
    if placement == "cpu":
        # warmup=1, then the counted step 1 and 2 timed steps: before at the counted step (warm-up step 0 done), after
        # eng.wait(); after: once all of them ran
        assert seen == [("before", [0]), ("after", [0, 1, 2, 3])]
    else:  # no CPU update to bracket
        assert seen == []
