"""The reference trainer's host program for the training workload: per segment of a step, the kernels the
host issues, whether it ends with a host sync, and the activation casts it makes (bytes per token per unit
width), read from the tables `simulator.train_op_counts` writes.

* ``results/profiles/train_op_counts_cuda.csv``: counted on a CUDA GPU (``python -m
  simulator.train_op_counts --device cuda``), both MoE backends; preferred (every simulated GPU is a CUDA
  GPU: SDPA, ``one_hot`` and the fused AdamW dispatch differently there, and only CUDA runs the Triton
  backend).
* ``results/profiles/train_op_counts.csv``: counted on the CPU (a CI test checks it against the code); the
  fallback for a code path the CUDA table lacks, whole (programs are never mixed across tables).

`train_program` returns None for a code path neither table holds; the workload then keeps its older host
floor (``host_ops``). `host_rates`: the host seconds per kernel of the step's forward, backward and optimizer
parts, measured on the GPU beside the CUDA table (``train_host_rates_cuda.csv``); without it the workload
takes the kernel profile's ``host_op`` rows (forward: ``reference`` / ``reference_triton``, the reference
model's inference forward; backward and optimizer: ``torch``, a bare op).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from simulator.workload.host import Segment, first_rows

PROFILES = Path(__file__).resolve().parent.parent / "results" / "profiles"
TRAIN_COUNTS = PROFILES / "train_op_counts.csv"
TRAIN_COUNTS_CUDA = PROFILES / "train_op_counts_cuda.csv"
KEY_COLS = ("config",)
UNITS = ("D", "F", "V", "E", "T")
# which part of the step a segment belongs to, for its host rate (`TrainProgram.part`): the forward runs the
# model's Python module code; the backward is dispatched by the C++ autograd engine; the optimizer part
# (clipping, AdamW, the bias update) issues multi-tensor ops from a little Python
PARTS = {"bwd_head": "bwd", "moe.bwd": "bwd", "dense.bwd": "bwd", "bwd_embedding": "bwd", "zero_grad": "fwd",
         "clip": "opt", "optimizer": "opt", "after_step": "opt"}
RATES_CUDA = PROFILES / "train_host_rates_cuda.csv"
MEM_COUNTS = PROFILES / "train_mem_bytes.csv"  # memory passes per segment, counted on the CPU
MEM_RATES_CUDA = PROFILES / "train_mem_rates_cuda.csv"  # achieved bandwidth per memory-pass class, on the GPU


@dataclass(frozen=True)
class TrainSegment(Segment):
    casts: tuple = (0.0, 0.0, 0.0, 0.0, 0.0)  # activation cast bytes per token per unit of D, F, V, E; per token (T)
    lead: int = 0  # kernels issued before the segment's first GEMM-class kernel
    mem: tuple = ()  # memory passes: (class, kernels, bytes per token per unit of D, F, V, E, T), `train_mem_bytes`

    def mem_bytes(self, tokens: float, widths: tuple) -> dict[str, tuple[float, float]]:
        """The segment's memory passes for ``tokens`` tokens and widths (D, F, V, E): class -> (kernels, bytes)."""
        ws = tuple(widths) + (1,)
        return {c: (k, tokens * sum(b * w for b, w in zip(by, ws))) for c, k, by in self.mem}

    def cast_bytes(self, tokens: float, widths: tuple) -> float:
        """HBM bytes of the segment's activation casts for ``tokens`` tokens and widths (D, F, V, E); the
        ``T`` part (one value per token or routed row) has no width."""
        ws = tuple(widths) + (1,) * (len(self.casts) - len(widths))
        return tokens * sum(c * w for c, w in zip(self.casts, ws))


@dataclass(frozen=True)
class TrainProgram:
    config: str
    segments: tuple[TrainSegment, ...]  # program order (block segments once per block kind)
    source: str = ""
    mem_source: str = ""  # the memory-pass table the segments' ``mem`` came from ("" when none)

    def group(self, base: str) -> tuple[TrainSegment, ...]:
        """``base`` and the pieces it was split into at syncs (``base_1``, ``base_2``, ...), in order."""
        def is_piece(name: str) -> bool:
            head, _, j = name.rpartition("_")
            return name == base or (head == base and j.isdigit())

        return tuple(s for s in self.segments if is_piece(s.name))

    def kernels(self, blocks: dict[str, int]) -> int:
        """Kernels of one step with ``blocks`` = {"moe": n, "dense": n} blocks."""
        return sum(s.kernels * (blocks.get(s.name.split(".")[0], 0) if "." in s.name else 1) for s in self.segments)

    def syncs(self, blocks: dict[str, int]) -> int:
        return sum(int(s.sync) * (blocks.get(s.name.split(".")[0], 0) if "." in s.name else 1) for s in self.segments)

    @staticmethod
    def part(name: str) -> str:
        """``fwd``, ``bwd`` or ``opt``: the part of the step segment ``name`` belongs to (its host rate)."""
        base = name.rpartition("_")[0] if name.rpartition("_")[2].isdigit() else name
        return PARTS.get(base, "fwd")


def host_rates(backend: str, adamw: str, path: str | Path | None = None) -> dict | None:
    """Measured host seconds per kernel of the step's parts (``{"fwd", "bwd", "opt"}``) for the MoE
    ``backend`` and ``adamw``, from ``train_host_rates_cuda.csv`` (`simulator.train_op_counts.time_parts`
    on the GPU), or None when not measured."""
    import csv

    p = Path(path) if path is not None else RATES_CUDA
    if not p.is_file():
        return None
    with p.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["backend"] == backend and r["adamw"] == adamw]
    out = {r["part"]: float(r["s_per_kernel"]) for r in rows}
    return out if {"fwd", "bwd", "opt"} <= out.keys() else None


def train_program(m, adamw: str, backend: str = "torch", device: str = "cuda",
                  path: str | Path | None = None) -> TrainProgram | None:
    """The host program of model ``m`` trained by the reference trainer with ``adamw`` (fused / foreach) and
    the MoE ``backend``: from ``path`` alone when given, else (``device`` cuda) the CUDA table with the CPU
    table as the fallback, or (``device`` cpu) the CPU table. None when no table holds the code path."""
    from simulator.train_op_counts import config_key

    key = (config_key(m, adamw, backend),)
    if path is not None:
        tables = [(Path(path), True)]
    elif device == "cuda":
        tables = [(TRAIN_COUNTS_CUDA, False), (TRAIN_COUNTS, False)]
    elif device == "cpu":
        tables = [(TRAIN_COUNTS, False)]
    else:
        raise ValueError(f"train_program: device must be cuda or cpu, got {device!r}")
    found = first_rows(key, KEY_COLS, tables)
    if found is None:
        return None
    rows, src = found
    mem = _mem_table(key, src, path)
    segs = tuple(TrainSegment(r["segment"], int(r["kernels"]), r["syncs"] == "1", "",
                              tuple(float(r.get(f"cast_{u}") or 0.0) for u in UNITS), int(r.get("lead") or 0),
                              mem.get(r["segment"], ()))
                 for r in rows)
    return TrainProgram(key[0], segs, src.name, mem_source=mem.get("", ""))


def _mem_table(key: tuple, src: Path, path) -> dict:
    """The memory passes of the program's segments: from the table beside the program's (``train_mem_bytes``
    + the program table's suffix), else (a CUDA program counted before the memory passes were) the CPU one;
    ``{segment: ((class, kernels, bytes per unit), ..), "": source name}``, ``{}`` when none holds the path."""
    cands = [src.with_name(src.name.replace("train_op_counts", "train_mem_bytes"))]
    if path is None and MEM_COUNTS not in cands:
        cands.append(MEM_COUNTS)
    found = first_rows(key, KEY_COLS, [(c, False) for c in cands if c.name != src.name])
    if found is None:
        return {}
    rows, msrc = found
    out: dict = {"": msrc.name}
    for r in rows:
        out.setdefault(r["segment"], ())
        out[r["segment"]] += ((r["class"], float(r["kernels"]), tuple(float(r[f"mem_{u}"] or 0.0) for u in UNITS)),)
    return out


# the kernel profile's row-wise op whose achieved bandwidth prices a memory-pass class when the classes' own
# rates (`mem_rates`) were not measured: (op, dtype) of `simulator.cost.Profile.mem_curves`
MEM_RATE_OPS = {"norm_fwd": ("layernorm", "bf16"), "norm_bwd": ("layernorm", "bf16"), "act": ("gelu", "bf16"),
                "gather": ("copy_d2d", "bytes"), "scatter": ("copy_d2d", "bytes"), "copy": ("copy_d2d", "bytes"),
                "elem": ("add", "bf16")}


def mem_rates(path: str | Path | None = None) -> dict | None:
    """Measured achieved bytes/s of each memory-pass class (`simulator.train_op_counts.time_mem_classes` on the
    GPU, ``train_mem_rates_cuda.csv``): class -> [(bytes per call, bytes/s), ...] sorted; None when not measured."""
    import csv

    p = Path(path) if path is not None else MEM_RATES_CUDA
    if not p.is_file():
        return None
    out: dict = {}
    with p.open(newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["class"], []).append((float(r["io_bytes"]), float(r["io_bytes"]) / float(r["time_s"])))
    return {c: sorted(v) for c, v in out.items()} or None
