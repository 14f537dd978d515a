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
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT_CSV = ROOT / "results" / "profiles" / "train_op_counts.csv"
OUT_CSV_CUDA = ROOT / "results" / "profiles" / "train_op_counts_cuda.csv"
RATES_CSV_CUDA = ROOT / "results" / "profiles" / "train_host_rates_cuda.csv"
MEM_CSV = ROOT / "results" / "profiles" / "train_mem_bytes.csv"  # memory passes per segment (`MEM_COLUMNS`)
MEM_CSV_CUDA = ROOT / "results" / "profiles" / "train_mem_bytes_cuda.csv"
MEM_RATES_CSV_CUDA = ROOT / "results" / "profiles" / "train_mem_rates_cuda.csv"  # `time_mem_classes`
COLUMNS = ("config", "segment", "kernels", "lead", "views", "syncs", "sync_op", "cast_D", "cast_F", "cast_V", "cast_E",
           "cast_T")
CAST_UNITS = ("D", "F", "V", "E", "T")
# the GEMM-class operators (the bulk of a segment's device work): ``lead`` counts the kernels before the first
GEMM_OPS = frozenset({"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._grouped_mm", "aten.linear",
                      "aten._scaled_dot_product_flash_attention", "aten._scaled_dot_product_efficient_attention",
                      "aten._scaled_dot_product_cudnn_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
                      "aten._scaled_dot_product_flash_attention_backward",
                      "aten._scaled_dot_product_efficient_attention_backward",
                      "aten._scaled_dot_product_cudnn_attention_backward",
                      "aten._scaled_dot_product_flash_attention_for_cpu_backward", "aten._fused_adamw_",
                      "aten._fused_adam_"})
EXTRA_SYNC_OPS = frozenset({"aten.bincount"})  # on CUDA, bincount reads max(input) back (a host sync)
# F.one_hot(x, num_classes) on the CPU checks the range of x (aminmax + two reads back); on CUDA it does not
# (aten/src/ATen/native/Onehot.cpp: the device asserts instead), so those ops are not recorded
ONE_HOT_CPU_CHECK = frozenset({"aten.aminmax", "aten._local_scalar_dense"})
ADAMWS = ("fused", "foreach")
BACKENDS = ("torch", "triton")
# tiny widths, pairwise distinct (cast classification by last dimension): hidden, heads (head dim 12),
# ffn, vocab; experts come from the structure
TINY = {"hidden": 48, "heads": 4, "kv_heads": None, "ffn": 80, "vocab": 272, "max_seq": 64}
TINY_BATCH, TINY_SEQ = 2, 20
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


def config_key(m, adamw: str, backend: str = "torch") -> str:
    """The code-path key of model ``m`` trained with ``adamw`` and the MoE ``backend``."""
    cap = "none" if m.capacity_factor is None else f"{m.capacity_factor:g}"
    parts = [f"moe-{backend}", f"adamw-{adamw}", f"L{m.layers}", f"E{m.experts}", f"k{m.top_k}", m.gate, f"cap{cap}", m.activation, m.norm, m.position]
    if m.tied_embeddings:
        parts.append("tied")
    if m.bias:
        parts.append("bias")
    if m.moe_every != 1:
        parts.append(f"dense{m.moe_every}")
    if m.shared_experts:
        parts.append(f"shared{m.shared_experts}")
    return " ".join(parts)


# memory passes (``mem``, `train_mem_bytes.csv`): every kernel that is neither GEMM-class nor a counted activation
# cast moves its tensors through HBM; its bytes are recorded per class (the kernel family whose achieved
# bandwidth prices it, `simulator.train_host.MEM_RATE_OPS`) and per unit width. Classes by aten operator; the
# rest is ``elem`` (adds, muls, reductions, softmax, the loss, ...)
MEM_CLASS = {
    "aten.native_layer_norm": "norm_fwd", "aten.native_layer_norm_backward": "norm_bwd",
    "aten.gelu": "act", "aten.gelu_backward": "act", "aten.silu": "act", "aten.silu_backward": "act",
    "aten.index_select": "gather", "aten.gather": "gather", "aten.index": "gather", "aten.embedding": "gather",
    "aten.index_add": "scatter", "aten.index_add_": "scatter", "aten.index_put": "scatter",
    "aten.index_put_": "scatter", "aten.scatter_add": "scatter", "aten.scatter_add_": "scatter",
    "aten.embedding_dense_backward": "scatter",
    "aten.index_copy": "copy", "aten.index_copy_": "copy", "aten.copy_": "copy", "aten.clone": "copy",
    "aten.cat": "copy", "aten._to_copy": "copy", "aten.new_zeros": "copy", "aten.zeros": "copy",
    "aten.zeros_like": "copy", "aten.full_like": "copy", "aten.fill_": "copy", "aten.zero_": "copy",
    "aten.ones_like": "copy", "aten.full": "copy",
}
MEM_CLASSES = ("norm_fwd", "norm_bwd", "act", "gather", "scatter", "copy", "elem")
# the classes `time_mem_classes` measures: the memory passes' and ``cast`` (fp32 <-> bf16 copies, which price the
# counted activation casts and the weight / gradient casts)
RATE_CLASSES = MEM_CLASSES + ("cast",)
# in-place operators that only write their first argument (no read of it)
WRITE_ONLY = frozenset({"aten.copy_", "aten.fill_", "aten.zero_", "aten.index_copy_"})
# the capacity ranks' cumsum is priced as a latency-bound scan (training.REF_RANK_SCAN_S_PER_ROW), not as bytes
MEM_SKIP = frozenset({"aten.cumsum"})
MEM_COLUMNS = ("config", "segment", "class", "kernels", "mem_D", "mem_F", "mem_V", "mem_E", "mem_T")


@dataclass
class _Op:
    name: str
    view: bool
    sync: bool
    cast: dict | None = None  # unit -> bytes per token per unit width
    mem: tuple | None = None  # (class, {unit: bytes per token per unit width}) of a memory pass


def _recorder(dims: dict, tokens: int, host_scalars: set, params: set):
    """A dispatch mode recording every aten operator in order, interleaved with str markers."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from reference.op_count import SYNC_OPS, VIEW_OPS, _name

    syncs = SYNC_OPS | EXTRA_SYNC_OPS

    def unit(t) -> str | None:
        last = t.shape[-1] if t.dim() else 1
        for u, widths in dims.items():
            if last in widths:
                return u
        return None

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seq: list = []
            self.in_one_hot = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = _name(func)
            kwargs = kwargs or {}
            if self.in_one_hot and name in ONE_HOT_CPU_CHECK:
                return func(*args, **kwargs)  # the CPU's range check: not dispatched on CUDA
            sync = name in syncs
            if name == "aten._local_scalar_dense" and args and id(args[0]) in host_scalars:
                sync = False  # a CPU-resident step counter: host work, no device sync
            cast = None
            out = func(*args, **kwargs)
            if name == "aten._to_copy" and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                src = args[0]
                shape = tuple(src.shape)
                if (src.is_floating_point() and out.is_floating_point() and src.dtype != out.dtype
                        and shape not in params and shape[::-1] not in params):
                    nbytes = src.numel() * (src.element_size() + out.element_size())
                    cast = _classify_cast(src, nbytes, dims, tokens, unit)
            mem = None
            if name not in VIEW_OPS and name not in GEMM_OPS and name not in MEM_SKIP and cast is None:
                mem = _mem_pass(name, args, kwargs, out, dims, tokens, params)
            self.seq.append(_Op(name, name in VIEW_OPS, sync, cast, mem))
            return out

        def mark(self, label) -> None:
            self.seq.append(label)

    return Recorder()


def _mem_unit(t, dims: dict, tokens: int) -> str | None:
    """The unit width of a tensor's HBM traffic: its last dimension when that is a width (D, F, V, E; vectors
    are never classified by their length), else per token (``T``: token ids, routing indices [T, k], per-row
    weights, ...); None for tensors smaller than half a value per token (scalars, per-expert counts)."""
    if 2 * t.numel() < tokens:
        return None
    if t.dim() >= 2:
        for u, widths in dims.items():
            if t.shape[-1] in widths:
                return u
    return "T"


def _mem_pass(name: str, args, kwargs, out, dims: dict, tokens: int, params: set) -> tuple | None:
    """``(class, {unit: bytes per token per unit width})`` of one kernel's HBM traffic: its tensor inputs read
    and its outputs written (an in-place operator's first argument read and written once, or only written
    for `WRITE_ONLY`); parameter-shaped tensors (weights, their gradients) are left out, as for the casts
    (`simulator.workload.training` prices the parameter passes itself). None when nothing is counted."""
    import torch
    from torch.utils._pytree import tree_leaves

    ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if name.endswith("_") and ins:  # in place: the first argument read and written (written only: WRITE_ONLY)
        traffic = [ins[0]] * (1 if name in WRITE_ONLY else 2) + [t for t in ins[1:] if t is not ins[0]]
    else:
        traffic = ins + [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    by: dict[str, float] = {}
    for t in traffic:
        if tuple(t.shape) in params or tuple(t.shape)[::-1] in params:
            continue
        u = _mem_unit(t, dims, tokens)
        if u is None:
            continue
        b = t.numel() * t.element_size() / tokens / (dims[u][0] if u != "T" else 1)
        by[u] = by.get(u, 0.0) + b
    return (MEM_CLASS.get(name, "elem"), by) if by else None


SMALL_LAST_DIM = 4  # a tensor's last dimension this small and no width: top-k slots, per-token statistics


def _classify_cast(src, nbytes: float, dims: dict, tokens: int, unit) -> dict | None:
    """The activation-cast bytes of casting ``src`` (``nbytes`` read + written), per token per unit width.
    Vectors are never classified by their length (it could equal a width by chance): scalars, per-expert
    vectors and per-step statistics (fewer values than half the tokens) are not activation passes (None);
    a longer vector holds one value per token or routed row (e.g. the combine weights of the kept rows)
    and is counted per token (``T``: bytes per token, no width). A tensor of two or more dimensions is
    classified by its last one (``unit``); a last dimension of at most ``SMALL_LAST_DIM`` that is no width
    (routing tensors [T, k]) is counted per token; any other unknown last dimension is an error (``other``)
    unless the tensor is smaller than one row per token."""
    if src.dim() <= 1:
        return {"T": nbytes / tokens} if 2 * src.numel() >= tokens else None
    u = unit(src)
    if u is not None:
        return {u: nbytes / tokens / dims[u][0]}
    if src.numel() < tokens:
        return None  # small index-shaped tensors: not an activation pass
    if src.shape[-1] <= SMALL_LAST_DIM:
        return {"T": nbytes / tokens}
    return {"other": float(nbytes)}


def _tiny_model(m):
    return m.replace(name="ops", **TINY)


def _tiny_trainer(m, adamw: str, backend: str, device: str):
    """(tiny spec, fp32 model on ``device`` built under MoE ``backend``, AdamW as the reference trainer
    configures it: GPT-2 decay groups, ``adamw`` fused or foreach) for the tiny-width copy of ``m``."""
    import torch

    from reference.model import MoEDecoder
    from reference.moe.layer import moe_backend_env

    with moe_backend_env(backend):
        tiny = _tiny_model(m)
        torch.manual_seed(0)
        model = MoEDecoder(tiny, seed=0).to(device=torch.device(device), dtype=torch.float32)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    kw = {"fused": True} if adamw == "fused" else {"foreach": True}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, **kw)
    return tiny, model, opt


def count_step(m, adamw: str = "fused", backend: str = "torch", device: str = "cpu",
               batch: int = TINY_BATCH, seq: int = TINY_SEQ, mem_out: list | None = None) -> list[dict]:
    """Table rows of one training step of (the tiny-width copy of) model ``m``'s structure, recorded on
    ``device`` (the second step: the optimizer states exist); ``mem_out``: the step's memory-pass rows
    (`MEM_COLUMNS`, `mem_rows`) are appended to it."""
    import torch

    from reference.op_count import count_ops
    from reference.train import TrainConfig, after_step

    if adamw not in ADAMWS:
        raise ValueError(f"train_op_counts: adamw must be one of {ADAMWS}, got {adamw!r}")
    if backend not in BACKENDS:
        raise ValueError(f"train_op_counts: backend must be one of {BACKENDS}, got {backend!r}")
    tiny, model, opt = _tiny_trainer(m, adamw, backend, device)
    dev = torch.device(device)
    cfg = TrainConfig(batch_size=batch, seq_len=seq)
    amp = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny.vocab, (batch, seq), generator=gen).to(dev)
    y = torch.randint(0, tiny.vocab, (batch, seq), generator=gen).to(dev)
    T = batch * seq
    hd = tiny.head_dim
    kv = tiny.n_kv_heads * hd
    # unit -> widths of a tensor's last dimension counted in it; the first is the unit's own width
    dims = {"D": tuple(dict.fromkeys((tiny.hidden, hd, tiny.hidden + 2 * kv))), "F": (tiny.ffn, 2 * tiny.ffn),
            "V": (tiny.vocab,), "E": (tiny.experts,) if tiny.experts else ()}
    if len({w for ws in dims.values() for w in ws}) != sum(len(ws) for ws in dims.values()):
        raise RuntimeError(f"train_op_counts: tiny widths collide {dims}")

    def step(rec=None):
        with torch.autocast(dev.type, dtype=amp):
            out = model(x, y)
        mark(rec, "zero_grad")
        opt.zero_grad(set_to_none=True)
        mark(rec, "backward")
        out.loss.backward()
        mark(rec, "bwd_end")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"), foreach=True)
        mark(rec, "optimizer")
        opt.step()
        mark(rec, "after_step")
        after_step(model, out, cfg)
        mark(rec, "readback")
        stats = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).double()
        return [float(v) for v in stats]  # reference.train reads the step's statistics back

    def mark(rec, label):
        if rec is not None:
            rec.mark(label)

    step()  # optimizer states exist from the second step on
    host_scalars = {id(s["step"]) for s in opt.state.values() if "step" in s and s["step"].device.type == "cpu"}
    if dev.type != "cpu":
        pass  # on a GPU the CPU step counters are the only CPU scalars the step reads
    # parameter-shaped tensors (weights and their gradients, either orientation) are not activations
    params = {tuple(p.shape) for p in model.parameters()}
    if any(s in params for s in ((batch, seq, tiny.hidden), (T, tiny.hidden), (T, tiny.experts))):
        raise RuntimeError("train_op_counts: an activation shape equals a parameter shape")
    rec = _recorder(dims, T, host_scalars, params)
    hooks = []
    for i, blk in enumerate(model.blocks):
        kind = "moe" if blk.is_moe else "dense"

        # backward boundaries: the gradient of block i's input ends block i's backward (and starts block
        # i-1's); the gradient of the last block's output starts the blocks' backward
        def pre(mod, args, kind=kind, i=i):
            rec.mark(("block_start", kind))
            x_in = args[0]
            if x_in.requires_grad:
                x_in.register_hook(lambda g: rec.mark(("bwd_block_end", i)))

        def post(mod, args, out, kind=kind, i=i):
            rec.mark(("block_end", kind))
            y_out = out[0]
            if y_out.requires_grad and i == len(model.blocks) - 1:
                y_out.register_hook(lambda g: rec.mark(("bwd_block_start", i)))

        hooks.append(blk.register_forward_pre_hook(pre))
        hooks.append(blk.register_forward_hook(post))
        hooks.append(blk.ffn.register_forward_pre_hook(lambda mod, args: rec.mark("ffn_start")))
        hooks.append(blk.ffn.register_forward_hook(lambda mod, args, out: rec.mark("ffn_end")))
    import torch.nn.functional as F

    one_hot = F.one_hot

    def one_hot_wrapped(t, num_classes=-1):
        rec.in_one_hot = num_classes >= 0 and t.device.type == "cpu"
        try:
            return one_hot(t, num_classes)
        finally:
            rec.in_one_hot = False

    F.one_hot = one_hot_wrapped
    try:
        with rec:
            _, total = count_ops(step, rec)
    finally:
        F.one_hot = one_hot
        for h in hooks:
            h.remove()
    rows = _segments(rec.seq, model)
    kernels = sum(1 for s in rec.seq if isinstance(s, _Op) and not s.view)
    # count_ops (nested inside the recorder) saw the one_hot checks too: its total less them
    skipped = total.by_name["aten.aminmax"] - sum(1 for s in rec.seq if isinstance(s, _Op) and s.name == "aten.aminmax")
    skipped *= 3  # aminmax and its two reads back per skipped check
    if kernels + skipped != total.kernels:
        raise RuntimeError(f"train_op_counts: recorder saw {kernels} kernels (+{skipped} one_hot checks), "
                           f"count_ops {total.kernels}")
    per_block = {"moe": sum(1 for b in model.blocks if b.is_moe), "dense": sum(1 for b in model.blocks if not b.is_moe)}
    recorded = sum(r["kernels"] * (per_block[r["segment"].split(".")[0]] if "." in r["segment"] else 1) for r in rows)
    if recorded != kernels:
        raise RuntimeError(f"train_op_counts: segments hold {recorded} of {kernels} kernels")
    key = config_key(m, adamw, backend)
    if mem_out is not None:
        mem_out.extend(mem_rows(key, rows))
    return [dict(config=key, **{k: v for k, v in r.items() if k != "mem"}) for r in rows]


def mem_rows(key: str, rows: list[dict]) -> list[dict]:
    """The memory-pass table rows of a counted program: per segment and class, the kernels and the bytes per
    token per unit width (``mem_D`` ... ``mem_T``; ``T``: per token, no width)."""
    out = []
    for r in rows:
        if r["segment"].split("_")[0] in ("clip", "optimizer", "after", "readback", "zero"):
            continue  # parameter-side passes (clipping, AdamW, ...): priced per parameter by the workload
        for cls in MEM_CLASSES:
            if cls in r["mem"]:
                k, by = r["mem"][cls]
                out.append({"config": key, "segment": r["segment"], "class": cls, "kernels": round(k, 4),
                            **{f"mem_{u}": round(by.get(u, 0.0), 4) for u in CAST_UNITS}})
    return out


def _segments(seq: list, model) -> list[dict]:
    """One step's recorded sequence -> table rows (see the module docstring)."""
    step_rows: list[dict] = []
    blocks: dict[str, list[list[dict]]] = {"moe": [], "dense": []}
    bwd_blocks: dict[str, list[list[dict]]] = {"moe": [], "dense": []}
    cur: dict = {}
    state = {"seg": "embedding", "block": None, "kind": None}

    def reset():
        cur.clear()
        cur.update(kernels=0, lead=None, views=0, other=0.0, mem={}, **{f"cast_{u}": 0.0 for u in CAST_UNITS})

    def flush(segment: str, sync_op: str = "") -> None:
        if not (cur["kernels"] or cur["views"] or sync_op) and segment.rpartition("_")[2].isdigit():
            return  # nothing after the segment's last sync
        if cur["other"]:
            raise RuntimeError(f"train_op_counts: {segment}: casts of unclassified widths ({cur['other']:.0f} bytes)")
        row = {"segment": segment, "kernels": cur["kernels"], "lead": cur["lead"] if cur["lead"] is not None else 0,
               "views": cur["views"], "syncs": int(bool(sync_op)),
               "sync_op": sync_op, **{f"cast_{u}": round(cur[f"cast_{u}"], 4) for u in CAST_UNITS},
               "mem": {c: (k, dict(b)) for c, (k, b) in cur["mem"].items()}}
        (state["block"] if state["block"] is not None else step_rows).append(row)
        reset()

    kinds = ["moe" if b.is_moe else "dense" for b in model.blocks]
    reset()
    for item in seq:
        if isinstance(item, tuple):
            tag, kind = item
            if tag == "block_start":
                if state["seg"] == "embedding":
                    flush("embedding")
                elif cur["kernels"] or cur["views"]:
                    raise RuntimeError(f"train_op_counts: {cur['kernels']} kernels between blocks")
                state.update(block=[], kind=kind, seg=f"{kind}.attn")
            elif tag == "block_end":
                flush(state["seg"])
                blocks[kind].append(state["block"])
                state.update(block=None, seg="head")
            elif tag == "bwd_block_start":
                flush(state["seg"])
                k = kinds[kind]
                state.update(block=[], kind=k, seg=f"{k}.bwd")
            elif tag == "bwd_block_end":
                flush(state["seg"])
                bwd_blocks[state["kind"]].append(state["block"])
                if kind > 0:
                    k = kinds[kind - 1]
                    state.update(block=[], kind=k, seg=f"{k}.bwd")
                else:
                    state.update(block=None, seg="bwd_embedding")
            continue
        if isinstance(item, str):
            if item == "ffn_start":
                flush(state["seg"])
                state["seg"] = f"{state['kind']}.ffn"
            elif item == "ffn_end":
                flush(state["seg"])
                state["seg"] = f"{state['kind']}.post"
            elif item in ("zero_grad", "backward"):
                flush(state["seg"])
                state["seg"] = "zero_grad" if item == "zero_grad" else "bwd_head"
            elif item == "bwd_end":
                flush(state["seg"])
                state["seg"] = "clip"
            elif item in ("optimizer", "after_step", "readback"):
                flush(state["seg"])
                state["seg"] = item
            continue
        if cur["lead"] is None and item.name in GEMM_OPS:
            cur["lead"] = cur["kernels"]
        cur["views" if item.view else "kernels"] += 1
        if item.mem:
            cls, by = item.mem
            k, acc = cur["mem"].setdefault(cls, (0, {}))
            for u, b in by.items():
                acc[u] = acc.get(u, 0.0) + b
            cur["mem"][cls] = (k + 1, acc)
        if item.cast:
            for u, b in item.cast.items():
                cur[f"cast_{u}" if u != "other" else "other"] += b
        if item.sync:  # the segment ends here; the rest is <base>_1, <base>_2, ...
            seg = state["seg"]
            flush(seg, item.name)
            base, _, j = seg.rpartition("_")
            state["seg"] = f"{base}_{int(j) + 1}" if j.isdigit() and base else f"{seg}_1"
    flush(state["seg"])

    def same(progs):
        key = [[(r["segment"], r["kernels"], r["lead"], r["views"], r["sync_op"]) for r in p] for p in progs]
        return all(k == key[0] for k in key[1:])

    def mean(progs):
        """The blocks' common program; cast bytes averaged (routed rows depend on the routing)."""
        rows = [dict(r) for r in progs[0]]
        for j, r in enumerate(rows):
            for c in (f"cast_{u}" for u in CAST_UNITS):
                r[c] = round(sum(p[j][c] for p in progs) / len(progs), 4)
            mem: dict = {}
            for p in progs:
                for cls, (k, by) in p[j]["mem"].items():
                    k0, acc = mem.setdefault(cls, (0, {}))
                    for u, b in by.items():
                        acc[u] = acc.get(u, 0.0) + b / len(progs)
                    mem[cls] = (k0 + k / len(progs), acc)
            r["mem"] = mem
        return rows

    out = []
    for kind, progs in blocks.items():
        if progs and not same(progs):
            raise RuntimeError(f"train_op_counts: the {kind} blocks of one step issue different programs")
    for kind, progs in bwd_blocks.items():
        if progs and not same(progs):
            raise RuntimeError(f"train_op_counts: the {kind} blocks' backward issue different programs")
    # program order: embedding, block programs (one per kind), head, zero_grad, bwd_head, block backward
    # programs, bwd_embedding, clip, optimizer, after_step, readback
    fwd_end = next(i for i, r in enumerate(step_rows) if r["segment"].startswith("head"))
    out.extend(step_rows[:fwd_end])
    for kind in ("moe", "dense"):
        if blocks[kind]:
            out.extend(mean(blocks[kind]))
    bwd_start = next(i for i, r in enumerate(step_rows) if r["segment"].startswith("bwd_embedding"))
    out.extend(step_rows[fwd_end:bwd_start])
    for kind in ("moe", "dense"):
        if bwd_blocks[kind]:
            out.extend(mean(bwd_blocks[kind]))
    out.extend(step_rows[bwd_start:])
    return out


RATE_COLUMNS = ("device", "backend", "adamw", "part", "kernels", "seconds", "s_per_kernel")


def time_parts(m, adamw: str = "fused", backend: str = "torch", device: str = "cuda", reps: int = 30) -> list[dict]:
    """Host seconds per kernel of the training step's parts (``fwd``: the forward under autocast, building
    the autograd graph; ``bwd``: the backward; ``opt``: clipping, AdamW and the bias update) for the tiny-width
    copy of ``m``: the GPU work of each kernel is shorter than its issue, so the median wall time of a part
    (synchronised at its end) over its kernels is the host's rate."""
    import statistics
    import time

    import torch

    from reference.op_count import count_ops
    from reference.train import TrainConfig, after_step

    tiny, model, opt = _tiny_trainer(m, adamw, backend, device)
    dev = torch.device(device)
    cfg = TrainConfig(batch_size=TINY_BATCH, seq_len=TINY_SEQ)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny.vocab, (TINY_BATCH, TINY_SEQ), generator=gen).to(dev)
    y = torch.randint(0, tiny.vocab, (TINY_BATCH, TINY_SEQ), generator=gen).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    state: dict = {}

    def fwd():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            state["out"] = model(x, y)
        opt.zero_grad(set_to_none=True)

    def bwd():
        state["out"].loss.backward()

    def optim():
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"), foreach=True)
        opt.step()
        after_step(model, state["out"], cfg)

    parts = (("fwd", fwd), ("bwd", bwd), ("opt", optim))
    for _ in range(3):
        for _, fn in parts:
            fn()
    sync()
    kernels = {}
    for name, fn in parts:
        _, c = count_ops(fn)
        kernels[name] = c.kernels
    times: dict = {name: [] for name, _ in parts}
    for _ in range(reps):
        for name, fn in parts:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    for name, _ in parts:
        sec = statistics.median(times[name])
        rows.append({"device": dev_name, "backend": backend, "adamw": adamw, "part": name, "kernels": kernels[name],
                     "seconds": f"{sec:.6g}", "s_per_kernel": f"{sec / max(1, kernels[name]):.6g}"})
    return rows


MEM_RATE_COLUMNS = ("device", "class", "rows", "width", "io_bytes", "time_s", "GBps")
MEM_PROBE_WIDTH = 2048  # the probe's row width (paper-13.9b's hidden); rows per call: MEM_PROBE_ROWS
MEM_PROBE_ROWS = (16384, 65536)


def _mem_probe_ops(R: int, W: int, dev):
    """Per class, the kernels the reference issues for it (dtypes as under autocast with fp32 masters: fp32
    residual stream and norms, bf16 expert activations), on R rows of width W, as zero-argument callables."""
    import torch

    aten = torch.ops.aten
    g = torch.Generator(device="cpu").manual_seed(0)
    f32 = torch.randn(R, W, generator=g).to(dev)
    dy = torch.randn(R, W, generator=g).to(dev)
    wn, bn = torch.ones(W, device=dev), torch.zeros(W, device=dev)
    _, mean, rstd = aten.native_layer_norm(f32, [W], wn, bn, 1e-5)
    hb = torch.randn(R, 4 * W, generator=g).to(dev, torch.bfloat16)
    idx = torch.randperm(R, generator=g).to(dev)
    idx2 = (torch.arange(R) // 2)[torch.randperm(R, generator=g)].to(dev)  # top-2: every target row twice
    acc = torch.zeros(R // 2, W, device=dev)
    b16 = f32.to(torch.bfloat16)
    wcol = torch.rand(R, 1, generator=g).to(dev, torch.bfloat16)
    pair = torch.randn(R // 2, 2, W, generator=g).to(dev, torch.bfloat16)
    return {
        "norm_fwd": [lambda: aten.native_layer_norm(f32, [W], wn, bn, 1e-5)],
        "norm_bwd": [lambda: aten.native_layer_norm_backward(dy, f32, [W], mean, rstd, wn, bn, [True, True, True])],
        "act": [lambda: aten.gelu(hb), lambda: aten.gelu_backward(hb, hb)],
        "gather": [lambda: aten.index_select(f32, 0, idx)],
        "scatter": [lambda: acc.index_add_(0, idx2, f32)],
        "copy": [lambda: aten.index_copy(b16, 0, idx, b16), lambda: f32.new_zeros((R, W)),
                 lambda: aten.cat([b16, b16], 1)],
        "elem": [lambda: b16 * wcol, lambda: f32 + dy, lambda: pair.sum(1)],
        "cast": [lambda: f32.to(torch.bfloat16), lambda: b16.to(torch.float32)], "_f32": f32, "_b16": b16,
    }


def time_mem_classes(device: str = "cuda", rows: tuple = MEM_PROBE_ROWS, width: int = MEM_PROBE_WIDTH,
                     reps: int = 20) -> list[dict]:
    """Achieved HBM bytes/s of each memory-pass class (`MEM_CLASSES`) and of the fp32 <-> bf16 casts on ``device``: its kernels
    (`_mem_probe_ops`, at shapes of the paper configs, not of a validated run) timed back to back, their bytes
    counted as the recorder counts them (`_mem_pass`: inputs read, outputs written), -> ``MEM_RATE_COLUMNS``
    rows. What `simulator.train_host.mem_rates` reads to price the counted memory passes."""
    import statistics
    import time

    import torch

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    out = []
    for R in rows:
        ops = _mem_probe_ops(R, width, dev)
        for cls in RATE_CLASSES:
            if cls == "cast":  # read the source, write the copy
                nbytes = sum(t.numel() * (t.element_size() + o.element_size()) for t, o in
                             ((src, fn()) for src, fn in zip((ops["_f32"], ops["_b16"]), ops["cast"])))
            else:
                rec = _recorder({}, 1, set(), set())
                with rec:
                    for fn in ops[cls]:
                        fn()
                nbytes = sum(sum(op.mem[1].values()) for op in rec.seq if isinstance(op, _Op) and op.mem)
            for fn in ops[cls]:
                fn()
            sync()
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(reps):
                    for fn in ops[cls]:
                        fn()
                sync()
                times.append((time.perf_counter() - t) / reps)
            sec = statistics.median(times)
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
            out.append({"device": name, "class": cls, "rows": R, "width": width, "io_bytes": int(nbytes),
                        "time_s": f"{sec:.6g}", "GBps": f"{nbytes / sec / 1e9:.4g}"})
    return out


def count_all(configs=CONFIGS, backend: str = "torch", device: str = "cpu", errors: list | None = None,
              mem_out: list | None = None) -> list[dict]:
    from semoe.presets import model_preset

    rows = []
    for preset, over, adamw in configs:
        m = model_preset(preset).replace(**over) if over else model_preset(preset)
        try:
            rows.extend(count_step(m, adamw, backend, device, mem_out=mem_out))
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"{preset} {over} {adamw} {backend}: {type(e).__name__}: {e}")
            print(f"train_op_counts: {errors[-1]}", flush=True)
    return rows


def to_csv(rows: list[dict], columns: tuple = COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def diff(a: list[dict], b: list[dict]) -> list[str]:
    """Rows of table ``a`` that differ from ``b`` (same config and segment), as text."""
    def key(r):
        return (r["config"], r["segment"])

    ib = {key(r): r for r in b}
    cols = ("kernels", "syncs", "sync_op")
    out = []
    for r in a:
        o = ib.get(key(r))
        if o is None or any(str(r[c]) != str(o[c]) for c in cols):
            out.append(f"{' / '.join(key(r))}: {[r[c] for c in cols]} vs {[o[c] for c in cols] if o else 'missing'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="compare with the committed table, exit 1 if it differs")
    ap.add_argument("--device", default="cpu", help="cuda: count on the GPU (both MoE backends), write --out "
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
    mem_path = out.with_name(MEM_CSV.name)
    if a.check:
        for path, t in ((out, text), (mem_path, mem_text)):
            old = path.read_text() if path.is_file() else ""
            if old != t:
                print(f"train_op_counts: {path} differs from the reference code; rerun python -m simulator.train_op_counts",
                      file=sys.stderr)
                return 1
        print(f"train_op_counts: {out} and {mem_path.name} match the reference code")
        return 0
    from semoe.io import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    atomic_write_text(mem_path, mem_text)
    print(f"wrote {out} ({text.count(chr(10)) - 1} rows), {mem_path.name} ({mem_text.count(chr(10)) - 1} rows)")
    return 0


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
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(RATE_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(rates)
        rates_out.write_text(buf.getvalue())
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
    committed = list(csv.DictReader(OUT_CSV.open(newline=""))) if OUT_CSV.is_file() else []
    d = diff(rows, committed)
    print(f"train_op_counts: {device}: {len(rows)} rows in {time.time() - t0:.1f} s -> {out}, {rates_out.name}; "
          f"{len(d)} differ from {OUT_CSV.name}; {len(errors)} failed")
    for line in d:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
