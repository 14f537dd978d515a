"""The expert-aware decode's host factor at the run's widths (`simulator.workload.inference_aftercopy`): its
calibration from the committed decode probe, the config check, and what it changes in a simulated pass."""

from __future__ import annotations

import pytest
from sim_helpers import make_cluster
from test_sim_inference import tiny

from semoe import SpecError
from simulator.engine import Sim
from simulator.workload.inference import FixedCosts, InferConfig, InferenceRun
from simulator.workload.inference_aftercopy import calibrate


def test_calibration_from_the_committed_decode_probe():
    """Three expert_nopred batches of the probe run: the run's non-copy block time is ~1.5x the tiny one's and the
    fit reproduces each point within 0.1 (a line through three points)."""
    c = calibrate()
    assert [b for b, _, _ in c.points] == [1, 2, 4]
    assert all(1.2 < r < 2.0 for _, _, r in c.points)
    assert c.a >= 0 and c.b >= 0
    for _, copy_s, r in c.points:
        assert c.factor(copy_s) == pytest.approx(r, abs=0.1)
    assert c.factor(0.0) == pytest.approx(1 + c.a) and c.factor(-1.0) == c.factor(0.0)
    assert "decode probe" in c.note()


def test_calibration_needs_the_probe_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="after-copy calibration"):
        calibrate(tmp_path)


@pytest.mark.parametrize("bad", [(0.5,), (-0.1, 1.0), (0.1, -2.0)])
def test_config_rejects_bad_factors(bad):
    with pytest.raises(SpecError, match="host_after_copy"):
        InferConfig(mode="expert", host_after_copy=bad)


def _decode(factor: tuple, mode: str = "expert"):
    sim = Sim(make_cluster(gpn=1), profile=None)
    cfg = InferConfig(mode=mode, batch=1, prompt_len=16, gen_len=4, slots=1, launch_s=1e-5, host_after_copy=factor)
    return InferenceRun(tiny(layers=3, experts=8, top_k=2), cfg, sim, costs=FixedCosts(experts_s=1e-6)).run()


def test_factor_slows_only_the_expert_aware_decode():
    """(0, 0) changes nothing; a = 1 makes the host-bound decode slower (the copies stay), the prefill and the
    ring mode are untouched; a larger b adds more where blocks copy."""
    base, same = _decode(()), _decode((0.0, 0.0))
    assert same.decode_s == base.decode_s and same.prefill_s == base.prefill_s
    slow = _decode((1.0, 0.0))
    assert slow.prefill_s == base.prefill_s and slow.misses == base.misses
    assert slow.decode_s > base.decode_s * 1.1
    assert _decode((1.0, 1e3)).decode_s > slow.decode_s
    ring, ring_f = _decode((), "ring"), _decode((1.0, 0.0), "ring")
    assert ring_f.decode_s == ring.decode_s
