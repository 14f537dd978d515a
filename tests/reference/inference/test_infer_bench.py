"""Issue 7's GPU benchmark (``reference/inference/bench.py --suite issue7``) on a tiny CPU model, so the first GPU
run does not die on a typo: the once-per-run engine host probe, the timed rows' repeats interleaved with the
adjacent host probes (medians, spread rows, repeats.csv), the expert pool's call trace, and the simulator's use of
them (``simulator.validate_infer``)."""

from __future__ import annotations

import csv
from collections import defaultdict

import pandas as pd
import pytest

from reference.inference import bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench7")
    # one batch (2: expert-aware decode without the ring fallback) keeps it short; every section runs; odd
    # repeats for the resident rows (the median is one repeat's), the ring decode single-pass
    assert bench.main(["--suite", "issue7", "--quick", "--out", str(out), "--reps", "1", "--batches", "2",
                       "--repeats", "3", "--decode-repeats", "3", "--ring-repeats", "2", "--expert-repeats", "2",
                       "--ring-decode-repeats", "1"]) == 0
    rows = list(csv.DictReader((out / "infer_rows.csv").open()))
    return out, rows, {(r["mode"], int(r["batch"]), r["metric"]): float(r["value"]) for r in rows}


def test_quick_host_probe_rows(quick_run):
    _, rows, got = quick_run
    L = got[("-", 0, "host_probe_moe_blocks")]
    assert L == 2
    for mode in ("resident", "ring", "expert", "expert_nopred"):
        assert got[(mode, 2, "host_prefill_ms")] > 0 and got[(mode, 2, "host_decode_ms_per_step")] > 0
    assert got[("resident", 2, "host_decode_copies_per_step")] == 0
    # the run's ring has K = 1 < L = 2 blocks and the probe mirrors it: every block copied once per pass
    assert got[("ring", 2, "budget_K")] == 1
    assert got[("ring", 2, "host_decode_copies_per_step")] == L == got[("ring", 2, "host_prefill_copies")]
    assert set(rows[0]) == set(bench.COLUMNS)


def test_quick_adjacent_probe_next_to_every_timed_row(quick_run):
    _, rows, got = quick_run
    timed = [("resident", 2, "prefill"), ("resident", 2, "decode"), ("ring_K1", 2, "prefill"), ("ring", 2, "prefill"),
             ("ring", 2, "decode"), ("expert", 2, "decode"), ("expert_nopred", 2, "decode")]
    for mode, B, phase in timed:
        ms, cp = bench.ADJ_METRICS[phase]
        assert got[(mode, B, f"{ms}_before")] > 0 and got[(mode, B, f"{ms}_after")] > 0, (mode, B, phase)
        assert (mode, B, cp) in got
    adj = {(r["mode"], int(r["batch"]), r["metric"]) for r in rows if r["metric"].startswith("host_adj_")}
    # repeated rows add the median, min and max of their probes; the single-pass ring decode does not
    assert len(adj) == 6 * (len(timed) - 1) + 3  # nothing else probed adjacently
    assert ("ring", 2, "host_adj_decode_ms_per_step_median") not in got
    assert got[("resident", 2, "host_adj_decode_copies_per_step")] == 0
    assert got[("ring", 2, "host_adj_decode_copies_per_step")] == 2 == got[("ring_K1", 2, "host_adj_prefill_copies")]
    # order: the before probe precedes the timed passes, the after probe follows them (the row is written last)
    order = [(r["mode"], int(r["batch"]), r["metric"]) for r in rows]
    for mode, metric, phase in (("resident", "prefill_tokens_per_s", "prefill"), ("ring", "decode_tokens_per_s", "decode"),
                                ("expert", "hit_rate_pooled", "decode")):
        ms = bench.ADJ_METRICS[phase][0]
        before, after = order.index((mode, 2, f"{ms}_before")), order.index((mode, 2, f"{ms}_after"))
        assert before + 1 == after < order.index((mode, 2, metric)), mode  # nothing else probed in between


def test_quick_pool_trace_replays_to_the_engines_counts(quick_run):
    from simulator.workload.inference import replay_pool_trace

    out, _, _ = quick_run
    stats = list(csv.DictReader((out / "expert_trace_stats.csv").open()))
    # every pass (a fresh engine on other prompts) is traced: the 2 timed repeats per mode and expert_nopred's
    # count pass (--quick: COUNT_PASSES_QUICK, 3 passes at B = 2)
    assert sorted((s["mode"], int(s["batch"]), int(s["repeat"])) for s in stats) == [
        ("expert", 2, 0), ("expert", 2, 1), ("expert_nopred", 2, 0), ("expert_nopred", 2, 1), ("expert_nopred", 2, 2)]
    calls, shape = defaultdict(list), {}
    for r in csv.DictReader((out / "expert_trace.csv").open()):
        k = (r["mode"], int(r["batch"]), int(r["repeat"]))
        calls[k].append((int(r["step"]), int(r["block"]), r["call"], tuple(int(e) for e in r["experts"].split())))
        shape[k] = (int(r["pool_slots"]), int(r["ring_slots"]))
    for s in stats:
        k = (s["mode"], int(s["batch"]), int(s["repeat"]))
        blocks = [int(b) for b in s["moe_blocks"].split()]
        got = replay_pool_trace(calls[k], shape[k][0], int(s["experts"]), blocks, shape[k][1])
        assert got == {m: int(s[m]) for m in ("hits", "misses", "prefetched", "prefetch_used")}, k


def test_quick_validate_uses_the_adjacent_probe(quick_run):
    """Each bf16 row of a run with adjacent probes is simulated with the probe of its own (mode, phase, batch):
    a resident decode step at tiny widths is host-bound on the H100, so it takes about the mean of the row's
    before and after probe steps (never less), not the once-per-run probe's median."""
    from simulator import validate_infer as V

    out, _, got = quick_run
    d = V.predict_all(pd.read_csv(out / "infer_rows.csv", dtype={"commit": str})).set_index(["mode", "batch", "metric"])
    assert (d.loc[[k for k in d.index if k[2].startswith("host_")], "status"] == "input").all()
    for B in (2,):  # repeated: the median of the row's probes
        step = got[("resident", B, "host_adj_decode_ms_per_step_median")]
        pred = d.loc[("resident", B, "decode_tokens_per_s"), "predicted"]
        assert 0.8 * B * 1e3 / step < pred <= B * 1e3 / step * 1.0001
        assert "interleaved with its repeats (median" in d.loc[("resident", B, "decode_tokens_per_s"), "note"]
        # the single-pass ring decode keeps the mean of its before and after probes
        assert "measured right before and after it" in d.loc[("ring", B, "decode_tokens_per_s"), "note"]
    assert (d.loc[[k for k in d.index if k[2].endswith(("_min", "_max", "_repeats"))
                   and not k[2].startswith(("host_", "h2d_"))], "kind"] == "spread").all()
    # the copy-bound rows take their own copy probes' bandwidth (the rule), which are inputs
    assert (d.loc[[k for k in d.index if k[2].startswith("h2d_adj_")], "status"] == "input").all()
    bw = got[("ring", 2, "h2d_adj_prefill_GBps_median")]
    assert f"PCIe: {bw:.2f} GB/s, the median of this row's prefill copy probes" in d.loc[("ring", 2, "prefill_tokens_per_s"), "note"]
    bw = (got[("ring", 2, "h2d_adj_decode_GBps_before")] + got[("ring", 2, "h2d_adj_decode_GBps_after")]) / 2
    assert f"PCIe: {bw:.2f} GB/s, the mean of this row's decode copy probes" in d.loc[("ring", 2, "decode_tokens_per_s"), "note"]
    assert "PCIe:" not in str(d.loc[("resident", 2, "prefill_tokens_per_s"), "note"])
    # the in-pass copy rows are predicted by the rate their pass is simulated at (copy probes: median / mean)
    pre = d.loc[("ring", 2, "prefill_copy_GBps_in_pass")]
    assert pre["predicted"] == pytest.approx(got[("ring", 2, "h2d_adj_prefill_GBps_median")])
    assert pre["kind"] == "bandwidth" and pre["status"] == "validated"
    assert d.loc[("ring", 2, "decode_copy_GBps_in_pass"), "predicted"] == pytest.approx(bw)
    assert d.loc[("ring_K1", 2, "prefill_copy_GBps_in_pass_min"), "kind"] == "spread"


def test_quick_pool_replay_note(quick_run, tmp_path, monkeypatch):
    """validate_infer notes the pool replay of a run's traced routing on its expert-aware pool rows."""
    import shutil

    from simulator import validate_infer as V

    out, rows, _ = quick_run
    commit = rows[0]["commit"]
    for name in ("expert_trace.csv", "expert_trace_stats.csv"):
        shutil.copy(out / name, tmp_path / f"2026-12-01_{commit}_{name}")
    from simulator import validate_infer_predict

    monkeypatch.setattr(validate_infer_predict, "TRACES", tmp_path)  # the part that reads it
    V.pool_replays.cache_clear()
    try:
        d = V.predict_all(pd.read_csv(out / "infer_rows.csv", dtype={"commit": str})).set_index(["mode", "batch", "metric"])
    finally:
        V.pool_replays.cache_clear()
    for mode, passes in (("expert", 2), ("expert_nopred", 3)):
        note = d.loc[(mode, 2, "hit_rate_pooled"), "note"]
        assert "pool replay on this run's traced routing" in note and "equal to the engine's" in note
        assert "NOT equal" not in note
        assert f"pooled over {passes} measured passes" in note and f"over {V.POOL_SEEDS_SAMPLED} routing seeds" in note
    assert "pool replay" not in d.loc[("ring", 2, "decode_tokens_per_s"), "note"]


def test_interleave_order():
    seen = []
    out = bench.interleave(3, lambda i: seen.append(f"t{i}") or 10 * i, lambda: seen.append("p"))
    assert out == [0, 10, 20] and seen == ["p", "t0", "p", "t1", "p", "t2", "p"]
    assert bench.interleave(2, lambda i: i) == [0, 1]  # no probe: the repeats alone
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.interleave(0, lambda i: i)


def test_quick_repeats_median_and_spread(quick_run):
    """Each timed row is repeated R times between R + 1 probes (repeats.csv, in order); its metric is the median
    of the repeats, its _min / _max rows their spread, its host_adj_*_median the median of its probes."""
    import statistics

    out, _, got = quick_run
    reps = defaultdict(list)
    for r in csv.DictReader((out / "repeats.csv").open()):
        reps[(r["mode"], int(r["batch"]), r["phase"])].append((int(r["repeat"]), r["what"], float(r["value"])))
    R = {("resident", "prefill"): 3, ("resident", "decode"): 3, ("ring_K1", "prefill"): 2, ("ring", "prefill"): 2,
         ("ring", "decode"): 1, ("expert", "decode"): 2, ("expert_nopred", "decode"): 2}
    assert set(reps) == {(m, 2, ph) for m, ph in R}
    G, P = 3, 8  # --quick
    for (mode, ph), n in R.items():
        seq = reps[(mode, 2, ph)]
        seq = [x for x in seq if x[1] in ("probe_ms", "timed_s")]  # (expert-aware: + each pass's pool counters)
        assert [w for _, w, _ in seq] == ["probe_ms", "timed_s"] * n + ["probe_ms"], mode
        assert [i for i, _, _ in seq] == [i // 2 for i in range(2 * n + 1)]
        secs = [v for _, w, v in seq if w == "timed_s"]
        probes = [v for _, w, v in seq if w == "probe_ms"]
        assert got[(mode, 2, f"{ph}_repeats")] == n
        ms = bench.ADJ_METRICS[ph][0]
        assert got[(mode, 2, f"{ms}_before")] == pytest.approx(probes[0], rel=1e-5)
        assert got[(mode, 2, f"{ms}_after")] == pytest.approx(probes[-1], rel=1e-5)
        metric = f"{ph}_tokens_per_s"
        per = [2 * (P if ph == "prefill" else G - 1) / x for x in secs]
        assert got[(mode, 2, metric)] == pytest.approx(statistics.median(per), rel=1e-5), mode
        if n > 1:
            assert got[(mode, 2, f"{ms}_median")] == pytest.approx(statistics.median(probes), rel=1e-5)
            assert got[(mode, 2, f"{metric}_min")] == pytest.approx(min(per), rel=1e-5)
            assert got[(mode, 2, f"{metric}_max")] == pytest.approx(max(per), rel=1e-5)
            assert got[(mode, 2, f"{metric}_min")] <= got[(mode, 2, metric)] <= got[(mode, 2, f"{metric}_max")]
        else:
            assert (mode, 2, f"{metric}_min") not in got
    L = got[("-", 0, "host_probe_moe_blocks")]
    res = [2 * P / x for x in (v for _, w, v in reps[("resident", 2, "prefill")] if w == "timed_s")]
    assert got[("resident", 2, "block_compute_ms")] == pytest.approx(1e3 * 2 * P / statistics.median(res) / L, rel=1e-5)
    # expert-aware repeats each build a fresh engine on other prompts: the count rows pool their counters
    # (repeats.csv pool_* rows, one per pass and counter: expert_nopred's count pass too), no single-pass count rows
    for mode, passes in (("expert", 2), ("expert_nopred", 3)):
        pc = defaultdict(float)
        for i, w, v in reps[(mode, 2, "decode")]:
            if w.startswith("pool_"):
                pc[w] += v
        assert got[(mode, 2, "pool_passes")] == passes
        assert got[(mode, 2, "hit_rate_pooled")] == pytest.approx(
            pc["pool_hits"] / max(1, pc["pool_hits"] + pc["pool_misses"]), rel=1e-5)
        assert (mode, 2, "hit_rate") not in got and (mode, 2, "decode_GB_copied_per_step") not in got
        if mode == "expert_nopred":
            assert pc["pool_prefetched"] == 0 and got[(mode, 2, "prefetched_used_frac_pooled")] == 0


def test_repeats_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--suite", "issue7", "--quick", "--out", str(tmp_path), "--repeats", "0"])


def test_pooled_rows_are_ratios_of_sums():
    """The pooled count rows sum the R passes' counters (a pass with many lookups weighs more), not average their
    ratios: hits 0 of 2 and 8 of 10 pool to 8 / 12, not 0.4."""
    st = [{"expert_hits": 0, "expert_misses": 2, "experts_prefetched": 4, "prefetch_used": 1},
          {"expert_hits": 8, "expert_misses": 2, "experts_prefetched": 0, "prefetch_used": 0}]
    got = bench.pooled_rows(st, expert_bytes=10**9, G=3)
    assert got["pool_passes"] == 2
    assert got["hit_rate_pooled"] == pytest.approx(8 / 12)
    assert got["prefetched_used_frac_pooled"] == pytest.approx(1 / 4)
    assert got["decode_GB_copied_per_step_pooled"] == pytest.approx((4 + 4) / (2 * 2))  # 8 experts of 1 GB, 4 steps
    assert bench.pooled_rows(st[1:], 10**9, 3)["prefetched_used_frac_pooled"] == 0  # nothing prefetched


def test_expert_repeats_prompts_and_fallback():
    """Repeat 0 decodes the resident rows' prompts (seed = batch), later repeats other prompts; a batch whose
    tokens are expected to touch >= 95% of the experts falls back to the ring (one repeat)."""
    from semoe.presets import model_preset

    seeds = [bench.expert_prompt_seed(4, i) for i in range(5)]
    assert seeds[0] == 4 and len(set(seeds)) == 5 and not set(seeds[1:]) & {1, 2, 4, 8, 16}
    spec = model_preset("mixtral-8x7b")  # 8 experts, top-2: 8 (1 - 0.75^B) >= 7.6 from B = 11
    assert [bench.falls_back(spec, B) for B in (1, 2, 4, 8, 10, 11, 16)] == [False] * 5 + [True] * 2


def test_quick_adjacent_copy_probes_of_the_copy_bound_rows(quick_run):
    """Every copy-bound row (ring_K<k>, ring prefill / decode, expert-aware decode) gets a pinned H2D copy probe in
    every host-probe slot (R + 1, right after the host probe, so nearest the timed pass): rows
    h2d_adj_<phase>_GBps_before / _after (first / last) and with R > 1 _median / _min / _max over all of them
    (per phase: a ring (mode, batch) times prefill and decode); resident rows get none."""
    import statistics

    out, rows, got = quick_run
    reps = defaultdict(list)
    for r in csv.DictReader((out / "repeats.csv").open()):
        reps[(r["mode"], int(r["batch"]), r["phase"])].append((int(r["repeat"]), r["what"], float(r["value"])))
    R = {("ring_K1", "prefill"): 2, ("ring", "prefill"): 2, ("ring", "decode"): 1, ("expert", "decode"): 2,
         ("expert_nopred", "decode"): 2}
    for (mode, ph), n in R.items():
        m = bench.H2D_ADJ_METRICS[ph]
        seq = [x for x in reps[(mode, 2, ph)] if x[1] in ("probe_ms", "h2d_GBps", "timed_s")]
        assert [w for _, w, _ in seq] == ["probe_ms", "h2d_GBps", "timed_s"] * n + ["probe_ms", "h2d_GBps"], mode
        gb = [v for _, w, v in seq if w == "h2d_GBps"]
        assert all(v > 0 for v in gb)
        assert got[(mode, 2, f"{m}_before")] == pytest.approx(gb[0], rel=1e-5)
        assert got[(mode, 2, f"{m}_after")] == pytest.approx(gb[-1], rel=1e-5)
        if n > 1:
            assert got[(mode, 2, f"{m}_median")] == pytest.approx(statistics.median(gb), rel=1e-5)
            assert got[(mode, 2, f"{m}_min")] == pytest.approx(min(gb), rel=1e-5)
            assert got[(mode, 2, f"{m}_max")] == pytest.approx(max(gb), rel=1e-5)
        else:
            assert (mode, 2, f"{m}_median") not in got
    h2d = {(r["mode"], r["metric"]) for r in rows if r["metric"].startswith("h2d_adj_")}
    assert {mode for mode, _ in h2d} == {"ring_K1", "ring", "expert", "expert_nopred"}
    assert not any(w == "h2d_GBps" for k, v in reps.items() if k[0] == "resident" for _, w, _ in v)
    assert bench.copy_bound("ring_K3") and bench.copy_bound("expert_nopred") and not bench.copy_bound("resident")


def test_h2d_prober_measures_a_positive_bandwidth_and_rejects_bad_sizes():
    """The copy probe samples a diagonal of the store: block i's slice at offset i / L of its buffer, equal
    slices, one block's bytes in all by default (capped at that)."""
    from types import SimpleNamespace

    import torch

    bufs = {b: torch.arange(1 << 16, dtype=torch.int32).to(torch.uint8) + b for b in (3, 5, 9, 11)}
    store = SimpleNamespace(moe_blocks=[3, 5, 9, 11], layer_buffers=bufs)
    p = bench.H2DProber(store)
    stride = (1 << 16) // 4
    assert [s.numel() for s in p.srcs] == [stride] * 4 and p.nbytes == 1 << 16
    for i, (b, s) in enumerate(zip((3, 5, 9, 11), p.srcs)):
        assert torch.equal(s, bufs[b][i * stride : (i + 1) * stride])  # block i's slice i
    assert p.measure() > 0
    small = bench.H2DProber(store, nbytes=1 << 12, copies=2)
    assert [s.numel() for s in small.srcs] == [1 << 10] * 4 and small.measure() > 0
    assert bench.H2DProber(store, nbytes=1 << 30).nbytes == 1 << 16  # capped at one block's bytes
    with pytest.raises(ValueError, match="nbytes and copies must be >= 1"):
        bench.H2DProber(store, nbytes=0)
    with pytest.raises(SystemExit):
        bench.main(["--suite", "issue7", "--quick", "--out", "/tmp/x_never", "--h2d-probe-mb", "0"])


def test_quick_count_passes_pool_into_the_count_rows(quick_run):
    """expert_nopred's count rows pool its 2 timed repeats and 1 untimed count pass (3 routings), expert's its 2
    timed repeats; the count pass is in repeats.csv with its pool counters but no timed seconds; the weights seed
    is a row."""
    out, _, got = quick_run
    assert got[("-", 0, "weights_seed")] == 0
    assert got[("expert_nopred", 2, "pool_passes")] == 3 and got[("expert", 2, "pool_passes")] == 2
    assert got[("expert_nopred", 2, "decode_repeats")] == 2  # the timed rows keep their repeats
    rep = pd.read_csv(out / "repeats.csv")
    nopred = rep[(rep["mode"] == "expert_nopred") & (rep["batch"] == 2)]
    assert sorted(nopred[nopred["what"] == "timed_s"]["repeat"]) == [0, 1]
    assert sorted(nopred[nopred["what"] == "pool_hits"]["repeat"]) == [0, 1, 2]
    assert list(nopred[nopred["what"] == "count_decode_s"]["repeat"]) == [2]  # its untimed-row seconds
    assert (nopred[nopred["what"] == "count_decode_s"]["value"] > 0).all()
    stats = pd.read_csv(out / "expert_trace_stats.csv")
    s = stats[stats["mode"] == "expert_nopred"]
    assert got[("expert_nopred", 2, "hit_rate_pooled")] == pytest.approx(
        s["hits"].sum() / (s["hits"].sum() + s["misses"].sum()), rel=1e-5)


def test_count_passes_round_robin_until_time_or_done():
    """Count passes go one per (mode, batch) in turn up to each one's R, skip ring-fallback batches and rows the
    run did not time, and stop once the run's time is past --count-until-s (the rows keep what they have)."""
    from reference.inference.bench_issue7 import count_passes

    def run(pools, want, until=1e9, budget=None):
        order, clock = [], [0.0]

        def run_pass(mode, B, i):
            assert i == len(pools[(mode, B)])
            pools[(mode, B)].append({"i": i})
            order.append((mode, B))
            clock[0] += 1.0

        n = count_passes(pools, want, run_pass, lambda: clock[0], until, lambda B: B >= 16)
        return n, order

    pools = {("expert_nopred", 1): [{}] * 3, ("expert_nopred", 2): [{}] * 3, ("expert_nopred", 16): [{}]}
    n, order = run({k: list(v) for k, v in pools.items()},
                   {("expert_nopred", 1): 5, ("expert_nopred", 2): 4, ("expert_nopred", 16): 9, ("expert", 4): 9})
    assert n == 3 and order == [("expert_nopred", 1), ("expert_nopred", 2), ("expert_nopred", 1)]
    p = {k: list(v) for k, v in pools.items()}
    n, order = run(p, {("expert_nopred", 1): 50, ("expert_nopred", 2): 50}, until=4.5)
    assert n == 5 and len(p[("expert_nopred", 1)]) == 6 and len(p[("expert_nopred", 2)]) == 5
    assert run({k: list(v) for k, v in pools.items()}, {("expert_nopred", 1): 2})[0] == 0  # has more already


def test_parse_count_passes_and_errors(tmp_path):
    assert bench.parse_count_passes("expert_nopred:1=17,2=48;expert:4=5") == {
        ("expert_nopred", 1): 17, ("expert_nopred", 2): 48, ("expert", 4): 5}
    assert bench.parse_count_passes("none") == {} == bench.parse_count_passes("")
    assert bench.parse_count_passes(bench.COUNT_PASSES_DEFAULT)[("expert_nopred", 2)] == 48
    for bad in ("ring:1=3", "expert_nopred:1=0", "expert_nopred:x=3", "expert_nopred", "expert_nopred:1"):
        with pytest.raises(ValueError, match="count passes"):
            bench.parse_count_passes(bad)
    with pytest.raises(SystemExit):
        bench.main(["--suite", "issue7", "--quick", "--out", str(tmp_path), "--count-passes", "expert:2=-1"])


def test_quick_ring_rows_report_their_in_pass_copies(quick_run):
    """Every timed ring pass (ring_K<k> and ring prefill, ring decode) logs its traced copies in repeats.csv:
    copy_GB = the blocks it copied (every MoE block once per prefill pass at K < L; the decode steps' copies for
    decode), copy_busy_s > 0, copy_GBps_in_pass = their ratio; the row <phase>_copy_GBps_in_pass is their median;
    every timed repeat of every row logs the collector's seconds and collections."""
    import statistics
    out, _, got = quick_run
    rep = pd.read_csv(out / "repeats.csv")
    L = int(got[("-", 0, "host_probe_moe_blocks")])
    layer_GB = got[("-", 0, "expert_GB_total")] / L
    for mode, phase, n in (("ring_K1", "prefill", 2), ("ring", "prefill", 2), ("ring", "decode", 1)):
        g = rep[(rep["mode"] == mode) & (rep["batch"] == 2) & (rep["phase"] == phase)]
        per = {w: g.loc[g["what"] == w].sort_values("repeat")["value"].tolist()
               for w in ("copy_GB", "copy_busy_s", "copy_GBps_in_pass", "gc_s", "gc_n")}
        assert all(len(v) == n for v in per.values()), (mode, phase, per)
        assert all(b > 0 for b in per["copy_busy_s"])
        for gb, busy, rate in zip(per["copy_GB"], per["copy_busy_s"], per["copy_GBps_in_pass"]):
            assert rate == pytest.approx(gb / busy, rel=1e-4)
        if phase == "prefill":  # K < L: every block copied once per pass
            assert per["copy_GB"] == pytest.approx([L * layer_GB] * n, rel=1e-3)
        else:  # the decode steps copy every block once a step (G - 1 steps, --quick G = 3)
            assert per["copy_GB"] == pytest.approx([2 * L * layer_GB] * n, rel=1e-3)
        assert all(s >= 0 for s in per["gc_s"]) and all(c >= 0 for c in per["gc_n"])
        assert got[(mode, 2, f"{phase}_copy_GBps_in_pass")] == pytest.approx(
            statistics.median(per["copy_GBps_in_pass"]), rel=1e-5)
    timed = rep[rep["what"] == "timed_s"]
    gcs = rep[rep["what"] == "gc_s"]
    assert len(gcs) == len(timed)  # every timed repeat, every row


def test_gc_clock_counts_a_forced_collection():
    import gc

    from reference.inference.bench_device import GcClock

    with GcClock() as c:
        gc.collect()
    assert c.n >= 1 and c.s > 0
    n_after = len(gc.callbacks)
    with GcClock():
        pass
    assert len(gc.callbacks) == n_after  # removed again


def test_quick_chunk_map_covers_every_block(quick_run):
    """h2d_chunks.csv: two rounds over every block's pinned buffer, chunks tiling it, positive rates; and every
    traced ring repeat's per-block copy seconds add up to its copy_busy_s."""
    out, _, got = quick_run
    ch = pd.read_csv(out / "h2d_chunks.csv")
    L = int(got[("-", 0, "host_probe_moe_blocks")])
    layer_GB = got[("-", 0, "expert_GB_total")] / L
    assert sorted(ch["round"].unique()) == [0, 1] and ch["block"].nunique() == L
    for (_, _), g in ch.groupby(["round", "block"]):
        assert g["GB"].sum() == pytest.approx(layer_GB, rel=1e-3)
        assert (g["GBps"] > 0).all()
    rep = pd.read_csv(out / "repeats.csv")
    g = rep[(rep["mode"] == "ring") & (rep["phase"] == "prefill")]
    timed = g.loc[g["what"] == "timed_s", "repeat"]
    assert len(timed) == 2  # --ring-repeats 2: every timed repeat traced
    for i in timed:
        gi = g[g["repeat"] == i]
        blocks = gi[gi["what"].str.startswith("copy_s_b")]
        assert len(blocks) == L
        assert blocks["value"].sum() == pytest.approx(float(gi.loc[gi["what"] == "copy_busy_s", "value"].iloc[0]),
                                                      rel=1e-3)


def test_chunk_map_rejects_bad_sizes():
    from reference.inference.bench_probes import h2d_chunk_map

    with pytest.raises(ValueError, match="chunk_bytes"):
        h2d_chunk_map(None, chunk_bytes=0)
