"""The training step's host program (simulator.train_op_counts, simulator.train_host) and the training
workload's host + sync model (TrainingIteration(host_program=...))."""

from __future__ import annotations

import csv
import warnings

import pytest

from semoe import Run, Workload, cluster_preset
from semoe.plan_spec import ParallelPlan
from semoe.presets import model_preset
from simulator import train_host as TH
from simulator import train_op_counts as TC
from simulator.engine import Sim
from simulator.train_host import TrainProgram, TrainSegment, train_program
from simulator.workload.host import HostClock
from simulator.workload.training import REF_RESIDUAL_CAST_BYTES, TrainingIteration


def _committed(config: str) -> list[dict]:
    with TC.OUT_CSV.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r["config"] == config]


def test_committed_table_matches_the_reference_code():
    """Recount one committed config (the offload bench's tiny structure, fused AdamW) on the CPU: the same
    segments, kernels, syncs and casts as the table (rerun python -m simulator.train_op_counts if not)."""
    preset, over, adamw = next(c for c in TC.CONFIGS if c[0] == "tiny" and c[2] == "fused")
    m = model_preset(preset).replace(**over)
    mem: list = []
    rows = TC.count_step(m, adamw, mem_out=mem)
    committed = _committed(rows[0]["config"])
    assert [{k: str(v) for k, v in r.items()} for r in rows] == committed
    with TC.MEM_CSV.open(newline="") as f:
        committed_mem = [r for r in csv.DictReader(f) if r["config"] == rows[0]["config"]]
    assert mem and [{k: str(v) for k, v in r.items()} for r in mem] == committed_mem


def test_program_structure_of_the_paper_config():
    """The torch MoE path syncs inside every MoE layer (bincount on CUDA, the routed row count) and at the
    loss read-back; the fused AdamW is a handful of kernels, foreach one per tensor and op."""
    m = model_preset("paper-13.9b").replace(layers=4)
    fused = train_program(m, "fused", device="cpu")
    foreach = train_program(m, "foreach", device="cpu")
    assert fused.source == TC.OUT_CSV.name
    ffn = fused.group("moe.ffn")
    assert len(ffn) >= 2 and all(s.sync for s in ffn[:-1]) and not ffn[-1].sync
    assert ffn[-1].kernels > 0  # dispatch, experts, combine after the last sync
    assert fused.group("readback")[0].sync
    blocks = {"moe": 4, "dense": 0}
    assert fused.syncs(blocks) == 4 * (len(ffn) - 1) + sum(s.sync for s in fused.group("readback"))
    assert foreach.group("optimizer")[0].kernels > 5 * fused.group("optimizer")[0].kernels
    assert fused.kernels(blocks) == sum(int(r["kernels"]) * (4 if "." in r["segment"] else 1)
                                        for r in _committed(fused.config))
    # activation casts: norm1's output to bf16 for the qkv GEMM (r4 w2 per element: 6 B per token per D),
    # logits.float() (r2 w4: 6 B per token per vocab entry)
    assert float(fused.group("moe.attn")[0].casts[0]) == pytest.approx(6.0)
    assert fused.group("head")[0].casts[2] == pytest.approx(6.0)
    assert train_program(m.replace(activation="swiglu"), "fused", device="cpu") is None  # not counted
    assert TrainProgram.part("moe.bwd") == "bwd" and TrainProgram.part("moe.ffn_3") == "fwd"
    assert TrainProgram.part("optimizer") == "opt"


def test_cuda_table_preferred_cpu_fallback(tmp_path, monkeypatch):
    m = model_preset("paper-13.9b").replace(layers=4)
    key = TC.config_key(m, "fused")
    rows = _committed(key)
    cuda = tmp_path / "train_op_counts_cuda.csv"
    with cuda.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(TC.COLUMNS))
        w.writeheader()
        w.writerows([dict(r, kernels=int(r["kernels"]) + 1) for r in rows])
    monkeypatch.setattr(TH, "TRAIN_COUNTS_CUDA", cuda)
    p = train_program(m, "fused")
    assert p.source == cuda.name and p.group("moe.attn")[0].kernels == int(rows[1]["kernels"]) + 1
    assert train_program(m, "foreach").source == TC.OUT_CSV.name  # not in the CUDA table: the CPU one, whole
    assert train_program(m, "fused", device="cpu").source == TC.OUT_CSV.name
    with pytest.raises(ValueError, match="device"):
        train_program(m, "fused", device="tpu")


def test_host_clock_by_hand():
    h = HostClock()
    assert h.issue(10, 1e-3) == (0.0, pytest.approx(0.010))
    h.sync(0.004)  # the device finished before the host: no wait
    assert h.t == pytest.approx(0.010) and h.sync_wait_s == 0.0
    h.sync(0.025)  # the host waits for the device
    assert h.t == 0.025 and h.sync_wait_s == pytest.approx(0.015)
    assert h.issue(2, 1e-3) == (0.025, pytest.approx(0.027)) and h.kernels == 12 and h.syncs == 2


def _run(prog=None, **kw):
    m = model_preset("paper-13.9b").replace(layers=4, hidden=1024, heads=8, ffn=2048, vocab=8192, name="t")
    run = Run(model=m, cluster=cluster_preset("h100-single"), plan=ParallelPlan(),
              workload=Workload(micro_batch=2, seq_len=512, steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = Sim(run.cluster, seed=0, trace=True)
        it = TrainingIteration(run, sim, impl="reference", ref_optimizer="fused", expert_kernels="torch",
                               host_program=prog, **kw)
        return it.run(), sim, it


def _program(kernels: int = 3, sync: bool = True) -> TrainProgram:
    """A program of the real structure (segment names) with ``kernels`` per segment, no casts."""
    real = train_program(model_preset("paper-13.9b").replace(layers=4), "fused", device="cpu")
    return TrainProgram("synthetic", tuple(TrainSegment(s.name, kernels, s.sync and sync) for s in real.segments))


def test_free_host_gives_the_device_timeline():
    """Host rates 0 and no casts: the step is the device's, exactly as without a host program."""
    base, _, _ = _run()
    s, _, _ = _run(_program(), host_rates={"fwd": 0.0, "bwd": 0.0, "opt": 0.0}, act_casts=False)
    # (not bit-equal: the zero-time gradient collectives of one rank interleave differently with the extra
    # zero-time host events, which moves the 10% overlap slowdown onto another short phase)
    assert s["step_time_s"] == pytest.approx(base["device_step_s"], rel=1e-3)
    assert s["host_syncs"] == _program().syncs({"moe": 4, "dense": 0})


def test_host_bound_step_is_the_issue_time():
    """1 s per kernel: every segment ends when its last kernel is issued, so the step is kernels x 1 s (the
    device's work, milliseconds, hides behind the issue)."""
    prog = _program(kernels=3)
    s, _, _ = _run(prog, host_rates={"fwd": 1.0, "bwd": 1.0, "opt": 1.0}, act_casts=False)
    n = prog.kernels({"moe": 4, "dense": 0})
    assert s["host_s"] == pytest.approx(n)
    assert n <= s["step_time_s"] <= n + 3.0  # + at most the device time of one segment per sync (ms each)


def test_syncs_stall_the_device_and_cost_time():
    """Same kernels, with and without the syncs: a sync drains the queue, the device then idles while the
    host issues the next segment's kernels (host_wait rows); without syncs the host runs ahead."""
    rates = {"fwd": 30e-6, "bwd": 10e-6, "opt": 10e-6}
    with_s, sim1, _ = _run(_program(2, True), host_rates=rates, act_casts=False)
    without, _, _ = _run(_program(2, False), host_rates=rates, act_casts=False)
    assert with_s["host_s"] < 0.5 * without["device_step_s"]  # the host alone is not the bottleneck
    assert with_s["step_time_s"] > without["step_time_s"] + 1e-4
    waits = [r for r in sim1.rows if r[3] == "host_wait"]
    assert waits and all(r[5] > r[4] for r in waits)
    assert without["host_sync_wait_s"] == 0.0 and with_s["host_sync_wait_s"] > 0.0


def test_activation_casts_priced_and_constants_not_double_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(TH, "MEM_RATES_CUDA", tmp_path / "none.csv")  # casts at the HBM roofline (no cast rate)
    prog = train_program(model_preset("paper-13.9b").replace(layers=4), "fused", device="cpu")
    zero = {"fwd": 0.0, "bwd": 0.0, "opt": 0.0}
    on, _, it_on = _run(prog, host_rates=zero, act_casts=True, mem_passes=False)
    off, _, it_off = _run(prog, host_rates=zero, act_casts=False)
    cm = it_on.sim.cost
    m, T = it_on.m, it_on.T
    widths = (m.hidden, m.ffn, m.vocab, m.experts)
    uses = {s.name: (m.layers if "." in s.name else 1) for s in prog.segments}
    expect = sum(cm.memory(s.cast_bytes(T, widths)) * uses[s.name] for s in prog.segments if any(s.casts))
    assert on["act_cast_s"] == pytest.approx(expect)
    assert off["act_cast_s"] == 0.0
    # the residual constant's two casts (12 B per token x hidden) are taken out when the casts are counted
    assert it_off.t_attn - it_on.t_attn == pytest.approx(REF_RESIDUAL_CAST_BYTES * T * m.hidden / cm.hbm, rel=1e-6)


def test_bad_options_rejected():
    prog = _program()
    with pytest.raises(ValueError, match="host_rates"):
        _run(prog, host_rates={"forward": 1.0})
    with pytest.raises(ValueError, match="act_casts"):
        _run(None, act_casts=True)


def test_device_path_quick_on_cpu(tmp_path):
    """The GPU command's code path (--device ... --quick) on the CPU: counts and host rates written."""
    out = tmp_path / "train_op_counts_cuda.csv"
    assert TC.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and rows[0]["segment"] == "embedding"
    rates = TH.host_rates("torch", "fused", out.with_name(TH.RATES_CUDA.name))
    assert rates is not None and set(rates) == {"fwd", "bwd", "opt"} and all(v > 0 for v in rates.values())


def test_cast_classifier_vectors_by_token_not_by_width():
    """The CUDA recount of top-2 configs failed on a cast of the kept rows' combine weights (a vector, not a
    [rows, width] activation): vectors are counted per token whatever their length, even one equal to a width;
    per-expert vectors and per-step statistics are not activation passes; an unknown width is still an error."""
    import torch

    tokens = 40
    dims = {"D": (48, 12, 144), "F": (80, 160), "V": (272,), "E": (8,)}

    def unit(t):
        return next((u for u, ws in dims.items() if t.shape[-1] in ws), None)

    def cls(shape, out_bytes=2):
        t = torch.zeros(shape)
        return TC._classify_cast(t, t.numel() * (4 + out_bytes), dims, tokens, unit)

    assert cls((68,)) == {"T": 68 * 6 / tokens}  # the combine weights of 68 kept routed rows, fp32 -> bf16
    assert cls((80,)) == {"T": 80 * 6 / tokens}  # as long as the ffn width: still per token, not cast_F
    assert cls((8,)) is None and cls((3,), 8) is None and cls(()) is None  # per expert, loss statistics, a scalar
    assert cls((tokens, 48)) == {"D": 6.0} and cls((2 * tokens, 80)) == {"F": 12.0}
    assert cls((tokens, 99)) == {"other": tokens * 99 * 6.0}  # an unclassified activation width: the error path
    assert cls((2, 9)) is None  # fewer elements than tokens: index-shaped, not an activation
    assert cls((tokens, 2)) == {"T": 2 * 6.0}  # routing weights [T, k]: per token
    seg = TrainSegment("moe.ffn_4", 10, False, casts=(6.0, 0.0, 0.0, 0.0, 10.2))
    assert seg.cast_bytes(100, (1024, 4096, 256, 8)) == pytest.approx(100 * (6.0 * 1024 + 10.2))


def test_memory_passes_counted_and_priced_replacing_the_constants():
    """The recorder counts every non-GEMM kernel's activation bytes per class (layer norm forward: the fp32
    input read and the output written, 8 B per token per unit of hidden, + mean / rstd); with the program's
    memory passes the constants' activation passes (residual / norm, gate, dispatch, expert activation, loss,
    embedding) are gone and each segment's classes are priced once per use at the class's rate."""
    m = model_preset("paper-13.9b").replace(layers=4)
    prog = train_program(m, "fused", device="cpu")
    assert prog.mem_source == TC.MEM_CSV.name
    attn = {c: b for c, _, b in prog.group("moe.attn")[0].mem}
    assert attn["norm_fwd"][0] == pytest.approx(16.0)  # two fp32 layer norms: (r4 + w4) x 2 per unit of D
    bwd = {c for c, _, _ in prog.group("moe.bwd")[0].mem}
    assert {"norm_bwd", "act", "scatter", "elem"} <= bwd  # index_add_ of the permute's backward: scatter
    assert not any(sg.mem for sg in prog.segments if sg.name in ("clip", "optimizer"))  # parameter passes
    zero = {"fwd": 0.0, "bwd": 0.0, "opt": 0.0}
    _, sim_on, it_on = _run(prog, host_rates=zero)
    _, _, it_off = _run(prog, host_rates=zero, mem_passes=False)
    assert it_on.mem_passes and not it_off.mem_passes
    assert it_on.t_dispatch == {} and it_on.t_expert_act == {} and it_on.t_loss_fwd == 0.0 == it_on.t_embed
    assert it_on.parts["attention"]["norm_residual"] == 0.0 < it_off.parts["attention"]["norm_residual"]
    uses = {s.name: (m.layers if "." in s.name else 1) for s in prog.segments}
    uses.update({n: 0 for n in ("zero_grad",)})
    expect = sum(t * uses[n] for n, ts in it_on.t_seg_mem.items() for t in ts.values())
    got = sum(r[5] - r[4] for r in sim_on.rows if r[3].startswith("mem_"))
    assert got == pytest.approx(expect, rel=1e-6) and got > 0
    # a class priced at its measured rate: twice the bandwidth, half the time
    seg = next(iter(it_on.t_seg_mem))
    cls = next(iter(it_on.t_seg_mem[seg]))
    k, b = it_on.segs[seg].mem_bytes(it_on.T, (it_on.m.hidden, it_on.m.ffn, it_on.m.vocab, it_on.m.experts))[cls]
    it_on._mem_rate_tab = {cls: [(1.0, 1e12), (1e12, 1e12)]}
    assert it_on._mem_time(cls, k, b) == pytest.approx(b / 1e12)
    with pytest.raises(ValueError, match="mem_passes"):
        _run(_program(), mem_passes=True)  # a program without counted memory passes


def test_mem_rates_table_read_and_probe_runs_on_cpu(tmp_path, monkeypatch):
    rows = TC.time_mem_classes("cpu", rows=(64,), width=16, reps=1)
    assert {r["class"] for r in rows} == set(TC.RATE_CLASSES)
    scatter = next(r for r in rows if r["class"] == "scatter")
    assert scatter["io_bytes"] == 64 * 16 * 4 * 2 + 64 * 8  # index_add_: target r/w (R/2 rows), source, index
    assert next(r for r in rows if r["class"] == "cast")["io_bytes"] == 2 * 64 * 16 * 6  # fp32 -> bf16 and back
    p = tmp_path / "rates.csv"
    p.write_text(TC.to_csv(rows, TC.MEM_RATE_COLUMNS))
    got = TH.mem_rates(p)
    assert set(got) == set(TC.RATE_CLASSES) and all(b > 0 for v in got.values() for _, b in v)
    assert TH.mem_rates(tmp_path / "missing.csv") is None
    # a measured cast rate prices the activation and weight casts: 1 TB/s -> bytes / 1e12
    p.write_text("device,class,rows,width,io_bytes,time_s,GBps\ncpu,cast,1,1,1000000000,0.001,1000\n")
    monkeypatch.setattr(TH, "MEM_RATES_CUDA", p)
    prog = train_program(model_preset("paper-13.9b").replace(layers=4), "fused", device="cpu")
    _, _, it = _run(prog, host_rates={"fwd": 0.0, "bwd": 0.0, "opt": 0.0})
    widths = (it.m.hidden, it.m.ffn, it.m.vocab, it.m.experts)
    name, seg = next((n, sg) for n, sg in it.segs.items() if any(sg.casts))
    assert it.t_seg_cast[name] == pytest.approx(seg.cast_bytes(it.T, widths) / 1e12)
    ex = it.expert_local_params if 0 in it.a2a else 0
    assert it.t_cast[0] == pytest.approx(6 * (it.dense_layer[0] + ex) / 1e12)  # REF_CAST_BYTES per parameter


def test_filled_allocations_write_their_output_only():
    """``zeros_like(x)`` / ``x.new_zeros(...)`` take ``x`` for its shape and dtype: the kernel writes the new tensor and
    reads nothing, unlike ``x.add(y)`` (both read, the output written) or ``x.zero_()`` (written only)."""
    import torch

    from simulator.train_op_record import _mem_pass

    tokens, dims = 40, {"D": (48,), "F": (80,), "V": (272,), "E": (8,)}
    x = torch.zeros(tokens, 48)  # fp32: 4 B per element -> 4 B per token per unit of D
    for name, out in (("aten.zeros_like", torch.zeros_like(x)), ("aten.new_zeros", x.new_zeros(tokens, 48)),
                      ("aten.full_like", torch.full_like(x, 2.0))):
        assert _mem_pass(name, (x,), {}, out, dims, tokens, set()) == ("copy", {"D": 4.0}), name
    assert _mem_pass("aten.add", (x, x), {}, x + x, dims, tokens, set()) == ("elem", {"D": 12.0})
    assert _mem_pass("aten.zero_", (x,), {}, x, dims, tokens, set()) == ("copy", {"D": 4.0})
