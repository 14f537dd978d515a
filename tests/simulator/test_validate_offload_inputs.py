"""simulator.validate_offload: which CPU AdamW input each simulated case takes (the engine probe of its run with
nothing beside the update, layer size, gradient dtype), the engine's block read / write / rewrite-prep probes, the
trace window of the counted steps, the diagnostic simulation given a run's own trace rates, and the generated
markdown tables (code: simulator.validate_offload_inputs, _traces, _report)."""

import pandas as pd
import pytest

from semoe.trace import TraceRow, write_csv
from simulator.validate_offload import (
    ADAM_LOADS_APRIORI,
    DIAGNOSTIC,
    ENGINE_ADAM,
    MD_BEGIN,
    MD_END,
    adam_input,
    compare,
    engine_adam_probes,
    layer_size,
    parse_config,
    queued_write_gaps,
    trace_rates,
    trace_window,
    write_markdown,
)

from offload_cases import CFG, P, RUN


def _probe(E, P_, grad, load, rate):
    return dict(RUN, config=f"cpu_adam_engine E{E} P{P_} grad={grad}", placement=load, prefetch="-",
                metric=ENGINE_ADAM, value=rate)


PROBES = [_probe(4, P, "bf16", "alone", 4000.0), _probe(4, P, "bf16", "gpu+pcie", 1000.0),
          _probe(4, P, "bf16", "gpu+pcie+ssd", 500.0), _probe(4, P, "fp32", "gpu+pcie", 2000.0),
          _probe(16, P, "fp32", "gpu+pcie+ssd", 800.0)]


def test_layer_size_is_the_engines_flat_expert():
    assert layer_size(parse_config(CFG)) == (4, P)
    E, P_glu = layer_size(parse_config(CFG + " activation=swiglu bias=True"))
    assert (E, P_glu) == (4, 3 * 512 * 1024 + 2 * 1024 + 512)


def test_each_case_takes_the_probe_with_nothing_beside_the_update_of_its_gradient_dtype_and_layer_size():
    probes = engine_adam_probes(pd.DataFrame(PROBES))[tuple(RUN.values())]
    cfg, acc = parse_config(CFG), parse_config(CFG + " micro_batches=4")
    assert ADAM_LOADS_APRIORI == ("alone@worker", "alone")
    # the rule does not depend on the placement: both take the 'alone' probe (the loads are diagnostics)
    for placement in ("cpu", "ssd"):
        rate, label = adam_input(probes, cfg, placement, RUN["device"])
        assert rate == 4000e6 and "'alone'" in label and "grad=bf16" in label and "nearest" not in label
    assert adam_input(probes, acc, "cpu", RUN["device"]) is None  # no fp32 probe without a load: caller falls back
    assert adam_input(probes, cfg, "gpu", RUN["device"]) is None
    # the engine's thread role wins where the run has it; the nearest layer size where it lacks the case's own
    more = engine_adam_probes(pd.DataFrame(PROBES + [_probe(4, P, "bf16", "alone@worker", 3000.0),
                                                     _probe(16, P, "fp32", "alone", 900.0)]))[tuple(RUN.values())]
    rate, label = adam_input(more, cfg, "ssd", RUN["device"])
    assert rate == 3000e6 and "'alone@worker'" in label
    rate, label = adam_input(more, acc, "cpu", RUN["device"])
    assert rate == 900e6 and "nearest layer size to E4" in label


def test_the_selected_probe_drives_the_simulated_update_and_older_runs_keep_their_inputs():
    case = dict(RUN, config=CFG, prefetch="on", metric="cpu_adam_ms_per_step", value=10.0)
    old = [dict(RUN, config="bandwidth", placement="cpu", prefetch="-", metric="cpu_adam_Mparams_per_s", value=1000.0)]
    rows = [dict(case, placement=p) for p in ("cpu", "ssd")]
    with_probes = compare(pd.DataFrame(rows + old + PROBES), traces=None)
    without = compare(pd.DataFrame(rows + old), traces=None)
    got = with_probes[with_probes["metric"] == "cpu_adam_ms_per_step"].set_index("placement")
    ref = without[without["metric"] == "cpu_adam_ms_per_step"].set_index("placement")
    # the update takes E x P / rate: the 'alone' probe (4000) is 4x the isolated probe (1000), in both placements
    for placement in ("cpu", "ssd"):
        assert got.loc[placement, "predicted"] == pytest.approx(ref.loc[placement, "predicted"] / 4, rel=1e-6)
        assert got.loc[placement, "cpu_adam_input"].startswith("engine probe 'alone'")
    assert "CPU AdamW input: engine probe" in got.loc["cpu", "note"]
    assert ref.loc["cpu", "cpu_adam_input"].startswith("isolated probe cpu_adam_Mparams_per_s: 1000")
    pr = with_probes[with_probes["metric"] == ENGINE_ADAM].set_index("placement")
    assert len(pr) == len(PROBES)
    # the probe without a load is an input; the ones under synthetic loads are listed, not inputs
    assert pr.loc["alone", "status"] == "fitted" and bool(pr.loc["alone", "used_for_fitting"])
    loaded = pr.drop(index="alone")
    assert (loaded["status"] == "not_modelled").all() and loaded["note"].str.contains("not an input").all()


def test_the_engines_block_calls_replace_the_plain_file_and_fresh_name_probes():
    mk = lambda extra: pd.DataFrame([dict(RUN, config=CFG + " cache=0", placement="ssd", prefetch="off",
                                          metric="ssd_read_gb_per_step", value=1.0)] + extra)
    bw = lambda metric, v: dict(RUN, config="bandwidth", placement="ssd", prefetch="-", metric=metric, value=v)
    plain = [bw("ssd_read_GBps", 1.5), bw("ssd_write_GBps", 1.7), bw("ssd_block_prep_GBps", 3.5)]
    block = [bw("ssd_block_read_GBps", 0.05), bw("ssd_block_write_GBps", 0.07), bw("ssd_block_rewrite_prep_GBps", 0.9)]
    a, b = compare(mk(plain), traces=None), compare(mk(block + plain), traces=None)
    na, nb = a.iloc[0]["note"], b.iloc[0]["note"]
    assert "disk_read 1.5e+09/s" in na and "disk_write 1.7e+09/s" in na and "ssd_write_prep 3.5e+09/s" in na
    assert "disk_read 5e+07/s" in nb and "disk_write 7e+07/s" in nb and "ssd_write_prep 9e+08/s" in nb
    st = b.set_index("metric")["status"]
    assert st["ssd_block_read_GBps"] == st["ssd_block_write_GBps"] == "fitted"
    assert st["ssd_block_rewrite_prep_GBps"] == "not_modelled"  # an input the simulator has no default for


def _trace(path, profile: bool, lag_s: float):
    """3 steps of 1 s (warm-up 0, counted 1 and 2), one layer; each update (cpu_adam, then one 1e8-byte write)
    runs after its step's row ends, ``lag_s`` late; reads are staged in the step. Then a profiled step."""
    rows, t = [], 0.0
    for step in range(3):
        rows += [TraceRow(0, -1, step, "step", t, t + 1.0, 0, 0, "compute"),
                 TraceRow(0, 0, step, "ssd_read", t + 0.1, t + 0.2, 10**8, 0, "ssd"),
                 TraceRow(0, 0, step, "cpu_adam", t + 1.0 + lag_s, t + 1.1 + lag_s, 0, 0, "cpu"),
                 TraceRow(0, 0, step, "ssd_write", t + 1.1 + lag_s, t + 1.3 + lag_s, 10**8, 0, "ssd")]
        t += 1.0 + (0.4 + lag_s if step == 0 else 0.0)  # the bench drains the warm-up's update before step 1
    end = max(r.end_s for r in rows) + 0.01
    if profile:  # after the counted steps' updates drained: its read, its update, its write
        rows += [TraceRow(0, -1, 3, "profile_step", end, end + 1.0, 0, 0, "compute"),
                 TraceRow(0, 0, 3, "ssd_read", end + 0.1, end + 0.2, 10**8, 0, "ssd"),
                 TraceRow(0, 0, 3, "cpu_adam", end + 1.0, end + 1.1, 0, 0, "cpu"),
                 TraceRow(0, 0, 3, "ssd_write", end + 1.1, end + 1.3, 10**8, 0, "ssd")]
    write_csv(sorted(rows, key=lambda r: r.start_s), path)
    return rows


@pytest.mark.parametrize("profile,marked", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("lag_s", [0.05, 1.5])
def test_trace_window_holds_every_counted_steps_update_and_nothing_later(tmp_path, profile, marked, lag_s):
    from simulator.validate_offload import trace_phases

    rows = _trace(tmp_path / "t.csv", profile, lag_s)
    if not marked:  # a trace from before the bench wrote profile_step rows (3bd5bc4): the update count decides
        rows = [r for r in rows if r.phase != "profile_step"]
        write_csv(sorted(rows, key=lambda r: r.start_s), tmp_path / "t.csv")
    t0, t1, n = trace_window(rows, 1, 2)
    assert t1 > t0 and n == 2 and t0 == pytest.approx(next(r.start_s for r in rows if r.phase == "step" and r.micro_batch == 1))
    ph = trace_phases(tmp_path / "t.csv", 1, 2)
    # one read and one write of 1e8 bytes per counted step, however late the writes trail their step
    assert ph["ssd_write_gb"] == pytest.approx(0.1) and ph["ssd_read_gb"] == pytest.approx(0.1)
    assert ph["cpu_adam_ms"] == pytest.approx(100.0)


def test_generated_tables_replace_their_block_and_keep_the_narrative(tmp_path):
    case = dict(RUN, config=CFG, prefetch="on", metric="step_ms", value=100.0)
    df = compare(pd.DataFrame([dict(case, placement="cpu")] + PROBES), traces=None)
    md = tmp_path / "v.md"
    md.write_text("# title\n\nnarrative\n")
    write_markdown(df, md)
    write_markdown(df, md)  # again: the block is replaced, not appended twice
    text = md.read_text()
    assert text.startswith("# title\n\nnarrative\n") and text.count(MD_BEGIN) == 1 and text.count(MD_END) == 1
    assert "| c d (NVIDIA H100 80GB HBM3)" not in text and "### Run c d" in text
    assert "engine probe 'alone', E4 P1048576 grad=bf16: 4000 Mparams/s" in text
    assert "| E4 P1048576 grad=bf16 | gpu+pcie | 1000 | no |" in text and "| E4 P1048576 grad=bf16 | alone | 4000 | yes |" in text
    md.write_text(text.replace("narrative", "narrative, edited") + "\ntail\n")
    write_markdown(df, md)
    assert "narrative, edited" in md.read_text() and md.read_text().rstrip().endswith("tail")


def test_a_failed_probe_row_is_listed_not_simulated():
    err = dict(RUN, config="cpu_adam_engine E4 P1048576 grad=-", placement="gpu+pcie", prefetch="-", metric="error",
               value=1)
    out = compare(pd.DataFrame([err]), traces=None)
    assert out.iloc[0]["status"] == "not_modelled" and "did not complete" in out.iloc[0]["note"]


def test_queued_write_gaps_leave_out_waits_for_an_update():
    w = lambda t, b=10**8: TraceRow(0, 0, 0, "ssd_write", t, t + 0.1, b, 0, "ssd")
    rows = [w(0.0), w(0.15),  # queued: 50 ms of host work between them
            TraceRow(0, 1, 0, "cpu_adam", 0.2, 0.5, 0, 0, "cpu"), w(0.55),  # waited for the update: left out
            TraceRow(0, 1, 0, "ssd_read", 0.7, 0.8, 10**8, 0, "ssd"), w(0.85)]  # a read between: not a write pair
    gaps = queued_write_gaps(rows)
    assert len(gaps) == 1 and gaps[0][0] == 1e8 and gaps[0][1] == pytest.approx(0.05)


def _case_trace(path, adam_s: float, layers: int = 2, steps: int = 3):
    """A cpu-placement trace: ``steps`` steps of 1 s (the first a warm-up), one update per layer of ``adam_s`` after
    each step (row bytes 16 B per parameter of a layer of E4 x P)."""
    rows, t = [], 0.0
    for step in range(steps):
        rows.append(TraceRow(0, -1, step, "step", t, t + 1.0, 0, 0, "compute"))
        for li in range(layers):
            a0 = t + 1.0 + li * adam_s
            rows.append(TraceRow(0, li, step, "cpu_adam", a0, a0 + adam_s, 16 * 4 * P, 0, "cpu"))
        t += 1.0 + layers * adam_s + 0.01
    write_csv(rows, path)


def test_trace_rates_are_the_cases_own_phase_rates(tmp_path):
    _case_trace(tmp_path / "t.csv", 0.5)
    got = trace_rates(tmp_path / "t.csv", 1, 2)
    assert got == {"cpu_adam": pytest.approx(4 * P / 0.5), "cpu_adam_fp32grad": pytest.approx(4 * P / 0.5)}
    # an SSD trace: its read / write busy rates and the queued gaps' prep rate (`_trace`: one write per step)
    _trace(tmp_path / "s.csv", False, 0.05)
    got = trace_rates(tmp_path / "s.csv", 1, 2)
    assert got["disk_read"] == pytest.approx(1e9) and got["disk_write"] == pytest.approx(0.5e9)
    assert "ssd_write_prep" not in got  # every write waited for its update: no queued gap


@pytest.mark.parametrize("adam_s", [0.02, 2.0])
def test_diagnostic_rows_simulate_the_run_given_its_trace_rates_and_stay_out_of_semoe_validate(tmp_path, adam_s):
    import json

    from simulator.validate_offload import rows as validate_rows

    cfg = "a_compute_bound preset=paper-13.9b L2 D512 E4 k1 F1024 bf16 B2 S256 steps=2 warmup=1"
    bench = pd.DataFrame([dict(RUN, config=cfg, placement="cpu", prefetch="on", metric="step_ms", value=100.0)]
                         + PROBES)
    (tmp_path / "run.json").write_text(json.dumps(RUN))
    _case_trace(tmp_path / "trace_a_cpu_on.csv", adam_s)
    out = compare(bench, traces=tmp_path)
    d = out[out["status"] == DIAGNOSTIC]
    pri = out[(out["status"] == "validated") & (out["metric"] == "step_ms")]
    assert len(d) == 1 and len(pri) == 1 and d.iloc[0]["metric"] == "step_ms"
    assert d.iloc[0]["cpu_adam_input"] == f"this run's trace: {4 * P / adam_s / 1e6:.0f} Mparams/s"
    assert "diagnostic, not a prediction" in d.iloc[0]["note"]
    # two 2 s updates per step cannot hide behind a short step: the diagnostic step is longer than the a-priori
    # one (the 'alone' probe, 4000 Mparams/s); 20 ms updates at 210 Mparams/s are slower than the probe too
    assert d.iloc[0]["predicted"] > pri.iloc[0]["predicted"]
    if adam_s == 2.0:
        assert d.iloc[0]["predicted"] > 2 * adam_s * 1e3
    # semoe validate: the diagnostic rows stay out, the a-priori ones go in
    import simulator.validate_offload as vo

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vo, "compare", lambda path: out)
        got = validate_rows(tmp_path / "bench.csv")
    assert len(got) == len(out) - 1 and all(r["status"] != DIAGNOSTIC for r in got)
    assert any(r["metric"] == "cpu prefetch=on step_ms" and r["status"] == "validated" for r in got)
