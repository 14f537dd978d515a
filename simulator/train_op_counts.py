"""Host programs of the reference trainer: aten operators per segment of one training step, where the host
synchronises with the device, and the fp32 <-> 16-bit casts it issues.

A training step of eager PyTorch is issued by the host one operator at a time (`reference.op_count`): a
segment of ``n`` kernels cannot finish before the host has issued them (``n x host_op_s``), and a host
synchronisation (``.item()``, ``.tolist()``, ``bincount`` on CUDA, ...) makes the host wait for the device
to drain, so the next kernels start on an idle GPU. The training workload (`simulator.workload.training`,
``host_program=``) needs, per segment of the step, the kernels the host issues and whether it ends with a
sync. These are properties of the code path (MoE backend, AdamW implementation, gate, top-k, activation,
norm, position encoding), not of the sizes, so they are counted here by running one step of the reference
trainer (as `reference.train` runs it: bf16 autocast, fp32 master weights, zero_grad, backward,
global-norm clipping, AdamW, the gate's bias update, the loss read-back) on the CPU with tiny widths, under a
dispatch mode that records every aten operator in order, split at module hooks.

Casts (``aten._to_copy`` between floating dtypes): autocast casts activations between the fp32 residual
stream and the bf16 GEMMs, and back for norms, the loss and the gradients; each is an HBM pass (read the
source, write the destination). Per segment the table gives their bytes per token in units of the model's
widths (``cast_D``: bytes per token per unit of hidden, so a segment moves ``cast_D x hidden x tokens`` bytes;
``cast_F`` per unit of ffn, ``cast_V`` per unit of vocab, ``cast_E`` per unit of experts); casts of
parameters (the fp32 master -> bf16 weight copies) are left out (`simulator.workload.training` prices them as
``weight_cast`` / ``grad_cast``): tensors of a parameter's shape (weights, gradients) are not counted. Rows of a tensor's elements are classified by its last dimension (hidden,
the head dimension, the qkv width -> D; ffn -> F; vocab -> V; experts -> E); the tiny widths are distinct
so that the classification is unambiguous.

Table (``results/profiles/train_op_counts.csv``, one row per segment, program order within a ``config``)::

    config     moe-<backend> adamw-<fused|foreach> L<layers> E<experts> k<top_k> <gate> cap<capacity factor|none> <activation>
               <norm> <position> [tied] [bias] [dense<every>]: the code path (`config_key`)
    segment    embedding                   token (+ position) embedding
               moe.attn / dense.attn        per block: norm1, attention, residual, norm2
               moe.ffn, moe.ffn_1 ..        per MoE block, the MoE layer split at host syncs
               dense.ffn                    per dense block
               moe.post / dense.post        per block: the residual add after the FFN
               head                         final norm, LM head, loss, auxiliary losses
               bwd_head                     backward from the loss to the last block's output
               moe.bwd / dense.bwd          per block backward
               (any segment ending with a sync continues as <segment>_1, <segment>_2, ...)
               bwd_embedding                backward of the embedding
               clip                         clip_grad_norm_ (foreach)
               optimizer                    AdamW step (fused: one kernel per parameter group)
               after_step                   the gate's bias update
               readback                     the per-step loss statistics read back (a sync: the step ends)
    kernels    non-view aten operators in the segment (each a kernel launch on a GPU, or host work)
    lead       kernels issued before the segment's first GEMM-class operator (`GEMM_OPS`: matmuls, attention,
               the fused AdamW), 0 when it has none: the segment's bulk device work cannot start before
               they are issued
    views      view / metadata operators
    syncs      1 when the segment ends with an operator that makes the host wait for the device
    sync_op    that operator (`reference.op_count.SYNC_OPS` plus ``aten.bincount``, which on CUDA reads
               its input's maximum back to size the output). ``.item()`` of a CPU tensor (foreach AdamW
               keeps its step counters on the CPU) is host work, not a sync.
    cast_D, cast_F, cast_V, cast_E   activation cast bytes per token per unit of that width (see above)
    cast_T     activation cast bytes per token of vectors with one value per token or routed row (the
               combine weights of the kept rows): no width (`_classify_cast`)

Memory passes (``results/profiles/train_mem_bytes.csv``, `MEM_COLUMNS`: config, segment, class, kernels,
``mem_D`` .. ``mem_T``): every other kernel's HBM traffic (tensor inputs read, outputs written; in-place ops read
and write their first argument) per segment and class (`MEM_CLASS`), in bytes per token per unit width as the
casts; parameter-shaped tensors and the optimizer-side segments are left out (priced per parameter by the
workload). `time_mem_classes` measures each class's achieved bandwidth on the GPU with the reference's own
kernels and dtypes at the paper configs' sizes (``train_mem_rates_cuda.csv``, with ``--device cuda``).

``python -m simulator.train_op_counts`` regenerates the table (and the memory-pass table) for the configs of `CONFIGS`; ``--check``
exits 1 when the committed table differs from the reference code (a CPU test checks a tiny config).
``--device cuda`` counts on a GPU (autocast there is CUDA's: SDPA and the fused AdamW dispatch
differently), both MoE backends, writes ``train_op_counts_cuda.csv`` (or ``--out``) and prints the rows that
differ; it then measures the host's seconds per kernel of the step's forward, backward and optimizer parts on
the tiny-width model (`time_parts`: its GPU work is shorter than the issue) -> ``train_host_rates_cuda.csv``
beside it, the training workload's host rates (`simulator.train_host.host_rates`).

The pieces, one module each (every name stays importable from here): `simulator.train_op_record` (the
recorder: one aten operator's view / sync class, cast bytes and memory pass), `simulator.train_op_step` (one
step recorded and split into segments: `count_step`), `simulator.train_op_rates` (the GPU timings:
`time_parts`, `time_mem_classes`); this module holds the committed tables' configs, paths and command line
(shared with `simulator.op_counts` through `simulator.op_count_table`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from simulator import op_count_table as table
from simulator.train_op_rates import (  # noqa: F401  (public names of this module)
    MEM_PROBE_ROWS,
    MEM_PROBE_WIDTH,
    MEM_RATE_COLUMNS,
    RATE_COLUMNS,
    _mem_probe_ops,
    time_mem_classes,
    time_parts,
)
from simulator.train_op_record import (  # noqa: F401  (public names of this module)
    ALLOC_OPS,
    CAST_UNITS,
    EXTRA_SYNC_OPS,
    GEMM_OPS,
    MEM_CLASS,
    MEM_CLASSES,
    MEM_SKIP,
    ONE_HOT_CPU_CHECK,
    RATE_CLASSES,
    SMALL_LAST_DIM,
    WRITE_ONLY,
    _classify_cast,
    _mem_pass,
    _mem_unit,
    _Op,
    _recorder,
)
from simulator.train_op_step import (  # noqa: F401  (public names of this module)
    ADAMWS,
    BACKENDS,
    COLUMNS,
    MEM_COLUMNS,
    TINY,
    TINY_BATCH,
    TINY_SEQ,
    _segments,
    _tiny_model,
    _tiny_trainer,
    config_key,
    count_step,
    mem_rows,
)

ROOT = table.PROFILES.parent.parent
OUT_CSV = table.PROFILES / "train_op_counts.csv"
OUT_CSV_CUDA = table.PROFILES / "train_op_counts_cuda.csv"
RATES_CSV_CUDA = table.PROFILES / "train_host_rates_cuda.csv"
MEM_CSV = table.PROFILES / "train_mem_bytes.csv"  # memory passes per segment (`MEM_COLUMNS`)
MEM_CSV_CUDA = table.PROFILES / "train_mem_bytes_cuda.csv"
MEM_RATES_CSV_CUDA = table.PROFILES / "train_mem_rates_cuda.csv"  # `time_mem_classes`
# the structures the committed table holds: paper-13.9b (the train.csv rows, top-1 and top-2) and the tiny
# preset of the offload bench (a_compute_bound), each with both AdamW implementations
CONFIGS = (
    ("paper-13.9b", {"layers": 4, "top_k": 1}, "fused"),
    ("paper-13.9b", {"layers": 4, "top_k": 2}, "fused"),
    ("paper-13.9b", {"layers": 4, "top_k": 1}, "foreach"),
    ("paper-13.9b", {"layers": 4, "top_k": 2}, "foreach"),
    ("tiny", {"layers": 4, "experts": 8}, "foreach"),
    ("tiny", {"layers": 4, "experts": 8}, "fused"),
)


def count_all(configs=CONFIGS, backend: str = "torch", device: str = "cpu", errors: list | None = None,
              mem_out: list | None = None) -> list[dict]:
    """Every config's rows (`count_step`); with ``errors`` a list, a config that fails is reported there and
    skipped; ``mem_out`` collects the memory-pass rows."""
    from semoe.presets import model_preset

    def jobs():
        for preset, over, adamw in configs:
            m = model_preset(preset).replace(**over) if over else model_preset(preset)
            yield (f"{preset} {over} {adamw} {backend}",
                   lambda m=m, adamw=adamw: count_step(m, adamw, backend, device, mem_out=mem_out))

    return table.count_jobs("train_op_counts", jobs(), errors)


def to_csv(rows: list[dict], columns: tuple = COLUMNS) -> str:
    return table.to_csv(rows, columns)


def diff(a: list[dict], b: list[dict]) -> list[str]:
    """Rows of table ``a`` that differ from ``b`` (same config and segment), as text."""
    return table.diff_rows(a, b, ("config", "segment"), ("kernels", "syncs", "sync_op"), " / ")


def main(argv: list[str] | None = None) -> int:
    ap = table.parser(__doc__.split("\n")[0], out_help=None,
                      device_help="cuda: count on the GPU (both MoE backends), write --out "
                                  f"(default {OUT_CSV_CUDA.name}) and print the rows that differ from the CPU table")
    ap.add_argument("--quick", action="store_true",
                    help="the --device path on one config, few repetitions, any device (a CI test runs it on the CPU)")
    a = ap.parse_args(argv)
    if a.device != "cpu" or a.quick:
        if a.quick and a.out is None:
            ap.error("--quick needs --out")
        out = a.out or OUT_CSV_CUDA
        if out.resolve() == OUT_CSV.resolve():
            ap.error("--device writes a table other than the committed CPU one")
        return _device_run(a.device, out, a.quick)
    out = a.out or OUT_CSV
    mem: list[dict] = []
    text = to_csv(count_all(mem_out=mem))
    mem_text = to_csv(mem, MEM_COLUMNS)
    return table.check_or_write("train_op_counts", [(out, text), (out.with_name(MEM_CSV.name), mem_text)], a.check)


def _device_run(device: str, out: Path, quick: bool) -> int:
    """Counts on ``device`` (both MoE backends on CUDA; the Triton one for the fused-AdamW paper configs, the
    ones its train.csv rows ran) and the host rates; each table is rewritten after every configuration, so an
    interrupted run keeps what it measured."""
    import time

    from semoe.presets import model_preset

    t0, errors = time.time(), []
    configs = CONFIGS[:1] if quick else CONFIGS
    jobs = [(c, "torch") for c in configs]
    if device != "cpu" and not quick:  # the Triton backend runs on CUDA only
        jobs += [(c, "triton") for c in configs if c[0] == "paper-13.9b" and c[2] == "fused"]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    mem: list[dict] = []
    mem_path = out.with_name(MEM_CSV_CUDA.name)
    for cfg, backend in jobs:
        rows += count_all((cfg,), backend=backend, device=device, errors=errors, mem_out=mem)
        out.write_text(to_csv(rows))
        mem_path.write_text(to_csv(mem, MEM_COLUMNS))
        print(f"train_op_counts: {device}: {cfg[0]} {cfg[1]} {cfg[2]} {backend} counted ({time.time() - t0:.1f} s)",
              flush=True)
    rates_out = out.with_name(RATES_CSV_CUDA.name)
    rates: list[dict] = []
    rate_jobs = [("torch", "fused")] if quick else [("torch", "fused"), ("torch", "foreach")]
    if device != "cpu" and not quick:
        rate_jobs.append(("triton", "fused"))
    for backend, adamw in rate_jobs:
        try:
            got = time_parts(model_preset("paper-13.9b").replace(layers=4), adamw, backend, device,
                             reps=2 if quick else 30)
        except Exception as e:  # noqa: BLE001 (a failed measurement is reported, the rest still run)
            errors.append(f"host rates {backend} {adamw}: {type(e).__name__}: {e}")
            print(f"train_op_counts: {errors[-1]}", flush=True)
            continue
        rates += got
        rates_out.write_text(to_csv(rates, RATE_COLUMNS))
        for r in got:
            print(f"  host rate {r['backend']:6s} {r['adamw']:7s} {r['part']}: {r['kernels']} kernels, "
                  f"{float(r['s_per_kernel']) * 1e6:.1f} us per kernel", flush=True)
    try:  # the memory-pass classes' achieved bandwidth (a few seconds)
        mr = time_mem_classes(device, rows=(256,) if quick else MEM_PROBE_ROWS, width=64 if quick else MEM_PROBE_WIDTH,
                              reps=2 if quick else 20)
        out.with_name(MEM_RATES_CSV_CUDA.name).write_text(to_csv(mr, MEM_RATE_COLUMNS))
        for r in mr:
            print(f"  memory pass {r['class']:8s} rows {r['rows']}: {r['GBps']} GB/s", flush=True)
    except Exception as e:  # noqa: BLE001 (a failed measurement is reported)
        errors.append(f"memory-pass rates: {type(e).__name__}: {e}")
        print(f"train_op_counts: {errors[-1]}", flush=True)
    table.print_device_diff("train_op_counts", device, rows, time.time() - t0, f"{out}, {rates_out.name}", OUT_CSV,
                            diff, f"{len(errors)} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
