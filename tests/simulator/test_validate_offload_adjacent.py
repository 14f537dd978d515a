"""simulator.validate_offload (code: simulator.validate_offload_inputs), task hB3: a case bracketed by adjacent AdamW
probes takes their mean as its CPU AdamW input; a case (or run) without them keeps the run-level engine probe."""

import math

import pandas as pd
import pytest

from simulator.validate_offload import (
    ADJACENT_RE,
    ENGINE_ADAM,
    adjacent_input,
    adjacent_probes,
    case_io,
    compare,
    engine_adam_probes,
    markdown_tables,
    parse_config,
)

from offload_cases import CFG, P, RUN

PROBE = dict(RUN, config=f"cpu_adam_engine E4 P{P} grad=bf16", placement="alone@worker", prefetch="-",
             metric=ENGINE_ADAM, value=4000.0)


def _adj(position, rate, placement="cpu", prefetch="on", config=CFG):
    return dict(RUN, config=config, placement=placement, prefetch=prefetch,
                metric=f"cpu_adam_adjacent_{position}_Mparams_per_s", value=rate)


def test_adjacent_rows_are_read_back_per_case_and_averaged():
    from reference.offload.bench import adjacent_metric

    assert ADJACENT_RE.match(adjacent_metric("before"))[1] == "before"  # the bench's writer and this reader agree
    assert ADJACENT_RE.match(ENGINE_ADAM) is None and ADJACENT_RE.match("cpu_adam_Mparams_per_s") is None
    with pytest.raises(ValueError, match="position"):
        adjacent_metric("during")
    df = pd.DataFrame([_adj("before", 1000.0), _adj("after", 2000.0), _adj("before", 500.0, placement="ssd"), PROBE])
    got = adjacent_probes(df)
    assert got == {("d", "c", RUN["device"], CFG, "cpu", "on"): {"before": 1000.0, "after": 2000.0},
                   ("d", "c", RUN["device"], CFG, "ssd", "on"): {"before": 500.0}}
    rate, label = adjacent_input(got[("d", "c", RUN["device"], CFG, "cpu", "on")])
    assert rate == 1500e6 and label.startswith("adjacent probes of this case (mean of before 1000, after 2000)")
    assert adjacent_input({}) is None and adjacent_input(None) is None
    assert adjacent_input({"before": float("nan"), "after": 0.0}) is None  # no usable probe: the run-level rule


def test_case_io_prefers_the_cases_own_probes_over_the_runs():
    probes = engine_adam_probes(pd.DataFrame([PROBE]))[tuple(RUN.values())]
    cfg = parse_config(CFG)
    io, label = case_io((("disk_read", 1e9),), probes, cfg, "cpu", RUN["device"], {"before": 1000.0, "after": 3000.0})
    assert dict(io)["cpu_adam"] == dict(io)["cpu_adam_fp32grad"] == 2000e6 and dict(io)["disk_read"] == 1e9
    assert label.startswith("adjacent probes")
    io, label = case_io((), probes, cfg, "cpu", RUN["device"], None)  # no adjacent probes: the run's alone@worker
    assert dict(io)["cpu_adam"] == 4000e6 and label.startswith("engine probe 'alone@worker'")
    assert case_io((), probes, cfg, "gpu", RUN["device"], {"before": 1000.0}) == ((), "")  # no CPU optimizer


def test_the_mean_of_the_adjacent_probes_drives_the_cases_simulation_and_other_cases_keep_the_run_probe():
    case = dict(RUN, config=CFG, prefetch="on", metric="cpu_adam_ms_per_step", value=10.0)
    rows = [dict(case, placement="cpu"), dict(case, placement="ssd"), PROBE,
            _adj("before", 1000.0), _adj("after", 3000.0)]  # only the cpu case was bracketed
    val = compare(pd.DataFrame(rows), traces=None)
    upd = val[val["metric"] == "cpu_adam_ms_per_step"].set_index("placement")
    # the same case given a run-level probe equal to the mean (2000): the same update time
    ref = compare(pd.DataFrame([dict(case, placement="cpu"), dict(PROBE, value=2000.0)]), traces=None)
    ref = ref[ref["metric"] == "cpu_adam_ms_per_step"].set_index("placement")
    assert upd.loc["cpu", "predicted"] == pytest.approx(ref.loc["cpu", "predicted"], rel=1e-9)
    # E x P / rate: the cpu case's input (2000) is half the run's probe (4000) that the ssd case keeps
    E_P = 4 * P * 2  # both MoE layers' updates per step
    assert upd.loc["cpu", "predicted"] == pytest.approx(1e3 * E_P / 2000e6, rel=0.05)
    assert upd.loc["cpu", "cpu_adam_input"].startswith("adjacent probes of this case")
    assert upd.loc["ssd", "cpu_adam_input"].startswith("engine probe 'alone@worker'")
    adj = val[val["metric"].str.startswith("cpu_adam_adjacent_")]
    assert len(adj) == 2 and (adj["status"] == "fitted").all() and adj["used_for_fitting"].all()
    assert not adj["predicted"].isna().any() and all(math.isfinite(x) for x in adj["error"])
    # the generated table lists the case's probes, their mean (its input) and the run-level probe
    md = markdown_tables(val.assign(status=val["status"].where(val["metric"] != "cpu_adam_ms_per_step", "validated")))
    assert "| paper-13.9b-scaled | cpu | on | 1000 | 3000 | 2000 | - | 4000 |" in md
    assert "| paper-13.9b-scaled | ssd |" not in md.split("Adjacent AdamW probes")[1].split("\n\n")[1]
    # a failed adjacent probe is listed, never simulated
    err = compare(pd.DataFrame([dict(case, placement="cpu", metric="adjacent_probe_error", value=1)]), traces=None)
    assert err["status"].tolist() == ["not_modelled"] and "adjacent AdamW probe" in err["note"].iloc[0]
