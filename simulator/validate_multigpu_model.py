"""The simulator set up for one run of `simulator.validate_multigpu` (its module docstring gives the rules): the
cluster preset of the run's device and world size, the kernel cost model (the GPU's own profile, or the H100's
extrapolated to the H200), a `Sim` with the run's link calibration, the `CommOp` of each measured collective and
its predicted time, the per-call host floor's forms (`_host_for`), the run's meta and iteration counts of its
``collectives.csv``, and the row dict every part writes."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd

SOURCE = "multigpu"
STATUSES = ("validated", "extrapolated", "derived", "not_modelled", "fitted")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "all_to_all_uneven")
PROFILE_GPU = "h100_80gb_hbm3.csv"  # the kernel profile the H200 rows are extrapolated from


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
    the H200's bandwidth (`simulator.validate_multigpu`'s docstring). ``impl``: which implementation's profile
    rows win."""
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


# ------------------------------------------------------------------------------------ collective ops
def uneven_matrix(n: int, nbytes: int) -> np.ndarray:
    """Bytes rank s sends to rank d in the run's ``all_to_all_uneven`` of ``nbytes`` per rank (fp32)."""
    from paper_repro.multigpu_run import uneven_splits

    return 4.0 * np.array(uneven_splits(n, nbytes // 4), dtype=float)


def collective_op(sim, name: str, nbytes: float, world: int, p2p_GBps: float | None = None):
    """The simulator's `CommOp` for the run's collective ``name`` of ``nbytes`` (its ``size_bytes``) over
    ``world`` ranks: ring all-reduce / all-gather / reduce-scatter, flat all-to-all (even: ``nbytes / world``
    to every rank; uneven: the run's split matrix, on NCCL's p2p path at ``p2p_GBps`` per peer when given:
    `collectives.all_to_all_p2p`, **P2P all-to-all** in `simulator.validate_multigpu`'s docstring)."""
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


# ------------------------------------------------------------------------ host floor forms, run meta
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


def _run_meta(df: pd.DataFrame):
    """(device, world, cluster or None) of one run's ``time_us`` rows; None when they mix devices or worlds."""
    t = df[df["metric"] == "time_us"]
    if t.empty or t["world"].nunique() != 1 or t["device"].nunique() != 1:
        return None
    device, world = str(t["device"].iloc[0]), int(t["world"].iloc[0])
    return device, world, cluster_for(device, world)


def _iters(df: pd.DataFrame) -> dict[tuple[str, int], int]:
    return {(str(r.config), int(r.size_bytes)): int(r.value) for r in df[df["metric"] == "iters"].itertuples()}
