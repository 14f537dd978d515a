"""simulator.validate_offload (code: simulator.validate_offload_bytes), task hF: the offload bench's byte and counter
rows.

The H2D bytes follow the engine's copy schedule (checked here against the reference engine itself) times the experts
the router sends tokens to (the run's routing record); counter rows of the bench's old counter windows are
``measurement_bug`` by a rule on the run's commit.
"""

import json

import pandas as pd
import pytest

from semoe.trace import TraceRow, write_csv
from simulator.validate_offload import (
    MEASUREMENT_BUG,
    compare,
    config_string,
    copy_schedule,
    measurement_bug,
    parse_config,
    routed_h2d_gb,
    rows,
    trace_routing,
)

# unknown commits: the rule falls back to the row's date against each fix's date
OLD, MID, NEW = "2026-11-24T06:27:20Z", "2026-11-24T07:04:17Z", "2026-11-24T08:25:23Z"
A = "a_compute_bound preset=tiny L4"


def test_measurement_bug_follows_the_counter_window_fixes():
    bug = measurement_bug
    # before 3bd5bc4: only the counters the engine's threads advance after step() returned
    for metric in ("cpu_adam_ms_per_step", "ssd_read_gb_per_step", "ssd_write_gb_per_step"):
        assert bug("nocommit", OLD, A, "ssd", "off", metric)
    assert bug("nocommit", OLD, A, "cpu", "on", "h2d_gb_per_step")  # the layer-ahead fetch runs in the update
    assert bug("nocommit", OLD, A, "cpu", "off", "h2d_gb_per_step") is None  # every copy on the training thread
    assert bug("nocommit", OLD, A, "cpu", "on", "d2h_gb_per_step") is None  # counted inside step()
    assert bug("nocommit", OLD, A, "ssd", "on", "cache_hit_rate") is None
    # from 3bd5bc4 until b638fe8: every counter of the --profile cases (config a, offloaded, prefetch on)
    for metric in ("h2d_gb_per_step", "d2h_gb_per_step", "cpu_adam_ms_per_step", "cache_hit_rate"):
        assert "profile" in bug("nocommit", MID, A, "ssd", "on", metric)
    assert bug("nocommit", MID, A, "ssd", "off", "d2h_gb_per_step") is None
    assert bug("nocommit", MID, "b_over_budget L6", "ssd", "on", "ssd_read_gb_per_step") is None
    # fixed runs, and metrics that are no counter
    assert bug("nocommit", NEW, A, "ssd", "on", "d2h_gb_per_step") is None
    assert bug("nocommit", OLD, A, "ssd", "on", "step_ms") is None


def _cache_rows(used: dict[tuple[int, int], int]) -> list[TraceRow]:
    return [TraceRow(0, layer, step, "cache_miss", 0.1 * step, 0.1 * step, 1, 0, "cpu_cache")
            for (step, layer), n in used.items() for _ in range(n)]


def test_trace_routing_counts_each_counted_steps_routed_experts(tmp_path):
    used = {(s, lay): n for s in range(4) for lay, n in ((0, 8), (1, 8 - s))}
    write_csv(_cache_rows(used) + [TraceRow(0, 0, 2, "h2d_fetch", 0.2, 0.3, 99, 0, "pcie_h2d")], tmp_path / "t.csv")
    got = trace_routing(tmp_path / "t.csv", warmup=2, counted=2)  # with the step before the counted ones
    assert got == {k: v for k, v in used.items() if k[0] >= 1}
    assert trace_routing(tmp_path / "t.csv", warmup=2, counted=3) is None  # step 4 was not recorded
    # per step: copies x bytes per expert x the routed experts of the layer (a missing layer routed none)
    sched = {0: (9.0, 10.0, 8), 1: (8.0, 10.0, 8), 2: (8.0, 10.0, 8)}
    assert routed_h2d_gb(sched, got, 2, 2, depth=0) * 1e9 == pytest.approx(9 * 10 * 8 + 8 * 10 * (6 + 5) / 2)
    # with prefetch a layer's first copy in a step moves the previous step's experts (topped up on demand)
    assert routed_h2d_gb(sched, got, 2, 2, depth=1) * 1e9 == pytest.approx(
        9 * 10 * 8 + 10 * ((7 + 7 * 6) + (6 + 7 * 5)) / 2)
    first = trace_routing(tmp_path / "t.csv", warmup=0, counted=1)  # no step before: this step's experts
    assert routed_h2d_gb(sched, first, 0, 1, depth=1) == routed_h2d_gb(sched, first, 0, 1, depth=0)


@pytest.mark.parametrize("depth", [1, 0])
def test_copy_schedule_is_the_engines(tmp_path, depth):
    """The reference engine (the bench's own run_case, on the CPU) copies each layer as often per step as the
    simulated pool does, and the bench's counter is the trace's copies over whole counted steps."""
    from reference.offload.bench import run_case
    from semoe.presets import load_model
    from semoe.trace import read_csv

    spec = load_model("tiny").replace(name="t", layers=4, hidden=32, ffn=64, heads=2)
    micro, steps, warmup = 3, 2, 1
    trace = tmp_path / "trace.csv"
    res = run_case(spec, 4, 32, "cpu", depth, 0, steps, warmup, tmp_path / "ssd", trace, lambda: 1e9, micro)
    cfg = parse_config(config_string(spec, 4, 32, label="a_compute_bound", steps=steps + 1, warmup=warmup,
                                     micro_batches=micro))
    counted = range(warmup, warmup + res["counted_steps"])
    routing = trace_routing(trace, cfg.warmup, cfg.steps)
    assert routing == {(s, lay): spec.experts for s in range(warmup - 1, counted[-1] + 1) for lay in range(4)}
    h2d = [r for r in read_csv(trace) if r.phase.startswith("h2d") and r.micro_batch in counted]
    per_expert = {r.bytes for r in h2d} == {spec.experts * 4 * 2 * 32 * 64}  # whole fp32 layers
    assert per_expert
    sched = copy_schedule(cfg, "cpu", depth)
    assert sorted(sched) == [0, 1, 2, 3]
    for lay, (copies, _, used) in sched.items():
        assert used == spec.experts
        assert sum(r.layer == lay for r in h2d) == copies * len(counted), (lay, copies)
    assert sum(c for c, *_ in sched.values()) == 2 * (4 - 2) * micro + 2  # 4.67 layer copies per micro-batch
    assert res["h2d_gb_per_step"] == pytest.approx(sum(r.bytes for r in h2d) / len(counted) / 1e9)


def _run_dir(path, date, used_last_layer: int, E=8):
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"date": date, "commit": "nocommit", "device": "H100"}))
    used = {(s, lay): (used_last_layer if lay == 3 else E) for s in range(2, 6) for lay in range(4)}
    write_csv(_cache_rows(used) + [TraceRow(0, -1, s, "step", s, s + 0.5, 0, 0, "compute") for s in range(6)],
              path / "trace_a_cpu_on.csv")
    return path


def test_h2d_rows_take_the_runs_routing_and_old_counters_are_measurement_bugs(tmp_path):
    from semoe.presets import load_model

    spec = load_model("tiny").replace(name="a", layers=4, hidden=256, ffn=512, experts=8, heads=4, dtype="bf16")
    cfg = config_string(spec, 4, 128, label="a_compute_bound", steps=4, warmup=2, micro_batches=8)
    base = {"device": "H100", "commit": "nocommit", "config": cfg, "placement": "cpu"}
    df = pd.DataFrame([dict(base, date=d, prefetch=pf, metric=m, value=v) for d, pf, m, v in (
        (NEW, "on", "h2d_gb_per_step", 1.0), (NEW, "off", "h2d_gb_per_step", 1.0), (OLD, "on", "h2d_gb_per_step", 1.0),
        (OLD, "on", "d2h_gb_per_step", 1.0), (OLD, "on", "cpu_adam_ms_per_step", 10.0))])
    traces = _run_dir(tmp_path / "offload", NEW, used_last_layer=2)
    out = compare(df, traces=traces).set_index(["date", "prefetch", "metric"])
    routed, apriori = out.loc[(NEW, "on", "h2d_gb_per_step")], out.loc[(NEW, "off", "h2d_gb_per_step")]
    assert routed["status"] == "validated" and "routed experts" in routed["note"]
    assert apriori["status"] == "not_modelled" and "no routing record" in apriori["note"]  # no trace of that case
    # layer 3 routes 2 of 8 experts: its copies move a quarter of the a-priori bytes
    sched = copy_schedule(parse_config(cfg), "cpu", 1)
    share = sched[3][0] / sum(c for c, *_ in sched.values())
    assert routed["predicted"] == pytest.approx(apriori["predicted"] * (1 - 0.75 * share))
    old = out.loc[OLD]
    assert old.loc[("on", "h2d_gb_per_step"), "status"] == old.loc[("on", "cpu_adam_ms_per_step"), "status"] == MEASUREMENT_BUG
    assert old.loc[("on", "d2h_gb_per_step"), "status"] == "validated"
    # semoe validate: shown with the prediction, not scored
    got = {r["metric"]: r for r in rows_of(df, tmp_path)}
    bug = got["cpu prefetch=on cpu_adam_ms_per_step"]
    assert bug["status"] == "not_modelled" and bug["note"].startswith(MEASUREMENT_BUG) and bug["predicted"] > 0


def rows_of(df, tmp_path):
    path = tmp_path / "bench.csv"
    df.to_csv(path, index=False)
    return [r for r in rows(path) if r["run"].endswith(OLD)]
