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

The kernels issue's profile (``results/profiles/<gpu>.csv``, schema in ``kernels/profile.py``:
``gpu,op,impl,dtype,batch,m,n,k,groups,io_bytes,flop,time_s,...``) is read with its op names mapped:
``gemm`` -> ``matmul``, ``grouped_gemm_fwd`` -> ``grouped_matmul`` (``grouped_gemm_dgrad`` /
``_wgrad`` keep their names); when several ``impl`` measured the same shape, the first of
``Profile.from_csv(impl=...)`` wins (default ``triton`` (ours) then ``torch``; the inference workload
asks for ``torch``, which is what ``reference/inference`` runs); a shape that impl measured several times (profile
runs appended with ``kernels/profile.py --append-to``: GEMM rates under the H100's 700 W cap differ ~5% between
runs) takes the mean time of its measurements. ``sdpa_fwd`` rows (causal attention,
``batch`` x ``k`` heads x ``m`` sequence x ``n`` head dim) form curves of FLOP/s over ``m`` per
``(batch*k, n)``; row-wise ops (``rmsnorm``, ``layernorm``, ``add``, ``gelu``, ``permute``,
``unpermute``, ``copy_d2d``) give achieved HBM GB/s over ``io_bytes`` (`CostModel.elementwise`).
A GEMM shape with no curve of its own borrows the achieved FLOP/s at the same ``m`` of the nearest
measured ``(n, k)`` of the same op (within 2x in each of ``n`` and ``k``; a grouped GEMM may borrow
from another expert count, the rows per group being what sets its efficiency), with a warning once.
`find_profile` maps a `GPUSpec` to its profile file (family A100/H100/H200 and memory size must
match the file's ``gpu`` column); `CostModel.auto` loads it when present, else warns once and uses
the roofline.

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

Host cost: eager PyTorch spends host time on every operator it dispatches; a step issuing ``n`` operators
cannot finish in less than ``n * host_op_s`` (`CostModel.host_time`). ``host_op_s`` is the profile's
``host_op`` row of impl ``reference`` (time per aten operator of the reference model's forward at batch 1,
sequence 1, measured by ``kernels/profile.py``; the operator count comes from `reference.op_count`), else
``HOST_OP_S`` = 8 us, HARDWARE.md's "PyTorch eager op overhead ~8 us per small op". Workloads count their
operators from the reference code (`reference.op_count`), never from a validation row. `CostModel.host_op_impl`
reads one impl's row (``reference_triton``: the forward with the Triton MoE backend; ``torch``: a bare op);
the training workload's host program (`simulator.train_host`) issues its forward segments at the backend's
``reference`` / ``reference_triton`` rate and its backward and optimizer segments (dispatched by the C++
autograd engine or as single multi-tensor ops, without the forward's Python module code) at the bare-op rate.

Host transfers (``TRANSFER_OPS``): ``disk_read`` / ``disk_write`` / ``copy_{h2d,d2h}_{pinned,pageable}``
rows (``io_bytes`` moved in ``time_s``) give achieved bytes/s over the size, used by `CostModel.transfer_time`
(else the cluster spec's bandwidth); a ``cpu_adam`` row (``io_bytes`` = parameters updated by the CPU
optimizer in ``time_s``) gives its parameters/s.

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
HOST_OP_S = 8e-6  # HARDWARE.md: PyTorch eager op overhead ~8 us per small op (host side)
# HARDWARE.md, H100: bf16 matmul K=4096 N=16384, achieved / 989 TFLOP/s peak
GEMM_EFF_M = np.array([128.0, 512.0, 2048.0, 8192.0])
GEMM_EFF = np.array([337.0, 738.0, 777.0, 746.0]) / 989.0
GROUPED_GEMM_FACTOR = 685.0 / (989.0 * float(np.interp(math.log(4096.0), np.log(GEMM_EFF_M), GEMM_EFF)))
BACKWARD_GEMM_FACTOR = 1.31
HBM_EFF = {"A100": 1800.0 / 2039.0, "default": 3100.0 / 3350.0}
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
_ALIASES = {"tokens": "m", "hidden": "k", "ffn": "n"}
# kernels/profile.py op names -> the cost model's
OP_NAMES = {"gemm": "matmul", "grouped_gemm_fwd": "grouped_matmul"}
GEMM_OPS = ("matmul", "grouped_matmul", "grouped_gemm_dgrad", "grouped_gemm_wgrad")
MEMORY_OPS = ("rmsnorm", "layernorm", "add", "gelu", "permute", "unpermute", "copy_d2d")
# host-side transfers and the CPU optimizer: achieved bytes/s (cpu_adam: parameters/s) over the size moved
TRANSFER_OPS = ("disk_read", "disk_write", "copy_h2d_pinned", "copy_d2h_pinned", "copy_h2d_pageable",
                "copy_d2h_pageable", "cpu_adam")
PROFILES_DIR = Path(__file__).resolve().parent.parent / "results" / "profiles"


def gemm_efficiency(m: float) -> float:
    """Fraction of peak of a GEMM with ``m`` rows (interpolated in log m; linear below m=128)."""
    if m <= GEMM_EFF_M[0]:
        return float(GEMM_EFF[0] * max(m, 1.0) / GEMM_EFF_M[0])
    return float(np.interp(math.log(m), np.log(GEMM_EFF_M), GEMM_EFF))


class Profile:
    """Measured kernel times; see the module docstring for the schema."""

    def __init__(self, rows: list[dict], peak_tflops: float | None = None, source: str = "profile",
                 impl: tuple[str, ...] = ("triton", "torch"), loglog: bool = False) -> None:
        self.source = source
        # loglog: interpolate log(FLOP/s) in log m (power law between measured points), which keeps the
        # memory-bound plateau of small-m GEMMs (time ~constant); the default interpolates FLOP/s
        # linearly in log m, which can make e.g. m=128 faster than both m=64 and m=256
        self.loglog = loglog
        self.peak_tflops = peak_tflops  # of the GPU it was measured on (for scaling)
        self.gpu = next((r["gpu"] for r in rows if r.get("gpu")), None)
        rank = {name: i for i, name in enumerate(impl)}
        best: dict[tuple, dict] = {}  # one row per shape: the preferred impl
        times: dict[tuple, list[float]] = defaultdict(list)  # every measurement of that shape by that impl
        for r in rows:
            op = OP_NAMES.get(r["op"], r["op"])
            r = dict(r, op=op)
            key = (op, r["dtype"], r["m"], r["n"], r["k"], r["groups"], r.get("batch", 1))
            old = best.get(key)
            new_rank, old_rank = rank.get(r.get("impl", ""), len(rank)), rank.get((old or {}).get("impl", ""), len(rank))
            if old is None or new_rank < old_rank:
                best[key] = r
                times[key] = [r["time_s"]]
            elif new_rank == old_rank:
                times[key].append(r["time_s"])
        # a shape measured several times by the preferred impl (profile runs appended, kernels/profile.py
        # --append-to; square shapes timed as both projections): the mean time of its measurements
        best = {key: (r if len(times[key]) == 1 else dict(r, time_s=float(np.mean(times[key]))))
                for key, r in best.items()}
        curves: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        mem: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        xfer: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in best.values():
            op = r["op"]
            if op in TRANSFER_OPS:
                size = r.get("io_bytes") or r["m"]
                if size > 0:
                    xfer[op].append((size, size / r["time_s"]))
            elif op.startswith("sdpa"):
                flops = r.get("flop") or 0.0
                if flops > 0:
                    curves[(op, r["dtype"], r["n"], r.get("batch", 1) * r["k"], 1)].append((r["m"], flops / r["time_s"]))
            elif op in MEMORY_OPS:
                if r.get("io_bytes"):
                    mem[(op, r["dtype"])].append((r["io_bytes"], r["io_bytes"] / r["time_s"]))
            elif op in GEMM_OPS or (r.get("flop") is None and op != "host_op"):
                flops = 2.0 * r["m"] * r["n"] * r["k"] * r["groups"]
                curves[(op, r["dtype"], r["n"], r["k"], r["groups"])].append((r["m"], flops / r["time_s"]))

        def arrays(d):
            return {k: (np.array([m for m, _ in sorted(v)]), np.array([f for _, f in sorted(v)])) for k, v in d.items()}

        # fused attention rows as measured ((batch, seq, head dim, heads) -> seconds) per op and dtype:
        # `CostModel.sdpa_backward_ratio` pairs sdpa_fwd and sdpa_fwd_bwd rows of the same shape
        self.sdpa_times: dict[tuple, dict[tuple, float]] = defaultdict(dict)
        for r in best.values():
            if r["op"] in ("sdpa_fwd", "sdpa_fwd_bwd"):
                self.sdpa_times[(r["op"], r["dtype"])][(r.get("batch", 1), r["m"], r["n"], r["k"])] = r["time_s"]
        self.curves = arrays(curves)
        self.curve_ops = {key[0] for key in self.curves}  # the ops with a measured curve (e.g. torch dgrad / wgrad)
        self.mem_curves = arrays(mem)
        self.transfer_curves = {k: v for k, v in arrays(xfer).items()}
        # host seconds per dispatched operator, by impl ('reference': the reference model; 'torch': a bare op)
        self.host_op = {r.get("impl", ""): r["time_s"] for r in rows if r["op"] == "host_op"}

    @classmethod
    def from_csv(cls, path: str | Path, peak_tflops: float | None = None,
                 impl: tuple[str, ...] = ("triton", "torch"), loglog: bool = False) -> "Profile":
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
                        "impl": rec.get("impl") or "",
                        "gpu": rec.get("gpu") or "",
                        "batch": int(float(rec.get("batch") or 1)),
                    }
                    for opt in ("io_bytes", "flop"):
                        if rec.get(opt) not in (None, ""):
                            row[opt] = float(rec[opt])
                except ValueError as e:
                    raise SpecError(f"profile: {path} row {i + 2}: {e}") from None
                if row["time_s"] <= 0:
                    raise SpecError(f"profile: {path} row {i + 2}: time_s must be > 0")
                rows.append(row)
        return cls(rows, peak_tflops, str(path), impl=impl, loglog=loglog)

    def nearest_curve(self, op: str, dtype: str, n: int, k: int, groups: int = 1) -> tuple | None:
        """Key of the measured curve of ``op`` nearest to ``(n, k)`` (log distance; same expert count
        preferred), within 2x in each of n and k; None if there is none."""
        best, best_d = None, None
        for key in self.curves:
            o, dt, n2, k2, g2 = key
            if o != op or dt != dtype:
                continue
            dn, dk = abs(math.log(n2 / n)), abs(math.log(k2 / k))
            if dn > math.log(2) + 1e-9 or dk > math.log(2) + 1e-9:
                continue
            d = dn + dk + (0.0 if g2 == groups else 1e-3 * abs(math.log(g2 / groups)))
            if best_d is None or d < best_d:
                best, best_d = key, d
        return best

    def bytes_per_s(self, op: str, dtype: str, nbytes: float) -> float | None:
        """Achieved HBM bytes/s of a row-wise op moving ``nbytes``, inside the measured range."""
        curve = self.mem_curves.get((op, dtype))
        if curve is None:
            return None
        xs, bs = curve
        if nbytes < xs[0] or nbytes > xs[-1]:
            return None
        return float(np.interp(math.log(nbytes), np.log(xs), bs)) if len(xs) > 1 else float(bs[0])

    def transfer_rate(self, op: str, size: float) -> float | None:
        """Achieved bytes/s (``cpu_adam``: parameters/s) of a host transfer ``op`` moving ``size``:
        interpolated in log size inside the measured range, the nearest end's rate outside it (a large
        copy streams at the rate of the largest measured one; a small one is charged no better than the
        smallest). None when the profile has no row of ``op``."""
        curve = self.transfer_curves.get(op)
        if curve is None:
            return None
        xs, bs = curve
        if len(xs) == 1:
            return float(bs[0])
        return float(np.interp(math.log(max(size, 1.0)), np.log(xs), bs))

    def flops_per_s(self, op: str, dtype: str, m: float, n: int, k: int, groups: int = 1,
                    key: tuple | None = None) -> float | None:
        curve = self.curves.get(key or (op, dtype, n, k, groups))
        if curve is None:
            return None
        ms, fs = curve
        if m < ms[0] or m > ms[-1]:
            return None
        if len(ms) == 1:
            return float(fs[0])
        if self.loglog:
            return float(np.exp(np.interp(math.log(m), np.log(ms), np.log(fs))))
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

    @property
    def host_op_s(self) -> float:
        """Host seconds per eager operator: the profile's ``host_op`` (impl ``reference``, else ``torch``)
        row, else ``HOST_OP_S`` (HARDWARE.md)."""
        if self.profile is not None:
            for impl in ("reference", "torch"):
                if impl in self.profile.host_op:
                    return self.profile.host_op[impl]
        return HOST_OP_S

    def host_op_impl(self, impl: str) -> float | None:
        """Host seconds per operator of the profile's ``host_op`` row of ``impl`` (``reference``: the reference
        model's eager forward with the torch MoE backend; ``reference_triton``: with the Triton backend;
        ``torch``: a bare op from a Python loop), or None when the profile has no such row."""
        if self.profile is None:
            return None
        return self.profile.host_op.get(impl)

    def host_time(self, n_ops: float) -> float:
        """Host time to dispatch ``n_ops`` eager operators (a lower bound on a host-bound step)."""
        return max(0.0, n_ops) * self.host_op_s

    def transfer_time(self, op: str, size: float, fallback_GBps: float) -> float:
        """Seconds to move ``size`` bytes by a host transfer ``op`` (`TRANSFER_OPS`): the profile's achieved
        rate when it has rows of ``op`` (e.g. ``disk_read``, ``disk_write``), else ``fallback_GBps`` (the
        cluster spec's bandwidth of that link)."""
        if size <= 0:
            return 0.0
        rate = self.profile.transfer_rate(op, size) if self.profile is not None else None
        return size / (rate if rate else fallback_GBps * 1e9)

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
            key = (op, dtype, n, k, groups)
            src = key if key in self.profile.curves else self.profile.nearest_curve(op, dtype, n, k, groups)
            fps = self.profile.flops_per_s(op, dtype, m, n, k, groups, key=src) if src else None
            if src is not None and src != key and ("borrow", op, dtype, n, k) not in self._warned:
                self._warned.add(("borrow", op, dtype, n, k))
                warnings.warn(f"{self.profile.source}: {op} {dtype} n={n} k={k} groups={groups} not measured; "
                              f"using the efficiency of n={src[2]} k={src[3]} groups={src[4]}", stacklevel=2)
            if fps is not None:
                scale = self.peak / (self.profile.peak_tflops * 1e12) if self.profile.peak_tflops else 1.0
                return flops / (fps * scale)
            # once per shape (grouped GEMMs: whatever the number of groups) and side of the range
            wkey = (op, dtype, n, k) + ((groups,) if groups == 1 else ()) + (m < self._m_range(src)[0] if src else None,)
            if wkey not in self._warned:
                self._warned.add(wkey)
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

    def _m_range(self, key) -> tuple[float, float]:
        ms = self.profile.curves[key][0]
        return float(ms[0]), float(ms[-1])

    @classmethod
    def auto(cls, gpu: GPUSpec, impl: tuple[str, ...] = ("triton", "torch"), profiles_dir: str | Path | None = None,
             loglog: bool = False, **kw) -> "CostModel":
        """A cost model with ``results/profiles/<gpu>.csv`` when one matches ``gpu`` (`find_profile`), else
        the roofline (with a warning, once per GPU name)."""
        path = find_profile(gpu, profiles_dir)
        if path is None:
            if gpu.name not in _NO_PROFILE_WARNED:
                _NO_PROFILE_WARNED.add(gpu.name)
                warnings.warn(f"no kernel profile for GPU {gpu.name!r} in {profiles_dir or PROFILES_DIR}; "
                              "using the roofline", stacklevel=2)
            return cls(gpu, None, **kw)
        return cls(gpu, _load_profile(str(path), impl, loglog), **kw)

    def elementwise(self, op: str, nbytes: float, dtype: str = "bf16") -> float:
        """A row-wise / memory-bound op moving ``nbytes`` (read + write): the profile's achieved GB/s for
        ``op`` inside its measured range, else `memory` (HBM roofline)."""
        if nbytes <= 0:
            return 0.0
        if self.profile is not None:
            bps = self.profile.bytes_per_s(op, dtype, nbytes)
            if bps is not None:
                return nbytes / bps
        return self.memory(nbytes)

    def sdpa(self, batch: int, heads: int, q_len: float, kv_len: float, head_dim: int, kv_heads: int | None = None,
             causal: bool = True, dtype: str = "bf16") -> float:
        """Fused attention forward of ``q_len`` queries over ``kv_len`` keys (FLOPs ``4 b h q kv d``,
        halved when causal with ``q_len == kv_len``, as the profile counts). Profile (``sdpa_fwd``,
        square causal shapes) inside its measured sequence range, else the roofline with the bytes of
        Q, K, V and the output."""
        flops = 4.0 * batch * heads * q_len * kv_len * head_dim * (0.5 if causal and q_len == kv_len else 1.0)
        b = DTYPE_BYTES.get(dtype, 2)
        nbytes = b * batch * head_dim * (2 * heads * q_len + 2 * (kv_heads or heads) * kv_len)
        if self.profile is not None and causal and q_len == kv_len:
            key = ("sdpa_fwd", dtype, head_dim, batch * heads, 1)
            if key not in self.profile.curves:
                key = next((c for c in self.profile.curves if c[0] == "sdpa_fwd" and c[1] == dtype and c[2] == head_dim), None)
            if key is not None:
                fps = self.profile.flops_per_s("sdpa_fwd", dtype, q_len, head_dim, 0, key=key)
                if fps is not None:
                    return flops / fps
        return self.roofline(flops, nbytes, batch * q_len)

    def sdpa_backward_ratio(self, seq: float, head_dim: int, heads: int, dtype: str = "bf16") -> float | None:
        """Backward / forward time of fused attention: the profile's ``sdpa_fwd_bwd`` less ``sdpa_fwd`` over
        ``sdpa_fwd`` for the measured shape nearest to (``seq``, ``head_dim``, ``heads``) in log distance
        (flash backward recomputes the scores and runs five GEMMs to the forward's two, at a lower rate);
        None without such a pair of rows."""
        if self.profile is None:
            return None
        fwd = self.profile.sdpa_times.get(("sdpa_fwd", dtype), {})
        both = self.profile.sdpa_times.get(("sdpa_fwd_bwd", dtype), {})
        pairs = [k for k in fwd if k in both and both[k] > fwd[k]]
        if not pairs:
            return None

        def dist(k):
            _, m, n, h = k
            return abs(math.log(m / seq)) + abs(math.log(n / head_dim)) + abs(math.log(h / heads))

        k = min(pairs, key=dist)
        return (both[k] - fwd[k]) / fwd[k]

    def attention_core(self, tokens: float, seq: int, hidden: int, dtype: str = "bf16") -> float:
        """Fused attention (QK^T, softmax, AV) forward: ``4 * seq * hidden`` FLOPs per token (full,
        not causal-halved, as `semoe.sizing`), at the GEMM efficiency of ``m = tokens``."""
        flops = 4.0 * seq * hidden * tokens
        return self.roofline(flops, 4 * DTYPE_BYTES.get(dtype, 2) * tokens * hidden, tokens)


_NO_PROFILE_WARNED: set[str] = set()
_PROFILE_CACHE: dict[tuple, Profile] = {}


def _load_profile(path: str, impl: tuple[str, ...], loglog: bool = False) -> Profile:
    key = (path, impl, loglog)
    if key not in _PROFILE_CACHE:
        _PROFILE_CACHE[key] = Profile.from_csv(path, impl=impl, loglog=loglog)
    return _PROFILE_CACHE[key]


def _gpu_key(name: str) -> tuple[str | None, int | None]:
    """('H100', 80) from 'H100-80G-PCIe5', 'NVIDIA H100 80GB HBM3' or 'h100_80gb_hbm3'."""
    import re

    u = name.upper()
    fam = next((f for f in ("A100", "H100", "H200", "B200", "L40S", "A10G") if f in u), None)
    mem = re.search(r"(\d+)\s*G", u.replace(fam or "", ""))
    return fam, int(mem.group(1)) if mem else None


def find_profile(gpu: GPUSpec, profiles_dir: str | Path | None = None) -> Path | None:
    """``results/profiles/<gpu>.csv`` measured on the same GPU family with the same memory size as
    ``gpu`` (e.g. the ``h100-single`` and ``dgx-h100`` presets -> ``h100_80gb_hbm3.csv``), or None."""
    d = Path(profiles_dir) if profiles_dir is not None else PROFILES_DIR
    if not d.is_dir():
        return None
    fam, mem = _gpu_key(gpu.name)
    if mem is None:
        mem = round(gpu.memory_bytes / 1e9)
    if fam is None:
        return None
    for path in sorted(d.glob("*.csv")):
        # a kernel profile is named for its GPU (``h100_80gb_hbm3.csv``); other tables measured on the same GPU
        # (``collective_host_h100.csv``, ``train_profile_h100.csv``) carry its name in a column too, and a
        # name-sorted scan would otherwise pick them and leave the cost model without kernel rows
        if _gpu_key(path.stem)[0] is None or not path.stem.upper().startswith(_gpu_key(path.stem)[0]):
            continue
        with path.open(newline="") as f:
            first = next(csv.DictReader(f), None)
        label = (first or {}).get("gpu") or path.stem
        f2, m2 = _gpu_key(label)
        if f2 == fam and (m2 is None or m2 == mem):
            return path
    return None
