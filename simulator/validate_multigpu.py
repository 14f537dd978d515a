"""The committed multi-GPU measurements (``results/multigpu/<kind>/``, `paper_repro.multigpu_run`) beside the
simulator: rows in `paper_repro.validate`'s format, ``source="multigpu"``.

Cluster: the preset of the device the run names (``device`` column NVIDIA H200, ``world`` column ``n``:
``h200-x<n>``, one host of ``n`` H200 on NVLink4, `semoe.presets`), with its NVLink bandwidth calibrated on a
documented subset of the run's own collective rows (**Link calibration** below: those rows have status
``fitted`` and ``used_for_fitting``; every other row is held out).

=========== ============================================== ==================================================
part        measured (what `paper_repro.multigpu_run`      predicted with
            times)
=========== ============================================== ==================================================
collectives ``time_us``: mean over ranks of 20 back-to-back the collective's `CommOp` (`simulator.collectives`,
            calls in one CUDA-event interval, fp32;         ring / flat all-to-all; the uneven all-to-all on
            ``size_bytes`` = all-reduce buffer, all-gather NCCL's p2p path with the run's split matrix
            output, reduce-scatter input, all-to-all send  `uneven_splits`, **P2P all-to-all**) on the
            buffer                                         analytic network, NCCL protocol chosen per size
                                                           (`simulator.hardware`), calibrated NVLink; per call
                                                           of the run's back-to-back calls ``max(device, host)
                                                           + min(device, host) / iters`` (**Host floor**):
                                                           ``validated`` (``fitted`` on the fit subsets;
                                                           ``not_modelled`` for **Measurement outliers**)
moe         ``fwd_bwd_ms``: the reference `MoELayer`       `moe_prediction`: the torch-backend layer
            (torch backend, `EPDispatcher`) forward +      (`simulator.torch_moe_layer`, path ``reference``: its
            backward, EP = world, flat or ``hetu_p<p>``    kernels counted from the code, host timeline) per
                                                           rank with the rank's local experts (E / EP groups of
                                                           T k / (E / EP) rows), `EPDispatcher`'s count
                                                           all-gather (a host sync), four all-to-alls (dispatch,
                                                           combine and their backward) and four regroups in
                                                           the layer's kernel order
train       ``tokens_per_s`` of `reference.train` (median  `simulator.workload.training.TrainingIteration`
            of steps 5-12), DP = EP = world, ZeRO-0/3 x    (``impl="reference"``, GradSync, fused AdamW, torch
            fused buckets off / on                         grouped experts) on the cluster with the trainer's
                                                           host program (`train_host_program`) plus
                                                           `EPDispatcher`'s work (`ep_program`)
=========== ============================================== ==================================================

**The H200's own profile** (``results/profiles/h200.csv``, measured on the device tool's single H200 on
2026-11-24 with ``python -m kernels.profile``; its host probe ``collective_host_h200.csv`` likewise): when it is
committed, `gpu_cost_model` uses it and the MoE / training rows are ``validated``. Without it:

**Extrapolation to the H200** (the ``extrapolated`` status: a prediction of a measured quantity with a kernel
profile measured on another GPU; scored, but reported in its own group) from the H100's profile
(``results/profiles/h100_80gb_hbm3.csv``). The H200 has the same SMs, clocks and bf16 peak (989 TFLOP/s) and
4.8 instead of 3.35 TB/s HBM (HARDWARE.md). `h200_cost_model` therefore keeps every FLOP curve of the profile
as measured (`CostModel` scales profile GEMM times by the ratio of compute peaks: 1 here), charges the
roofline memory passes (`CostModel.memory`) at the H200's datasheet bandwidth with the H100's achieved fraction
(0.925: 4.44 TB/s; HARDWARE.md measures 4.46 TB/s read on the H200), and scales the profile's measured
row-wise curves (gelu, layernorm, permute, ...: achieved HBM GB/s) by the same ratio 4.8 / 3.35. Memory-bound
GEMMs at small ``m`` keep the H100's time (not scaled: a mild overestimate). The host time per eager operator
is the H100 machine's (the H200 machine's host was not profiled).

**Latency** (collectives below ~4 MiB): the simulator's device terms are NCCL 2.10's tuning-model constants
(`simulator.hardware`: LL / LL128 / Simple base 6.6 / 14 / 8.4 us) and the preset's per-hop NVLink latency
(2 us); none of them was measured on this machine, and none is tuned to these rows. They give 7-15 us; the
measured per-call time is 33-41 us for every collective up to 4 MiB, flat in size, and different per
collective (all-reduce ~40, all-gather ~34, reduce-scatter ~36, all-to-all ~37, uneven ~39 us): not a device
latency (the model's device times there are 7-15 us, and their differences between collectives do not match
the measured ones).

**Host floor** (issue 9): that floor is the host's dispatch rate of back-to-back ``torch.distributed`` calls (20
calls timed as one interval: the GPU waits for each launch); `collective_rows` predicts each ``time_us`` as
``back_to_back_s(device, host, iters)`` (`simulator.network.host_dispatch`). Where ``host`` per call comes from
(`rows`' ``host``):

- ``"run"`` (default, `fit_host_floor`): fitted on ONE row per collective, its smallest measured size (1 KiB,
  status ``fitted``: 5 rows), where the device time is a few us; every larger size of that collective is held
  out. Chosen because the probe below runs another code path: at world 1 NCCL short-circuits (``nranks == 1``:
  no ring kernel; for the in-place all-reduce no device work at all, for the out-of-place calls a copy), so its
  host cost per call is not the world-2 one. Evidence in the committed data: the H200 probe's per-call
  time minus the run's fitted world-2 floor is -11.3 us for the in-place all-reduce (the largest gap, as that
  mechanism says) and +0.1, +4.1, +0.0, +4.6 us for all-gather, reduce-scatter, all-to-all and the uneven
  one. Each row's note gives the probe's number beside the fitted one.
- ``"auto"``: `kernels.collective_host`'s probe under ``results/profiles/collective_host_*.csv`` (1 KiB calls
  on one GPU): a probe of the run's own GPU family (``H200``) makes the rows ``validated``, one of another
  machine (the H100's: another host CPU) makes the host-bound rows ``extrapolated``.
- None: no floor (the device time alone; the note says so).

The MoE and training rows do not use the floor: their collectives are not issued back to back (training has its
own host model, `simulator.workload.training`).

**P2P all-to-all** (issue 9): PyTorch runs ``all_to_all_single`` with explicit split lists as
``torch::cuda::nccl::all2all_single_unequal_split`` (one ``ncclSend`` / ``ncclRecv`` per peer in a group: NCCL's
p2p path, its own p2p channels per peer, LL / Simple only) and the even call as a separate function,
``all2all_single_equal_split`` (the CPU build's ``torch/csrc/cuda/nccl.h`` and ``c10d/ProcessGroupNCCL.hpp``
declare both; the sources are not installed here, so that the even one runs NCCL's all-to-all collective
kernel with torch 2.11 and NCCL 2.28.9 is what its speed says, not read). The measured uneven calls run at
~122 GB/s off-rank per rank from 16 MiB up, linear in size, against ~298 GB/s for the even one on the same link: a rate
limit per peer of the p2p path, not the link. `fit_p2p` fits that per-peer rate on ONE row (the uneven
all-to-all at its largest size, 256 MiB: status ``fitted``), `collectives.all_to_all_p2p` applies it
(`CommOp.peer_GBps`), every other size is held out. At world 2 each rank has one peer, so a rate limit of the
rank's self-copy (its 1/3 of the buffer, `uneven_splits`) through the same p2p kernel would scale the same way;
a run at world 4 or more tells the two apart (there per-peer limits add up over peers, a self-copy limit does not).

**Per-collective bandwidth** (issue 9, `fit_collective_links`): the all-gather and the reduce-scatter reach a
lower rate per wire byte than the all-reduce on the same two GPUs (marginal 261 / 253 GB/s between 128 and 256
MiB against the all-reduce's 316 and the even all-to-all's 298: each NCCL collective is its own kernel, with its
own per-step primitives: the all-gather's copy-and-send, the reduce-scatter's receive-reduce; NCCL's tuning
model gives them no such difference, and this run logged no channel counts). The simulator does not derive
that difference: each of the all-gather, reduce-scatter and even all-to-all gets its own achieved NVLink
bandwidth fitted on ONE row, its largest size (256 MiB, status ``fitted``; the rule is `fit_p2p`'s: the most
device-bound row), and every other size is held out: 251, 244 and 290 GB/s. The all-reduce keeps the 3-row fit
above (used by the MoE and training rows too); ``rows(folder, calibrate=False)`` drops all link fits.

**Measurement outliers** (issue 9; the rule uses only the measurements, never a prediction or an error): a
``time_us`` row slower than the same collective at the next larger size (no per-call cost that grows with size
can do that) and more than `OUTLIER_JUMP` (1.25) x the next smaller size's time (beyond the floor's spread: up
to 4 MiB the other rows of one collective lie within 1.10-1.16x of each other) is a stall of its one timed
interval (the run times one 20-call interval per size, no repetition). `measurement_outliers` flags 6 of the 95:
all-reduce 8 MiB (180 us; 16 MiB: 75) and 32 MiB (272; 64 MiB: 251), all-gather 32 MiB (181; 64 MiB: 157; its max over
ranks is 267 us, 1.48x the mean, where every other row's is within 1.05x: one rank stalled), reduce-scatter
64 MiB (303; 128 MiB: 297), all-to-all 64 KiB (61; 128 KiB: 39), uneven 128 KiB (125; 256 KiB: 40). The excess
is 0.5-2.8 ms per 20-call interval, once per row: a host or OS stall, not a size effect (the collectives part
of the run took 1.3 s in all). They get status ``not_modelled`` with the evidence in the note
(``measurement_bug: ...``, as `paper_repro.validate` marks the inference source's), the prediction still shown.

**Link calibration** (issue 9; `run_calibration` runs the fits in order: host floor, NVLink, p2p rate,
per-collective bandwidth; 12 of the 95 ``time_us`` rows are ``fitted``, 6 are outliers, 77 held out):
`fit_nvlink` fits the achieved per-GPU NVLink bandwidth on `fit_subset`:
``all_reduce`` ``time_us`` at every other measured size from 16 MiB up (16, 64, 256 MiB of the committed sweep:
3 of the 19 all-reduce rows, no row of another collective), with the simulator's own prediction of those rows
(latency terms and protocol as the model has them, the host floor when a probe exists); `rows` applies it to
the run's cluster for all three parts (`host_dispatch.calibrate_topology`). It is a calibration input of the
collective model, not a change of the ``h200-x2`` preset: the preset keeps the datasheet (450 GB/s x the H100's
achievable fraction 0.844 = 380 GB/s) shared with ``h200-x4`` / ``-x8``, whose links (NVSwitch) were not
measured, and the fit belongs to one run whose fitted rows must stay marked. ``rows(folder, calibrate=False,
host=None, outliers=False)`` gives the uncalibrated table. `fit_alpha_beta` (free ``alpha`` and ``B`` on every
other size of every collective) stays as the experiment ``results/multigpu/README.md`` lists; nothing uses it.

**HetuMoE on one node** (``hetu_p2`` with world 2: one fake node of 2 GPUs): `simulator.collectives.all_to_all`
falls back to flat there (nothing to aggregate); the prediction instead runs the simulator's HetuMoE schedule
`all_to_all_hetu` on that one node (gather on local rank 0, scatter back), which is what the reference ran. The
schedule ships the non-leader's whole buffer, its rows for itself included, through the leader and back, as
`reference.comm.alltoall.AllToAll._hetu` does; the leader's two regroups of the node's rows (memory passes) are
not modelled, so the predicted gap between ``hetu_p2`` and ``flat`` stays smaller than the measured one.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

SOURCE = "multigpu"
STATUSES = ("validated", "extrapolated", "derived", "not_modelled", "fitted")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven")
PROFILE_GPU = "h100_80gb_hbm3.csv"  # the kernel profile the H200 rows are extrapolated from
LATENCY_BOUND_BYTES = 4 * 1024 * 1024  # below: the measured times are at the ~35 us per-call floor
_MOE = re.compile(r"(?P<name>\S+) E(?P<E>\d+) k(?P<k>\d+) H(?P<H>\d+) F(?P<F>\d+) T(?P<T>\d+)/rank (?P<gate>\S+) "
                  r"(?P<dtype>\w+) ep(?P<ep>\d+)$")
_TRAIN = re.compile(r"(?P<name>\S+) L(?P<L>\d+) D(?P<D>\d+) E(?P<E>\d+) k(?P<k>\d+) F(?P<F>\d+) (?P<dtype>\w+) "
                    r"B(?P<B>\d+) S(?P<S>\d+) ep(?P<ep>\d+) (?P<a2a>\S+) gpn(?P<gpn>\S+) params(?P<params>\d+) "
                    r"steps(?P<steps>\d+)(?P<traced> traced)?$")
_TRAIN_IMPL = re.compile(r"zero(?P<zero>\d+)_bucket(?P<bucket>\d+)$")
_HETU = re.compile(r"hetu_p(?P<p>\d+)$")
_RAIL = re.compile(r"rail_p(?P<p>\d+)$")


def _row(config, metric, measured, predicted=float("nan"), status="validated", note="", fitted=False, kind="time",
         run=""):
    """`paper_repro.validate._row`'s dict (same keys), ``source="multigpu"``."""
    from paper_repro.validate import _row as vrow

    return vrow(SOURCE, run, config, metric, measured, predicted, status=status, note=note, fitted=fitted, kind=kind)


# ------------------------------------------------------------------------------------ cluster, cost
def cluster_for(device: str, world: int):
    """The preset of a run's device and world size: NVIDIA H200 -> ``h200-x<world>``; None when there is none."""
    from semoe import CLUSTER_PRESETS, cluster_preset

    name = f"h200-x{world}" if "H200" in str(device).upper() else None
    return cluster_preset(name) if name in CLUSTER_PRESETS else None


def gpu_cost_model(gpu, impl: tuple[str, ...] = ("torch", "triton")):
    """(`CostModel`, native): the kernel profile measured on ``gpu``'s own family when one is committed
    (``results/profiles/h200.csv``: rows ``validated``), else the H100 profile extrapolated (`h200_cost_model`:
    rows ``extrapolated``)."""
    from simulator.cost import CostModel, _load_profile, find_profile

    path = find_profile(gpu)
    if path is not None:
        return CostModel(gpu, _load_profile(str(path), impl)), True
    return h200_cost_model(gpu, impl), False


def h200_cost_model(gpu, impl: tuple[str, ...] = ("torch", "triton")):
    """`CostModel` of ``gpu`` (an H200) from the H100 profile: FLOP curves as measured, memory-bound terms at
    the H200's bandwidth (module docstring). ``impl``: which implementation's profile rows win."""
    from simulator.cost import PROFILES_DIR, CostModel, _load_profile

    prof = copy.copy(_load_profile(str(PROFILES_DIR / PROFILE_GPU), impl))
    h100_hbm = 3350.0  # the h100-single preset's datasheet HBM (HARDWARE.md)
    ratio = gpu.hbm_GBps / h100_hbm
    prof.mem_curves = {k: (xs, bs * ratio) for k, (xs, bs) in prof.mem_curves.items()}
    return CostModel(gpu, prof)


def _sim(cluster, cost=None, cal=None):
    """A `Sim` of ``cluster`` (analytic network), its NVLink set to the link calibration ``cal`` if given."""
    from simulator.engine import Sim
    from simulator.network.host_dispatch import calibrate_topology

    sim = Sim(cluster, trace=False, profile=None)
    if cost is not None:
        sim.cost = cost
    calibrate_topology(sim.topo, cal)
    return sim


def op_time(sim, op) -> float:
    """Seconds until the last rank of ``op`` finishes (analytic backend, NCCL-style protocol choice)."""
    return float(sim.net.op_offsets(op).max()) if op.steps else 0.0


# ------------------------------------------------------------------------------------- collectives
def uneven_matrix(n: int, nbytes: int) -> np.ndarray:
    """Bytes rank s sends to rank d in the run's ``all_to_all_uneven`` of ``nbytes`` per rank (fp32)."""
    from paper_repro.multigpu_run import uneven_splits

    return 4.0 * np.array(uneven_splits(n, nbytes // 4), dtype=float)


def collective_op(sim, name: str, nbytes: float, world: int, p2p_GBps: float | None = None):
    """The simulator's `CommOp` for the run's collective ``name`` of ``nbytes`` (its ``size_bytes``) over
    ``world`` ranks: ring all-reduce / all-gather / reduce-scatter, flat all-to-all (even: ``nbytes / world``
    to every rank; uneven: the run's split matrix, on NCCL's p2p path at ``p2p_GBps`` per peer when given:
    `collectives.all_to_all_p2p`, **P2P all-to-all** in the module docstring)."""
    from simulator import collectives as C

    ranks = np.arange(world)
    if name in ("all_reduce", "all_gather", "reduce_scatter"):
        return getattr(C, name)(sim.topo, ranks, nbytes)
    if name == "all_to_all":
        return C.all_to_all(sim.topo, ranks, np.full((world, world), nbytes / world), "flat")
    if name == "all_to_all_uneven":
        M = uneven_matrix(world, int(nbytes))
        if p2p_GBps is not None:
            return C.all_to_all_p2p(sim.topo, ranks, M, p2p_GBps)
        return C.all_to_all(sim.topo, ranks, M, "flat")
    raise ValueError(f"validate_multigpu: unknown collective {name!r}")


def predict_collective(sim, name: str, nbytes: float, world: int, p2p_GBps: float | None = None) -> float:
    """Predicted seconds of one ``name`` collective of ``nbytes`` over ``world`` ranks."""
    return op_time(sim, collective_op(sim, name, nbytes, world, p2p_GBps))


# ------------------------------------------------------------------ measurement outliers (issue 9)
OUTLIER_JUMP = 1.25  # a row this much above the next smaller size's time is beyond the floor's spread (<= 16%)


def measurement_outliers(df: pd.DataFrame, jump: float = OUTLIER_JUMP) -> dict[tuple[str, int], str]:
    """``(config, size_bytes)`` -> evidence, for every ``time_us`` row of ``collectives.csv`` that no
    per-call cost growing with size can produce (**Measurement outliers** in the module docstring): slower
    than the same collective at the next larger measured size AND more than ``jump`` x the next smaller
    size's time. Uses the measurements only, never a prediction."""
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


def _host_for(host, device: str):
    """(CollectiveHost or None, same_host) for a run on ``device``: ``host="auto"`` looks under
    results/profiles (`host_dispatch.find_collective_host`), None: no floor, a `CollectiveHost`: that one
    (``"run"``, the floor fitted on the run itself, is resolved by the callers that have the run's file:
    `rows`, `collective_rows`)."""
    from simulator.network.host_dispatch import CollectiveHost, find_collective_host, gpu_family

    if host is None:
        return None, False
    if isinstance(host, CollectiveHost):
        return host, gpu_family(host.gpu) == gpu_family(device)
    if host == "auto":
        return find_collective_host(device)
    raise ValueError(f"validate_multigpu: host must be 'run', 'auto', None or a CollectiveHost, got {host!r}")


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


# ------------------------------------------------------------------------------------------ MoE layer
def parse_moe_config(config: str):
    """'mixtral_like E8 k2 H4096 F14336 T16384/rank topk bf16 ep2' -> (MoELayerConfig, dtype, ep)."""
    from semoe.moe_layer_configs import MoELayerConfig

    m = _MOE.match(str(config))
    if m is None:
        raise ValueError(f"validate_multigpu: cannot parse moe.csv config {config!r}")
    cfg = MoELayerConfig(m["name"], int(m["E"]), int(m["k"]), int(m["H"]), int(m["F"]), int(m["T"]), gate=m["gate"])
    return cfg, m["dtype"], int(m["ep"])


def moe_prediction(sim, cfg, ep: int, impl: str, world: int) -> dict:
    """Forward + backward seconds per rank of one EP MoE layer (weak scaling: ``cfg.tokens`` per rank).

    Compute: the torch-backend layer the run times (`simulator.torch_moe_layer`, path ``reference``: the
    reference `MoELayer`'s kernels counted from its code, GEMMs from the kernel profile's torch rows with the rank's
    ``E / ep`` local experts each receiving ``T k ep / E`` rows (balanced routing: the run measured 1.002-1.004
    max/mean received rows), memory passes at the measured class rates scaled to the GPU, the host issuing each
    kernel and waiting at the layer's syncs). `EPDispatcher`'s own work is placed in that kernel order
    (`torch_moe_layer.ep_inserts`): the count all-gather (``E`` int64 per rank, then a host sync), four
    all-to-alls of ``T k H`` bytes per rank (dispatch, combine, and their backward; blocking, no overlap) and four
    regroups of the received rows (``torch.cat``: forward two, backward two). HetuMoE (``hetu_p<p>``): the
    simulator's schedule through the node leader plus the leader's two regroups of the node's ``p T k`` rows per
    all-to-all (`reference.comm.alltoall.AllToAll._hetu`), on the critical path of every rank."""
    from simulator import collectives as C
    from simulator import torch_layer_probe
    from simulator.torch_moe_layer import (
        count_layer,
        ep_inserts,
        layer_time,
        regroup_time,
    )
    from simulator.train_host import mem_rates

    cm = sim.cost
    T, E, k, H, F = cfg.tokens, cfg.experts, cfg.top_k, cfg.hidden, cfg.ffn
    TK = T * k
    ranks = np.arange(ep)
    row_bytes = H * 2  # bf16 rows
    M = np.full((ep, ep), TK * row_bytes / ep)
    rates = mem_rates()
    hetu_regroup = 0.0
    if impl == "flat" or (_RAIL.match(impl) and int(_RAIL.match(impl)["p"]) >= ep):
        a2a = C.all_to_all(sim.topo, ranks, M, "flat")
        algo = "flat"
    elif (h := _HETU.match(impl)) or _RAIL.match(impl):
        algo = "hetu" if h else "rail"
        fn = C.all_to_all_hetu if h else C.all_to_all_rail
        a2a = fn(sim.topo, ranks, M)
        if h:
            p = min(int(h["p"]), ep)
            hetu_regroup = 2 * regroup_time(cm, p * TK, H, rates)
    else:
        raise ValueError(f"validate_multigpu: unknown all-to-all variant {impl!r}")
    t_a2a = op_time(sim, a2a) + hetu_regroup
    t_counts = op_time(sim, C.all_gather(sim.topo, ranks, 8.0 * E * ep))  # gather_counts: [G, E] int64
    rg = regroup_time(cm, TK, H, rates) if ep > 1 else 0.0
    prog = count_layer("reference", E, k, cfg.gate, cfg.renormalize)
    r = layer_time(prog, T, H, F, cm, rates, cm.host_op_impl("reference"), cm.host_op_impl("torch"),
                   groups=E // ep, routed_rows=TK, breakdown=True, inserts=ep_inserts(t_a2a, t_counts, rg),
                   probe=torch_layer_probe.load(cm.gpu.name))
    comm = 4 * t_a2a + t_counts
    total = r["fwd_bwd"]
    return {"fwd_bwd_s": total, "compute_s": total - comm - 4 * rg, "a2a_s": t_a2a, "comm_s": comm,
            "regroup_s": 4 * rg, "algo": algo, "hetu_regroup_s": hetu_regroup,
            "gemm_s": r["fwd_gemm_s"] + r["bwd_gemm_s"],
            "mem_s": sum(r["fwd_mem_s"].values()) + sum(r["bwd_mem_s"].values()),
            "kernels": r["fwd_kernels"] + r["bwd_kernels"]}


def moe_rows(path: Path, cal=None) -> list[dict]:
    df = pd.read_csv(path, dtype={"commit": str})
    rows: list[dict] = []
    cache: dict = {}
    for r in df.itertuples():
        run = f"{path.parent.name} {r.commit}"
        cfg_s = f"{r.config} {r.impl}"
        if r.metric in ("recv_rows_max_over_mean", "max_rel_diff_vs_flat", "agree_with_flat"):
            rows.append(_row(cfg_s, r.metric, r.value, status="not_modelled", kind="ratio", run=run,
                             note="routing balance / correctness vs flat, not a simulated quantity"))
            continue
        cfg, _dtype, ep = parse_moe_config(r.config)
        key = (r.config, r.impl, r.device, int(r.world))
        if key not in cache:
            c = cluster_for(r.device, int(r.world))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # profile borrowing / roofline fallbacks (router GEMM)
                if c is None:
                    cache[key] = None
                else:
                    cost, native = gpu_cost_model(c.gpu)
                    cache[key] = moe_prediction(_sim(c, cost, cal), cfg, ep, r.impl, int(r.world))
                    cache[key]["native"] = native
        p = cache[key]
        if p is None:
            rows.append(_row(cfg_s, r.metric, r.value, status="not_modelled", run=run,
                             note=f"no cluster preset for {r.device} x {r.world}"))
            continue
        ms = p["fwd_bwd_s"] * 1e3
        parts = (f"torch-backend layer {p['kernels']} kernels (GEMMs {p['gemm_s'] * 1e3:.2f} ms, memory passes "
                 f"{p['mem_s'] * 1e3:.2f} ms, host timeline: compute {p['compute_s'] * 1e3:.2f} ms) + 4 regroups "
                 f"{p['regroup_s'] * 1e3:.2f} ms + 4 all-to-alls x {p['a2a_s'] * 1e3:.3f} ms ({p['algo']}) + counts; "
                 + ("the H200's own kernel profile" if p.get("native") else "H100 profile extrapolated to the H200"))
        if r.metric == "fwd_bwd_ms":
            note = parts
            if p["algo"] == "hetu":
                note += ("; the simulator's HetuMoE ships the non-leader's whole buffer through the leader as the "
                         f"reference does, plus the leader's two regroups of the node's rows "
                         f"({p['hetu_regroup_s'] * 1e3:.3f} ms per all-to-all)")
            rows.append(_row(cfg_s, r.metric, r.value, ms, status="validated" if p.get("native") else "extrapolated",
                             note=note, run=run))
        elif r.metric == "fwd_bwd_ms_max":
            rows.append(_row(cfg_s, r.metric, r.value, ms, status="derived", run=run,
                             note="max over ranks; symmetric ranks in the model: scored once, as fwd_bwd_ms"))
        elif r.metric == "tokens_per_s":
            rows.append(_row(cfg_s, r.metric, r.value, cfg.tokens * int(r.world) / p["fwd_bwd_s"], status="derived",
                             run=run, note="global tokens / fwd_bwd_ms_max: same error as its inverse"))
        elif r.metric == "tflops_per_rank":
            rows.append(_row(cfg_s, r.metric, r.value, cfg.flops("fwd_bwd") / p["fwd_bwd_s"] / 1e12, status="derived",
                             kind="throughput", run=run, note="routed FLOPs / fwd_bwd_ms"))
        else:
            rows.append(_row(cfg_s, r.metric, r.value, status="not_modelled", run=run, note="unknown metric"))
    return rows


# ------------------------------------------------------------------------------------------- training
def parse_train(config: str, impl: str) -> dict:
    m = _TRAIN.match(str(config))
    z = _TRAIN_IMPL.match(str(impl))
    if m is None or z is None:
        raise ValueError(f"validate_multigpu: cannot parse train.csv config {config!r} / impl {impl!r}")
    return {"preset": m["name"].removesuffix("-scaled"), "layers": int(m["L"]), "hidden": int(m["D"]),
            "experts": int(m["E"]), "top_k": int(m["k"]), "ffn": int(m["F"]), "dtype": m["dtype"],
            "batch": int(m["B"]), "seq": int(m["S"]), "ep": int(m["ep"]), "a2a": m["a2a"], "params": int(m["params"]),
            "traced": bool(m["traced"]), "zero": int(z["zero"]), "bucket": int(z["bucket"])}


def simulate_train(t: dict, cluster, cal=None, host_program: bool = True, ep_dispatcher: bool = True) -> dict:
    """One `reference.train` step of the parsed config on ``cluster`` (DP = world, EP as parsed), the way
    `paper_repro.validate.simulate_train` does it for the single GPU: ``impl="reference"``, torch MoE backend
    with grouped experts (the run's commit contains 676c520), fused AdamW (42307ef), GradSync (torchrun), the
    trainer's host program (`train_host_program`: kernels per segment, host syncs, memory passes per class;
    ``host_program=False``: the reference's aten operator count as the host floor, the model before issue 9's
    torch-layer work) with `EPDispatcher`'s own work added when EP > 1 (`ep_program`; ``ep_dispatcher=False``
    leaves it out); the run GPU's kernel profile (`gpu_cost_model`)."""
    from paper_repro.validate import TRAIN_HEADS, reference_host_ops
    from semoe import Run, Workload, sizing
    from semoe.plan_spec import ParallelPlan
    from semoe.presets import model_preset
    from simulator.workload.training import TrainingIteration

    W = cluster.world_size
    m = model_preset(t["preset"]).replace(layers=t["layers"], hidden=t["hidden"], heads=TRAIN_HEADS, ffn=t["ffn"],
                                          experts=t["experts"], top_k=t["top_k"], dtype=t["dtype"],
                                          name=f"{t['preset']}-scaled")
    n = sizing.count_params(m).total
    if n != t["params"]:
        raise ValueError(f"validate_multigpu: rebuilt model has {n} parameters, train.csv says {t['params']}")
    if t["batch"] % W:
        raise ValueError(f"validate_multigpu: global batch {t['batch']} not divisible by world {W}")
    plan = ParallelPlan(data_parallel=W, expert_parallel=t["ep"], alltoall=t["a2a"], fusion_bucket_bytes=t["bucket"],
                        zero_stage=t["zero"])
    run = Run(model=m, cluster=cluster, plan=plan, workload=Workload(micro_batch=t["batch"] // W, seq_len=t["seq"],
                                                                     steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = reference_host_ops(m)
        cost, native = gpu_cost_model(cluster.gpu, ("triton", "torch"))
        sim = _sim(cluster, cost, cal)
        prog, prog_note = train_host_program(m, "fused", "torch") if host_program else (None, "")
        if prog is not None and t["ep"] > 1 and ep_dispatcher:
            prog = ep_program(prog, m.top_k)
            prog_note += "; EPDispatcher's count sync and regroups added (ep_program)"
        out = TrainingIteration(run, sim, impl="reference", host_ops=0.0 if prog is not None else ops,
                                host_program=prog, expert_impl="grouped", expert_kernels="torch",
                                ref_optimizer="fused", grad_sync=True).run()
        out["native"] = native
        out["program_note"] = prog_note or "no host program: the reference's aten operator count as the host floor"
        return out


PROGRAM_LAYERS = (4,)  # the block counts `simulator.train_op_counts.CONFIGS` counts the reference trainer at


def train_host_program(m, adamw: str = "fused", backend: str = "torch"):
    """(`TrainProgram`, note) of the reference trainer for model ``m`` (`simulator.train_host.train_program`: the
    CUDA table, the CPU table as fallback), or None. The tables key the code path with the block count; a model of
    another depth runs the same per-block code, so its program is the counted structure's at `PROGRAM_LAYERS`
    (per-block segments are issued once per block by the workload; the per-step segments (embedding, head, clip,
    fused AdamW) were counted at that depth: the clip's foreach kernels over more tensors, a small overcount)."""
    from simulator.train_host import train_program

    prog = train_program(m, adamw, backend)
    if prog is not None:
        return prog, f"the trainer's host program ({prog.source})"
    for L in PROGRAM_LAYERS:
        prog = train_program(m.replace(layers=L), adamw, backend)
        if prog is not None:
            return prog, (f"the trainer's host program of the same code path counted at L{L} ({prog.source}; "
                          f"per-block segments per block, per-step segments at L{L})")
    return None, ""


EP_COUNT_KERNELS = 3  # gather_counts: the all-gather, the cat of the gathered rows, the copy to the CPU (a sync)
EP_FWD_KERNELS = 4  # dispatch and combine: one all_to_all_single and one regroup cat each
EP_BWD_KERNELS = 4  # the reverse all-to-alls and the split backward's cats
EP_ROW_BYTES = 4  # the dispatcher's rows are the fp32 residual stream under autocast (`workload.training` REF_DISPATCH)


def ep_program(prog, top_k: int, row_bytes: int = EP_ROW_BYTES):
    """``prog`` (counted on one process, `LocalDispatcher`) with `reference.parallel.ep_dispatcher.EPDispatcher`'s
    own work per MoE block: after the permute, ``gather_counts`` (`EP_COUNT_KERNELS` kernels ending in a host
    sync: the counts' ``.cpu()``) as a piece of the forward FFN before its last piece; in that last piece the two
    all-to-all calls and two regroups (``torch.cat`` of the received rows, a ``copy`` pass reading and writing
    ``top_k`` rows of ``row_bytes`` per token and unit of hidden each); in the backward the same four kernels and
    two regroup passes. The all-to-alls' device time is the workload's own (``dispatch_a2a`` ...)."""
    import dataclasses

    from simulator.train_host import TrainProgram

    ffn = prog.group("moe.ffn")
    if not ffn:
        return prog
    last = ffn[-1]
    n = len(ffn)
    cat = ("copy", 2.0, (2.0 * 2 * top_k * row_bytes, 0.0, 0.0, 0.0, 0.0))  # 2 cats, read + write k rows
    sync_piece = dataclasses.replace(last, name=f"moe.ffn_{n - 1}" if n > 1 else "moe.ffn", kernels=EP_COUNT_KERNELS,
                                     sync=True, casts=(0.0,) * len(last.casts), lead=0, mem=())
    new_last = dataclasses.replace(last, name=f"moe.ffn_{n}", kernels=last.kernels + EP_FWD_KERNELS,
                                   mem=tuple(last.mem) + (cat,))
    segs = []
    for sg in prog.segments:
        if sg is last:
            segs += [sync_piece, new_last]
        elif sg.name == "moe.bwd":
            segs.append(dataclasses.replace(sg, kernels=sg.kernels + EP_BWD_KERNELS, mem=tuple(sg.mem) + (cat,)))
        else:
            segs.append(sg)
    if n == 1:  # the router piece itself becomes the sync piece's predecessor: keep the names in order
        segs = [dataclasses.replace(x, name="moe.ffn_1") if x is new_last else x for x in segs]
    return TrainProgram(prog.config + " ep", tuple(segs), prog.source, prog.mem_source)


def train_rows(path: Path, cal=None) -> list[dict]:
    df = pd.read_csv(path, dtype={"commit": str, "rank": str})
    rows: list[dict] = []
    cache: dict = {}
    leaked: dict = {}  # (run, device, world) -> bytes the process's earlier train() runs left allocated
    before: dict = {}  # (run, device, world) + config key -> leaked bytes when that run started
    for r in df.itertuples():
        run = f"{path.parent.name} {r.commit}"
        cfg_s = f"{r.config} {r.impl}"
        metric = r.metric if r.rank == "all" else f"{r.metric} rank{r.rank}"
        t = parse_train(r.config, r.impl)
        if t["traced"]:
            rows.append(_row(cfg_s, metric, r.value, status="not_modelled", run=run,
                             note="traced run (every phase boundary synchronises): not simulated"))
            continue
        key = (r.config, r.impl, r.device, int(r.world))
        if key not in cache:
            c = cluster_for(r.device, int(r.world))
            cache[key] = None if c is None else simulate_train(t, c, cal)
        s = cache[key]
        if s is None:
            rows.append(_row(cfg_s, metric, r.value, status="not_modelled", run=run,
                             note=f"no cluster preset for {r.device} x {r.world}"))
            continue
        desc = (f"simulated step {s['step_time_s'] * 1e3:.1f} ms (device {s['device_step_s'] * 1e3:.1f}, host "
                f"{s['host_s'] * 1e3:.1f}, {s.get('host_syncs', 0)} host syncs); {s.get('program_note', '')}; "
                + ("the H200's own kernel profile" if s.get("native") else "H100 profile extrapolated to the H200"))
        if r.metric == "tokens_per_s":
            rows.append(_row(cfg_s, metric, r.value, s["tokens_per_s"],
                             status="validated" if s.get("native") else "extrapolated", note=desc, run=run))
        elif r.metric == "step_s":
            rows.append(_row(cfg_s, metric, r.value, s["step_time_s"], status="derived", run=run,
                             note="tokens per step / tokens_per_s: same error as its inverse"))
        elif r.metric == "mfu":
            rows.append(_row(cfg_s, metric, r.value, s["mfu"], status="derived", kind="ratio", run=run,
                             note="tokens_per_s x training FLOPs per token / peak: same error as tokens_per_s"))
        elif r.metric.startswith("peak_mem"):
            from simulator.train_memory import multigpu_peak

            proc = (run, r.device, int(r.world))
            if proc + key not in before:  # train.csv lists one process's runs in the order it trained them
                before[proc + key] = leaked.get(proc, 0.0)
                leaked[proc] = leaked.get(proc, 0.0) + s.get("leaked_state_bytes", 0.0)
            # the leak is scored: confirmed on the H100 (results/profiles/train_mem_probe_cuda.csv, leak_* rows:
            # each finished run leaves its fp32 parameters and gradients allocated, zero0 and zero3 alike)
            pred, status, note = multigpu_peak(s, metric, before[proc + key], score_leaked=True)
            rows.append(_row(cfg_s, metric, r.value, pred, status=status, kind="memory", run=run, note=note))
        else:
            rows.append(_row(cfg_s, metric, r.value, status="not_modelled", run=run,
                             note="loss values and wall time with the model build: not simulated"))
    return rows


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
def _run_meta(df: pd.DataFrame):
    """(device, world, cluster or None) of one run's ``time_us`` rows; None when they mix devices or worlds."""
    t = df[df["metric"] == "time_us"]
    if t.empty or t["world"].nunique() != 1 or t["device"].nunique() != 1:
        return None
    device, world = str(t["device"].iloc[0]), int(t["world"].iloc[0])
    return device, world, cluster_for(device, world)


def _iters(df: pd.DataFrame) -> dict[tuple[str, int], int]:
    return {(str(r.config), int(r.size_bytes)): int(r.value) for r in df[df["metric"] == "iters"].itertuples()}


def fit_host_floor(path: Path, cal=None):
    """The host seconds per back-to-back call of each collective at the run's own world size, fitted on ONE row
    per collective: its smallest measured size (1 KiB in the committed sweep; the size the world-1 probe uses),
    where the device time (NCCL latency model, a few us) is far below the host's. Host-bound back to back, that
    row is ``h + d / iters`` (`host_dispatch.back_to_back_s`), so ``h = time_us - d / iters``; a row whose
    ``h`` would not exceed ``d`` gives no floor (not host-bound). Returns (`CollectiveHost` with ``fitted_on``
    set, or None without preset / rows; the fitted ``(config, size_bytes)`` keys). **Host floor** in the module
    docstring says why the run's world, not the world-1 probe."""
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


# ---------------------------------------------------------------------------------------------- driver
PARTS = {"collectives.csv": collective_rows, "moe.csv": moe_rows, "train.csv": train_rows}


def fit_collective_links(path: Path, host=None) -> tuple[dict, frozenset]:
    """Each ring / all-to-all collective's own achieved NVLink bandwidth, fitted on ONE row: its largest measured
    size (256 MiB in the committed sweep: the most device-bound row), with `fit_nvlink`'s closed form (the model's
    latencies, the host share ``h / iters``). Not for `FIT_CONFIG` (the all-reduce keeps the NVLink fit that the
    MoE and training rows use) nor for `P2P_CONFIG` (its rate is `fit_p2p`'s, on that same largest row). Returns
    ({collective: `LinkCalibration`}, fitted ``(config, size_bytes)`` keys). **Per-collective bandwidth** in the
    module docstring."""
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


def rows(folder: Path, calibrate: bool = True, host="run", outliers: bool = True) -> list[dict]:
    """Every row of every ``collectives.csv`` / ``moe.csv`` / ``train.csv`` under ``folder`` (the folder itself
    and its run subfolders, e.g. ``results/multigpu/h200x2/``) beside its simulation. ``calibrate``: the NVLink
    bandwidth of each run folder is fitted on its own `fit_subset` and the p2p rate on `fit_p2p`'s row (those
    rows: status ``fitted``); the NVLink fit is used for all three parts of that folder; ``host``: the
    collectives' per-call host floor (``"run"``: `fit_host_floor`, its rows ``fitted``; ``"auto"``: the probe
    files; None: none; `run_calibration`); ``outliers``: `measurement_outliers` rows not scored."""
    folder = Path(folder)
    out: list[dict] = []
    if not folder.is_dir():
        return out
    for d in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        cal, h, p2p, fitted, links = None, host, None, frozenset(), {}
        if (d / "collectives.csv").is_file():
            cal, h, p2p, fitted, links = run_calibration(d / "collectives.csv", calibrate, host)
        for name, fn in PARTS.items():
            if (d / name).is_file():
                if name == "collectives.csv":
                    out += fn(d / name, cal, h, fitted, p2p, outliers, links)
                else:
                    out += fn(d / name, cal)
    return out


def summary(rs: list[dict]) -> pd.DataFrame:
    """Per part and status: rows, MAPE and max |error| of the scored rows (``validated`` / ``extrapolated``)
    and of the ``fitted`` ones (apart: never mixed with the held-out rows)."""
    df = pd.DataFrame(rs)
    if df.empty:
        return df
    df["part"] = df["config"].map(_part)
    s = df[df["status"].isin(["validated", "extrapolated", "fitted"])]
    g = s.groupby(["part", "status"])["error"]
    return pd.DataFrame({"rows": g.size(), "mape": g.apply(lambda e: e.abs().mean()),
                         "max_error": g.apply(lambda e: e.abs().max())}).reset_index()


def _part(config: str) -> str:
    c = str(config)
    if c.split(" ")[0] in COLLECTIVES:
        return "collectives"
    return "train" if " params" in c else "moe"


def main() -> None:  # pragma: no cover - a convenience printout
    root = Path(__file__).resolve().parent.parent / "results" / "multigpu"
    rs = rows(root)
    for d in sorted(p for p in root.iterdir() if (p / "collectives.csv").is_file()):
        cal, h, p2p, fitted, links = run_calibration(d / "collectives.csv")
        if cal is not None:
            print(f"{d.name}: NVLink {cal.nvlink_GBps:.1f} GB/s fitted on {cal.source}")
        if h is not None and getattr(h, "fitted_on", ""):
            per = ", ".join(f"{c} {v * 1e6:.1f} us" for c, v in h.per_call_s.items())
            print(f"{d.name}: host floor per call {per} fitted on {h.fitted_on}")
        if p2p is not None:
            print(f"{d.name}: p2p rate {p2p:.1f} GB/s per peer fitted on {P2P_CONFIG} at its largest size")
        for c, lc in links.items():
            print(f"{d.name}: {c} NVLink {lc.nvlink_GBps:.1f} GB/s fitted on {lc.source}")
        print(f"{d.name}: {len(fitted)} fitted rows; measurement outliers (not scored): "
              + ", ".join(f"{c} {s} B" for c, s in measurement_outliers(pd.read_csv(d / "collectives.csv"))))
    df = pd.DataFrame(rs)
    pd.set_option("display.width", 250)
    sc = df[df["status"].isin(["validated", "extrapolated", "fitted"])]
    print(sc[["config", "metric", "measured", "predicted", "error", "status"]].to_string(
        index=False, max_colwidth=70, float_format=lambda x: f"{x:.4g}"))
    print(summary(rs).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if not math.isfinite(sc["error"].abs().max()):
        print("some scored rows have no prediction")


if __name__ == "__main__":  # pragma: no cover
    main()
