"""Peak HBM of one rank of the reference trainer's step, from mechanisms counted on the reference code.

What `torch.cuda.max_memory_allocated` sees during a step of `reference.train` (or of
`reference.offload.bench`'s loop), as a sum of the tensors alive at the step's high points. Nothing here is
fitted to a measured peak: every term is a tensor the reference code allocates, sized from the model.

Model states, as allocated (`reference.train`: fp32 master parameters, bf16 autocast):
    params     4 B per local parameter (fp32 masters; the bf16 copies are autocast's, counted as activations)
    grads      4 B per local parameter (fp32: the casts' backward returns fp32 gradients to the fp32 leaves);
               alive during the forward when the optimizer's ``zero_grad(set_to_none=True)`` runs after it
               (`reference.train`: forward, zero_grad, backward) or when micro-batches accumulate
               (`reference.offload.bench`: zero_grad, then micro-batches)
    adam       8 B per local parameter (AdamW's exp_avg, exp_avg_sq, fp32; fused: no temporaries; foreach:
               its ``_foreach_sqrt`` / ``_foreach_div`` / ... results, ``ADAM_FOREACH_TEMP_BYTES`` per parameter
               at the optimizer step)
Offloaded experts (`reference.offload.ExpertOffload`, placement cpu / ssd): no fp32 expert state on the GPU;
    the pool of ``max(2, prefetch_depth + 1)`` slots of one layer's stacked 16-bit weights, and the gradient
    accumulators of every MoE layer until the step (a micro-batch's bf16 autograd gradient kept as is, turned
    into an fp32 sum by the next micro-batch: bf16 with one micro-batch, fp32 with several).
Activations saved for backward (`simulator.train_mem_count`'s table, counted from the autograd graph):
    per block ``T x sum_T + N x sum_N + params x sum_P`` (T tokens of the micro-batch, N routed rows the
    rank's experts receive, P the block's GEMM weights whose bf16 casts are saved; with the offload engine
    the expert weights are the pool's slots, not casts), and the head's (final norm, the bf16 input of
    the LM head, the cast of the tied embedding, the fp32 log-softmax [T, V]).
Loss buffers (`reference.model.MoEDecoder.forward`: bf16 logits, ``logits.float()``, cross-entropy):
    forward   bf16 logits 2 V B/token (kept by the returned ``ModelOutput``) + the fp32 copy 4 V B/token, with
              the saved fp32 log-softmax
    backward  nll_loss's fp32 gradient (4 V) and log_softmax's backward output (4 V) beside the saved
              log-softmax and the bf16 logits
    previous  the previous micro-batch's (or step's) ``ModelOutput`` keeps its bf16 logits until the next
              forward returns: 2 V B/token during the forward
Gradient buckets (`reference.comm.buckets.GradBuckets`, every run under a process group): each bucket's flat
    fp32 copy of its gradients (``cat`` or ``clone``) lives from its launch to ``finish()``: 4 B per bucketed
    parameter at the end of the backward.

Backward transient: the autograd engine releases a node's saved tensors after the node has run, so its
    outputs and its inputs coexist; the largest such moments are the MoE blocks' second expert GEMM
    backward (``torch._grouped_mm``'s node): dh [N, F] and dW [E_local, F, D] in bf16 beside the saved
    tensors of the blocks not yet done (the head's and the block's combine's already released), the
    gradients the later blocks left (when this backward creates them: fp32 gradients, the engine's
    accumulators), the fp32 [T, D] gradient of the residual stream and the combine's [N, D] gradient; and just
    after it, the block's gradients made and its experts' saved tensors released (found with
    `simulator.train_mem_count.track_step`'s live tracker of a real step on the CPU).
ZeRO-3 (`reference.parallel.zero3`): the dense states are shards over the node (1 / node size); the root unit
    (embeddings, final norm, the tied head) is gathered in full (fp32) for the whole forward and again for the
    head's backward; a block's gathered buffer dies with its forward (saved views become tags) and the
    backward re-gathers one or two blocks at a time (4 B x a block's dense parameters: small here, left out);
    only the experts' gradients go through buckets.

High points (`step_peak`, `POINTS`): ``forward_loss`` (end of the forward, in the loss), ``backward_loss`` (the
loss backward), ``backward_experts`` (the largest block moment above), ``end_backward`` (every gradient and
bucket), ``optimizer``; the peak is the largest. `simulator.workload.training.TrainingIteration` with
``impl="reference"`` allocates and frees the same tensors along its timeline, so its peak is this one.

A process that trains several times (`paper_repro.multigpu_run`'s variants) can start a run with earlier runs'
models still allocated (`leaked_state_bytes`, `multigpu_peak`).

Not modelled: the caching allocator's rounding (``max_memory_allocated`` counts blocks: requests rounded up to
512 B, and a block whose remainder is too small to split (<= 1 MiB in the large pool) is handed out whole, so up
to 1 MiB more per live tensor: a bound of ~0.1-0.3 GB for the few hundred tensors alive at these peaks, not a
derivable amount without replaying the allocator), NCCL's own buffers (outside the caching allocator), cuBLAS /
cuDNN workspaces.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from semoe import ModelSpec, ParallelPlan
from semoe.sizing import (
    attention_params,
    block_params,
    count_params,
    embedding_params,
    expert_params,
    router_params,
)

ROOT = Path(__file__).resolve().parent.parent
SAVED_CSV = ROOT / "results" / "profiles" / "train_mem_saved.csv"
MASTER_BYTES = 4  # fp32 master parameter
GRAD_BYTES = 4  # fp32 gradient of an fp32 leaf
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
# torch.optim.AdamW(foreach=True) step (torch/optim/adamw.py _multi_tensor_adamw, no capturable): the lists it
# allocates at once over all parameters of a group: exp_avg_sq_sqrt (4 B), then divided in place, and the
# bias-corrected step sizes are scalars: one fp32 temporary per parameter
ADAM_FOREACH_TEMP_BYTES = 4
BUCKET_BYTES = 4  # a bucket's flat fp32 copy of its gradients
LOGITS_BYTES = 2  # bf16 logits per token x vocab
LOSS_FP32_BYTES = 4  # logits.float(), nll_loss's gradient, log_softmax's backward output: fp32 [T, V] each
TRAINERS = ("train", "bench")
POINTS = ("forward_loss", "backward_loss", "backward_experts", "end_backward", "optimizer")


def _read(path: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["config"], []).append(r)
    return out


@lru_cache(maxsize=4)
def saved_table(path: Path = SAVED_CSV) -> dict[str, list[dict]]:
    """The committed saved-tensor table by config key (`simulator.train_mem_count.COLUMNS`)."""
    if not path.is_file():
        raise FileNotFoundError(f"train_memory: {path} is missing; run python -m simulator.train_mem_count")
    return _read(path)


def config_key(m: ModelSpec) -> str:
    """The code path of model ``m`` whose saved tensors the table holds (widths and layer count left out); torch-free,
    so `simulator.train_mem_count` (the counter) imports it from here."""
    cap = "none" if m.capacity_factor is None else f"{m.capacity_factor:g}"
    parts = [f"k{m.top_k}", m.gate, f"cap{cap}", m.activation, m.norm, m.position]
    for flag, name in ((m.tied_embeddings, "tied"), (m.bias, "bias"), (m.moe_every != 1, f"dense{m.moe_every}"),
                       (m.shared_experts, f"shared{m.shared_experts}")):
        if flag:
            parts.append(name)
    return " ".join(parts)


def unit_widths(m: ModelSpec) -> dict[str, int]:
    """The value of each unit of the table (``D``, ``F``, ``V``, ``E``, ``kE``, ``k``, ``H``, ``1``) for model ``m``."""
    return {"D": m.hidden, "F": m.ffn, "V": m.vocab, "E": m.experts, "kE": m.top_k * m.experts, "k": m.top_k,
            "H": m.heads, "1": 1}


@dataclass(frozen=True)
class SavedCoeffs:
    """Saved bytes of ``m``'s code path: per region, bytes per token (``T``), per routed row (``N``), per cast
    parameter (``P``) and per call (``C``)."""

    key: str
    T: dict[str, float] = field(default_factory=dict)
    N: dict[str, float] = field(default_factory=dict)
    P: dict[str, float] = field(default_factory=dict)
    C: dict[str, float] = field(default_factory=dict)
    ND: dict[str, float] = field(default_factory=dict)  # the [N, D]-shaped part of N (bytes per routed row)


def saved_coeffs(m: ModelSpec, table: dict[str, list[dict]] | None = None) -> SavedCoeffs:
    """``m``'s widths applied to its code path's counted rows. A code path the table lacks: ValueError naming
    the key (count it with ``python -m simulator.train_mem_count``)."""
    table = saved_table() if table is None else table
    key = config_key(m)
    if key not in table:
        raise ValueError(f"train_memory: no saved-tensor counts for the code path '{key}' in {SAVED_CSV.name} "
                         f"(counted: {sorted(table)}); add it to simulator.train_mem_count.CONFIGS")
    w = unit_widths(m)
    c = SavedCoeffs(key)
    for r in table[key]:
        b = float(r["bytes_per_unit"]) * w[r["unit"]]
        d = {"T": c.T, "N": c.N, "P": c.P, "1": c.C}[r["rows"]]
        d[r["region"]] = d.get(r["region"], 0.0) + b
        if r["rows"] == "N" and r["unit"] == "D":
            c.ND[r["region"]] = c.ND.get(r["region"], 0.0) + b
    return c


BLOCK_REGIONS = ("norm1", "attn", "norm2", "gate", "experts", "ffn", "block")
HEAD_REGIONS = ("final_norm", "head", "embedding")


def block_saved_bytes(m: ModelSpec, tokens: float, routed_rows: float, local_experts: int,
                      expert_casts: bool = True, coeffs: SavedCoeffs | None = None) -> float:
    """Bytes one MoE block saves for backward: ``tokens`` of the micro-batch, ``routed_rows`` reaching this
    rank's ``local_experts``; ``expert_casts``: the experts' bf16 weights are casts saved by the GEMMs (False:
    the offload engine's pool slots, already counted)."""
    c = coeffs or saved_coeffs(m)
    params = {"attn": attention_params(m), "gate": router_params(m),
              "experts": local_experts * expert_params(m) if expert_casts else 0}
    b = 0.0
    for r in BLOCK_REGIONS:
        b += tokens * c.T.get(r, 0.0) + routed_rows * c.N.get(r, 0.0) + c.C.get(r, 0.0)
        b += params.get(r, 0) * c.P.get(r, 0.0)
    return b


def head_saved_bytes(m: ModelSpec, tokens: float, coeffs: SavedCoeffs | None = None) -> float:
    """Bytes the final norm, the LM head, the loss and the embedding save (the tied head's bf16 weight cast:
    per vocabulary x hidden parameter)."""
    c = coeffs or saved_coeffs(m)
    b = sum(tokens * c.T.get(r, 0.0) + c.C.get(r, 0.0) for r in HEAD_REGIONS)
    return b + m.vocab * m.hidden * c.P.get("head", 0.0)


@dataclass(frozen=True)
class MemoryPeak:
    """Bytes of one rank: ``parts`` (each mechanism's tensors), ``points`` (the live total at each high point of
    the step, `POINTS`), ``peak`` = the largest, at ``point``."""

    parts: dict[str, float]
    points: dict[str, float]
    layers: list = field(default_factory=list)  # per MoE block: act, transient, combine_saved, *_growth

    @property
    def point(self) -> str:
        return max(self.points, key=self.points.get)

    @property
    def peak(self) -> float:
        return self.points[self.point]


def step_peak(m: ModelSpec, plan: ParallelPlan, *, tokens: float, routed_rows, micro_batches: int = 1,
              trainer: str = "train", optimizer: str = "fused", process_group: bool | None = None) -> MemoryPeak:
    """Peak HBM of one rank of the reference trainer (module docstring). ``tokens``: tokens of one
    micro-batch on this rank; ``routed_rows``: rows this rank's experts receive in each MoE layer (a sequence,
    one per MoE layer); ``trainer``: ``"train"`` (`reference.train`) or ``"bench"`` (`reference.offload.bench`'s
    loop); ``optimizer``: the GPU AdamW, ``fused`` or ``foreach``; ``process_group``: the run went through
    `reference.parallel` (gradient buckets), default: when ``plan`` has more than one rank."""
    if trainer not in TRAINERS:
        raise ValueError(f"train_memory: trainer must be one of {TRAINERS}, got {trainer!r}")
    if optimizer not in ("fused", "foreach"):
        raise ValueError(f"train_memory: optimizer must be fused or foreach, got {optimizer!r}")
    if plan.zero_stage in (1, 2):
        raise ValueError(f"train_memory: ZeRO stage {plan.zero_stage} is not what the reference trainer runs (0 or 3)")
    if plan.offload.dense_params != "gpu" or plan.offload.dense_optimizer != "gpu":
        raise ValueError("train_memory: dense states off the GPU are not what the reference trainer runs")
    routed = [float(x) for x in routed_rows]
    if len(routed) != m.moe_layers:
        raise ValueError(f"train_memory: routed_rows has {len(routed)} entries, the model {m.moe_layers} MoE layers")
    if m.moe_layers != m.layers:
        raise ValueError("train_memory: dense FFN blocks are not counted (moe_every must be 1)")
    c = saved_coeffs(m)
    EP = plan.expert_parallel
    local = m.experts // EP
    pc = count_params(m)
    expert_local = local * expert_params(m) * m.moe_layers
    offloaded = plan.offload.expert_params != "gpu" or plan.offload.expert_optimizer != "gpu"
    zero3 = plan.zero_stage == 3
    node = plan.gpus_per_node or plan.world_size
    dense_local = -(-pc.dense // node) if zero3 else pc.dense  # reference.parallel.zero3: shards over the node
    gpu_params = dense_local + (0 if offloaded else expert_local)
    T = float(tokens)
    V = m.vocab
    acts = [block_saved_bytes(m, T, n, local, expert_casts=not offloaded, coeffs=c) for n in routed]
    per_layer = local * expert_params(m)
    # the engine's accumulators (reference.offload.ExpertOffload._on_grad): a micro-batch's bf16 autograd gradient
    # is kept as is, the next one converts it to fp32 and adds (a new fp32 tensor, the bf16 one freed); emptied by
    # the engine's step. In the last micro-batch: present at its start (0 / bf16 / fp32 for 1 / 2 / more
    # micro-batches), grown by each block's backward (bf16 created, or bf16 -> fp32), fp32 (or bf16) at the end
    acc_start = (0.0 if micro_batches == 1 else 2.0 if micro_batches == 2 else 4.0) * per_layer if offloaded else 0.0
    acc_grow = (2.0 * per_layer if micro_batches <= 2 else 0.0) if offloaded else 0.0
    acc_end = ((4.0 if micro_batches > 1 else 2.0) * per_layer) if offloaded else 0.0
    grads_bwd = micro_batches > 1  # fp32 .grad tensors exist at the last micro-batch's backward
    # per MoE block (backward order is reversed): its saved bytes; at its second expert GEMM's backward
    # (torch._grouped_mm's node) the node's outputs dh [N, F] and dW [E_local, F, D] (bf16) exist before it
    # releases its saved tensors, beside the gradients flowing in (the fp32 [T, D] residual gradient, the
    # combine's [N, D] bf16 one), the combine's saved [N, D] rows already released; the gradients the block
    # leaves behind: fp32 for its dense (and GPU-resident expert) weights when this backward creates them, the
    # engine's accumulator growth
    layers = [{"act": a,
               "transient": GRAD_BYTES * m.hidden * T + 2.0 * m.hidden * n + 2.0 * m.ffn * n
               + 2.0 * local * m.ffn * m.hidden,
               "combine_saved": c.ND.get("ffn", 0.0) * n,
               # released when the experts' backward is done: the expert GEMMs' saved inputs and activations
               "expert_saved": n * c.N.get("experts", 0.0) + c.C.get("experts", 0.0)
               + (0.0 if offloaded else local * expert_params(m) * c.P.get("experts", 0.0)),
               "grad_growth": GRAD_BYTES * block_params(m, i)["dense"] * dense_local / pc.dense
               + (0.0 if offloaded else GRAD_BYTES * per_layer),
               "acc_growth": acc_grow}
              for i, (a, n) in enumerate(zip(acts, routed))]
    parts = {
        "params": MASTER_BYTES * gpu_params,
        "grads": GRAD_BYTES * gpu_params,
        "adam": ADAM_BYTES * gpu_params,
        "expert_pool": 0.0,
        "expert_grad_acc": acc_end * m.moe_layers,
        "expert_grad_acc_start": acc_start * m.moe_layers,
        "acc_layer_bf16": 2.0 * per_layer if offloaded else 0.0,  # one layer's bf16 accumulator (or its growth)
        "activations": sum(acts) + head_saved_bytes(m, T, c),
        "logits": LOGITS_BYTES * T * V,
        "loss_fwd_fp32": LOSS_FP32_BYTES * T * V,
        "loss_bwd_fp32": 2 * LOSS_FP32_BYTES * T * V,
        "prev_logits": LOGITS_BYTES * T * V,
        "buckets": 0.0,
        "bwd_expert_transient": layers[-1]["transient"] if layers else 0.0,  # the last block's (see layers)
        "head_saved": head_saved_bytes(m, T, c),
        "combine_saved": layers[-1]["combine_saved"] if layers else 0.0,
        "adam_temp": ADAM_FOREACH_TEMP_BYTES * gpu_params if optimizer == "foreach" else 0.0,
    }
    if offloaded:
        parts["expert_pool"] = 2.0 * per_layer * max(2, plan.prefetch_depth + 1)
    pg = plan.world_size > 1 if process_group is None else process_group
    if pg:  # ZeRO-3: the dense shards' gradients come from the gathers' reduce-scatter, not from buckets
        parts["buckets"] = BUCKET_BYTES * (gpu_params - dense_local if zero3 else gpu_params)
    # ZeRO-3: the root unit (embeddings, final norm: the tied head) is gathered in full (fp32) for the whole
    # forward and re-gathered for the head's backward
    parts["zero3_root"] = MASTER_BYTES * embedding_params(m) if zero3 else 0.0
    static = parts["params"] + parts["adam"] + parts["expert_pool"]
    # fp32 gradients alive in the last micro-batch's forward (reference.train: last step's, until zero_grad)
    grads_fwd = trainer == "train" or micro_batches > 1
    acc0, acc = parts["expert_grad_acc_start"], parts["expert_grad_acc"]
    act = parts["activations"]
    points = {
        "forward_loss": static + grads_fwd * parts["grads"] + acc0 + act + parts["logits"] + parts["loss_fwd_fp32"]
        + parts["prev_logits"] + parts["zero3_root"],
        "backward_loss": static + grads_bwd * parts["grads"] + acc0 + act + parts["logits"] + parts["loss_bwd_fp32"]
        + parts["zero3_root"],
        # the largest block backward (the head's saved tensors and the loss buffers released by then)
        "backward_experts": _backward_blocks(layers, static + grads_bwd * parts["grads"] + acc0 + parts["logits"],
                                             grow=not grads_bwd),
        "end_backward": static + parts["grads"] + acc + parts["buckets"] + parts["logits"],
        "optimizer": static + parts["grads"] + acc + parts["adam_temp"] + parts["logits"],
    }
    return MemoryPeak(parts=parts, points=points, layers=layers)


def _backward_blocks(layers: list[dict], base: float, grow: bool) -> float:
    """The largest live total over the blocks' expert backward, last block first: blocks ``< i`` still hold
    their saved tensors, blocks ``> i`` have left their gradients (when they are created in this backward); block
    ``i`` in its expert GEMM's backward (the transient), then just after it (its gradients made, its experts'
    saved tensors released, the rest of the block's still held)."""
    best, grown = 0.0, 0.0
    for i in reversed(range(len(layers))):
        L = layers[i]
        alive = sum(x["act"] for x in layers[: i + 1]) - L["combine_saved"]
        best = max(best, base + grown + alive + L["transient"])  # in the expert GEMM's backward
        grown += L["acc_growth"] + (L["grad_growth"] if grow else 0.0)
        best = max(best, base + grown + alive - L["expert_saved"])  # after it: the block's gradients made
    return best


def run_peak(run, tokens_in=None, trainer: str = "train", optimizer: str = "fused",
             process_group: bool | None = None) -> MemoryPeak:
    """`step_peak` of a `semoe.Run` (its plan, micro-batch, micro-batches); ``tokens_in``: rows the rank's
    experts receive per MoE layer (default: tokens x top_k, balanced)."""
    m, w = run.model, run.workload
    T = w.micro_batch * w.seq_len
    if tokens_in is None:  # balanced: EP ranks each send k T E_local / E rows to this rank's experts
        tokens_in = [float(T * m.top_k)] * m.moe_layers
    return step_peak(m, run.plan, tokens=T, routed_rows=tokens_in, micro_batches=w.micro_batches, trainer=trainer,
                     optimizer=optimizer, process_group=process_group)


# ------------------------------------------------------------------------------- multi-GPU training rows
RESERVED_NOTE = ("max_memory_reserved = allocated + the caching allocator's cached free segments (its 2 MiB / 20 MiB "
                 "segment rounding and fragmentation over the run): not modelled")


def leaked_state_bytes(m: ModelSpec, plan: ParallelPlan) -> float:
    """Bytes a finished `reference.train` run can leave allocated in its process: its model's fp32 parameters and
    gradients (8 B per local parameter; AdamW's moments die with the optimizer). `reference.parallel.zero3` keeps
    its model alive through autograd nodes that hold Python closures (a cycle through C++ the garbage collector
    cannot see: a CPU test shows the model of a finished ZeRO-3 run still alive); ``zero_stage`` 3 holds the dense
    shards (1 / node size) and the local experts."""
    pc = count_params(m)
    local_experts = (m.experts // plan.expert_parallel) * expert_params(m) * m.moe_layers
    dense = pc.dense
    if plan.zero_stage == 3:
        node = plan.gpus_per_node or plan.world_size
        dense = -(-dense // node)
    return (MASTER_BYTES + GRAD_BYTES) * (dense + local_experts)


def multigpu_peak(summary: dict, metric: str, earlier_leaked_bytes: float = 0.0,
                  score_leaked: bool = False) -> tuple[float | None, str, str]:
    """(predicted bytes, status, note) of a multi-GPU training row ``metric`` (``peak_mem_allocated_bytes``,
    ``..._max``, ``peak_mem_reserved_bytes``, with or without `` rankN``) from `TrainingIteration`'s ``summary``
    (``impl="reference"``, ``grad_sync=True``: `simulator.validate_multigpu.simulate_train`).
    ``earlier_leaked_bytes``: bytes earlier runs of the same process left allocated (`leaked_state_bytes` of each;
    `paper_repro.multigpu_run` trains zero0_bucket0, zero0_bucket<B>, zero3_bucket0, zero3_bucket<B> in one
    process): added to the prediction, and the row is not scored (a property of the harness, not of the step)
    unless ``score_leaked`` (once a GPU run has confirmed the leak: ``train_mem_count --probe``'s leak rows)."""
    base = metric.split()[0]
    pred = float(summary["peak_hbm_bytes"])
    if summary.get("hbm_model") != "reference":
        return pred, "not_modelled", f"the step's peak is not modelled: {summary.get('hbm_model_note', '')}"
    pts = summary.get("hbm_points", {})
    point = max(pts, key=pts.get) if pts else "?"
    parts = summary.get("hbm_parts", {})
    what = ", ".join(f"{k} {parts[k] / 1e9:.2f}" for k in ("params", "grads", "adam", "activations", "logits",
                                                           "loss_fwd_fp32", "buckets") if parts.get(k))
    note = f"simulator.train_memory: peak at {point} ({what} GB)"
    if base == "peak_mem_reserved_bytes":
        return pred + earlier_leaked_bytes, "not_modelled", RESERVED_NOTE
    if not base.startswith("peak_mem_allocated_bytes"):
        return None, "not_modelled", f"train_memory: unknown memory metric {metric!r}"
    if earlier_leaked_bytes:
        return (pred + earlier_leaked_bytes, "validated" if score_leaked else "not_modelled",
                note + f"; plus {earlier_leaked_bytes / 1e9:.2f} GB left allocated by the process's earlier runs "
                       "(their fp32 parameters and gradients)" + ("" if score_leaked else ": not scored"))
    return pred, "validated", note
