"""Host programs of the reference inference engine: aten operators per segment, counted on the CPU.

A decode step of eager PyTorch is bound by the host (every dispatched operator costs Python,
dispatcher and launch time, `simulator.cost.CostModel.host_op_s`), and a host synchronisation makes
the host wait until the device has caught up. The inference workload (`simulator.workload.inference`)
needs, per forward pass, how many kernels the host issues between the synchronisations and where the
expert copies and dequantisations are issued. Those counts are a property of the code path (mode,
quantisation, prefill or decode), not of the sizes, so they are counted here by running
``reference.inference`` itself on the CPU with a tiny Mixtral-shaped model (bf16, so that the casts
the GPU run dispatches are dispatched here too), under a dispatch mode that records every aten
operator in order (classified with `reference.op_count`: views issue no kernel; the totals are
checked against `reference.op_count.count_ops` of the same call).

``python -m simulator.op_counts`` regenerates ``results/profiles/op_counts.csv``; ``--check`` exits 1
when the committed table differs from the reference code (a CPU test runs it); rerun it whenever
``reference/inference`` changes. ``--device cuda`` counts the same paths on a GPU, writes
``results/profiles/op_counts_cuda.csv`` (or ``--out FILE``; never the CPU table) and prints the rows that
differ from the CPU table. CUDA dispatches some operators differently (SDPA: 27 kernels per attention
segment against 41 on the CPU; the head's RMSNorm 2 against 9) and a few CUDA-only ones (the
``.to(device)`` of the expert-aware slot map), so the inference workload reads the CUDA table when it
simulates a (CUDA) GPU and the CPU table only for paths the CUDA table lacks
(`simulator.workload.inference_host`); rerun ``--device cuda`` on the GPU after ``reference/inference``
changes (the CPU ``--check`` catches that it changed).

The counts are of the eager path the reference runs by default (``torch.compile`` and fused
dequantisation, when the reference grows them, are other code paths to count here).

Table (one row per segment, program order within ``(quant, mode, phase)``)::

    quant     none | int8 | fp8      expert weights as the pool holds them
    mode      ring | expert | resident (the engine's provider of a forward pass; ``expert`` = a pass of
              the expert-aware provider, i.e. decode)
    phase     prefill | decode
    segment   embedding            ops before the first block (embedding, RoPE tables)
              attention            per block: norm1, qkv, RoPE, cache write, SDPA, proj, residual, norm2
              moe_0 .. moe_n       per block, the MoE part split at host syncs: moe_0 starts with the
                                   router, the last one holds the grouped FFN and the combine
              post                 per block: the residual add after the MoE part
              head                 final norm + LM head
              copy_block           per ring load of one block (copy_ calls of the tensors)
              copy_expert          per expert copied by the expert-aware cache
              dequant_block        per ring block dequantised into the workspace (quantised only)
              dequant_expert       per expert dequantised (expert-aware, quantised only)
              predict              expert-aware with ``predict``: routing the next block one block
                                   ahead (norm2, gate, unique; its copies are ``copy_expert``);
                                   ``syncs`` is the number of syncs inside it
    kernels   non-view aten operators (each a kernel launch on the GPU) in the segment
    views     view / metadata operators (no kernel)
    syncs     1 when the segment ends with an operator that makes the host wait for the device
    sync_op   that operator: op_count.SYNC_OPS (.item(), unique, nonzero...) plus ``aten.bincount``,
              which on CUDA reads its input's maximum back to size the output
    marker    the engine call right after the segment, when one splits it (``acquire``: Ring.acquire,
              the compute stream waits for the block's copy; ``fetch``: ExpertPool.fetch, the misses
              are copied; ``release``: Ring.release)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from simulator import op_count_table as table

ROOT = table.PROFILES.parent.parent
OUT_CSV = table.PROFILES / "op_counts.csv"
OUT_CSV_CUDA = table.PROFILES / "op_counts_cuda.csv"
COLUMNS = ("quant", "mode", "phase", "segment", "kernels", "views", "syncs", "sync_op", "marker")
# CUDA-only host syncs the CPU run cannot see as such: torch.bincount reads max(input) back
EXTRA_SYNC_OPS = frozenset({"aten.bincount"})
QUANTS = ("none", "int8", "fp8")
MODES = ("resident", "ring", "expert")
PHASES = ("prefill", "decode")
PER_COPY = ("copy_block", "copy_expert", "dequant_block", "dequant_expert")


def tiny_spec(hidden: int = 64, ffn: int = 128, layers: int = 2, experts: int | None = None,
              top_k: int | None = None):
    """A Mixtral-shaped model small enough for the CPU: same code path as the full one."""
    from semoe.presets import model_preset

    m = model_preset("mixtral-8x7b")
    kw = {} if experts is None else {"experts": experts}
    if top_k is not None:
        kw["top_k"] = top_k
    return m.replace(layers=layers, hidden=hidden, heads=4, kv_heads=2, ffn=ffn, vocab=256, max_seq=512,
                     name="tiny-mixtral", **kw)


@dataclass
class _Op:
    name: str
    view: bool
    sync: bool


def _recorder():
    from torch.utils._python_dispatch import TorchDispatchMode

    from reference.op_count import SYNC_OPS, VIEW_OPS, _name

    syncs = SYNC_OPS | EXTRA_SYNC_OPS

    class Recorder(TorchDispatchMode):
        """Every aten operator in dispatch order, interleaved with markers (str) from engine hooks."""

        def __init__(self) -> None:
            super().__init__()
            self.seq: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = _name(func)
            self.seq.append(_Op(name, name in VIEW_OPS, name in syncs))
            return func(*args, **(kwargs or {}))

        def mark(self, label) -> None:
            self.seq.append(label)

    return Recorder()


def _wrap(obj, attr: str, rec, tag: str | None = None, around: str | None = None, units=None) -> None:
    """Mark calls of ``obj.attr``: ``tag`` before the call (a split point of the host program), and
    with ``around`` the call's own ops bracketed as ``("<", around)`` ... ``(">", around, n)``, ``n``
    the growth of ``units()`` over the call (copies made)."""
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        if tag:
            rec.mark(tag)
        if around is None:
            return fn(*a, **k)
        before = units()
        rec.mark(("<", around))
        try:
            return fn(*a, **k)
        finally:
            rec.mark((">", around, units() - before))

    setattr(obj, attr, wrapped)


def _segments(seq: list, blocks: int) -> list[dict]:
    """One forward's recorded sequence -> table rows (see the module docstring)."""
    head_rows: list[dict] = []
    block_rows: list[list[dict]] = []
    block: list[dict] | None = None
    per_unit: dict[str, set] = {k: set() for k in PER_COPY}
    cur = {"kernels": 0, "views": 0}
    inner = {"kernels": 0, "views": 0}
    stack: list[str] = []
    seg, moe_i = "embedding", 0

    def flush(segment: str, sync_op: str = "", marker: str = "") -> None:
        row = {"segment": segment, "kernels": cur["kernels"], "views": cur["views"], "syncs": int(bool(sync_op)),
                   "sync_op": sync_op, "marker": marker}
        (block if block is not None else head_rows).append(row)
        cur["kernels"] = cur["views"] = 0

    for item in seq:
        if isinstance(item, tuple):
            if item[0] == "<":
                stack.append(item[1])
                inner["kernels"] = inner["views"] = 0
            else:
                stack.pop()
                n = item[2]
                if n:
                    if inner["kernels"] % n:
                        raise RuntimeError(f"op_counts: {item[1]}: {inner['kernels']} kernels for {n} units")
                    per_unit[item[1]].add(inner["kernels"] // n)
                elif inner["kernels"]:
                    raise RuntimeError(f"op_counts: {item[1]}: {inner['kernels']} kernels for nothing copied")
            continue
        if isinstance(item, str):
            if item == "block_start":
                if block is None and not block_rows:
                    flush("embedding")
                block, seg, moe_i = [], "attention", 0
            elif item == "experts_start":
                flush("attention")
                seg = "moe_0"
            elif item == "experts_end":
                flush(f"moe_{moe_i}")
                seg = "post"
            elif item == "block_end":
                flush("post")
                block_rows.append(block)
                block, seg = None, "head"
            elif item in ("acquire", "fetch", "release") and seg.startswith("moe_"):
                flush(seg, marker=item)
                moe_i += 1
                seg = f"moe_{moe_i}"
            continue
        if stack:
            inner["views" if item.view else "kernels"] += 1
            if item.sync:
                raise RuntimeError(f"op_counts: host sync {item.name} inside {stack[-1]}")
            continue
        cur["views" if item.view else "kernels"] += 1
        if item.sync:
            if not seg.startswith("moe_"):
                raise RuntimeError(f"op_counts: host sync {item.name} outside the MoE part ({seg})")
            flush(seg, sync_op=item.name)
            moe_i += 1
            seg = f"moe_{moe_i}"
    flush("head")
    if len(block_rows) != blocks:
        raise RuntimeError(f"op_counts: {len(block_rows)} blocks recorded, expected {blocks}")

    def key(rows):
        return [tuple(r.values()) for r in rows]

    if any(key(b) != key(block_rows[0]) for b in block_rows[1:]):
        raise RuntimeError("op_counts: the blocks of one forward issue different programs")
    out = [head_rows[0], *block_rows[0], head_rows[-1]]
    for tag, ns in per_unit.items():
        if len(ns) > 1:
            raise RuntimeError(f"op_counts: {tag} issued different op counts per unit {sorted(ns)}")
        if ns:
            out.append({"segment": tag, "kernels": ns.pop(), "views": 0, "syncs": 0, "sync_op": "", "marker": ""})
    return out


def build_store(directory: str, spec=None) -> None:
    import torch

    from reference.inference.build import build_random_store

    build_random_store(directory, spec or tiny_spec(), torch.bfloat16, seed=0, gen_device="cpu")


def count_path(quant: str, mode: str, phase: str, store_dir: str, batch: int = 2, prompt: int = 16,
               device: str = "cpu") -> list[dict]:
    """Table rows of one ``(quant, mode, phase)``: the reference's forward on ``device``, recorded.

    ``mode`` ring runs K = 1 (every block copied each pass, so the per-copy counts are seen); expert
    runs the expert-aware provider (``fallback_frac`` 1: never the ring, also for the prefill)."""
    import torch

    from reference.inference.engine import Engine, InferConfig, random_prompts
    from reference.inference.store import ModelStore
    from reference.op_count import count_ops

    if quant not in QUANTS or mode not in MODES or phase not in PHASES:
        raise ValueError(f"op_counts: unknown path {quant}/{mode}/{phase}")
    store = ModelStore.load(store_dir, pin=False)
    spec = store.spec
    cfg = InferConfig(mode=mode, device=device, trace=False, quant=None if quant == "none" else quant,
                      slots=1 if mode == "ring" else None, fallback_frac=1.0)
    eng = Engine(store, cfg, batch=batch, max_len=prompt + 8, prefill_tokens=batch * prompt)
    rec = _recorder()
    if eng.ring is not None:
        _wrap(eng.ring, "acquire", rec, "acquire")
        _wrap(eng.ring, "release", rec, "release")
    pool = eng.pool
    _wrap(pool, "copy_block", rec, around="copy_block", units=lambda: pool.copies)
    # expert-aware: fetch is a split point, its own ops are the copy_ calls of the misses
    _wrap(pool, "fetch", rec, tag="fetch", around="copy_expert", units=lambda: pool.misses)
    if cfg.quant is not None:
        orig_deq = pool._dequantize_rows

        def deq(rows, k=None):
            tag = "dequant_block" if rows is None else "dequant_expert"
            rec.mark(("<", tag))
            try:
                return orig_deq(rows, k)
            finally:
                rec.mark((">", tag, 1 if rows is None else len(rows)))

        pool._dequantize_rows = deq
    inner = eng._experts

    def experts(block, x, moe, ids):
        rec.mark("experts_start")
        try:
            return inner(block, x, moe, ids)
        finally:
            rec.mark("experts_end")

    for b in eng.model.blocks:
        b.norm1.register_forward_pre_hook(lambda mod, args: rec.mark("block_start"))

    def forward(x, cache, start):
        eng.begin_pass(x.numel())
        return eng.model(x, experts, cache, start, False, on_block=lambda i, h: rec.mark("block_end"))

    idx = random_prompts(batch, prompt, spec.vocab).to(eng.device)
    cache = eng.new_cache(batch)
    with torch.no_grad():
        forward(idx, cache, 0)  # warm-up prefill: RoPE tables, the pool
        if phase == "decode":
            forward(idx[:, -1:], cache, prompt)  # a first decode step: the cache as in steady decode
            x, start = idx[:, -2:-1], prompt + 1
        else:
            cache = eng.new_cache(batch)
            x, start = idx, 0
        if mode == "expert":  # an empty cache: the step's experts are all misses (counts per copy)
            pool.where.clear()
            pool.lru.clear()
            pool.owner[:] = [None] * len(pool.owner)
        rec.seq.clear()
        with rec:  # count_ops nested inside: its totals check the recorder's classification
            _, total = count_ops(forward, x, cache, start)
    rows = _segments(rec.seq, len(eng.blocks))
    if mode == "expert":  # the one-block-ahead predictor (InferConfig.predict), its copies excluded
        pool.prefetch = lambda block, experts: None
        h = torch.zeros(batch, x.shape[1], spec.hidden, dtype=store.dtype, device=eng.device)
        with torch.no_grad():
            _, pc = count_ops(eng._predict, eng.blocks[0], h, x.reshape(-1))
        rows.append({"segment": "predict", "kernels": pc.kernels, "views": pc.views,
                     "syncs": pc.syncs + sum(pc.by_name[n] for n in EXTRA_SYNC_OPS), "sync_op": "", "marker": ""})
    kernels = sum(1 for s in rec.seq if isinstance(s, _Op) and not s.view)
    syncs = sum(1 for s in rec.seq if isinstance(s, _Op) and s.name in _sync_ops_strict())
    per_forward = {"embedding", "head"}
    recorded = sum(r["kernels"] * (1 if r["segment"] in per_forward else len(eng.blocks)) for r in rows
                   if r["segment"] not in PER_COPY and r["segment"] != "predict")
    if recorded + _inner_kernels(rec.seq) != kernels:
        raise RuntimeError(f"op_counts: segments hold {recorded} kernels of {kernels} (+ copies)")
    if kernels != total.kernels or syncs != total.syncs:
        raise RuntimeError(f"op_counts: recorder saw {kernels} kernels / {syncs} syncs, count_ops "
                           f"{total.kernels} / {total.syncs}")
    return [dict(quant=quant, mode=mode, phase=phase, **r) for r in rows]


def _inner_kernels(seq: list) -> int:
    """Kernels recorded inside copy / dequant brackets (per-unit rows, not block segments)."""
    depth = n = 0
    for s in seq:
        if isinstance(s, tuple):
            depth += 1 if s[0] == "<" else -1
        elif isinstance(s, _Op) and depth and not s.view:
            n += 1
    return n


def _sync_ops_strict():
    from reference.op_count import SYNC_OPS

    return SYNC_OPS


def count_all(store_dir: str | None = None, quants=QUANTS, modes=MODES, phases=PHASES, device: str = "cpu",
              errors: list | None = None) -> list[dict]:
    """Every path's rows; with ``errors`` a list, a path that fails is reported there and skipped."""
    import tempfile

    if store_dir is None:
        with tempfile.TemporaryDirectory() as d:
            build_store(d)
            return count_all(d, quants, modes, phases, device, errors)
    jobs = ((f"{q}/{m}/{p}", lambda q=q, m=m, p=p: count_path(q, m, p, store_dir, device=device))
            for q in quants for m in modes for p in phases)
    return table.count_jobs("op_counts", jobs, errors)


def diff(a: list[dict], b: list[dict]) -> list[str]:
    """Rows of table ``a`` that differ from ``b`` (same path and segment), as text."""
    return table.diff_rows(a, b, ("quant", "mode", "phase", "segment"), ("kernels", "syncs", "sync_op", "marker"), "/")


def to_csv(rows: list[dict]) -> str:
    return table.to_csv(rows, COLUMNS)


def main(argv: list[str] | None = None) -> int:
    out_help = f"default {OUT_CSV.name} (cpu) / {OUT_CSV_CUDA.name} (--device cuda), in results/profiles"
    ap = table.parser(__doc__.split("\n")[0], out_help=out_help,
                      device_help="cuda: count on the GPU (a check of the CPU table: CUDA-only ops and syncs), write "
                                  "--out and print the rows that differ from the committed table; never overwrites it")
    a = ap.parse_args(argv)
    if a.device != "cpu":
        return _device_check(a.device, a.out or OUT_CSV_CUDA)
    return table.check_or_write("op_counts", [(a.out or OUT_CSV, to_csv(count_all()))], a.check)


def _device_check(device: str, out: Path) -> int:
    import time

    if out.resolve() == OUT_CSV.resolve():
        print("op_counts: --device needs an --out other than the committed table", file=sys.stderr)
        return 2
    t0 = time.time()
    errors: list[str] = []
    rows = count_all(device=device, errors=errors)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_csv(rows))
    table.print_device_diff("op_counts", device, rows, time.time() - t0, str(out), OUT_CSV, diff,
                            f"{len(errors)} paths failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
