"""simulator.validate_offload after task hB: the engine's I/O-cycle probe is the SSD input where a run has it, the
thread A/B cases and the thread diagnostics are listed (not predicted), and the markdown shows the A/B (code:
simulator.validate_offload_inputs)."""

import pandas as pd

from simulator.validate_offload import (
    AB_SUFFIX,
    IO_CYCLE,
    THREAD_DIAGNOSTICS,
    compare,
    markdown_tables,
)

from offload_cases import RUN

CFG = "paper-13.9b-scaled L2 D512 E4 k1 F1024 bf16 B2 S256 steps6 cache=0"


def _bw(metric, v):
    return dict(RUN, config="bandwidth", placement="ssd", prefetch="-", metric=metric, value=v)


def test_the_io_cycle_probe_wins_over_the_block_and_plain_file_probes():
    case = dict(RUN, config=CFG, placement="ssd", prefetch="off", metric="ssd_read_gb_per_step", value=1.0)
    plain = [_bw("ssd_read_GBps", 1.5), _bw("ssd_write_GBps", 1.7)]
    block = [_bw("ssd_block_read_GBps", 0.05), _bw("ssd_block_write_GBps", 0.07), _bw("ssd_block_rewrite_prep_GBps", 0.9)]
    cycle = [_bw("ssd_cycle_read_GBps", 0.03), _bw("ssd_cycle_write_GBps", 0.04), _bw("ssd_cycle_prep_GBps", 0.6)]
    with_cycle = compare(pd.DataFrame([case] + plain + block + cycle), traces=None)
    without = compare(pd.DataFrame([case] + plain + block), traces=None)
    n = with_cycle.iloc[0]["note"]
    assert "disk_read 3e+07/s" in n and "disk_write 4e+07/s" in n and "ssd_write_prep 6e+08/s" in n
    assert not any(k in n for k in IO_CYCLE)  # the helper keys are folded into the ones the simulation reads
    assert "disk_read 5e+07/s" in without.iloc[0]["note"]
    st = with_cycle.set_index("metric")
    assert st.loc["ssd_cycle_read_GBps", "status"] == st.loc["ssd_cycle_write_GBps", "status"] == "fitted"
    assert st.loc["ssd_cycle_prep_GBps", "status"] == "not_modelled"  # no simulator default for it
    assert st.loc["ssd_cycle_prep_GBps", "used_for_fitting"]


def test_thread_ab_cases_and_thread_diagnostics_are_listed_not_predicted():
    label, rest = CFG.split(" ", 1)
    rows = []
    for lab, step, adam, threads in ((label, 900.0, 100.0, 14), (label + AB_SUFFIX, 1200.0, 180.0, 16)):
        for metric, v in (("step_ms", step), ("cpu_adam_ms_per_step", adam), ("threads_adam", threads)):
            rows.append(dict(RUN, config=f"{lab} {rest}", placement="cpu", prefetch="on", metric=metric, value=v))
    rows.append(dict(RUN, config="cpu_adam_engine E4 P1048576 grad=-", placement="gpu+pcie+ssd@worker", prefetch="-",
                     metric="ssd_beside_adam_read_GBps", value=0.8))
    rows.append(dict(RUN, config="bandwidth", placement="cpu", prefetch="-", metric="cpu_threads_worker", value=14))
    val = compare(pd.DataFrame(rows), traces=None)
    lab = val["config"].str.split().str[0]
    ab = val[lab.str.endswith(AB_SUFFIX)]
    assert len(ab) == 3 and (ab["status"] == "not_modelled").all()
    assert ab[ab["metric"] != "threads_adam"]["note"].str.contains("A/B case").all()
    assert ab["predicted"].isna().all()
    main = val[(lab == label) & (val["metric"] == "step_ms")]
    assert len(main) == 1 and main["status"].iloc[0] == "validated" and main["predicted"].iloc[0] > 0
    diag = val[val["metric"].isin(THREAD_DIAGNOSTICS)]
    assert set(diag["metric"]) == {"threads_adam", "ssd_beside_adam_read_GBps", "cpu_threads_worker"}
    assert (diag["status"] == "not_modelled").all() and diag["note"].str.len().gt(20).all()
    assert diag["note"].str.contains("not an input|thread layout").all()
    md = markdown_tables(val)
    assert "Thread A/B (task hB)" in md
    assert f"| {label} | cpu | on | 900 | 1200 | 100 | 180 | 14 / 16 |" in md
