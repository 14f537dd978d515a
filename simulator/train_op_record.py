"""What one aten operator of the reference trainer's step is, as `simulator.train_op_counts` counts it: a dispatch
mode (`_recorder`) that records every operator in order with whether it is a view (no kernel) or a host sync, the
bytes of an activation cast (`_classify_cast`) and the HBM bytes of any other non-GEMM kernel, a memory pass of a
class (`_mem_pass`, `MEM_CLASS`), per token and unit width (``D`` hidden, ``F`` ffn, ``V`` vocab, ``E`` experts,
``T`` per token: `CAST_UNITS`). `simulator.train_op_step` splits the recorded sequence into segments;
`simulator.torch_moe_layer` records the MoE layer alone with it.
"""

from __future__ import annotations

from dataclasses import dataclass

CAST_UNITS = ("D", "F", "V", "E", "T")
# the GEMM-class operators (the bulk of a segment's device work): ``lead`` counts the kernels before the first of them
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
# allocations that fill a new tensor (``zeros_like(x)``, ``x.new_zeros(...)``, ...): only their output is written;
# the tensor argument gives the shape / dtype and is not read
ALLOC_OPS = frozenset({"aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.new_zeros", "aten.new_ones",
                       "aten.new_full", "aten.zeros", "aten.ones", "aten.full"})
# the capacity ranks' cumsum is priced as a latency-bound scan (training.REF_RANK_SCAN_S_PER_ROW), not as bytes
MEM_SKIP = frozenset({"aten.cumsum"})


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
    for `WRITE_ONLY`; a filled allocation, `ALLOC_OPS`, only writes its output); parameter-shaped tensors (weights, their gradients) are left out, as for the casts
    (`simulator.workload.training` prices the parameter passes itself). None when nothing is counted."""
    import torch
    from torch.utils._pytree import tree_leaves

    ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if name in ALLOC_OPS:  # a filled allocation: its output written, its arguments not read
        traffic = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    elif name.endswith("_") and ins:  # in place: the first argument read and written (written only: WRITE_ONLY)
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
