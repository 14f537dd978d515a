"""The collectives part of `simulator.validate_multigpu` (its module docstring gives the rules): the rows of a
run's ``collectives.csv`` beside the simulation (`collective_rows`), the measurement outliers, and the link
calibration fitted on documented rows of that file -- the per-call host floor, the NVLink bandwidth (used by the
MoE and training rows too), the p2p rate of the uneven all-to-all, each other collective's own bandwidth
(`run_calibration` runs them in order) -- plus the alpha-beta experiment nothing uses (`fit_alpha_beta`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simulator.validate_multigpu_model import (
    COLLECTIVES,
    _host_for,
    _iters,
    _row,
    _run_meta,
    _sim,
    cluster_for,
    collective_op,
    op_time,
    predict_collective,
    uneven_matrix,
)

LATENCY_BOUND_BYTES = 4 * 1024 * 1024  # below: the measured times are at the ~35 us per-call floor


# ------------------------------------------------------------------ measurement outliers (issue 9)
OUTLIER_JUMP = 1.25  # a row this much above the next smaller size's time is beyond the floor's spread (<= 16%)


def measurement_outliers(df: pd.DataFrame, jump: float = OUTLIER_JUMP) -> dict[tuple[str, int], str]:
    """``(config, size_bytes)`` -> evidence, for every ``time_us`` row of ``collectives.csv`` that no
    per-call cost growing with size can produce (**Measurement outliers** in `simulator.validate_multigpu`'s
    docstring): slower than the same collective at the next larger measured size AND more than ``jump`` x the
    next smaller size's time. Uses the measurements only, never a prediction."""
    t = df[df["metric"] == "time_us"]
    out: dict[tuple[str, int], str] = {}
    for name, g in t.groupby("config"):
        g = g.sort_values("size_bytes")
        sz, v = g["size_bytes"].astype(int).tolist(), g["value"].astype(float).tolist()
        for i in range(1, len(sz) - 1):
            if v[i] > v[i + 1] and v[i] > jump * v[i - 1]:
                out[(str(name), sz[i])] = (
                    f"measurement_bug: {v[i]:.1f} us per call, slower than the {sz[i + 1]} B call of the same "
                    f"collective ({v[i + 1]:.1f} us) and {v[i] / v[i - 1]:.2f}x the {sz[i - 1]} B one "
                    f"({v[i - 1]:.1f} us): a cost that grows with size cannot do that; the excess over the larger "
                    f"call, {v[i] - v[i + 1]:.1f} us x the interval's calls, is one stall of the timed interval "
                    f"(the run times one interval per size)")
    return out


# ----------------------------------------------------------------------------------- collective rows
def _probe_note(device: str, collective: str) -> str:
    """'; the world-1 probe (collective_host_*.csv) says X us' for comparison, or ''."""
    from simulator.network.host_dispatch import find_collective_host

    probe, same = find_collective_host(device)
    h = probe.host_s(collective) if probe is not None else None
    if h is None:
        return ""
    return (f"; the {'' if same else 'other machine: '}world-{probe.world} probe ({Path(probe.path).name}) measures "
            f"{h * 1e6:.1f} us for the same call")


def collective_rows(path: Path, cal=None, host="auto", fitted: frozenset = frozenset(), p2p_GBps: float | None = None,
                    outliers: bool = True, links: dict | None = None) -> list[dict]:
    """Rows of one ``collectives.csv``. ``cal``: the run's link calibration (None: the preset's NVLink);
    ``host``: the per-call host dispatch (`_host_for`, or ``"run"``: `fit_host_floor` on this file); a ``time_us``
    row is then predicted as the back-to-back time per call of the run's ``iters`` calls, ``max(device, host) +
    min(device, host) / iters`` (`host_dispatch.back_to_back_s`); without a floor, the device time alone.
    ``fitted``: the ``(config, size_bytes)`` rows any calibration was fitted on (status ``fitted``);
    ``p2p_GBps``: the uneven all-to-all on NCCL's p2p path at that per-peer rate (`fit_p2p`; None: as the flat
    collective); ``outliers``: rows `measurement_outliers` flags get status ``not_modelled`` with the evidence
    (``measurement_bug: ...``), their prediction still shown; ``links``: collective -> its own `LinkCalibration`
    (`fit_collective_links`), in place of ``cal`` for that collective."""
    from simulator.network.host_dispatch import back_to_back_s

    df = pd.read_csv(path, dtype={"commit": str})
    if isinstance(host, str) and host == "run":
        host, keys = fit_host_floor(path, cal)
        fitted = fitted | keys
    iters = _iters(df)
    bad = measurement_outliers(df) if outliers else {}
    smallest = df[df["metric"] == "time_us"].groupby("config")["size_bytes"].min().astype(int).to_dict()
    rows: list[dict] = []
    sims: dict = {}
    for r in df.itertuples():
        run = f"{path.parent.name} {r.commit}"
        cfg = f"{r.config} {int(r.size_bytes)} B world{int(r.world)}"
        if r.metric in ("check_ok", "iters"):
            rows.append(_row(cfg, r.metric, r.value, status="not_modelled", kind="count", run=run,
                             note="correctness check / iteration count of the measurement, not a simulated quantity"))
            continue
        own = (links or {}).get(r.config)
        key = (r.device, int(r.world), r.config if own is not None else "")
        if key not in sims:
            c = cluster_for(r.device, int(r.world))
            sims[key] = (_sim(c, cal=own or cal), *_host_for(host, r.device)) if c is not None else None
        if sims[key] is None:
            rows.append(_row(cfg, r.metric, r.value, status="not_modelled", run=run,
                             note=f"no cluster preset for {r.device} x {r.world}"))
            continue
        sim, probe, same_host = sims[key]
        p2p = p2p_GBps if r.config == P2P_CONFIG else None
        op = collective_op(sim, r.config, float(r.size_bytes), int(r.world), p2p)
        dev = op_time(sim, op)
        proto = sim.net.choose_protocol(op).name
        h = probe.host_s(r.config) if probe is not None else None
        n_calls = iters.get((r.config, int(r.size_bytes)), 1)
        t = back_to_back_s(dev, h, n_calls) if h is not None else dev
        host_bound = h is not None and h > dev
        was_fitted = (r.config, int(r.size_bytes)) in fitted
        floor_row = bool(was_fitted and h is not None and probe.fitted_on
                         and int(r.size_bytes) == smallest.get(r.config))
        link_row = was_fitted and not floor_row and (r.config == FIT_CONFIG or own is not None)
        link = (f"NVLink {sim.topo.nvlink_GBps:.0f} GB/s (" + ("this collective's own, " if own is not None else "")
                + ("fitted on this row)" if link_row else "calibrated on other rows)") if (own or cal) is not None
                else f"preset NVLink {sim.topo.nvlink_GBps:.0f} GB/s")
        if r.metric == "time_us":
            note = f"{proto} protocol, {link}, device {dev * 1e6:.1f} us"
            if p2p is not None:
                note += (f"; NCCL p2p path (torch's split-list all_to_all_single: grouped ncclSend/ncclRecv) at "
                         f"{p2p:.1f} GB/s per peer " + ("(fitted on this row)" if was_fitted and not floor_row
                                                        else "(fitted on another row)"))
            status = "fitted" if was_fitted else "validated"
            if h is not None:
                if probe.fitted_on:
                    note += (f"; host dispatch {h * 1e6:.1f} us per call at world {probe.world}, fitted on "
                             f"{'this row' if floor_row else 'the smallest-size row of this collective'}"
                             f"{': host-bound' if host_bound else ''}, {n_calls} calls back to back"
                             + _probe_note(r.device, r.config))
                else:
                    note += (f"; host dispatch {h * 1e6:.1f} us per call ({probe.gpu} host, world {probe.world} probe)"
                             f"{': host-bound' if host_bound else ''}, {n_calls} calls back to back")
                if host_bound and not same_host and not was_fitted:
                    status = "extrapolated"
                    note += "; the probe ran on another machine's host CPU"
            elif r.size_bytes <= LATENCY_BOUND_BYTES:
                note += ("; latency-bound: simulator latencies are NCCL 2.10 tuning-model constants and the preset's"
                         " 2 us NVLink hop; the measured ~35 us floor is the per-call host dispatch of back-to-back"
                         " torch.distributed calls, modelled only with a host floor (none given)")
            if r.config == P2P_CONFIG and p2p is None:
                note += "; torch's uneven all_to_all_single runs ~3x slower than the even one on the same bytes"
            flag = bad.get((r.config, int(r.size_bytes)))
            if flag is not None and not was_fitted:
                rows.append(_row(cfg, r.metric, r.value, t * 1e6, status="not_modelled", run=run,
                                 note=f"{flag}; prediction shown, not scored: {note}"))
                continue
            rows.append(_row(cfg, r.metric, r.value, t * 1e6, status=status, note=note, run=run, fitted=was_fitted))
        elif r.metric == "time_us_max":
            rows.append(_row(cfg, r.metric, r.value, t * 1e6, status="derived", run=run,
                             note="max over ranks of the same calls; ranks are symmetric in the model: scored once, as time_us"))
        elif r.metric in ("algbw_GBps", "busbw_GBps"):
            from paper_repro.multigpu_run import bus_factor

            bw = float(r.size_bytes) / t / 1e9 * (bus_factor(r.config, int(r.world)) if r.metric == "busbw_GBps" else 1)
            rows.append(_row(cfg, r.metric, r.value, bw, status="derived", kind="bandwidth", run=run,
                             note="size / time_us (x bus factor): same error as the inverse of time_us"))
        else:
            rows.append(_row(cfg, r.metric, r.value, status="not_modelled", run=run, note="unknown metric"))
    return rows


# ------------------------------------------------------------------ link calibration used by the rows
FIT_CONFIG = "all_reduce"  # the collective the NVLink bandwidth is fitted on
FIT_MIN_BYTES = 16 * 1024 * 1024  # from here up the device time is well above any per-call floor
FIT_EVERY = 2  # every other size from FIT_MIN_BYTES up: 16, 64, 256 MiB of the 16 .. 256 MiB sweep


def fit_subset(df: pd.DataFrame, config: str = FIT_CONFIG, min_bytes: int = FIT_MIN_BYTES,
               every: int = FIT_EVERY) -> list[int]:
    """The sizes of ``config`` the link is fitted on: every ``every``-th measured size >= ``min_bytes``."""
    t = df[(df["metric"] == "time_us") & (df["config"] == config) & (df["size_bytes"] >= min_bytes)]
    return [int(x) for x in sorted(t["size_bytes"].unique())[::every]]


def fit_nvlink(path: Path, config: str = FIT_CONFIG, min_bytes: int = FIT_MIN_BYTES, every: int = FIT_EVERY,
               host=None):
    """Fit the achieved per-GPU NVLink bandwidth ``B`` of a run's machine on `fit_subset` of its
    ``collectives.csv``: the simulator's own prediction of each fitted row with the protocol it chooses on the
    preset is ``c + w / B`` (latencies ``c`` as the model has them: NCCL constants and the preset's hop, not
    fitted), and ``1 / B`` minimises the squared relative error over the subset (closed form). With a host
    probe (``host``, as `collective_rows` takes it) the fitted rows are predicted as `collective_rows` does:
    device-bound back-to-back calls, ``c + w / B + h / iters`` (checked: the fitted device time exceeds ``h``
    on every fitted row, else ValueError). Returns
    (`LinkCalibration` or None when the run has no preset or no row in the subset, the fitted ``(config,
    size_bytes)`` keys)."""
    from simulator.network.host_dispatch import LinkCalibration

    df = pd.read_csv(path, dtype={"commit": str})
    sizes = fit_subset(df, config, min_bytes, every)
    t = df[(df["metric"] == "time_us") & (df["config"] == config) & df["size_bytes"].isin(sizes)]
    if t.empty or t["world"].nunique() != 1 or t["device"].nunique() != 1:
        return None, frozenset()
    world, device = int(t["world"].iloc[0]), str(t["device"].iloc[0])
    cluster = cluster_for(device, world)
    if cluster is None:
        return None, frozenset()
    probe, _ = _host_for(host, device)
    h = probe.host_s(config) if probe is not None else None
    iters = {int(r.size_bytes): int(r.value) for r in df[(df["metric"] == "iters") & (df["config"] == config)].itertuples()}
    b1, b2 = 100.0, 200.0
    s1, s2 = _sim(cluster, cal=LinkCalibration(b1)), _sim(cluster, cal=LinkCalibration(b2))
    num = den = 0.0
    devs = []
    for r in t.itertuples():
        proto = _sim(cluster).net.choose_protocol(collective_op(s1, config, float(r.size_bytes), world))
        t1 = float(s1.net.op_offsets(collective_op(s1, config, float(r.size_bytes), world), proto).max())
        t2 = float(s2.net.op_offsets(collective_op(s2, config, float(r.size_bytes), world), proto).max())
        w = (t1 - t2) / (1 / b1 - 1 / b2)  # t = c + w / B (B in GB/s)
        c = t1 - w / b1
        y = r.value * 1e-6
        c_all = c + (h / iters.get(int(r.size_bytes), 1) if h is not None else 0.0)
        num += (w / y) * (1 - c_all / y)
        den += (w / y) ** 2
        devs.append((c, w))
    if num <= 0:
        return None, frozenset()
    if h is not None and any(c + w * num / den <= h for c, w in devs):
        raise ValueError(f"validate_multigpu: a fitted {config} row of {path} is host-bound ({h * 1e6:.1f} us per call)")
    src = f"{config} time_us at {', '.join(f'{x >> 20} MiB' for x in sizes)} of {path.parent.name}"
    return LinkCalibration(den / num, source=src), frozenset((config, x) for x in sizes)


# --------------------------------------------------------------------- host floor and p2p rate (issue 9)
def fit_host_floor(path: Path, cal=None):
    """The host seconds per back-to-back call of each collective at the run's own world size, fitted on ONE row
    per collective: its smallest measured size (1 KiB in the committed sweep; the size the world-1 probe uses),
    where the device time (NCCL latency model, a few us) is far below the host's. Host-bound back to back, that
    row is ``h + d / iters`` (`host_dispatch.back_to_back_s`), so ``h = time_us - d / iters``; a row whose
    ``h`` would not exceed ``d`` gives no floor (not host-bound). Returns (`CollectiveHost` with ``fitted_on``
    set, or None without preset / rows; the fitted ``(config, size_bytes)`` keys). **Host floor** in
    `simulator.validate_multigpu`'s docstring says why the run's world, not the world-1 probe."""
    from simulator.network.host_dispatch import CollectiveHost

    df = pd.read_csv(path, dtype={"commit": str})
    meta = _run_meta(df)
    if meta is None or meta[2] is None:
        return None, frozenset()
    device, world, cluster = meta
    sim, iters = _sim(cluster, cal=cal), _iters(df)
    t = df[df["metric"] == "time_us"]
    per, keys, calls = {}, set(), set()
    for name, g in t.groupby("config"):
        r = g.loc[g["size_bytes"].astype(int).idxmin()]
        size, n = int(r["size_bytes"]), iters.get((str(name), int(r["size_bytes"])), 1)
        d = predict_collective(sim, str(name), float(size), world)
        h = float(r["value"]) * 1e-6 - d / n
        if h > d:
            per[str(name)] = h
            keys.add((str(name), size))
            calls.add(n)
    if not per:
        return None, frozenset()
    src = ", ".join(f"{c} {s} B" for c, s in sorted(keys))
    return (CollectiveHost(per, device, world, max(calls), str(path), fitted_on=f"{src} of {path.parent.name}"),
            frozenset(keys))


P2P_CONFIG = "all_to_all_uneven"  # the collective torch runs as grouped ncclSend / ncclRecv


def fit_p2p(path: Path, cal=None, host=None):
    """The per-peer rate (GB/s) of NCCL's p2p path, fitted on ONE row: ``all_to_all_uneven`` ``time_us`` at the
    largest measured size (256 MiB in the committed sweep: the most device-bound row). The simulator's
    prediction of that row on the p2p path is ``c + w / B_p2p`` (``c``: Simple base latency and the hop, ``w``:
    the largest message, both from the model) plus the back-to-back host share ``h / iters`` when ``host`` (a
    `CollectiveHost`) is given; ``B_p2p`` solves it exactly. Returns (``B_p2p`` or None when the run has no such
    row / preset or the rate would not bind below the link, the fitted ``(config, size_bytes)`` keys)."""
    df = pd.read_csv(path, dtype={"commit": str})
    meta = _run_meta(df)
    t = df[(df["metric"] == "time_us") & (df["config"] == P2P_CONFIG)]
    if meta is None or meta[2] is None or t.empty:
        return None, frozenset()
    _device, world, cluster = meta
    r = t.loc[t["size_bytes"].astype(int).idxmax()]
    size = int(r["size_bytes"])
    sim = _sim(cluster, cal=cal)
    b1, b2 = 10.0, 20.0
    d1, d2 = (predict_collective(sim, P2P_CONFIG, float(size), world, b) for b in (b1, b2))
    w = (d1 - d2) / (1 / b1 - 1 / b2)
    c = d1 - w / b1
    h = host.host_s(P2P_CONFIG) if host is not None else None
    n = _iters(df).get((P2P_CONFIG, size), 1)
    y = float(r["value"]) * 1e-6 - (h / n if h is not None else 0.0)
    if w <= 0 or y <= c:
        return None, frozenset()
    bp = w / (y - c)
    if predict_collective(sim, P2P_CONFIG, float(size), world, bp) <= predict_collective(sim, P2P_CONFIG, float(size),
                                                                                           world) * (1 + 1e-9):
        return None, frozenset()  # the link, not the p2p rate, sets the time: nothing to fit
    return bp, frozenset({(P2P_CONFIG, size)})


def fit_collective_links(path: Path, host=None) -> tuple[dict, frozenset]:
    """Each ring / all-to-all collective's own achieved NVLink bandwidth, fitted on ONE row: its largest measured
    size (256 MiB in the committed sweep: the most device-bound row), with `fit_nvlink`'s closed form (the model's
    latencies, the host share ``h / iters``). Not for `FIT_CONFIG` (the all-reduce keeps the NVLink fit that the
    MoE and training rows use) nor for `P2P_CONFIG` (its rate is `fit_p2p`'s, on that same largest row). Returns
    ({collective: `LinkCalibration`}, fitted ``(config, size_bytes)`` keys). **Per-collective bandwidth** in
    `simulator.validate_multigpu`'s docstring."""
    df = pd.read_csv(path, dtype={"commit": str})
    t = df[df["metric"] == "time_us"]
    links, keys = {}, set()
    for name in COLLECTIVES:
        if name in (FIT_CONFIG, P2P_CONFIG) or not (t["config"] == name).any():
            continue
        largest = int(t.loc[t["config"] == name, "size_bytes"].max())
        cal, k = fit_nvlink(path, config=name, min_bytes=largest, every=1, host=host)
        if cal is not None:
            links[name] = cal
            keys |= k
    return links, frozenset(keys)


def run_calibration(path: Path, calibrate: bool = True, host="run"):
    """Everything one run's ``collectives.csv`` calibrates, in order, and the rows each was fitted on:
    the host floor (``host="run"``: `fit_host_floor` on the preset link; else `_host_for`'s forms), the NVLink
    bandwidth (`fit_nvlink`, with that floor), the p2p rate (`fit_p2p`, with both) and each other collective's own
    bandwidth (`fit_collective_links`); ``calibrate=False``: none of the link fits. Returns (``cal``, ``host`` as
    `collective_rows` takes it, ``p2p_GBps``, fitted keys, per-collective ``links``)."""
    fitted: frozenset = frozenset()
    if isinstance(host, str) and host == "run":
        host, keys = fit_host_floor(path)
        fitted |= keys
    cal = p2p = None
    links: dict = {}
    if calibrate:
        cal, keys = fit_nvlink(path, host=host)
        fitted |= keys
        meta = _run_meta(pd.read_csv(path, dtype={"commit": str}))
        probe = _host_for(host, meta[0])[0] if meta is not None else None
        p2p, keys = fit_p2p(path, cal, probe)
        fitted |= keys
        links, keys = fit_collective_links(path, host)
        fitted |= keys
    return cal, host, p2p, fitted, links


# ------------------------------------------------------------------- link calibration (issue 10, apart)
def wire_bytes(name: str, nbytes: float, world: int) -> float:
    """Bytes one rank puts on its NVLink port in the simulator's schedule of the collective (ring: 2(n-1)
    chunks of S/n for all-reduce, n-1 for the halves; flat all-to-all: the off-rank part of the buffer)."""
    n = world
    if name == "all_reduce":
        return 2 * (n - 1) * nbytes / n
    if name in ("all_gather", "reduce_scatter"):
        return (n - 1) * nbytes / n
    if name == "all_to_all":
        return (n - 1) * nbytes / n
    if name == "all_to_all_uneven":
        M = uneven_matrix(n, int(nbytes))
        return float((M.sum(axis=1) - np.diag(M)).max())
    raise ValueError(f"validate_multigpu: unknown collective {name!r}")


def fit_alpha_beta(path: Path, collectives=COLLECTIVES, fit_every: int = 2) -> dict:
    """A calibration experiment, kept out of `rows` (nothing in the simulator uses it): fit ``t = alpha +
    wire_bytes / B`` (relative least squares) on every ``fit_every``-th size of the ``collectives`` measured in
    ``collectives.csv`` (sizes 0, 2, 4, ...), and report the error on the held-out sizes (1, 3, 5, ...).
    Returns ``alpha_s``, ``B_GBps``, the fitted and held-out sizes, and the held-out ``mape`` / ``max_error``."""
    df = pd.read_csv(path, dtype={"commit": str})
    df = df[(df["metric"] == "time_us") & df["config"].isin(collectives)]
    world = int(df["world"].iloc[0])
    sizes = sorted(df["size_bytes"].unique())
    fit_sizes = set(sizes[::fit_every])
    x = np.array([wire_bytes(c, s, world) for c, s in zip(df["config"], df["size_bytes"])])
    t = df["value"].to_numpy() * 1e-6
    fit = df["size_bytes"].isin(fit_sizes).to_numpy()
    A = np.stack([1 / t[fit], x[fit] / t[fit]], axis=1)
    (alpha, inv_b), *_ = np.linalg.lstsq(A, np.ones(fit.sum()), rcond=None)
    pred = alpha + x * inv_b
    err = pred[~fit] / t[~fit] - 1
    return {"alpha_s": float(alpha), "B_GBps": float(1 / inv_b / 1e9), "fit_sizes": sorted(fit_sizes),
            "held_out": int((~fit).sum()), "fitted": int(fit.sum()), "mape": float(np.abs(err).mean()),
            "max_error": float(np.abs(err).max())}
