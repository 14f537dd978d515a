"""Distillation of an MoE into fewer experts (Mixture-of-Students; SE-MoE's deployment pipeline,
DeepSpeed-MoE's "MoS"), with student experts initialised by merging teacher experts.

Shape legend: B batch, S sequence, V vocab, T = B*S tokens, D model dim, E teacher experts,
G = E_small student experts (groups of teacher experts), k top-k.

Pipeline (``distill``)::

    teacher (trained: a `semoe train --out DIR` checkpoint, or trained here for --teacher-steps)
      -> calibration batch: routing statistics per MoE block       (routing_similarity)
      -> group the E experts into G groups by similarity            (group_experts)
      -> student = teacher's dense weights + merged experts/router  (merge_into_student)
      -> train the student with  loss = alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE + aux
      -> held-out loss of teacher, merged init, distilled student, and a same-size student trained
         from scratch (LM loss only, same steps, same data order)  -> OUT/distill.csv

CSV rows (``model``): ``teacher``; ``teacher_int8`` / ``teacher_fp8`` (the teacher with quantized
experts, reference/inference/quantize.py; logit error against the teacher); ``merged_init`` (the
student before training); ``distilled``; ``scratch``; and with ``controls``: ``merged_lm`` (the merged
student trained with the LM loss only, alpha = 0: separates the effect of the KD term from that of the
initialisation) and ``teacher_plus`` (the teacher trained ``steps`` more LM steps with a fresh warm-up
and cosine: the student starts from the teacher's dense weights, so it has had teacher_steps + steps of
training; this row says how much of a student's gain over the teacher is just that).

Distillation loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", sec. 2):
``p^T = softmax(logits / T)``; ``KL(p_t^T || p_s^T)`` per token, averaged over tokens, multiplied by
``T^2`` so that its gradient scale does not depend on T; defaults ``T = 2``, ``alpha = 0.5``.
The teacher runs in eval mode without gradients.

Grouping (our choice, documented): the similarity of two experts of one block is either

* ``router`` (default): the cosine similarity of their router rows ``W_e`` (the gate computes
  ``logits = x W^T``, so experts with parallel rows receive the same tokens), or
* ``coact``: co-activation on the calibration batch: ``C[i, j]`` = tokens that route to both i and j
  in their top-k, normalised ``C[i, j] / sqrt(C[i, i] C[j, j])`` (the cosine of the 0/1 selection
  columns). With top-k = 1 this is 0 off the diagonal, so the fallback there is the cosine of the
  routing probability columns ``probs_TE[:, e]``.

Groups come from average-linkage agglomerative clustering on the similarity, with at most
``ceil(E / G)`` experts per group (so no student expert absorbs most of the block).
Merging: every tensor of a student expert (w1, w2, w3, biases) and its router row are the average of
the group's teacher tensors weighted by each expert's usage (selection count on the calibration batch
+ 1). Weight averaging of FFNs is only an initialisation (hidden units of different experts are not
aligned); distillation then trains it. Dense weights (embeddings, attention, norms, dense FFNs,
shared experts) are copied from the teacher unchanged.

Held-out data: the last ``heldout_frac`` (10%) of the byte corpus is never used for training; the loss
is the mean LM loss over ``eval_batches`` fixed windows of it (same windows for every model).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from reference.data import ByteCorpus
from reference.model import MoEDecoder
from reference.train import TrainConfig, after_step, lr_at, make_optimizer
from semoe.model_spec import ModelSpec
from semoe.io import git_commit  # noqa: F401 (re-exported)

MERGE_METHODS = ("router", "coact", "none")
CSV_COLUMNS = ("date", "commit", "device", "teacher", "model", "experts", "top_k", "params", "steps",
               "heldout_loss", "delta_vs_teacher", "logit_err_max", "logit_err_rms", "expert_bytes",
               "merge", "temperature", "alpha", "seed", "train_s")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    experts: int  # E_small
    steps: int = 100
    teacher_steps: int = 200  # when the teacher is a preset or a directory without a checkpoint
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 5
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the KD term; 1 - alpha on the LM loss
    merge: str = "router"
    calib_batches: int = 4
    eval_batches: int = 8
    heldout_frac: float = 0.1
    data: Path | None = None
    seed: int = 0
    device: str = "cpu"
    quant: tuple[str, ...] = ("int8", "fp8")  # also report the teacher with quantized experts
    controls: bool = True  # also report merged_lm and teacher_plus (module doc)

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ValueError(f"DistillConfig.experts ({self.experts}) must be >= 1")
        for name in ("steps", "batch_size", "seq_len", "calib_batches", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"DistillConfig.{name} ({getattr(self, name)}) must be >= 1")
        if self.teacher_steps < 0:
            raise ValueError(f"DistillConfig.teacher_steps ({self.teacher_steps}) must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature ({self.temperature}) must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillConfig.alpha ({self.alpha}) must be in [0, 1]")
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"DistillConfig.merge ({self.merge!r}) must be one of {MERGE_METHODS}")
        if not 0.0 < self.heldout_frac < 1.0:
            raise ValueError(f"DistillConfig.heldout_frac ({self.heldout_frac}) must be in (0, 1)")

    def train_config(self, steps: int) -> TrainConfig:
        return TrainConfig(steps=max(1, steps), batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           warmup_steps=min(self.warmup_steps, max(1, steps)), seed=self.seed,
                           device=self.device, progress=False)


# ------------------------------------------------------------------------------------------ data
def split_corpus(corpus: ByteCorpus, heldout_frac: float) -> tuple[ByteCorpus, ByteCorpus]:
    """(train, held-out): the first ``1 - heldout_frac`` of the bytes and the rest."""
    cut = int(len(corpus) * (1 - heldout_frac))
    parts = []
    for data in (corpus.data[:cut], corpus.data[cut:]):
        part = ByteCorpus.__new__(ByteCorpus)
        part.path, part.data = corpus.path, data
        parts.append(part)
    return parts[0], parts[1]


@torch.no_grad()
def _amp(model: MoEDecoder):
    """bf16/fp16 autocast on a CUDA GPU for a bf16/fp16 spec, as `reference.train` does (fp32 master weights);
    a no-op on the CPU, so CPU results are unchanged."""
    dev = next(model.parameters()).device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(model.spec.dtype) if dev.type == "cuda" else None
    return torch.autocast(dev.type, dtype=amp, enabled=amp is not None)


def _wide(t: Tensor) -> Tensor:
    """16-bit logits (autocast) to fp32 for the KD softmax; fp32/fp64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def heldout_loss(model: MoEDecoder, data: ByteCorpus, cfg: DistillConfig) -> float:
    """Mean LM loss over ``cfg.eval_batches`` fixed windows of ``data`` (seeded: same for every model)."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    dev = next(model.parameters()).device
    total = 0.0
    for _ in range(cfg.eval_batches):
        x, y = data.batch(cfg.batch_size, cfg.seq_len, gen)
        with _amp(model):
            total += float(model(x.to(dev), y.to(dev)).lm_loss)
    model.train(was)
    return total / cfg.eval_batches


@torch.no_grad()
def logit_error(model: MoEDecoder, ref: MoEDecoder, data: ByteCorpus, cfg: DistillConfig) -> tuple[float, float]:
    """(max, rms) of ``logits(model) - logits(ref)`` over the first held-out evaluation batch."""
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    x, _ = data.batch(cfg.batch_size, cfg.seq_len, gen)
    dev = next(model.parameters()).device
    model.eval(), ref.eval()
    with _amp(model):
        d = model(x.to(dev)).logits_BSV.double() - ref(x.to(dev)).logits_BSV.double()
    return float(d.abs().max()), float(d.pow(2).mean().sqrt())


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_tokens KL(softmax(t / T) || softmax(s / T))`` (Hinton et al. 2015)."""
    V = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def train_model(model: MoEDecoder, data: ByteCorpus, steps: int, cfg: DistillConfig,
                teacher: MoEDecoder | None = None) -> float:
    """AdamW with the reference's warm-up + cosine schedule for ``steps`` steps (data order seeded by
    ``cfg.seed``, the same for every model). With ``teacher``: the KD + LM loss. Returns seconds."""
    if steps <= 0:
        return 0.0
    tcfg = cfg.train_config(steps)
    opt = make_optimizer(model, tcfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = next(model.parameters()).device
    if teacher is not None:
        teacher.eval()
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tcfg)
        x, y = data.batch(cfg.batch_size, cfg.seq_len, gen)
        x, y = x.to(dev), y.to(dev)
        with _amp(model):
            out = model(x, y)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad(), _amp(teacher):
                t_logits = teacher(x).logits_BSV
            kd = kd_loss(_wide(out.logits_BSV), _wide(t_logits), cfg.temperature)
            loss = cfg.alpha * kd + (1 - cfg.alpha) * out.lm_loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        after_step(model, out, tcfg)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"distill: loss became {float(loss.detach())} at step {step}")
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- grouping
@torch.no_grad()
def routing_stats(model: MoEDecoder, data: ByteCorpus, cfg: DistillConfig) -> list[dict[str, Tensor]]:
    """Per MoE block, on ``cfg.calib_batches`` training batches: ``probs_TE`` (routing probabilities)
    and ``selected_TE`` (0/1 top-k selection)."""
    layers = model.moe_layers()
    captured: list[list[Tensor]] = [[] for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, out, i=i):
            captured[i].append((out.probs_TE.detach().float(), out.expert_ids_TK.detach(), out.kept_TK.detach()))
        hooks.append(layer.gate.register_forward_hook(hook, with_kwargs=True))
    gen = torch.Generator().manual_seed(20_000 + cfg.seed)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        for _ in range(cfg.calib_batches):
            x, _ = data.batch(cfg.batch_size, cfg.seq_len, gen)
            with _amp(model):
                model(x.to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    stats = []
    for layer, caps in zip(layers, captured):
        E = layer.spec.experts
        probs = torch.cat([c[0] for c in caps])
        sel = torch.zeros_like(probs)
        for (_, ids, kept), start in zip(caps, torch.tensor([0] + [c[0].shape[0] for c in caps]).cumsum(0)):
            rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids) + int(start)
            sel[rows[kept], ids[kept]] = 1.0
        assert sel.shape[1] == E
        stats.append({"probs_TE": probs, "selected_TE": sel})
    return stats


def _cosine(cols_NE: Tensor) -> Tensor:
    n = cols_NE.norm(dim=0).clamp_min(1e-12)
    return (cols_NE.T @ cols_NE) / (n[:, None] * n[None, :])


def routing_similarity(layer, stats: dict[str, Tensor], method: str) -> Tensor:
    """``[E, E]`` similarity of one block's experts (module doc: ``router`` or ``coact``)."""
    if method == "router" and getattr(layer.gate, "router", None) is not None:
        return _cosine(layer.gate.router.weight.detach().double().T)
    sel = stats["selected_TE"].double()
    if layer.spec.top_k > 1:
        return _cosine(sel)
    return _cosine(stats["probs_TE"].double())


def group_experts(sim_EE: Tensor, groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of E experts into ``groups`` groups of at most
    ``ceil(E / groups)`` experts; ties broken by the lowest indices (deterministic). Groups sorted
    by their smallest member."""
    E = sim_EE.shape[0]
    if not 1 <= groups <= E:
        raise ValueError(f"group_experts: groups ({groups}) must be in [1, {E}]")
    cap = math.ceil(E / groups)
    clusters = [[e] for e in range(E)]
    sim = sim_EE.double()
    while len(clusters) > groups:
        best, pair = -math.inf, None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                if len(clusters[a]) + len(clusters[b]) > cap:
                    continue
                sizes = [len(c) for i, c in enumerate(clusters) if i not in (a, b)] + [len(clusters[a]) + len(clusters[b])]
                if not _packable(sizes, groups, cap):  # e.g. sizes 3, 3, 2 into 2 groups of 4: a dead end
                    continue
                s = float(sim[clusters[a]][:, clusters[b]].mean())
                if s > best + 1e-12 or pair is None:  # "or": NaN similarities still merge
                    best, pair = s, (a, b)
        if pair is None:  # no merge keeps a packing (first-fit is not exact): merge the two smallest
            order = sorted(range(len(clusters)), key=lambda i: (len(clusters[i]), i))
            pair = tuple(sorted(order[:2]))
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


def _packable(sizes: list[int], bins: int, cap: int) -> bool:
    """Whether clusters of these sizes fit into ``bins`` groups of at most ``cap`` (first-fit decreasing)."""
    load = [0] * bins
    for n in sorted(sizes, reverse=True):
        i = next((i for i, x in enumerate(load) if x + n <= cap), None)
        if i is None:
            return False
        load[i] += n
    return True


def student_spec(spec: ModelSpec, experts: int) -> ModelSpec:
    """The teacher's spec with ``experts`` experts (top-k capped at it)."""
    if experts > spec.experts:
        raise ValueError(f"distill: --experts ({experts}) must be <= the teacher's experts ({spec.experts})")
    return spec.replace(name=f"{spec.name}-E{experts}", experts=experts, top_k=min(spec.top_k, experts))


@torch.no_grad()
def merge_into_student(teacher: MoEDecoder, sspec: ModelSpec, groups_per_block: list[list[list[int]]],
                       usage_per_block: list[Tensor], seed: int = 0) -> MoEDecoder:
    """A student of ``sspec`` with the teacher's dense weights and, per MoE block, student expert g =
    the usage-weighted average of the teacher experts ``groups[g]`` (weights and router rows)."""
    ref = next(teacher.parameters())
    student = MoEDecoder(sspec, seed=seed).to(device=ref.device, dtype=ref.dtype)
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    t_moe = {f"blocks.{b.index}." for b in teacher.blocks if b.is_moe}
    for name, val in s_state.items():
        routed = any(name.startswith((p + "ffn.experts.", p + "ffn.gate.")) for p in t_moe)
        if not routed:
            val.copy_(t_state[name])
    for layer_t, layer_s, groups, usage in zip(teacher.moe_layers(), student.moe_layers(),
                                               groups_per_block, usage_per_block):
        w = usage.double() + 1.0
        for pname, p_s in layer_s.experts.named_parameters():
            p_t = getattr(layer_t.experts, pname).detach().double()
            for g, members in enumerate(groups):
                wg = w[members] / w[members].sum()
                p_s[g] = torch.einsum("e,e...->...", wg, p_t[members]).to(p_s.dtype)
        r_t, r_s = getattr(layer_t.gate, "router", None), getattr(layer_s.gate, "router", None)
        if r_t is not None and r_s is not None:
            for g, members in enumerate(groups):
                wg = w[members] / w[members].sum()
                r_s.weight[g] = (wg[:, None] * r_t.weight[members].double()).sum(0).to(r_s.weight.dtype)
    return student


# ----------------------------------------------------------------------------------- the teacher
def load_teacher(teacher: str, cfg: DistillConfig, train_data: ByteCorpus) -> tuple[MoEDecoder, str]:
    """``teacher`` is a directory of `semoe train --out DIR` (model.yaml; weights from its latest
    checkpoint in DIR/checkpoints, else trained here for ``cfg.teacher_steps``), or a preset / YAML
    trained here for ``cfg.teacher_steps``. Returns (model, how it was obtained)."""
    from semoe.presets import load_model

    path = Path(teacher)
    if path.is_dir():
        if not (path / "model.yaml").is_file():
            raise FileNotFoundError(f"teacher directory {path} has no model.yaml (not a `semoe train --out` directory)")
        spec = ModelSpec.from_yaml(path / "model.yaml")
        model = MoEDecoder(spec, seed=cfg.seed).to(torch.device(cfg.device))
        from reference.checkpoint import latest_checkpoint, load_checkpoint

        ckpt = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
        if ckpt is not None:
            load_checkpoint(ckpt, model, restore_rng=False)
            return model, f"checkpoint {ckpt}"
        if cfg.teacher_steps < 1:
            raise ValueError(f"teacher directory {path} has no checkpoint (train with --checkpoint-every) "
                             "and --teacher-steps is 0")
    else:
        spec = load_model(teacher)
        model = MoEDecoder(spec, seed=cfg.seed).to(torch.device(cfg.device))
        if cfg.teacher_steps < 1:
            raise ValueError(f"teacher preset {teacher!r} needs --teacher-steps >= 1 (it is trained here)")
    if spec.dtype == "fp64":
        model = model.double()
    train_model(model, train_data, cfg.teacher_steps, cfg)
    return model, f"trained here for {cfg.teacher_steps} steps"


# --------------------------------------------------------------------------------------- results
@dataclass
class DistillResult:
    rows: list[dict] = field(default_factory=list)
    groups: list[list[list[int]]] = field(default_factory=list)
    teacher_source: str = ""

    def loss(self, model: str) -> float:
        return next(r["heldout_loss"] for r in self.rows if r["model"] == model)

    def table(self) -> str:
        head = f"{'model':<16}{'experts':>8}{'params':>10}{'steps':>7}{'held-out loss':>15}{'vs teacher':>12}"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['model']:<16}{r['experts']:>8}{r['params']:>10,}{r['steps']:>7}"
                         f"{r['heldout_loss']:>15.4f}{r['delta_vs_teacher']:>+12.4f}")
        return "\n".join(lines)



def _expert_bytes(model: MoEDecoder, fmt: str | None) -> int:
    from reference.inference.quantize import expert_weight_params, quantize

    total = 0
    for _, p in expert_weight_params(model):
        total += p.numel() * 2 if fmt is None else quantize(p, fmt).nbytes  # bf16 storage as the baseline
    return total


def distill(teacher: str, cfg: DistillConfig, out: Path | None = None) -> DistillResult:
    """Run the whole pipeline (module doc); write ``out/distill.csv`` when ``out`` is given."""
    import copy

    from reference.inference.quantize import quantize_model_experts_

    corpus = ByteCorpus(cfg.data)
    train_data, held = split_corpus(corpus, cfg.heldout_frac)
    dev = torch.device(cfg.device)
    tmodel, source = load_teacher(teacher, cfg, train_data)
    tmodel.eval()
    tspec = tmodel.spec
    sspec = student_spec(tspec, cfg.experts)
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    device_name = "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    common = {"date": date, "commit": git_commit(), "device": device_name, "teacher": f"{tspec.name}:{teacher}",
              "merge": cfg.merge, "temperature": cfg.temperature, "alpha": cfg.alpha, "seed": cfg.seed}
    res = DistillResult(teacher_source=source)
    t_loss = heldout_loss(tmodel, held, cfg)

    def row(model_name, m, steps, loss, train_s=0.0, logit=(0.0, 0.0), fmt=None):
        res.rows.append({**common, "model": model_name, "experts": m.spec.experts, "top_k": m.spec.top_k,
                         "params": sum(p.numel() for p in m.parameters()), "steps": steps,
                         "heldout_loss": loss, "delta_vs_teacher": loss - t_loss,
                         "logit_err_max": logit[0], "logit_err_rms": logit[1],
                         "expert_bytes": _expert_bytes(m, fmt), "train_s": round(train_s, 2)})

    row("teacher", tmodel, cfg.teacher_steps if source.startswith("trained") else 0, t_loss)
    for fmt in cfg.quant:
        qm = copy.deepcopy(tmodel)
        quantize_model_experts_(qm, fmt)
        row(f"teacher_{fmt}", qm, 0, heldout_loss(qm, held, cfg), logit=logit_error(qm, tmodel, held, cfg), fmt=fmt)

    # merged initialisation
    if cfg.merge == "none":
        student = MoEDecoder(sspec, seed=cfg.seed + 1).to(dev)
        res.groups = []
    else:
        stats = routing_stats(tmodel, train_data, cfg)
        res.groups = [group_experts(routing_similarity(layer, st, cfg.merge), cfg.experts)
                      for layer, st in zip(tmodel.moe_layers(), stats)]
        usage = [st["selected_TE"].sum(0) for st in stats]
        student = merge_into_student(tmodel, sspec, res.groups, usage, seed=cfg.seed + 1)
        row("merged_init", student, 0, heldout_loss(student, held, cfg))
    if cfg.controls and cfg.merge != "none":
        lm_only = copy.deepcopy(student)
    secs = train_model(student, train_data, cfg.steps, cfg, teacher=tmodel)
    row("distilled", student, cfg.steps, heldout_loss(student, held, cfg), secs)
    if cfg.controls:
        if cfg.merge != "none":
            secs = train_model(lm_only, train_data, cfg.steps, cfg)
            row("merged_lm", lm_only, cfg.steps, heldout_loss(lm_only, held, cfg), secs)
        more = copy.deepcopy(tmodel)
        secs = train_model(more, train_data, cfg.steps, cfg)
        row("teacher_plus", more, cfg.steps, heldout_loss(more, held, cfg), secs)

    scratch = MoEDecoder(sspec, seed=cfg.seed + 1).to(dev)
    if tspec.dtype == "fp64":
        scratch = scratch.double()
    secs = train_model(scratch, train_data, cfg.steps, cfg)
    row("scratch", scratch, cfg.steps, heldout_loss(scratch, held, cfg), secs)
    if out is not None:
        write_csv(res.rows, Path(out) / "distill.csv")
    return res


def write_csv(rows: list[dict], path: Path, append: bool = False) -> Path:
    """Write (or append to) a tidy CSV of :data:`CSV_COLUMNS` atomically (temp + rename)."""
    import io

    from semoe.io import atomic_write_text

    old = path.read_text() if append and path.is_file() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    if not old:
        w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, old + buf.getvalue())
    return path


# ------------------------------------------------------------------------------------ GPU command
def gpu_teacher_spec(hidden: int = 512, layers: int = 4, experts: int = 16, ffn: int = 2048, heads: int = 8,
                     seq_len: int = 256) -> ModelSpec:
    """The teacher of the GPU run: ``tiny``'s architecture (byte vocab, GELU experts, top-2) scaled
    to ``experts`` experts of width ``ffn`` (defaults: ~138M parameters, 16 experts)."""
    from semoe.presets import model_preset

    spec = model_preset("tiny").replace(hidden=hidden, layers=layers, experts=experts, ffn=ffn, heads=heads,
                                        max_seq=max(seq_len, 128), dtype="fp32")
    params = sum(p.numel() for p in MoEDecoder(spec.replace(layers=1), seed=None).parameters()) * layers
    return spec.replace(name=f"moe{experts}x{ffn}-d{hidden}-L{layers}-{params / 1e6:.0f}M")


def main(argv: list[str] | None = None) -> int:
    """``python -m reference.distill --out DIR``: one distillation run, rows in DIR/distill.csv (the
    schema of results/bench/distill.csv; the caller appends them). Defaults are the GPU run (teacher
    of ~138M parameters with 16 experts trained here, student with 4 experts, ~2-3 min on an H100);
    ``--quick`` is the same code on a small CPU model (CI)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="Mixture-of-Students distillation run (reference/distill.py)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="small CPU model, few steps (smoke test)")
    p.add_argument("--device", default="auto")
    p.add_argument("--teacher-experts", type=int, default=16)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--merge", default="router", choices=MERGE_METHODS)
    p.add_argument("--no-controls", action="store_true", help="skip merged_lm and teacher_plus")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dev = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if a.quick:
        a.hidden, a.layers, a.ffn, a.teacher_experts, a.experts = 64, 2, 128, 8, 2
        a.steps, a.teacher_steps, a.batch_size, a.seq_len = 10, 15, 4, 32
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls (fp32 weights and optimizer state)
        torch.backends.cudnn.allow_tf32 = True
    spec = gpu_teacher_spec(a.hidden, a.layers, a.teacher_experts, a.ffn, seq_len=a.seq_len)
    a.out.mkdir(parents=True, exist_ok=True)
    yaml = a.out / f"{spec.name}.yaml"
    spec.to_yaml(yaml)
    cfg = DistillConfig(experts=a.experts, steps=a.steps, teacher_steps=a.teacher_steps, batch_size=a.batch_size,
                        seq_len=a.seq_len, lr=a.lr, merge=a.merge, controls=not a.no_controls, device=dev, seed=a.seed,
                        eval_batches=4 if a.quick else 16)
    t0 = time.perf_counter()
    print(f"[distill] teacher {spec.name} ({spec.experts} experts) -> student {a.experts} experts on {dev}", flush=True)
    res = distill(str(yaml), cfg, out=a.out)
    print(res.table())
    print(f"[distill] {time.perf_counter() - t0:.1f} s; rows in {a.out / 'distill.csv'}", flush=True)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
