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

import math
from pathlib import Path

import pandas as pd

# the public names of this module, defined by concept in its parts: simulator.validate_multigpu_model (cluster,
# cost model, Sim, collective ops, host floor forms, run meta), _collectives (collective rows, outliers, link
# calibration) and _workloads (MoE layer and training rows)
from simulator.validate_multigpu_collectives import (  # noqa: F401  (public names of this module)
    FIT_CONFIG,
    FIT_EVERY,
    FIT_MIN_BYTES,
    LATENCY_BOUND_BYTES,
    OUTLIER_JUMP,
    P2P_CONFIG,
    _probe_note,
    collective_rows,
    fit_alpha_beta,
    fit_collective_links,
    fit_host_floor,
    fit_nvlink,
    fit_p2p,
    fit_subset,
    measurement_outliers,
    run_calibration,
    wire_bytes,
)
from simulator.validate_multigpu_model import (  # noqa: F401  (public names of this module)
    COLLECTIVES,
    PROFILE_GPU,
    SOURCE,
    STATUSES,
    _host_for,
    _iters,
    _row,
    _run_meta,
    _sim,
    cluster_for,
    collective_op,
    gpu_cost_model,
    h200_cost_model,
    op_time,
    predict_collective,
    uneven_matrix,
)
from simulator.validate_multigpu_workloads import (  # noqa: F401  (public names of this module)
    _HETU,
    _MOE,
    _RAIL,
    _TRAIN,
    _TRAIN_IMPL,
    EP_BWD_KERNELS,
    EP_COUNT_KERNELS,
    EP_FWD_KERNELS,
    EP_ROW_BYTES,
    PROGRAM_LAYERS,
    ep_program,
    moe_prediction,
    moe_rows,
    parse_moe_config,
    parse_train,
    simulate_train,
    train_host_program,
    train_rows,
)

# ---------------------------------------------------------------------------------------------- driver
PARTS = {"collectives.csv": collective_rows, "moe.csv": moe_rows, "train.csv": train_rows}


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
