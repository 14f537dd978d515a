"""The host's share of back-to-back collective calls: measured per-call dispatch time, and the link
calibration input of the collective model.

**Host dispatch floor.** A program that issues ``N`` collectives back to back (`paper_repro.multigpu_run`
times 20 calls as one CUDA-event interval) hands each call to the GPU only after the host has gone through
``torch.distributed`` (c10d work object, CUDA events, stream waits, the NCCL enqueue). With ``h`` the host
seconds per call and ``d`` the device seconds of one collective (the network model), the GPU runs call ``i``
when both the host has issued it and call ``i-1`` has ended, so the interval from the start event to the end
of call ``N`` is ``N max(h, d) + min(h, d)``: host-bound, call ``i`` starts at ``i h`` and the last ends at
``N h + d``; device-bound, the first starts at ``h`` and the rest follow back to back. Per call:
``max(h, d) + min(h, d) / N`` (`back_to_back_s`).

``h`` is measured, never fitted: `kernels.collective_host` times the same calls on 1 KiB tensors on one
GPU (world 1), where ``d`` is a few microseconds, and writes ``host_call_<collective>`` rows in the kernel
profile's columns. `find_collective_host` looks for ``results/profiles/collective_host_*.csv`` and prefers
the file of the run's GPU family (``H200`` in ``NVIDIA H200``); a file of another machine is returned with
``same_host=False`` (its host CPU differs: the caller says so). Without any file there is no floor.
The probe runs at world 1, where NCCL takes its one-rank shortcut (no ring kernel; nothing at all for an
in-place all-reduce), so its per-call cost can differ from a multi-GPU run's: a `CollectiveHost` can instead
be fitted on a run's own smallest-size rows (``fitted_on`` names them; `simulator.validate_multigpu.
fit_host_floor`, which the 2 x H200 validation uses).

**Link calibration** (`LinkCalibration`, `calibrate_topology`): the achieved per-GPU NVLink bandwidth (and
optionally per-hop latency) of a measured machine replaces the preset's datasheet x achievable fraction
(`simulator.hardware.nvlink_effective_GBps`) in a built `Topology`. It is an input of the collective model
rather than a preset value because it is one run's measurement (the preset keeps the datasheet that the
other sizes of the family, ``h200-x4`` / ``-x8``, share) and because the caller has to keep track of the rows
it was fitted on (`simulator.validate_multigpu.fit_nvlink`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.hardware import GB

PROFILES_DIR = Path(__file__).resolve().parents[2] / "results" / "profiles"
PATTERN = "collective_host_*.csv"
CALL_OP = "host_call_"
_FAMILY = re.compile(r"\b([A-Z]\d{2,3})\b")


def back_to_back_s(device_s: float, host_s: float, calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back collectives timed as one interval from an idle GPU:
    ``max(h, d) + min(h, d) / calls`` (module docstring)."""
    if calls < 1:
        raise ValueError(f"back_to_back_s: calls must be >= 1, got {calls}")
    if device_s < 0 or host_s < 0:
        raise ValueError("back_to_back_s: times must be >= 0")
    return max(device_s, host_s) + min(device_s, host_s) / calls


def gpu_family(name: str) -> str | None:
    """'NVIDIA H200' -> 'H200', 'NVIDIA H100 80GB HBM3' -> 'H100'; None when no such token."""
    m = _FAMILY.search(str(name).upper())
    return m.group(1) if m else None


@dataclass(frozen=True)
class CollectiveHost:
    """Host seconds per back-to-back call of each collective, as measured on ``gpu``'s machine."""

    per_call_s: dict[str, float]
    gpu: str
    world: int
    calls: int
    path: str
    fitted_on: str = ""  # not a probe: fitted on these rows of a run (`simulator.validate_multigpu.fit_host_floor`)

    def host_s(self, collective: str) -> float | None:
        return self.per_call_s.get(collective)


def load_collective_host(path: Path) -> CollectiveHost:
    """The ``host_call_<collective>`` rows of one probe file (`kernels.collective_host`)."""
    import pandas as pd

    df = pd.read_csv(path)
    missing = {"gpu", "op", "n", "k", "time_s"} - set(df.columns)
    if missing:
        raise ValueError(f"collective host profile {path}: missing columns {sorted(missing)}")
    df = df[df["op"].astype(str).str.startswith(CALL_OP)]
    if df.empty:
        raise ValueError(f"collective host profile {path}: no {CALL_OP}<collective> rows")
    if df["gpu"].nunique() != 1:
        raise ValueError(f"collective host profile {path}: rows of several GPUs {sorted(df['gpu'].unique())}")
    per = {op.removeprefix(CALL_OP): float(t) for op, t in zip(df["op"], df["time_s"])}
    if not all(np.isfinite(v) and v > 0 for v in per.values()):
        raise ValueError(f"collective host profile {path}: time_s must be > 0")
    return CollectiveHost(per, str(df["gpu"].iloc[0]), int(df["n"].iloc[0]), int(df["k"].iloc[0]), str(path))


def find_collective_host(device: str, folder: Path = PROFILES_DIR) -> tuple[CollectiveHost | None, bool]:
    """(probe of ``device``'s GPU family if measured, else of another machine, else None; same_host)."""
    files = sorted(Path(folder).glob(PATTERN)) if Path(folder).is_dir() else []
    if not files:
        return None, False
    probes = [load_collective_host(f) for f in files]
    fam = gpu_family(device)
    for p in probes:
        if fam is not None and gpu_family(p.gpu) == fam:
            return p, True
    return probes[0], False


# ------------------------------------------------------------------------------------ link calibration
@dataclass(frozen=True)
class LinkCalibration:
    """Achieved per-GPU NVLink bandwidth each way (and per-hop latency, None: the preset's) of one machine,
    and where it came from (``source``: the rows it was fitted on)."""

    nvlink_GBps: float
    nvlink_latency_s: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not (np.isfinite(self.nvlink_GBps) and self.nvlink_GBps > 0):
            raise ValueError(f"LinkCalibration: nvlink_GBps must be > 0, got {self.nvlink_GBps}")
        if self.nvlink_latency_s is not None and self.nvlink_latency_s < 0:
            raise ValueError(f"LinkCalibration: nvlink_latency_s must be >= 0, got {self.nvlink_latency_s}")


def calibrate_topology(topo, cal: LinkCalibration | None) -> None:
    """Set the NVLink links of a built `Topology` to ``cal`` (in place; None leaves them as built)."""
    if cal is None:
        return
    if topo.nvl_out0 < 0:
        raise ValueError("calibrate_topology: the cluster has no NVLink to calibrate")
    W = topo.world
    topo.nvlink_GBps = cal.nvlink_GBps
    for first in (topo.nvl_out0, topo.nvl_in0):
        topo.capacity[first: first + W] = cal.nvlink_GBps * GB
    if cal.nvlink_latency_s is not None:
        topo.latency[topo.nvl_out0: topo.nvl_out0 + W] = cal.nvlink_latency_s
