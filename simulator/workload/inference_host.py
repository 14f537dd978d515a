"""Host programs of the reference inference engine for the inference workload: how many kernels the
host issues per segment of a forward pass, where it synchronises with the device and where the
engine copies or dequantises experts.

The counts are the committed table ``results/profiles/op_counts.csv``, regenerated from the reference
code on the CPU by ``python -m simulator.op_counts`` (a test checks the table matches the code): they
depend on the code path (quantisation, provider mode, prefill or decode), not on the sizes. Each
kernel costs ``CostModel.host_op_s`` of host time (the profile's ``host_op`` row, else HARDWARE.md's
8 us); a segment ending with a sync makes the host wait until the compute stream has run it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from semoe import SpecError

OP_COUNTS = Path(__file__).resolve().parent.parent.parent / "results" / "profiles" / "op_counts.csv"
PER_UNIT = ("copy_block", "copy_expert", "dequant_block", "dequant_expert", "predict")


@dataclass(frozen=True)
class Segment:
    name: str  # attention, moe_<i>, post
    kernels: int
    sync: bool  # the host waits for the device at the end of the segment
    marker: str = ""  # engine call right after it: acquire, release, fetch (or "")


@dataclass(frozen=True)
class HostProgram:
    """One forward pass of the reference engine (``quant``, provider ``mode``, ``phase``)."""

    embedding: int
    block: tuple[Segment, ...]
    head: int
    per_unit: dict  # copy_block, copy_expert, dequant_block, dequant_expert -> kernels per unit

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


@cache
def _table(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"op_counts: {p} not found (python -m simulator.op_counts writes it)")
    out: dict = {}
    with p.open(newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault((r["quant"], r["mode"], r["phase"]), []).append(r)
    return out


def host_program(quant: str | None, mode: str, phase: str, path: str | Path = OP_COUNTS) -> HostProgram:
    """The program of ``(quant or 'none', mode, phase)`` from the op-count table."""
    key = (quant or "none", mode, phase)
    rows = _table(str(path)).get(key)
    if not rows:
        raise SpecError(f"op_counts: no host program for quant={key[0]} mode={mode} phase={phase} in {path}")
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
    return HostProgram(emb, tuple(block), head, per_unit)
