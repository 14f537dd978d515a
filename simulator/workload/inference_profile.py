"""Profile rows of the inference workload that `simulator.cost.CostModel` does not read (sweep ``infer``
of ``kernels/profile.py``, in the same ``results/profiles/<gpu>.csv``):

* ``dequant`` (dtype ``int8`` / ``fp8``): the reference's workspace dequantisation
  (``reference.inference.quantize.dequantize_into``: a strided copy of the k-major 1-byte data into the
  bf16 workspace, then the scale pass) of ``m`` experts' ``[k=I, n=O]`` matrix. `InferProfile.dequant_s`
  charges the measured seconds per weight of the same ``(I, O)`` (nearest expert count, linear in
  the number of experts);
* ``qgemm_fwd`` (dtype ``int8`` / ``fp8``): ``reference.inference.qmatmul.quant_mm``, the fused quantised
  grouped GEMM (fp8: ``torch._scaled_grouped_mm`` with the per-row activation quantisation; int8: the
  Triton dequant GEMM) at ``m`` rows per expert. `InferProfile.qgemm_s`: FLOP/s interpolated as a
  power law in ``m`` inside the measured range (clamped to the nearest end outside it);
* ``grouped_gemm_fwd_routed``: ``torch._grouped_mm`` with uneven routed groups (seeded uniform top-k
  routing, ``m`` the mean rows per expert: the reference's prefill groups). `InferProfile.routed_gemm_s`:
  time interpolated as a power law in ``m`` inside the measured range of the same ``(k, n, groups)``, None
  outside it (the caller keeps the tile padding model of `simulator.workload.inference_costs.padded_rows`);
* ``host_call_<name>`` (impl ``triton``): host seconds per call of a kernel wrapper issued back to
  back (`InferProfile.host_call_s`).

The file is the one the cost model was loaded from (``CostModel.profile.source``); with no profile, or
no such rows, every accessor returns None and the caller keeps its analytic model.
"""

from __future__ import annotations

import csv
import math
from functools import cache
from pathlib import Path

import numpy as np

OPS = ("dequant", "qgemm_fwd", "grouped_gemm_fwd_routed")


def _load(path: str) -> tuple[dict, ...]:
    p = Path(path)
    if not p.is_file():
        return ()
    st = p.stat()
    return _read(str(p), st.st_mtime_ns, st.st_size)


@cache
def _read(path: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    """The inference rows of the CSV (cached per file version)."""
    p = Path(path)
    out = []
    with p.open(newline="") as f:
        for r in csv.DictReader(f):
            op = r.get("op", "")
            if op in OPS or op.startswith("host_call_"):
                try:
                    out.append({"op": op, "impl": r.get("impl", ""), "dtype": r["dtype"], "m": float(r["m"]),
                                "n": int(float(r["n"])), "k": int(float(r["k"])),
                                "groups": int(float(r.get("groups") or 1)), "time_s": float(r["time_s"])})
                except (KeyError, ValueError):
                    continue
    return tuple(out)


class InferProfile:
    """The inference rows of one profile CSV (module docstring)."""

    def __init__(self, rows: tuple[dict, ...] | list[dict], source: str = "") -> None:
        self.rows = tuple(rows)
        self.source = source

    @classmethod
    def of(cls, cost) -> InferProfile:
        """The rows of the file ``cost`` (a `CostModel`) was loaded from (none without a profile)."""
        prof = getattr(cost, "profile", None)
        src = getattr(prof, "source", "") if prof is not None else ""
        return cls(_load(str(src)) if src else (), str(src))

    def __bool__(self) -> bool:
        return bool(self.rows)

    def _select(self, op: str, dtype: str | None = None, **eq) -> list[dict]:
        return [r for r in self.rows if r["op"] == op and (dtype is None or r["dtype"] == dtype)
                and all(r[k] == v for k, v in eq.items())]

    def dequant_s(self, fmt: str, inputs: int, outputs: int, experts: int) -> float | None:
        """Seconds to dequantise ``experts`` experts' ``[inputs, outputs]`` matrix into the workspace:
        the measured seconds per weight of the same shape (the row with the nearest expert count)."""
        rows = self._select("dequant", fmt, k=inputs, n=outputs)
        if not rows or experts <= 0:
            return None
        r = min(rows, key=lambda r: (abs(math.log(r["m"] / experts)), -r["m"]))
        return r["time_s"] * experts / r["m"]

    def qgemm_s(self, fmt: str, rows_per_expert: float, inputs: int, outputs: int, experts: int) -> float | None:
        """Seconds of the fused quantised grouped GEMM of ``experts`` groups of ``rows_per_expert`` rows,
        from the measured FLOP/s of the same ``(inputs, outputs)`` (power law in rows between measured
        points; below them the smallest rows' time (the weights are read anyway), above them the largest rows'
        FLOP/s); rows of another expert count are scaled by the
        number of groups (time per group at the same rows per expert)."""
        cand = self._select("qgemm_fwd", fmt, k=inputs, n=outputs)
        if not cand or rows_per_expert <= 0 or experts <= 0:
            return None
        g = min({r["groups"] for r in cand}, key=lambda g: (abs(math.log(g / experts)), -g))
        rows = sorted((r for r in cand if r["groups"] == g), key=lambda r: r["m"])
        ms = np.array([r["m"] for r in rows])
        # FLOP/s of ``experts`` groups: the measured rate per group (rows of another expert count: same
        # rows per expert, the work scales with the groups)
        fps = np.array([2.0 * r["m"] * inputs * outputs * experts / (r["time_s"] * experts / g) for r in rows])
        m = float(np.clip(rows_per_expert, ms[0], ms[-1]))
        f = float(np.exp(np.interp(math.log(m), np.log(ms), np.log(fps)))) if len(ms) > 1 else float(fps[0])
        # below the smallest measured rows the kernel still streams every weight: no faster than there
        return 2.0 * max(rows_per_expert, ms[0]) * inputs * outputs * experts / f

    def routed_gemm_s(self, rows_per_expert: float, inputs: int, outputs: int, experts: int) -> float | None:
        """Seconds of the bf16 ``torch._grouped_mm`` of ``experts`` uneven routed groups of ``rows_per_expert``
        mean rows (``[rows, inputs] x [inputs, outputs]`` per group) from the ``grouped_gemm_fwd_routed`` rows
        of the same shape and expert count: time interpolated as a power law in the rows between the measured
        points; None outside the measured rows (no extrapolation: below them the kernel streams every weight
        and its tile imbalance is not measured) or when no row has this shape."""
        rows = sorted(self._select("grouped_gemm_fwd_routed", "bf16", k=inputs, n=outputs, groups=experts),
                      key=lambda r: r["m"])
        if not rows or rows_per_expert <= 0:
            return None
        ms = np.array([r["m"] for r in rows])
        if not ms[0] <= rows_per_expert <= ms[-1]:
            return None
        ts = np.array([r["time_s"] for r in rows])
        if len(ms) == 1:
            return float(ts[0])
        return float(np.exp(np.interp(math.log(rows_per_expert), np.log(ms), np.log(ts))))

    def host_call_s(self, name: str) -> float | None:
        """Host seconds per call of the wrapper ``name`` (``gating``, ``permute``), if measured."""
        rows = self._select(f"host_call_{name}")
        return rows[-1]["time_s"] if rows else None
