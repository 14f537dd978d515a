"""The torch-backend MoE layer (eager PyTorch: router, top-k, sort, gather, ``torch._grouped_mm``, GELU, weighted
scatter back, and autograd's backward of all of it) as the simulator prices it: its kernels counted from the code,
one at a time, on a host / device timeline.

`simulator.calibration.predict_moe_layer` is the project's Triton layer (fused gating, permute maps, grouped GEMMs
with fused gather / GELU, one unpermute); the torch backend issues many more kernels, and several of them
(``index_add`` / ``index_put`` scatters, ``sort``, fp32 casts, the weighted copy of every routed row) run far
below the HBM roofline. Two code paths are counted (`PATHS`):

``bench``      ``kernels.bench.moe_layer.TorchGrouped`` (the ``torch_grouped`` rows of
               ``results/bench/moe_layer.csv``): bf16 router GEMM, softmax / top-k in fp32, stable argsort,
               ``bincount`` (a host sync on CUDA), gather ``x[tok]``, two grouped GEMMs with GELU, the weighted
               rows ``index_add``-ed into a zero output.
``reference``  `reference.moe.layer.MoELayer` with ``backend="torch"`` and the contiguous `LocalDispatcher`
               (the layer `paper_repro.multigpu_run` times with `EPDispatcher`): the gate's fp32 logits, the
               dispatcher's sort, ``int(sum)`` (a host sync), ``index_select`` permute, `GroupedExperts`,
               ``index_copy`` into a zero ``[T k, D]`` buffer and the sum over ``k``.

**Counting** (`count_layer`): the path's module runs forward + backward on the CPU at tiny widths (hidden
`TINY_D`, ffn `TINY_F`, `TINY_T` tokens; the config's own experts and top-k) under
`simulator.train_op_counts`' recorder, which gives every aten operator in order with its HBM bytes (inputs read,
outputs written) per token per unit width (``D``, ``F``, ``E``, or per token ``T``) and its memory class
(`train_op_counts.MEM_CLASS`: gather, scatter, copy, act, elem; fp32 <-> bf16 activation copies: ``cast``), the
GEMM-class operators (`train_op_counts.GEMM_OPS`) with their operand shapes, view operators (no kernel) and host
syncs (``bincount`` on CUDA, ``.item()``). The bytes scale linearly with tokens and each width, so one tiny run
per (path, experts, top-k, gate) gives the layer at any size.

**Pricing** (`layer_time`): each kernel in program order on a timeline: the host issues one kernel every
``host_s`` (the profile's ``host_op`` row: ``torch`` = a bare operator from Python for the bench and for autograd's
backward, ``reference`` = the reference model's eager forward operator for the reference path's forward), the
device runs it when it is issued and the previous kernel is done, and a sync makes the host wait for the device.
Device time per kernel: GEMMs from the kernel profile (``torch`` rows first: ``torch._grouped_mm``, cuBLAS;
backward dX / dW GEMMs priced as a forward GEMM of the same FLOPs and widths, as
`simulator.workload.training.TORCH_EXPERT_BWD_FACTOR` = 1 does; fp32 GEMMs (the reference gate's logits, no TF32)
no faster than the datasheet FP32 peak `FP32_TFLOPS`); memory passes at the class's measured bandwidth
(`simulator.train_host.mem_rates`: ``train_mem_rates_cuda.csv``, the reference's own kernels timed on the H100,
interpolated in bytes per kernel), on another GPU scaled by the ratio of the two GPUs' profiled row-wise rate of
the class's op (`train_host.MEM_RATE_OPS`, e.g. ``copy_d2d``: the H200 profile over the H100 profile at the same
bytes); ``index_add`` (`ATOMIC_OPS`) no faster than its element count at the measured atomic-add rate
(`atomic_adds_per_s`: the class probe's ``index_add_`` runs at the same elements/s at both sizes, not the same
bytes/s, so a bf16 top-8 scatter costs its elements, not its bytes); with a committed
`simulator.torch_layer_probe` file for the GPU, the bf16 ``index_add`` / ``x[idx]`` / ``index_put_`` accumulate /
``sort`` kernels at its rates (`PROBED_OPS`); every kernel at least ``CostModel.launch_s``. Nothing here is fitted
to a layer measurement.

Expert parallelism (`ep_extras`): `EPDispatcher` adds, per layer and rank, two regroups of the received rows
(``torch.cat`` of the chunks: forward ``dispatch_postprocess`` and ``combine_preprocess``; autograd's split
backward cats the gradient chunks again: two more), each a ``copy`` of ``M x D`` (read + write), and one more host
sync (the count all-gather's ``.cpu()``); the all-to-alls and the count all-gather are the caller's
(`simulator.validate_multigpu.moe_prediction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache

PATHS = ("bench", "reference")
TINY_D, TINY_F, TINY_T = 48, 80, 112  # pairwise distinct, and distinct from every config's experts and top-k
UNITS = ("D", "F", "E", "T")
FP32_TFLOPS = 67.0  # H100 / H200 SXM FP32 (non-tensor-core) peak, NVIDIA datasheet: the gate's fp32 logits GEMM
# allocations filled with a constant: they write their output and read nothing (`train_op_counts._mem_pass` also
# counts the tensor a ``new_zeros`` / ``zeros_like`` is called on as read; here only the output is counted)
ALLOC_OPS = frozenset({"aten.new_zeros", "aten.zeros_like", "aten.full_like", "aten.ones_like", "aten.new_full",
                       "aten.new_ones", "aten.zeros", "aten.full", "aten.ones"})
ATOMIC_OPS = frozenset({"aten.index_add", "aten.index_add_", "aten.scatter_add", "aten.scatter_add_"})
# aten operator -> (`simulator.torch_layer_probe` op, which argument's elements count: an index or "out")
PROBED_OPS = {"aten.index_add": ("index_add", 3), "aten.index_add_": ("index_add", 3), "aten.index": ("index_gather", "out"),
              "aten.index_put": ("index_put_acc", 2), "aten.index_put_": ("index_put_acc", 2), "aten.sort": ("sort", 0)}
MEM_RATE_REF_GPU = "h100_80gb_hbm3.csv"  # the profile of the GPU `train_mem_rates_cuda.csv` was measured on


@dataclass(frozen=True)
class Kernel:
    """One kernel of the program: ``kind`` gemm / mem / none (a kernel with no counted bytes: scalars, per-expert
    vectors, parameter-shaped tensors), ``cls`` its memory class, ``bytes_per`` bytes per token per unit width
    (``UNITS`` order), ``gemm`` the operand dims as units (``(m, n, k)`` of C[m, n] = A[m, k] B[k, n]) and dtype,
    ``grouped`` whether it is a grouped GEMM; ``sync``: the host waits for the device after it."""

    name: str
    kind: str
    cls: str = ""
    bytes_per: tuple = (0.0, 0.0, 0.0, 0.0)
    gemm: tuple = ()
    grouped: bool = False
    sync: bool = False
    atomic_per: tuple = (0.0, 0.0, 0.0, 0.0)  # `ATOMIC_OPS`: elements added, per token per unit width
    probe_op: str = ""  # the `simulator.torch_layer_probe` kernel that prices it when a probe is committed
    elems_per: tuple = (0.0, 0.0, 0.0, 0.0)  # its elements (source / output / values / keys) per token per unit


@dataclass(frozen=True)
class LayerProgram:
    """The kernels of one forward (``fwd``) and one backward (``bwd``) of a path's layer, in issue order."""

    path: str
    experts: int
    top_k: int
    gate: str
    fwd: tuple = field(default_factory=tuple)
    bwd: tuple = field(default_factory=tuple)

    def count(self, phase: str, kind: str | None = None) -> int:
        ks = getattr(self, phase)
        return sum(1 for k in ks if kind is None or k.kind == kind)

    def syncs(self, phase: str) -> int:
        return sum(1 for k in getattr(self, phase) if k.sync)

    def mem_bytes(self, phase: str, tokens: float, hidden: int, ffn: int) -> dict[str, float]:
        """HBM bytes per memory class of ``phase`` at ``tokens`` tokens and the given widths."""
        w = self._widths(tokens, hidden, ffn)
        out: dict[str, float] = {}
        for k in getattr(self, phase):
            if k.kind == "mem":
                out[k.cls] = out.get(k.cls, 0.0) + sum(b * x for b, x in zip(k.bytes_per, w))
        return out

    def _widths(self, tokens: float, hidden: int, ffn: int) -> tuple:
        return (tokens * hidden, tokens * ffn, tokens * self.experts, tokens)


# ------------------------------------------------------------------------------------------------- counting
def _dims_unit(n: int, T: int, k: int) -> str:
    """The unit of a GEMM operand dimension at the tiny sizes: D, F, T (tokens), N (routed rows T k)."""
    for u, v in (("D", TINY_D), ("F", TINY_F)):
        if n == v:
            return u
    if n == T * k and k > 1:
        return "N"
    if n == T:
        return "T"
    return "E"


def _gemm_dims(name: str, args, out, T: int, k: int, E: int) -> tuple[tuple, bool, str]:
    """((m, n, k) as units, grouped, dtype) of a recorded GEMM-class operator."""
    import torch

    a = next(t for t in args if isinstance(t, torch.Tensor))
    dtype = "fp32" if a.dtype == torch.float32 else "bf16"
    if name == "aten._grouped_mm":
        o = out.shape
        if len(o) == 3:  # dW: [G, rows_in, cols_out] reduced over each group's routed rows
            return (_dims_unit(o[1], T, k), _dims_unit(o[2], T, k), "N"), True, dtype
        kk = a.shape[-1]
        return ("N", _dims_unit(o[-1], T, k), _dims_unit(kk, T, k)), True, dtype
    m, n = out.shape[-2], out.shape[-1]
    kk = a.shape[-1]
    return (_dims_unit(m, T, k), _dims_unit(n, T, k), _dims_unit(kk, T, k)), False, dtype


def _module(path: str, experts: int, top_k: int, gate: str, renormalize: bool):
    import torch

    from semoe.moe_layer_configs import MoELayerConfig

    cfg = MoELayerConfig("tiny", experts, top_k, TINY_D, TINY_F, TINY_T, gate=gate, renormalize=renormalize)
    if path == "bench":
        from kernels.bench.moe_layer import TorchGrouped

        return TorchGrouped(cfg, device="cpu")
    from reference.moe.layer import MoELayer
    from semoe.model_spec import ModelSpec

    spec = ModelSpec(name="tiny", layers=1, hidden=TINY_D, heads=1, vocab=256, ffn=TINY_F, experts=experts,
                     top_k=top_k, gate=gate, capacity_factor=None, renormalize=renormalize, activation="gelu",
                     dtype="bf16")
    return MoELayer(spec, seed=0, dtype=torch.bfloat16, device="cpu", backend="torch")


@cache
def count_layer(path: str, experts: int, top_k: int, gate: str = "topk", renormalize: bool = True) -> LayerProgram:
    """The `LayerProgram` of ``path`` (`PATHS`) for a layer of ``experts`` experts, top-``top_k``, ``gate``:
    one forward + backward (bf16 input that requires grad, as both benchmarks time it) recorded on the CPU."""
    import torch

    from simulator.train_op_counts import GEMM_OPS, _mem_unit, _recorder

    if path not in PATHS:
        raise ValueError(f"torch_moe_layer: path must be one of {PATHS}, got {path!r}")
    if experts in (TINY_D, TINY_F, TINY_T) or top_k in (TINY_D, TINY_F, TINY_T) or not 1 <= top_k <= experts:
        raise ValueError(f"torch_moe_layer: experts {experts} / top_k {top_k} clash with the tiny widths or each other")
    torch.manual_seed(0)
    mod = _module(path, experts, top_k, gate, renormalize)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(TINY_T, TINY_D, generator=g).to(torch.bfloat16).requires_grad_(True)
    gy = torch.randn(TINY_T, TINY_D, generator=g).to(torch.bfloat16)
    params = {tuple(p.shape) for p in mod.parameters()}
    dims = {"D": (TINY_D,), "F": (TINY_F,), "E": (experts,)}
    rec = _recorder(dims, TINY_T, set(), params)
    gemm_info: list = []
    atomics: list = []
    allocs: list = []
    probed: list = []

    # the recorder keeps names, classes and bytes; the GEMMs' operand shapes are taken by a second mode inside
    from torch.utils._python_dispatch import TorchDispatchMode

    from reference.op_count import _name

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if _name(func) in GEMM_OPS:
                gemm_info.append(_gemm_dims(_name(func), args, out, TINY_T, top_k, experts))
            if _name(func) in ALLOC_OPS:
                u = _mem_unit(out, dims, TINY_T)
                w = {"D": TINY_D, "F": TINY_F, "E": experts, "T": 1}.get(u, 1)
                allocs.append(tuple(out.numel() * out.element_size() / TINY_T / w if x == u else 0.0 for x in UNITS))
            if _name(func) in PROBED_OPS:
                op, which = PROBED_OPS[_name(func)]
                t = out if which == "out" else args[which]
                t = t[0] if isinstance(t, (tuple, list)) else t
                rows_op = op == "sort" or (t.dim() == 2 and t.shape[-1] in (TINY_D, TINY_F))
                if op == "index_put_acc" and not (len(args) > 3 and args[3]):
                    rows_op = False  # a plain index_put (no accumulate) is a copy, not the probed kernel
                u = "T" if op == "sort" else {TINY_D: "D", TINY_F: "F"}.get(t.shape[-1], "T")
                w = {"D": TINY_D, "F": TINY_F, "T": 1}[u]
                probed.append((op, tuple(t.numel() / TINY_T / w if x == u else 0.0 for x in UNITS)) if rows_op
                              else ("", (0.0,) * len(UNITS)))
            if _name(func) in ATOMIC_OPS:  # (self, dim, index, source): one atomic add per source element
                src = args[3]
                u = {TINY_D: "D", TINY_F: "F", experts: "E"}.get(src.shape[-1] if src.dim() > 1 else -1, "T")
                w = {"D": TINY_D, "F": TINY_F, "E": experts, "T": 1}[u]
                atomics.append(tuple(src.numel() / TINY_T / w if x == u else 0.0 for x in UNITS))
            return out

    with rec, Shapes():
        y = mod(x)
        y = y[0] if isinstance(y, tuple) else y
        rec.mark("bwd")
        y.backward(gy)
    phases: dict[str, list] = {"fwd": [], "bwd": []}
    cur = "fwd"
    gi = iter(gemm_info)
    ai = iter(atomics)
    li = iter(allocs)
    pi = iter(probed)
    for op in rec.seq:
        if isinstance(op, str):
            cur = op
            continue
        if op.view:
            continue
        if op.name in GEMM_OPS:
            (m, n, kk), grouped, dtype = next(gi)
            phases[cur].append(Kernel(op.name, "gemm", gemm=(m, n, kk, dtype), grouped=grouped, sync=op.sync))
            continue
        by = dict(op.mem[1]) if op.mem else {}
        cls = op.mem[0] if op.mem else ""
        if op.cast:
            cls, by = "cast", dict(op.cast)
        if op.name in ALLOC_OPS:
            cls, by = "copy", dict(zip(UNITS, next(li)))
            by = {u: b for u, b in by.items() if b}
        if by.get("other") or set(by) - set(UNITS):
            raise ValueError(f"torch_moe_layer: {op.name} moves a tensor of unknown width")
        kind = "mem" if by else "none"
        at = next(ai) if op.name in ATOMIC_OPS else (0.0,) * len(UNITS)
        pop, pel = next(pi) if op.name in PROBED_OPS else ("", (0.0,) * len(UNITS))
        phases[cur].append(Kernel(op.name, kind, cls, tuple(float(by.get(u, 0.0)) for u in UNITS), sync=op.sync,
                                  atomic_per=at, probe_op=pop, elems_per=pel))
    return LayerProgram(path, experts, top_k, gate, tuple(phases["fwd"]), tuple(phases["bwd"]))


# -------------------------------------------------------------------------------------------------- pricing
def mem_rate_scale(cost, cls: str, per_kernel_bytes: float) -> float:
    """Ratio of ``cost``'s GPU's achieved rate of the class's profiled row-wise op to the H100's (the GPU the class
    rates were measured on) at ``per_kernel_bytes`` (the nearest measured size outside both profiles' ranges); 1
    when either profile lacks the op or ``cost`` is the H100's."""
    from simulator.cost import PROFILES_DIR, _load_profile
    from simulator.train_host import MEM_RATE_OPS

    prof = cost.profile
    if prof is None or str(getattr(prof, "source", "")).endswith(MEM_RATE_REF_GPU):
        return 1.0
    op, dtype = MEM_RATE_OPS.get(cls, ("copy_d2d", "bytes")) if cls != "cast" else ("copy_d2d", "bytes")
    ref = _load_profile(str(PROFILES_DIR / MEM_RATE_REF_GPU), ("torch", "triton"))
    ca, cb = prof.mem_curves.get((op, dtype)), ref.mem_curves.get((op, dtype))
    if ca is None or cb is None:
        return 1.0
    x = min(max(per_kernel_bytes, ca[0][0], cb[0][0]), ca[0][-1], cb[0][-1])  # the nearest end outside the range
    a, b = prof.bytes_per_s(op, dtype, x), ref.bytes_per_s(op, dtype, x)
    if a is None or b is None:
        return 1.0
    return a / b


def mem_time(cost, cls: str, nbytes: float, rates: dict | None) -> float:
    """Seconds of one memory-pass kernel of class ``cls`` moving ``nbytes``: the class's measured bandwidth
    (``rates``: `train_host.mem_rates`) interpolated in log bytes (the nearest end outside), scaled to ``cost``'s
    GPU (`mem_rate_scale`); without a rate for the class, the HBM roofline; at least ``cost.launch_s``."""
    import numpy as np

    if nbytes <= 0:
        return cost.launch_s
    curve = (rates or {}).get(cls)
    if not curve:
        return max(cost.launch_s, cost.memory(nbytes))
    xs, bs = np.log([x for x, _ in curve]), np.array([b for _, b in curve])
    rate = float(np.interp(math.log(max(nbytes, 1.0)), xs, bs)) * mem_rate_scale(cost, cls, nbytes)
    return max(cost.launch_s, nbytes / rate)


def probe_rate(probe: dict | None, op: str, top_k: int) -> float | None:
    """Elements per second of probed kernel ``op`` at the measured rows-per-target nearest ``top_k`` (log
    distance); None without a probe row."""
    if not probe or not op:
        return None
    dups = [d for (o, d) in probe if o == op]
    if not dups:
        return None
    d = min(dups, key=lambda x: abs(math.log(x / top_k)))
    return probe[(op, d)][0]


def atomic_adds_per_s(path=None) -> float | None:
    """Element atomic adds per second of ``index_add_`` on the GPU: the ``scatter`` class probe of
    ``train_mem_rates_cuda.csv`` (`train_op_counts.time_mem_classes`: ``index_add_`` of ``rows x width`` fp32
    elements, every target row twice) as elements over time, the median over its sizes. Its time is set by the
    number of atomic adds (the probe's two sizes give the same elements/s, not the same bytes/s), so a bf16 or
    top-8 scatter of the same elements takes as long; the L2's atomic throughput is the chip's (H100 and H200
    share it: not scaled with HBM). None without the file."""
    import csv
    import statistics
    from pathlib import Path

    from simulator.train_host import MEM_RATES_CUDA

    p = Path(path) if path is not None else MEM_RATES_CUDA
    if not p.is_file():
        return None
    with p.open(newline="") as f:
        v = [float(r["rows"]) * float(r["width"]) / float(r["time_s"]) for r in csv.DictReader(f) if r["class"] == "scatter"]
    return statistics.median(v) if v else None


def gemm_time(cost, dims: tuple, grouped: bool, sizes: dict, groups: int) -> float:
    """A recorded GEMM at real sizes: ``dims`` = (m, n, k, dtype) as units; a grouped GEMM is priced as the forward
    grouped GEMM of the same widths and FLOPs (``groups`` groups of ``N / groups`` rows), a dense one from the
    profile's GEMM rows; fp32 no faster than `FP32_TFLOPS`."""
    m, n, k, dtype = dims
    if grouped:  # dX / forward: m = routed rows; dW: [G, in, out], m = in
        k_w = sizes[m] if m in ("D", "F") else sizes[k]
        return cost.matmul(sizes["N"] / groups, sizes[n], k_w, groups=groups)
    mm, nn, kk = sizes[m], sizes[n], sizes[k]
    t = cost.matmul(mm, nn, kk)
    if dtype == "fp32":
        t = max(t, 2.0 * mm * nn * kk / (FP32_TFLOPS * 1e12))
    return t


def layer_time(prog: LayerProgram, tokens: float, hidden: int, ffn: int, cost, rates: dict | None = None,
               host_fwd_s: float | None = None, host_bwd_s: float | None = None, groups: int | None = None,
               routed_rows: float | None = None, breakdown: bool = False, rates_path=None,
               inserts: dict | None = None, probe: dict | None = None) -> dict:
    """Forward and forward + backward seconds of ``prog`` at ``tokens`` tokens, widths ``hidden`` / ``ffn``, on
    ``cost`` (`CostModel`). ``rates``: the memory classes' measured bandwidths (`train_host.mem_rates`; None:
    roofline); ``host_*_s``: host seconds per kernel (None: ``cost.host_op_s``); ``groups`` / ``routed_rows``: the
    grouped GEMMs' groups and rows (default: all experts, ``tokens x top_k``; expert parallelism gives the rank's
    local experts and received rows); ``inserts``: ``{(phase, op name, occurrence): (seconds, sync)}`` device work
    that is not an aten kernel of the layer (EP collectives and regroups), run after the ``occurrence``-th (1-based)
    kernel of that name, the host waiting for it when ``sync``; ``probe``: `simulator.torch_layer_probe.load`'s rates
    of the GPU (bf16 ``index_add`` / ``x[idx]`` / ``index_put_`` accumulate at the nearest measured rows per token,
    ``sort``), which then price those kernels by their elements instead of the class rates. Returns ``fwd``, ``fwd_bwd`` (seconds), and per phase the device busy time,
    GEMM time, memory time per class and kernel count."""
    E, k = prog.experts, prog.top_k
    N = routed_rows if routed_rows is not None else tokens * k
    G = groups or E
    sizes = {"D": hidden, "F": ffn, "E": E, "T": tokens, "N": N}
    widths = (tokens * hidden, tokens * ffn, tokens * E, tokens)
    h_f = cost.host_op_s if host_fwd_s is None else host_fwd_s
    h_b = cost.host_op_s if host_bwd_s is None else host_bwd_s
    atomic_rate = atomic_adds_per_s(rates_path) if rates is not None else None
    out: dict = {}
    host = dev = 0.0
    inserts = dict(inserts or {})
    for phase, h in (("fwd", h_f), ("bwd", h_b)):
        gemm = extra = 0.0
        mem: dict[str, float] = {}
        seen: dict[str, int] = {}
        for kern in getattr(prog, phase):
            if kern.kind == "gemm":
                t = gemm_time(cost, kern.gemm, kern.grouped, sizes, G)
                gemm += t
            else:
                nbytes = sum(b * w for b, w in zip(kern.bytes_per, widths))
                t = mem_time(cost, kern.cls, nbytes, rates) if kern.kind == "mem" else cost.launch_s
                if any(kern.atomic_per) and atomic_rate:
                    t = max(t, sum(a * w for a, w in zip(kern.atomic_per, widths)) / atomic_rate)
                rate = probe_rate(probe, kern.probe_op, k)
                if rate:
                    t = max(cost.launch_s, sum(a * w for a, w in zip(kern.elems_per, widths)) / rate)
                key = kern.cls or "other"
                mem[key] = mem.get(key, 0.0) + t
            host += h
            dev = max(dev, host) + t
            if kern.sync:
                host = max(host, dev)
            seen[kern.name] = seen.get(kern.name, 0) + 1
            ins = inserts.pop((phase, kern.name, seen[kern.name]), None)
            if ins is not None:
                dev += ins[0]
                extra += ins[0]
                if ins[1]:
                    host = max(host, dev)
        out[phase] = max(dev, host)
        out[f"{phase}_inserted_s"] = extra
        out[f"{phase}_gemm_s"] = gemm
        out[f"{phase}_mem_s"] = mem
        out[f"{phase}_kernels"] = prog.count(phase)
    if inserts:
        raise ValueError(f"torch_moe_layer: no kernel to insert after for {sorted(inserts)}")
    return {"fwd": out["fwd"], "fwd_bwd": out["bwd"], **({k: v for k, v in out.items() if k not in ("fwd", "bwd")}
                                                       if breakdown else {})}


def regroup_time(cost, rows: float, hidden: int, rates: dict | None = None, dtype_bytes: int = 2) -> float:
    """One `EPDispatcher` regroup (``torch.cat`` of the received chunks): a ``copy`` of ``rows x hidden`` (read +
    write) at the class's measured rate."""
    return mem_time(cost, "copy", 2.0 * rows * hidden * dtype_bytes, rates)


def ep_inserts(a2a_s: float, counts_s: float, regroup_s: float) -> dict:
    """Where `EPDispatcher`'s work falls in the reference path's kernel order (`layer_time` ``inserts``): forward,
    after the permute (``index_select``): the count all-gather (its ``.cpu()`` a host sync), the dispatch
    all-to-all and the regroup; after the second grouped GEMM: the regroup and the combine all-to-all. Backward
    (autograd runs them in reverse): after the unpermute's backward (its first ``sum``): the combine's reverse
    all-to-all and the regroup's backward cat; after the experts' last grouped GEMM: the other cat and the
    dispatch's reverse all-to-all."""
    return {("fwd", "aten.index_select", 1): (counts_s + a2a_s + regroup_s, True),
            ("fwd", "aten._grouped_mm", 2): (regroup_s + a2a_s, False),
            ("bwd", "aten.sum", 1): (a2a_s + regroup_s, False),
            ("bwd", "aten._grouped_mm", 4): (regroup_s + a2a_s, False)}


def predict_torch_layer(cfg, cost, path: str = "bench", rates: dict | None = None, host: str | None = None,
                        breakdown: bool = False, probe: dict | bool | None = True) -> dict:
    """Forward and forward + backward seconds of the torch-backend layer of ``cfg`` (`MoELayerConfig`) on one GPU:
    `count_layer` + `layer_time` with the measured class rates (`train_host.mem_rates`) and the profile's host rates
    (``host``: the ``host_op`` impl of the forward, default ``torch`` for the bench, ``reference`` for the
    reference path; the backward: ``torch``); ``probe``: True looks for the GPU's committed
    `simulator.torch_layer_probe` rates, a dict gives them, None leaves them out."""
    from simulator import torch_layer_probe
    from simulator.train_host import mem_rates

    prog = count_layer(path, cfg.experts, cfg.top_k, cfg.gate, cfg.renormalize)
    rates = mem_rates() if rates is None else rates
    hf = cost.host_op_impl(host or ("torch" if path == "bench" else "reference"))
    hb = cost.host_op_impl("torch")
    probe = torch_layer_probe.load(cost.gpu.name) if probe is True else probe
    return layer_time(prog, cfg.tokens, cfg.hidden, cfg.ffn, cost, rates, hf, hb, breakdown=breakdown, probe=probe)
