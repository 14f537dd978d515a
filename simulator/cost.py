"""Compute cost model: kernel time from a measured profile, or a roofline with measured ceilings.

Profile CSV schema (``results/profiles/<gpu>.csv``, written by ``kernels/profile.py``); one row per
measured kernel shape, extra columns ignored::

    op,dtype,m,n,k,time_s            # required
    groups                           # optional, default 1 (grouped GEMM: ``groups`` GEMMs of m x n x k)
    gpu                              # optional, the GPU the row was measured on

``op`` is ``matmul`` (C[m,n] = A[m,k] @ B[k,n]) or ``grouped_matmul`` (m = tokens per group);
columns ``tokens,hidden,ffn`` are accepted as aliases of ``m,k,n``. Rows with the same
``(op, dtype, n, k, groups)`` form a curve over ``m``: inside its measured ``m`` range the achieved
FLOP/s is interpolated linearly in ``log m``; outside it (or for a shape with no curve) the roofline
below is used and a warning is issued once per shape.

Roofline (no profile, or outside it): ``t = launch + max(flops / (peak * eff(m)), bytes / (hbm * eta))``
with the ceilings measured on the H100 (HARDWARE.md): GEMM efficiency vs tokens ``m`` (K=4096,
N=16384: 337 / 738 / 777 / 746 TFLOP/s at m = 128 / 512 / 2048 / 8192 of 989 peak), HBM achieved
3.1 of 3.35 TB/s (eta = 0.925; A100: ~1.8 of 2.039 TB/s, eta = 0.883). Other GPUs use the same
efficiencies against their own datasheet peaks (roofline ratio scaling); profile times measured on
another GPU are scaled by the ratio of compute peaks (compute-bound shapes).

Grouped GEMMs (``groups > 1``, one GEMM per expert) run at ``GROUPED_GEMM_FACTOR`` of the dense
GEMM efficiency at the same rows per group: HARDWARE.md measures ``torch._grouped_mm`` at 685 TFLOP/s
for E=8, top-2, 16384 tokens (4096 rows per expert), H=4096, F=3584, where the dense curve gives
``gemm_efficiency(4096) * 989`` = 761 TFLOP/s: factor 0.90.

Backward: each backward GEMM (dX and dW) costs the forward GEMM times ``BACKWARD_GEMM_FACTOR`` = 1.31.
Calibrated on one point: the ``mixtral_like`` forward+backward MoE layer of ``results/bench/moe_layer.csv``
(impl ``ours``, H100, 2026-11-24: 42.37 ms measured, 43.5 ms predicted with the rounded factor);
held out, the same model predicts ``hetu_switch_b32`` and ``fine_grained`` forward+backward within 2%
(see `simulator.calibration`).

Overlap: a kernel that runs while a collective or copy is in flight on the same GPU is slowed by
``OVERLAP_SLOWDOWN`` = 1.10 (assumption: NCCL kernels hold ~8-16 SM channels of 108-132 and share
HBM bandwidth; 5-15% slowdowns are typically reported). It is a parameter of `CostModel`.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from semoe import GPUSpec, SpecError

OVERLAP_SLOWDOWN = 1.10
LAUNCH_S = 5e-6  # per kernel; HARDWARE.md measures ~8 us per small eager PyTorch op
# HARDWARE.md, H100: bf16 matmul K=4096 N=16384, achieved / 989 TFLOP/s peak
GEMM_EFF_M = np.array([128.0, 512.0, 2048.0, 8192.0])
GEMM_EFF = np.array([337.0, 738.0, 777.0, 746.0]) / 989.0
GROUPED_GEMM_FACTOR = 685.0 / (989.0 * float(np.interp(math.log(4096.0), np.log(GEMM_EFF_M), GEMM_EFF)))
BACKWARD_GEMM_FACTOR = 1.31
HBM_EFF = {"A100": 1800.0 / 2039.0, "default": 3100.0 / 3350.0}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
_ALIASES = {"tokens": "m", "hidden": "k", "ffn": "n"}


def gemm_efficiency(m: float) -> float:
    """Fraction of peak of a GEMM with ``m`` rows (interpolated in log m; linear below m=128)."""
    if m <= GEMM_EFF_M[0]:
        return float(GEMM_EFF[0] * max(m, 1.0) / GEMM_EFF_M[0])
    return float(np.interp(math.log(m), np.log(GEMM_EFF_M), GEMM_EFF))


class Profile:
    """Measured kernel times; see the module docstring for the schema."""

    def __init__(self, rows: list[dict], peak_tflops: float | None = None, source: str = "profile") -> None:
        self.source = source
        self.peak_tflops = peak_tflops  # of the GPU it was measured on (for scaling)
        curves: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            flops = 2.0 * r["m"] * r["n"] * r["k"] * r["groups"]
            curves[(r["op"], r["dtype"], r["n"], r["k"], r["groups"])].append((r["m"], flops / r["time_s"]))
        self.curves = {k: (np.array([m for m, _ in sorted(v)]), np.array([f for _, f in sorted(v)])) for k, v in curves.items()}

    @classmethod
    def from_csv(cls, path: str | Path, peak_tflops: float | None = None) -> "Profile":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"profile: file not found: {path}")
        rows = []
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            cols = {_ALIASES.get(c, c) for c in (reader.fieldnames or [])}
            missing = {"op", "dtype", "m", "n", "k", "time_s"} - cols
            if missing:
                raise SpecError(f"profile: {path} lacks column(s) {', '.join(sorted(missing))}")
            for i, rec in enumerate(reader):
                rec = {_ALIASES.get(k, k): v for k, v in rec.items()}
                try:
                    row = {
                        "op": rec["op"],
                        "dtype": rec["dtype"],
                        "m": float(rec["m"]),
                        "n": int(float(rec["n"])),
                        "k": int(float(rec["k"])),
                        "groups": int(float(rec.get("groups") or 1)),
                        "time_s": float(rec["time_s"]),
                    }
                except ValueError as e:
                    raise SpecError(f"profile: {path} row {i + 2}: {e}") from None
                if row["time_s"] <= 0:
                    raise SpecError(f"profile: {path} row {i + 2}: time_s must be > 0")
                rows.append(row)
        return cls(rows, peak_tflops, str(path))

    def flops_per_s(self, op: str, dtype: str, m: float, n: int, k: int, groups: int = 1) -> float | None:
        curve = self.curves.get((op, dtype, n, k, groups))
        if curve is None:
            return None
        ms, fs = curve
        if m < ms[0] or m > ms[-1]:
            return None
        if len(ms) == 1:
            return float(fs[0])
        return float(np.interp(math.log(m), np.log(ms), fs))


class CostModel:
    def __init__(
        self,
        gpu: GPUSpec,
        profile: Profile | None = None,
        overlap_slowdown: float = OVERLAP_SLOWDOWN,
        launch_s: float = LAUNCH_S,
        backward_gemm_factor: float = BACKWARD_GEMM_FACTOR,
    ) -> None:
        self.gpu = gpu
        self.backward_gemm_factor = backward_gemm_factor
        self.profile = profile
        self.overlap_slowdown = overlap_slowdown
        self.launch_s = launch_s
        self.peak = gpu.bf16_tflops * 1e12
        fam = "A100" if gpu.name.upper().startswith("A100") else "default"
        self.hbm = gpu.hbm_GBps * 1e9 * HBM_EFF[fam]
        self._warned: set = set()

    def memory(self, nbytes: float) -> float:
        """A memory-bound kernel moving ``nbytes`` (read + write) through HBM."""
        return self.launch_s + nbytes / self.hbm if nbytes > 0 else 0.0

    def roofline(self, flops: float, nbytes: float, m: float) -> float:
        if flops <= 0 and nbytes <= 0:
            return 0.0
        return self.launch_s + max(flops / (self.peak * gemm_efficiency(m)), nbytes / self.hbm)

    def matmul(self, m: float, n: int, k: int, dtype: str = "bf16", groups: int = 1, op: str | None = None) -> float:
        """Time of ``groups`` GEMMs of [m,k] x [k,n] (``m`` rows each)."""
        if m <= 0 or groups <= 0:
            return 0.0
        op = op or ("grouped_matmul" if groups > 1 else "matmul")
        flops = 2.0 * m * n * k * groups
        if self.profile is not None:
            fps = self.profile.flops_per_s(op, dtype, m, n, k, groups)
            if fps is not None:
                scale = self.peak / (self.profile.peak_tflops * 1e12) if self.profile.peak_tflops else 1.0
                return flops / (fps * scale)
            key = (op, dtype, n, k, groups)
            if key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"{self.profile.source}: no measurement for {op} {dtype} n={n} k={k} groups={groups} "
                    f"at m={m:g}; using the roofline",
                    stacklevel=2,
                )
        b = DTYPE_BYTES.get(dtype, 2)
        nbytes = b * groups * (m * k + k * n + m * n)
        if groups > 1:
            eff = gemm_efficiency(m) * GROUPED_GEMM_FACTOR
            return self.launch_s + max(flops / (self.peak * eff), nbytes / self.hbm)
        return self.roofline(flops, nbytes, m)

    def attention_core(self, tokens: float, seq: int, hidden: int, dtype: str = "bf16") -> float:
        """Fused attention (QK^T, softmax, AV) forward: ``4 * seq * hidden`` FLOPs per token (full,
        not causal-halved, as `semoe.sizing`), at the GEMM efficiency of ``m = tokens``."""
        flops = 4.0 * seq * hidden * tokens
        return self.roofline(flops, 4 * DTYPE_BYTES.get(dtype, 2) * tokens * hidden, tokens)
