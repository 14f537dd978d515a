"""Task hH: the CPU update and the SSD I/O slow each other while both run (simulator.workload.host_share), with the
bench's contention probes as the factors (simulator.validate_offload's a-priori rule of hH, code:
simulator.validate_offload_inputs)."""

import math

import pandas as pd
import pytest
import simpy

from simulator.validate_offload import (
    CONTENTION_FACTORS,
    case_io,
    compare,
    contention_input,
    contention_probes,
    markdown_tables,
)
from simulator.workload.host_share import HostShare

from offload_cases import CFG, RUN


def _timeline(jobs):
    """jobs: (name, class, start, alone_s, {class: beside_s}) -> {name: end time} on one HostShare."""
    env = simpy.Environment()
    share = HostShare(env)
    end = {}

    def job(name, cls, start, alone, beside):
        yield env.timeout(start)
        yield from share.run(cls, alone, beside)
        end[name] = env.now

    for j in jobs:
        env.process(job(*j))
    env.run()
    assert share.active == {c: 0 for c in share.active}
    return end


def test_rate_switch_exact_timeline():
    # adam alone 0..0.5 (half done); both 0.5..1.5: adam's other half at 1/2 per s (1 s), io 1/1.5 per s (2/3 done);
    # io alone from 1.5: 1/3 left at 1 per s -> 1.8333
    adam = {"io_read": 2.0, "io_write": 4.0}
    end = _timeline([("adam", "adam", 0.0, 1.0, adam), ("io", "io_read", 0.5, 1.0, {"adam": 1.5})])
    assert end["adam"] == pytest.approx(1.5) and end["io"] == pytest.approx(1.5 + 1 / 3)
    # the same beside a write: the update at 1/4 per s from 0.5: 0.5 / (1/4) = 2 s -> 2.5; the write (1.5 s beside)
    # is done at 2.0, so the update's last 0.5 s run at 1/4 ... : 0.5..2.0 does 1.5 / 4 = 0.375, 0.125 left alone
    end = _timeline([("adam", "adam", 0.0, 1.0, adam), ("io", "io_write", 0.5, 1.0, {"adam": 1.5})])
    assert end["io"] == pytest.approx(2.0) and end["adam"] == pytest.approx(2.125)
    # no overlap: alone durations exactly
    assert _timeline([("a", "adam", 0.0, 1.0, {"io_read": 3.0}), ("b", "io_read", 1.0, 2.0, {"adam": 5.0})]
                     ) == pytest.approx({"a": 1.0, "b": 3.0})
    # two jobs of one class do not slow each other, nor does a class the job does not name
    assert _timeline([("a", "io_read", 0.0, 1.0, {"adam": 9.0}), ("b", "io_read", 0.2, 1.0, {"adam": 9.0}),
                      ("c", "io_write", 0.1, 1.0, {"adam": 9.0})]) == pytest.approx({"a": 1.0, "b": 1.2, "c": 1.1})
    # an io job inside an update: the io entirely beside (1.5 s), the update 1 s alone-equivalent + 1.5 s at 1/2
    end = _timeline([("adam", "adam", 0.0, 2.0, {"io_read": 4.0}), ("io", "io_read", 0.5, 1.0, {"adam": 1.5})])
    assert end["io"] == pytest.approx(2.0)
    assert end["adam"] == pytest.approx(0.5 + 1.5 + (2.0 - 0.5 - 1.5 / 2)) and end["adam"] == pytest.approx(2.75)
    with pytest.raises(ValueError, match="durations"):
        list(HostShare(simpy.Environment()).run("io_read", -1.0, {}))


def _probe_rows(config, placement, prefetch, values):
    rows = []
    for (pos, q, cond), v in values.items():
        unit = "Mparams_per_s" if q == "adam" else "GBps"
        rows.append(dict(RUN, config=config, placement=placement, prefetch=prefetch,
                         metric=f"contention_{pos}_{q}_{cond}_{unit}", value=v))
    return rows


def test_contention_input_is_the_mean_of_beside_over_alone_per_quantity():
    probes = {("before", "adam", "alone"): 1600.0, ("before", "adam", "beside_read"): 800.0,
              ("after", "adam", "alone"): 1000.0, ("after", "adam", "beside_read"): 900.0,
              ("after", "adam", "beside_write"): 300.0,
              ("before", "io_read", "alone"): 2.0, ("before", "io_read", "beside"): 1.0,
              ("after", "io_read", "beside"): 5.0,  # no alone value at this position: skipped
              ("before", "io_write", "alone"): 0.0, ("before", "io_write", "beside"): 1.0}  # non-positive: skipped
    factors, label = contention_input(probes)
    assert factors == pytest.approx({"contention_cpu_adam_read": (0.5 + 0.9) / 2, "contention_cpu_adam_write": 0.3,
                                     "contention_disk_read": 0.5})
    assert "adam beside_read x0.70 over 2" in label and "io_read beside x0.50 over 1" in label
    assert contention_input({}) is None and contention_input(None) is None
    assert contention_input({("before", "adam", "alone"): 1.0}) is None
    # the frame reader: config / placement / prefetch of the case; a repeated row keeps the mean
    rows = _probe_rows("cfg x", "ssd", "on", {("before", "adam", "alone"): 1000.0,
                                              ("before", "adam", "beside_read"): 600.0})
    rows.append(dict(rows[-1], value=800.0))
    got = contention_probes(pd.DataFrame(rows + [dict(RUN, config="cfg x", placement="ssd", prefetch="on",
                                                      metric="step_ms", value=1.0)]))
    assert got == {(RUN["date"], RUN["commit"], RUN["device"], "cfg x", "ssd", "on"): {
        ("before", "adam", "alone"): 1000.0, ("before", "adam", "beside_read"): 700.0}}
    from simulator.workload.training import CONTENTION_KEYS

    assert set(CONTENTION_FACTORS.values()) == set(CONTENTION_KEYS)
    from reference.offload.bench import CONTENTION_PAIRS

    # every pair the bench writes is read back; every non-alone pair is a factor
    assert {p for p in CONTENTION_PAIRS if p[1] != "alone"} <= set(CONTENTION_FACTORS)


def _case(placement, prefetch, metric, v):
    return dict(RUN, config=CFG + " cache=1", placement=placement, prefetch=prefetch, metric=metric, value=v)


def test_contention_slows_the_update_of_an_ssd_case_only_where_it_overlaps_io():
    from simulator.validate_offload import parse_config

    cfg = parse_config(CFG + " cache=1")
    io = (("cpu_adam", 2e9), ("cpu_adam_fp32grad", 2e9), ("disk_read", 1e9), ("disk_write", 1e9))
    probes = {("before", "adam", "alone"): 1000.0, ("before", "adam", "beside_read"): 500.0,
              ("before", "adam", "beside_write"): 500.0,
              ("before", "io_read", "alone"): 1.0, ("before", "io_read", "beside"): 0.8,
              ("before", "io_write", "alone"): 1.0, ("before", "io_write", "beside"): 0.8}
    got, label = case_io(io, {}, cfg, "ssd", RUN["device"], None, probes)
    assert dict(got)["contention_cpu_adam_write"] == pytest.approx(0.5) and "contention" in label
    assert case_io(io, {}, cfg, "gpu", RUN["device"], None, probes) == (io, "")

    base = []
    for pf in ("on", "off"):
        base += [_case("ssd", pf, "cpu_adam_ms_per_step", 10.0), _case("ssd", pf, "step_ms", 100.0)]
    base += [_case("cpu", "on", "cpu_adam_ms_per_step", 10.0)]
    rows = base + _probe_rows(CFG + " cache=1", "ssd", "on", probes) + _probe_rows(CFG + " cache=1", "cpu", "on", probes)
    a = compare(pd.DataFrame(base), traces=None).set_index(["placement", "prefetch", "metric"])
    bf = compare(pd.DataFrame(rows), traces=None)
    b = bf.set_index(["placement", "prefetch", "metric"])
    md = markdown_tables(bf)  # per case and position, and the factors its simulation takes
    assert "Contention probes (task hH" in md
    assert "| ssd | on | before | 1000 | 500 | 500 | 1 / 0.8 | 1 / 0.8 | - / - |" in md
    assert "| ssd | on | factors | - | x0.50 | x0.50 | x0.80 | x0.80 | - |" in md
    # ssd on: the update overlaps the I/O queue's write-backs and staged reads -> slower, never more than 1 / 0.5
    slow = b.loc[("ssd", "on", "cpu_adam_ms_per_step"), "predicted"] / a.loc[("ssd", "on", "cpu_adam_ms_per_step"),
                                                                              "predicted"]
    assert 1.0 < slow <= 2.0 + 1e-9
    assert b.loc[("ssd", "on", "step_ms"), "predicted"] >= a.loc[("ssd", "on", "step_ms"), "predicted"]
    # a case without its own contention rows keeps its prediction exactly (ssd off here; cpu: the probes are its own
    # but there is no SSD I/O to contend with)
    for key in (("ssd", "off", "cpu_adam_ms_per_step"), ("ssd", "off", "step_ms"), ("cpu", "on", "cpu_adam_ms_per_step")):
        assert b.loc[key, "predicted"] == a.loc[key, "predicted"]
    assert "contention" in b.loc[("ssd", "on", "step_ms"), "note"] and "x0.5" in b.loc[("ssd", "on", "step_ms"), "note"]
    con = b[b.index.get_level_values("metric").str.startswith("contention_")]
    assert len(con) == 14 and con["used_for_fitting"].all() and (con["status"] == "not_modelled").all()
    assert con["note"].str.contains("task hH").all() and con["predicted"].isna().all()


def test_factors_of_one_change_nothing_and_the_busy_time_is_the_elapsed_one():
    from simulator.validate_offload import parse_config, simulate

    cfg = parse_config(CFG + " cache=1")
    io = (("cpu_adam", 2e9), ("cpu_adam_fp32grad", 2e9), ("disk_read", 1e9), ("disk_write", 1e9))
    plain = simulate(cfg, "ssd", 1, io)
    ones = simulate(cfg, "ssd", 1, tuple(sorted(io + tuple((k, 1.0) for k in set(CONTENTION_FACTORS.values())))))
    assert ones["step_time_s"] == pytest.approx(plain["step_time_s"], rel=1e-9)
    assert ones["busy_s"] == pytest.approx(plain["busy_s"], rel=1e-9)
    slow_io = simulate(cfg, "ssd", 1, tuple(sorted(io + (("contention_disk_read", 0.5), ("contention_disk_write", 0.5)))))
    # the I/O's busy time grows where it overlaps the update, at most 2x; the bytes do not change
    r = slow_io["busy_s"]["ssd_read"] / plain["busy_s"]["ssd_read"]
    assert 1.0 <= r <= 2.0 + 1e-9 and slow_io["bytes"] == pytest.approx(plain["bytes"])
    assert not math.isnan(slow_io["step_time_s"])
