"""Inference workload, issue 7 (resident prefill at small batch): the grouped-FFN segment's GEMMs start only after
the host has issued the kernels before them (the dispatch and the offsets), and every counted kernel but the
priced grouped GEMMs occupies the compute stream `BlockCosts.kernel_s` (exact timelines with FixedCosts)."""

from __future__ import annotations

import pytest
from sim_helpers import make_cluster

from semoe import ModelSpec
from simulator.engine import Sim
from simulator.workload.inference import FixedCosts, InferConfig, InferenceRun
from simulator.workload.inference_host import host_program


def tiny(layers: int = 3) -> ModelSpec:
    return ModelSpec(name="tiny-moe", layers=layers, hidden=64, heads=4, vocab=128, max_seq=256, ffn=128,
                     experts=4, top_k=1, activation="swiglu", norm="rmsnorm", position="rope", dtype="bf16")


class KernelCosts(FixedCosts):
    """FixedCosts with an unpriced device time per counted kernel."""

    def __init__(self, kernel_s: float, **kw) -> None:
        super().__init__(**kw)
        self.kernel_s = kernel_s

    def kernels(self, n):
        return max(0, n) * self.kernel_s


def prefill(m, costs, h: float):
    sim = Sim(make_cluster(gpn=1), profile=None)
    cfg = InferConfig(mode="resident", batch=1, prompt_len=16, gen_len=2, launch_s=h, warmup_passes=0)
    res = InferenceRun(m, cfg, sim, costs=costs).run()
    return res, sim.rows


def test_ffn_lead_delays_the_gemms_by_its_host_time():
    m, h, lead = tiny(), 1e-4, 5
    prog = host_program(None, "resident", "prefill")
    ffn = [s for s in prog.block if s.name.startswith("moe_") and s.kernels][-1]
    ex = 3 * (sum(s.kernels for s in prog.block) + 1) * h  # device-bound: the experts outlast a block's host time
    base, _ = prefill(m, FixedCosts(experts_s=ex), h)
    late, rows = prefill(m, FixedCosts(experts_s=ex, ffn_lead=lead), h)
    # every block's GEMMs wait for the lead's host time after the dispatcher's sync, nothing else moves
    assert late.prefill_s - base.prefill_s == pytest.approx(m.moe_layers * lead * h, rel=1e-9)
    step0 = [r for r in rows if r[2] == -1]  # the timed prefill (trace step -1)
    disp = [r for r in step0 if r[3] == "dispatch_fwd"]
    exp = [r for r in step0 if r[3] == "experts_fwd"]
    assert len(disp) == len(exp) == m.moe_layers
    for d, e in zip(disp, exp):
        assert d[5] - d[4] == pytest.approx(lead * h, rel=1e-9)  # idle stream, bound by the host's issue
        assert e[4] == pytest.approx(d[5], rel=1e-12)  # the GEMMs start when the lead is issued
        assert e[5] - e[4] == pytest.approx(ex, rel=1e-9)
    assert ffn.kernels > lead


def test_kernel_device_time_charges_every_counted_kernel_but_the_gemms():
    m, k, ex = tiny(), 3e-6, 2e-4
    prog = host_program(None, "resident", "prefill")
    # no host time: the pass is the compute stream's sum of work
    base, _ = prefill(m, FixedCosts(experts_s=ex), 0.0)
    assert base.prefill_s == pytest.approx(m.moe_layers * ex, rel=1e-9)
    res, _ = prefill(m, KernelCosts(k, experts_s=ex), 0.0)
    kernels = prog.embedding + prog.head - 1 + m.moe_layers * (prog.block_kernels - KernelCosts.ffn_gemms)
    assert res.prefill_s == pytest.approx(m.moe_layers * ex + kernels * k, rel=1e-9)


def test_kernel_device_time_hides_under_a_slower_host():
    """Host-bound segments (the host issues slower than the device runs them): the per-kernel device time
    changes nothing while each kernel's device time stays below the host's per kernel."""
    m, h = tiny(), 1e-4
    base, _ = prefill(m, FixedCosts(experts_s=0.0), h)
    res, _ = prefill(m, KernelCosts(0.5 * h, experts_s=0.0), h)
    assert res.prefill_s == pytest.approx(base.prefill_s, rel=1e-6)
    slow, _ = prefill(m, KernelCosts(2 * h, experts_s=0.0), h)  # device slower than the host: it shows
    assert slow.prefill_s > 1.5 * base.prefill_s
