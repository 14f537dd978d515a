"""simulator.validate_offload: which CPU AdamW input each simulated case takes (the engine probe of its run,
layer size, gradient dtype and load), the engine's block-read probe, the trace window of the counted steps,
and the generated markdown tables."""

import pandas as pd
import pytest

from semoe.trace import TraceRow, write_csv
from simulator.validate_offload import (
    ADAM_LOAD,
    ENGINE_ADAM,
    MD_BEGIN,
    MD_END,
    adam_input,
    compare,
    engine_adam_probes,
    layer_size,
    parse_config,
    trace_window,
    write_markdown,
)

# E4 experts of P = 2 x 512 x 1024 parameters (gelu, no bias)
CFG = "paper-13.9b-scaled L2 D512 E4 k1 F1024 bf16 B2 S256 steps6"
P = 2 * 512 * 1024
RUN = {"date": "d", "commit": "c", "device": "NVIDIA H100 80GB HBM3"}


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


def test_each_case_takes_the_probe_of_its_placements_load_gradient_dtype_and_layer_size():
    probes = engine_adam_probes(pd.DataFrame(PROBES))[tuple(RUN.values())]
    cfg, acc = parse_config(CFG), parse_config(CFG + " micro_batches=4")
    assert ADAM_LOAD == {"cpu": "gpu+pcie", "ssd": "gpu+pcie+ssd"}
    rate, label = adam_input(probes, cfg, "cpu", RUN["device"])
    assert rate == 1000e6 and "'gpu+pcie'" in label and "grad=bf16" in label and "nearest" not in label
    assert adam_input(probes, cfg, "ssd", RUN["device"])[0] == 500e6
    assert adam_input(probes, acc, "cpu", RUN["device"])[0] == 2000e6  # accumulated: fp32 gradients
    rate, label = adam_input(probes, acc, "ssd", RUN["device"])  # only an E16 probe: the nearest layer size
    assert rate == 800e6 and "nearest layer size to E4" in label
    assert adam_input(probes, cfg, "ssd", "cpu")[0] == 4000e6  # a CPU run: the engine is synchronous (alone)
    assert adam_input(probes, cfg, "gpu", RUN["device"]) is None
    assert adam_input(probes, acc, "cpu", "cpu") is None  # no fp32 'alone' probe: the caller falls back


def test_the_selected_probe_drives_the_simulated_update_and_older_runs_keep_their_inputs():
    case = dict(RUN, config=CFG, prefetch="on", metric="cpu_adam_ms_per_step", value=10.0)
    old = [dict(RUN, config="bandwidth", placement="cpu", prefetch="-", metric="cpu_adam_Mparams_per_s", value=4000.0)]
    rows = [dict(case, placement=p) for p in ("cpu", "ssd")]
    with_probes = compare(pd.DataFrame(rows + old + PROBES), traces=None)
    without = compare(pd.DataFrame(rows + old), traces=None)
    got = with_probes[with_probes["metric"] == "cpu_adam_ms_per_step"].set_index("placement")
    ref = without[without["metric"] == "cpu_adam_ms_per_step"].set_index("placement")
    # the update takes E x P / rate: 4x (cpu: 1000 vs 4000) and 8x (ssd: 500) the isolated probe's time
    assert got.loc["cpu", "predicted"] == pytest.approx(4 * ref.loc["cpu", "predicted"], rel=1e-6)
    assert got.loc["ssd", "predicted"] == pytest.approx(8 * ref.loc["ssd", "predicted"], rel=1e-6)
    assert got.loc["ssd", "cpu_adam_input"].startswith("engine probe under 'gpu+pcie+ssd'")
    assert "CPU AdamW input: engine probe" in got.loc["cpu", "note"]
    assert ref.loc["cpu", "cpu_adam_input"].startswith("isolated probe cpu_adam_Mparams_per_s: 4000")
    pr = with_probes[with_probes["metric"] == ENGINE_ADAM]
    assert len(pr) == len(PROBES) and (pr["status"] == "fitted").all() and pr["used_for_fitting"].all()


def test_the_engines_block_read_replaces_the_plain_file_read():
    mk = lambda extra: pd.DataFrame([dict(RUN, config=CFG + " cache=0", placement="ssd", prefetch="off",
                                          metric="ssd_read_gb_per_step", value=1.0)] + extra)
    plain = [dict(RUN, config="bandwidth", placement="ssd", prefetch="-", metric="ssd_read_GBps", value=1.5)]
    block = [dict(RUN, config="bandwidth", placement="ssd", prefetch="-", metric="ssd_block_read_GBps", value=0.05)]
    a, b = compare(mk(plain), traces=None), compare(mk(block + plain), traces=None)
    assert "disk_read 1.5e+09/s" in a.iloc[0]["note"] and "disk_read 5e+07/s" in b.iloc[0]["note"]
    assert b.set_index("metric").loc["ssd_block_read_GBps", "status"] == "fitted"


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
    assert "engine probe under 'gpu+pcie', E4 P1048576 grad=bf16: 1000 Mparams/s" in text
    md.write_text(text.replace("narrative", "narrative, edited") + "\ntail\n")
    write_markdown(df, md)
    assert "narrative, edited" in md.read_text() and md.read_text().rstrip().endswith("tail")


def test_a_failed_probe_row_is_listed_not_simulated():
    err = dict(RUN, config="cpu_adam_engine E4 P1048576 grad=-", placement="gpu+pcie", prefetch="-", metric="error",
               value=1)
    out = compare(pd.DataFrame([err]), traces=None)
    assert out.iloc[0]["status"] == "not_modelled" and "did not complete" in out.iloc[0]["note"]
