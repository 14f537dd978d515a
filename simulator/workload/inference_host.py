"""Host programs of the reference inference engine for the inference workload: how many kernels the
host issues per segment of a forward pass, where it synchronises with the device and where the
engine copies or dequantises experts.

The counts are measured tables of the reference code (never fitted): they depend on the code path
(quantisation, provider mode, prefill or decode), not on the sizes.

* ``results/profiles/op_counts_cuda.csv``: counted on a CUDA GPU (the H100, ``python -m
  simulator.op_counts --device cuda``). Every GPU the simulator models is a CUDA GPU, so this is the
  table the inference workload reads (``device="cuda"``, the default): CUDA dispatches fewer kernels
  than the CPU for a few operators (SDPA 27 vs 41 kernels per attention segment, the head's RMSNorm 2
  vs 9) and a few CUDA-only ones (the ``.to(device)`` of the expert-aware slot map).
* ``results/profiles/op_counts.csv``: counted on the CPU by ``python -m simulator.op_counts`` (a CI test
  checks it matches the code). A path (``quant, mode, phase``) the CUDA table lacks falls back to it,
  whole (segments are not mixed across tables); ``device="cpu"`` reads only it.

Each kernel costs ``CostModel.host_op_s`` of host time (the profile's ``host_op`` row, else
HARDWARE.md's 8 us); a segment ending with a sync makes the host wait until the compute stream has
run it. Where a bench run measured the engine's own host program (`HostProbe`: the same engine, model
family and block count at tiny widths, in the same run, ``reference.inference.bench.host_probe``), a
pass's kernels cost that run's measured host seconds per counted kernel of the same code path instead. `Segment` and the table reading are shared with the training workload (`simulator.workload.host`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import median

from semoe import SpecError
from simulator.workload.host import Segment, read_table

PROFILES = Path(__file__).resolve().parent.parent.parent / "results" / "profiles"
OP_COUNTS = PROFILES / "op_counts.csv"  # counted on the CPU (CI checks it against the code)
OP_COUNTS_CUDA = PROFILES / "op_counts_cuda.csv"  # counted on the H100 (``--device cuda``)
DEVICES = ("cuda", "cpu")
PER_UNIT = ("copy_block", "copy_expert", "dequant_block", "dequant_expert", "predict")


@dataclass(frozen=True)
class HostProgram:
    """One forward pass of the reference engine (``quant``, provider ``mode``, ``phase``)."""

    embedding: int
    block: tuple[Segment, ...]
    head: int
    per_unit: dict  # copy_block, copy_expert, dequant_block, dequant_expert -> kernels per unit
    source: str = ""  # the table the counts come from

    @property
    def block_kernels(self) -> int:
        return sum(s.kernels for s in self.block)

    @property
    def block_syncs(self) -> int:
        return sum(s.sync for s in self.block)

    def kernels(self, blocks: int) -> int:
        """Kernels of a forward over ``blocks`` MoE blocks, copies and dequantisation excluded."""
        return self.embedding + blocks * self.block_kernels + self.head

    def unit(self, name: str) -> int:
        return int(self.per_unit.get(name, 0))


KEY_COLS = ("quant", "mode", "phase")
__all__ = ["HostProbe", "HostProgram", "Segment", "host_program", "program_rows"]


def _table(path: str, required: bool = True) -> dict:
    if required and not Path(path).is_file():
        raise SpecError(f"op_counts: {path} not found (python -m simulator.op_counts writes it)")
    return read_table(path, KEY_COLS, required)


def program_rows(quant: str | None, mode: str, phase: str, path: str | Path | None = None,
                 device: str = "cuda") -> tuple[list, Path]:
    """The table rows of ``(quant or 'none', mode, phase)`` and the table they come from: ``path`` alone
    when given, else (``device`` cuda) the CUDA-measured table with the CPU table as the fallback for
    paths it does not hold, or (``device`` cpu) the CPU table."""
    key = (quant or "none", mode, phase)
    if path is not None:
        tables = [(Path(path), True)]
    elif device == "cuda":
        tables = [(OP_COUNTS_CUDA, False), (OP_COUNTS, True)]
    elif device == "cpu":
        tables = [(OP_COUNTS, True)]
    else:
        raise SpecError(f"op_counts: device {device!r} is not one of {', '.join(DEVICES)}")
    for p, required in tables:
        rows = _table(str(p), required).get(key)
        if rows:
            return rows, p
    raise SpecError(f"op_counts: no host program for quant={key[0]} mode={mode} phase={phase} in "
                    f"{', '.join(str(p) for p, _ in tables)}")


def host_program(quant: str | None, mode: str, phase: str, path: str | Path | None = None,
                 device: str = "cuda") -> HostProgram:
    """The program of ``(quant or 'none', mode, phase)`` (tables: `program_rows`)."""
    rows, src = program_rows(quant, mode, phase, path, device)
    emb = head = 0
    block: list[Segment] = []
    per_unit: dict = {}
    for r in rows:
        seg, n = r["segment"], int(r["kernels"])
        if seg == "embedding":
            emb = n
        elif seg == "head":
            head = n
        elif seg in PER_UNIT:
            per_unit[seg] = n
        else:
            block.append(Segment(seg, n, r["syncs"] == "1", r.get("marker") or ""))
    return HostProgram(emb, tuple(block), head, per_unit, src.name)


PROBE_MODES = ("resident", "ring", "expert", "expert_nopred")  # expert: one-block-ahead prediction on
PROBE_METRICS = {"host_prefill_ms": ("prefill", "ms"), "host_decode_ms_per_step": ("decode", "ms"),
                 "host_prefill_copies": ("prefill", "copies"), "host_decode_copies_per_step": ("decode", "copies")}
PROBE_BLOCKS_METRIC = "host_probe_moe_blocks"


@dataclass(frozen=True)
class HostProbe:
    """The reference engine's host time per forward pass, measured in the bench run whose rows are simulated:
    the host program measured at tiny widths in the same run (``reference.inference.bench.host_probe``:
    same engine, model family, block count, experts and top-k; each kernel's device time a few us, so a
    pass's wall time is the host's).

    ``points``: ``(mode, phase, batch, seconds, copies)`` per pass, ``mode`` one of `PROBE_MODES`
    (``expert`` predicts one block ahead, ``expert_nopred`` does not), ``copies`` the copy calls of the
    pass (ring blocks or experts); ``blocks``: the probe model's MoE blocks. The inference workload divides
    a point's seconds by the kernels the counted program (`host_program`) issues in that pass, for a host
    seconds per kernel of that code path on that run's host (`rate`)."""

    blocks: int
    points: tuple = ()

    def __post_init__(self) -> None:
        if self.blocks < 1:
            raise SpecError(f"HostProbe.blocks: must be >= 1, got {self.blocks}")
        for m, ph, b, sec, cp in self.points:
            if m not in PROBE_MODES or ph not in ("prefill", "decode"):
                raise SpecError(f"HostProbe.points: mode {m!r} / phase {ph!r} not one of {PROBE_MODES} / prefill, decode")
            if b < 1 or not sec > 0 or cp < 0:
                raise SpecError(f"HostProbe.points: ({m}, {ph}, batch {b}): seconds ({sec}) must be > 0, "
                                f"batch >= 1, copies ({cp}) >= 0")

    def has(self, mode: str, phase: str) -> bool:
        return any(p[0] == mode and p[1] == phase for p in self.points)

    def rate(self, mode: str, phase: str, batch: int, kernels_of, keep=None) -> float | None:
        """Host seconds per kernel of (``mode``, ``phase``): the median over the probed batches of each pass's
        seconds over ``kernels_of(probe_batch, copies)`` (the counted kernels of that pass); None when not
        probed. ``keep(batch)``: which probed batches to use (the workload: those whose pass ran the same
        mechanism), all when none is kept.

        One value for every batch, not interpolated between them: at the probe's tiny widths the device work
        is ~0 and the counted program does not depend on the batch (its copy calls are counted per pass), so
        the per-kernel time of one code path is one quantity measured at each probed batch; each point is
        one median of a few passes (prefill) or one ``generate`` (decode) on a host whose pass time jitters
        by tens of percent (the b238b9a run: the same ring-fallback prefill program 15.9 to 28.1 ms across
        modes and batches), so the median over the batches estimates it, where interpolating would carry
        one point's jitter into that batch's rows. ``batch`` is kept for the callers (unused)."""
        pts = [(b, s, c) for m, ph, b, s, c in self.points if m == mode and ph == phase]
        if keep is not None and any(keep(b) for b, _, _ in pts):
            pts = [p for p in pts if keep(p[0])]
        if not pts:
            return None
        return float(median(s / max(1, kernels_of(b, c)) for b, s, c in pts))

    @classmethod
    def from_rows(cls, rows) -> HostProbe | None:
        """From one bench run's ``(mode, batch, metric, value)`` rows (`PROBE_METRICS`, `PROBE_BLOCKS_METRIC`);
        None when the run has no probe rows."""
        blocks, got = None, {}
        for mode, batch, metric, value in rows:
            if metric == PROBE_BLOCKS_METRIC:
                blocks = int(float(value))
            elif metric in PROBE_METRICS:
                phase, what = PROBE_METRICS[metric]
                got.setdefault((mode, phase, int(batch)), {})[what] = float(value)
        pts = tuple((m, ph, b, v["ms"] * 1e-3, v.get("copies", 0.0)) for (m, ph, b), v in sorted(got.items()) if "ms" in v)
        if not pts or blocks is None:
            return None
        return cls(blocks, pts)
