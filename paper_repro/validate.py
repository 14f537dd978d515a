"""``semoe validate``: every committed GPU measurement under ``results/`` beside its simulation.

Sources (each row of ``results/validation/summary.csv`` names one):

=========== ================================= ==========================================================
source      measured file                     simulated with
=========== ================================= ==========================================================
moe_layer   ``results/bench/moe_layer.csv``   `simulator.calibration.compare` per benchmark run
            (impl ``ours``, metric ``ms``)    (``commit`` column); the standalone gating / permute
                                              kernels as max(device time, host launch chain)
                                              (`standalone_wall_ms`: events around one call)
train       ``results/bench/train.csv``       one training step of the scaled paper model in the
                                              ``config`` column on the ``h100-single`` preset (the
                                              profile is read automatically), ``impl="reference"``:
                                              the reference trainer's fp32-master / autocast / fp32
                                              loss / clipping / AdamW HBM passes, and its
                                              aten operator count (`reference_host_ops`) as a
                                              host-time floor (`simulator.workload.training`);
                                              the config's ``moe-torch|moe-triton adamw-fused``
                                              tokens pick the AdamW (fused / foreach) and the
                                              expert path (`expert_options`)
infer       ``results/bench/infer.csv``       `simulator.validate_infer.predict_all`
offload     ``results/bench/offload_train.  `simulator.validate_offload.rows`: the reference-trainer step
            csv``                             with expert states on gpu / cpu / ssd, prefetch on / off
multigpu    ``results/multigpu/<kind>/        `simulator.validate_multigpu.rows`: collectives on the run's
            {collectives,moe,train}.csv``     cluster preset (``h200-x2``), the EP MoE layer and training
                                              with the H100 kernel profile extrapolated to the H200
=========== ================================= ==========================================================

Columns: ``source, run, config, metric, measured, predicted, error, used_for_fitting, status, note``
with ``error = predicted / measured - 1``. ``status`` is

- ``validated``: a prediction of a measured quantity, nothing fitted to the row;
- ``fitted``: the row (or the model input it equals) was used to set a simulator constant; these have
  ``used_for_fitting = true``: the ``mixtral_like`` forward+backward row of run ``65fffb4+wip3``
  (``simulator.cost.BACKWARD_GEMM_FACTOR``) and the measured pinned H2D bandwidth (the preset's
  PCIe bandwidth is HARDWARE.md's measurement of the same link), and the offload bench's bandwidth /
  CPU-AdamW probes (model inputs of that run's simulations, `simulator.validate_offload`), and 12 rows
  of ``results/multigpu/h200x2`` (`simulator.validate_multigpu.run_calibration`): the 3 all_reduce rows
  the achieved NVLink bandwidth is fitted on (`fit_nvlink`), each collective's 1 KiB row (its world-2
  host floor per call, `fit_host_floor`), the 256 MiB row of all_gather / reduce_scatter / all_to_all (each
  one's own achieved bandwidth, `fit_collective_links`) and of all_to_all_uneven (the send/receive path's
  per-peer rate, `fit_p2p`); every other collective row is held out, except 6 rows that
  `measurement_outliers` flags from the measured times alone (``not_modelled``, note ``measurement_bug``);
- ``extrapolated``: a prediction of a measured quantity made with a kernel profile of another GPU (the
  multi-GPU H200 rows use the H100's, `simulator.validate_multigpu`), or a collective host-dispatch probe
  of another machine (``results/profiles/collective_host_*.csv``): scored in its own group, not in the
  validated statistics;
- ``derived``: a value computed from another row of the same run (``tflops``/``gbps`` from ``ms``,
  ``mfu`` from ``tokens_per_s``): same error as that row, so not counted twice;
- ``not_modelled``: the simulator has no model of the quantity, or the measurement shows an effect
  it does not model (the reason is in ``note``). Listed separately, never silently dropped.

Statistics (`summarise`) are over ``validated`` rows only: MAPE (mean |error|), max |error|, Spearman
rank correlation of predicted vs measured (across all metrics, so mostly their scales; per-source
values are given too). Goal (issue 9): MAPE <= 5 % and max <= 15 % over >= 20 rows.
Nothing here is tuned to the rows it validates.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
COLUMNS = ("source", "run", "config", "metric", "kind", "measured", "predicted", "error", "used_for_fitting", "status",
           "note")
# kind: time (ms, tokens/s: what the simulator is for), memory (GB), count (slots, K), ratio, bytes, size
FITTED_LAYER_ROWS = {("65fffb4+wip3", "mixtral_like", "fwd_bwd")}  # simulator.cost.BACKWARD_GEMM_FACTOR
GOAL_MAPE, GOAL_MAX, GOAL_ROWS = 0.05, 0.15, 20
TRAIN_HEADS = 16  # not in train.csv's config; reference/parallel/bench.py's documented command (head dim 128)


def _row(source, run, config, metric, measured, predicted=float("nan"), status="validated", note="", fitted=False,
         kind="time"):
    measured = float(measured)
    predicted = float(predicted)
    if math.isnan(predicted) or measured == 0:
        err = float("nan")
    else:
        err = predicted / measured - 1
    return {"source": source, "run": str(run), "config": str(config), "metric": metric, "kind": kind,
            "measured": measured, "predicted": predicted, "error": err, "used_for_fitting": bool(fitted),
            "status": status, "note": note}


# ---------------------------------------------------------------------------------------- kernels
# rows that measured something else than the code they name (shown with the reason, not scored)
OUTLIER_LAYER_ROWS = {
    ("65fffb4+wip4", "hetu_switch_b32", "fwd"): (
        "forward alone 2.20 ms (run 3: 1.21 ms), but the same run's forward+backward took 4.46 ms (run 3: 3.83): "
        "the forward rose 0.99 ms while forward+backward, which contains the same forward, rose 0.62 ms; "
        "mixtral_like and fine_grained forwards of the run stayed within 8% of run 3"),
}


def standalone_wall_ms(device_s: float, wrapper: str, launches: int, cm) -> tuple[float, str]:
    """What ``kernels/bench/moe_layer.py`` measures for a standalone kernel call: ``do_bench`` records CUDA
    events around one call, so when the GPU work is shorter than the host's launch chain the interval
    holds the host time (the GPU waits for the launch): ``max(device, host)``. Host: the profile's
    ``host_call_<wrapper>`` row (`simulator.workload.inference_profile`, sweep ``infer``: host seconds per
    call issued back to back) when measured, else ``launches`` x the CostModel's host seconds per kernel
    of the Triton backend (the ``host_op`` row of impl ``reference_triton``, else ``host_op_s``)."""
    from simulator.workload.inference_profile import InferProfile

    host = InferProfile.of(cm).host_call_s(wrapper)
    if host is not None:
        src = f"the profile's host_call_{wrapper} row"
    else:
        per = cm.profile.host_op.get("reference_triton") if cm.profile is not None else None
        src = "the profile's host_op reference_triton row" if per else "CostModel.host_op_s"
        host = launches * (per or cm.host_op_s)
        src = f"{launches} launch(es) x {host / launches * 1e6:.1f} us ({src})"
    wall = max(device_s, host)
    which = "host-bound" if host > device_s else "device-bound"
    return wall * 1e3, (f"wall = max(device {device_s * 1e6:.1f} us, host {host * 1e6:.1f} us: {src}), {which}")


_GATING = re.compile(r"gating_T(?P<T>\d+)_E(?P<E>\d+)_k(?P<k>\d+)$")
_PERMUTE = re.compile(r"permute_T(?P<T>\d+)_k(?P<k>\d+)_D(?P<D>\d+)$")


def kernel_rows(path: Path) -> list[dict]:
    """moe_layer.csv, impl ``ours``: the three MoE layer configs (fwd, fwd_bwd) per run, and the
    standalone gating / permute kernels predicted with the memory-pass terms of the layer model; impl
    ``torch_grouped`` (the torchtitan-style eager layer): `simulator.torch_moe_layer` (its kernels counted from
    ``kernels.bench.moe_layer.TorchGrouped``, GEMMs from the profile's torch rows, memory passes at the measured
    class rates, host timeline)."""
    from semoe import cluster_preset
    from simulator.calibration import compare
    from simulator.cost import CostModel

    cluster = cluster_preset("h100-single")
    df = pd.read_csv(path, dtype={"commit": str})
    rows = torch_grouped_rows(df[df["impl"] == "torch_grouped"], cluster)
    df = df[df["impl"] == "ours"]
    for run, d in df.groupby("commit", sort=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmp = compare(str(path), cluster, impl="ours", commit=str(run))
        pred = {(r.config, r.mode): r.predicted_ms for r in cmp.itertuples()}
        cm = CostModel(cluster.gpu)  # what calibration.predict_moe_layer uses: roofline, no profile
        cm_prof = CostModel.auto(cluster.gpu, impl=("triton", "torch"))  # the profile (ours: impl triton)
        for r in d.itertuples():
            src = "moe_layer"
            if r.metric != "ms":
                rows.append(_row(src, run, r.config, f"{r.mode}_{r.metric}", r.value, status="derived",
                                 note=f"computed from the {r.mode} ms row of the same run"))
                continue
            metric = f"{r.mode}_ms"
            if (str(run), r.config, r.mode) in OUTLIER_LAYER_ROWS:
                rows.append(_row(src, run, r.config, metric, r.value, pred.get((r.config, r.mode), float("nan")),
                                 status="not_modelled",
                                 note="measurement_outlier: " + OUTLIER_LAYER_ROWS[(str(run), r.config, r.mode)]))
            elif (r.config, r.mode) in pred:
                fitted = (str(run), r.config, r.mode) in FITTED_LAYER_ROWS
                note = "BACKWARD_GEMM_FACTOR fitted on this row" if fitted else ""
                if not fitted and r.config == "mixtral_like" and r.mode == "fwd_bwd":
                    note = "same config as the fitted row, another benchmark run"
                rows.append(_row(src, run, r.config, metric, r.value, pred[(r.config, r.mode)],
                                 status="fitted" if fitted else "validated", note=note, fitted=fitted))
            elif (m := _GATING.match(r.config)) and r.mode == "fwd":
                T, E = int(m["T"]), int(m["E"])
                p, note = standalone_wall_ms(cm.memory(3 * 4 * T * E), "gating", 1, cm_prof)
                rows.append(_row(src, run, r.config, metric, r.value, p,
                                 note="device: gating term of calibration.predict_moe_layer (fp32 logits, memory "
                                      "pass); " + note))
            elif (m := _PERMUTE.match(r.config)) and r.mode == "fwd":
                T, k, D = int(m["T"]), int(m["k"]), int(m["D"])
                io = (T + T * k) * D * 2  # kernels/profile.py's byte count of one permute (or unpermute)
                dev = cm_prof.elementwise("permute", io) + cm_prof.elementwise("unpermute", io)
                p, note = standalone_wall_ms(dev, "permute", 2, cm_prof)
                rows.append(_row(src, run, r.config, metric, r.value, p,
                                 note="device: the profile's permute + unpermute rows (achieved GB/s); " + note))
            else:
                rows.append(_row(src, run, r.config, metric, r.value, status="not_modelled",
                                 note="no simulator model of this kernel config"))
    return rows


def torch_grouped_rows(df: pd.DataFrame, cluster) -> list[dict]:
    """Rows of moe_layer.csv's ``torch_grouped`` impl: ``ms`` (fwd: under ``no_grad``; fwd_bwd) predicted by
    `simulator.torch_moe_layer.predict_torch_layer` (path ``bench``) on the run's GPU profile with torch GEMM rows
    first; ``tflops`` rows derived. Nothing of this model was fitted to these rows: status ``validated``."""
    from semoe.moe_layer_configs import MOE_LAYER_CONFIGS
    from simulator import torch_layer_probe
    from simulator.cost import CostModel
    from simulator.torch_moe_layer import predict_torch_layer

    rows: list[dict] = []
    probed = torch_layer_probe.load(cluster.gpu.name) is not None
    if df.empty:
        return rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = CostModel.auto(cluster.gpu, impl=("torch", "triton"))
        preds = {c: predict_torch_layer(cfg, cm, "bench", breakdown=True) for c, cfg in MOE_LAYER_CONFIGS.items()
                 if c in set(df["config"])}
    for r in df.itertuples():
        run = str(r.commit)
        p = preds.get(r.config)
        if p is None:
            rows.append(_row("moe_layer", run, f"{r.config} torch_grouped", f"{r.mode}_{r.metric}", r.value,
                             status="not_modelled", note="no simulator model of this kernel config"))
            continue
        if r.metric != "ms":
            rows.append(_row("moe_layer", run, f"{r.config} torch_grouped", f"{r.mode}_{r.metric}", r.value,
                             status="derived", note=f"computed from the {r.mode} ms row of the same run"))
            continue
        ph = "fwd" if r.mode == "fwd" else "bwd"
        gemm = p["fwd_gemm_s"] + (p["bwd_gemm_s"] if ph == "bwd" else 0.0)
        mem = sum(p["fwd_mem_s"].values()) + (sum(p["bwd_mem_s"].values()) if ph == "bwd" else 0.0)
        n = p["fwd_kernels"] + (p["bwd_kernels"] if ph == "bwd" else 0)
        note = (f"torch-backend layer (simulator.torch_moe_layer, path bench): {n} kernels, GEMMs {gemm * 1e3:.2f} ms "
                f"(profile torch rows), memory passes {mem * 1e3:.2f} ms ("
                + ("bf16 index / index_add / index_put / sort at the committed torch_layer_probe rates, the rest at "
                   "the measured class rates" if probed else "measured class rates; index_add at the measured "
                   "atomic-add rate") + "), host timeline with the bincount sync; not fitted to these rows")
        rows.append(_row("moe_layer", run, f"{r.config} torch_grouped", f"{r.mode}_ms", r.value, p[r.mode] * 1e3,
                         status="validated", note=note))
    return rows


# ---------------------------------------------------------------------------------------- training
_TRAIN = re.compile(
    r"(?P<name>\S+) L(?P<L>\d+) D(?P<D>\d+) E(?P<E>\d+) k(?P<k>\d+) F(?P<F>\d+) (?P<dtype>\w+) B(?P<B>\d+) "
    r"S(?P<S>\d+) lr\S+ steps\d+ world(?P<world>\d+) (?P<backend>\S+)"
    r"(?: ep(?P<ep>\d+) (?P<a2a>\S+) bucket(?P<bucket>\d+) zero(?P<zero>\d+))? params(?P<params>\d+)"
    r"(?: moe-(?P<moe>\S+))?(?: adamw-(?P<adamw>\S+))?$")


@dataclass(frozen=True)
class TrainConfig:
    preset: str
    layers: int
    hidden: int
    experts: int
    top_k: int
    ffn: int
    dtype: str
    batch: int
    seq: int
    world: int
    ep: int
    alltoall: str
    bucket: int
    zero: int
    params: int
    backend: str = "single-process"  # nccl / gloo: a torchrun run (reference.parallel's GradSync, even at 1 rank)
    moe: str = "torch"  # MoE backend of the run (reference.moe.layer): torch or triton; rows without it: torch
    adamw: str = "foreach"  # reference.train's AdamW: fused (CUDA, since 42307ef) or foreach (rows without it)


def parse_train_config(config: str) -> TrainConfig:
    """'paper-13.9b-scaled L4 D2048 E8 k1 F8192 bf16 B8 S1024 lr0.0003 steps40 world1 nccl
    [ep1 rail bucket26214400 zero3] params1248151552' -> TrainConfig."""
    m = _TRAIN.match(config)
    if m is None:
        raise ValueError(f"validate: cannot parse train.csv config {config!r}")
    name = m["name"].removesuffix("-scaled")
    return TrainConfig(preset=name, layers=int(m["L"]), hidden=int(m["D"]), experts=int(m["E"]), top_k=int(m["k"]),
                       ffn=int(m["F"]), dtype=m["dtype"], batch=int(m["B"]), seq=int(m["S"]), world=int(m["world"]),
                       ep=int(m["ep"] or 1), alltoall=m["a2a"] or "flat", bucket=int(m["bucket"] or 0),
                       zero=int(m["zero"] or 0), params=int(m["params"]), backend=m["backend"],
                       moe=m["moe"] or "torch", adamw=_ADAMW.get(m["adamw"] or "foreach", "foreach"))


# bench label -> TrainingIteration ref_optimizer ("default" is the CPU's AdamW, foreach-like per tensor)
_ADAMW = {"fused": "fused", "foreach": "foreach", "default": "foreach"}


def _has_grouped_cast(commit: str, date: str) -> bool:
    """Whether the run's commit contains 676c520 (GroupedExperts casts to the autocast dtype; before it the
    torch MoE backend ran its experts through the fp32 loop fallback under bf16 autocast)."""
    from simulator.validate_offload import (
        GROUPED_CAST_COMMIT,
        GROUPED_CAST_DATE,
        commit_contains,
    )

    return commit_contains(GROUPED_CAST_COMMIT, commit, date, GROUPED_CAST_DATE)


def expert_options(c: TrainConfig, commit: str, date: str) -> tuple[str, str]:
    """``(expert_impl, expert_kernels)`` of `TrainingIteration` for a train.csv row: ``moe-triton``: grouped
    GEMMs, our Triton kernels' profile rows; ``moe-torch`` from 676c520 on: ``torch._grouped_mm`` (the torch
    profile rows); ``moe-torch`` before it: the fp32 loop fallback (one ``mm`` per expert, dense gradients)."""
    if c.moe == "triton":
        return "grouped", "triton"
    if c.moe != "torch":
        raise ValueError(f"validate: unknown MoE backend {c.moe!r} in train.csv")
    return ("grouped", "torch") if _has_grouped_cast(commit, date) else ("loop", "torch")


_HOST_OPS: dict = {}


def reference_host_ops(m) -> float:
    """Aten operators one `reference.train` step of model ``m`` dispatches (forward, backward, clip,
    foreach AdamW, the loss read-back), counted by `reference.op_count` on the CPU on a copy of ``m`` with
    tiny widths (the operator count depends on the structure: layers, experts, top-k, gate, not on the
    widths). The optimizer and the clipping run in their CUDA form (``foreach``); kernels only, views
    are metadata. Cached per structure."""
    import torch

    from reference.model import MoEDecoder
    from reference.op_count import count_ops
    from reference.train import TrainConfig, after_step

    key = (m.layers, m.experts, m.top_k, m.gate, m.moe_every, m.norm, m.position, m.activation, m.shared_experts,
           m.tied_embeddings, m.bias)
    if key in _HOST_OPS:
        return _HOST_OPS[key]
    tiny = m.replace(hidden=64, heads=4, kv_heads=None, ffn=64, vocab=256, max_seq=64, name="ops")
    torch.manual_seed(0)
    model = MoEDecoder(tiny, seed=0).float()
    cfg = TrainConfig(batch_size=2, seq_len=32)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), foreach=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny.vocab, (2, 32), generator=gen)
    y = torch.randint(0, tiny.vocab, (2, 32), generator=gen)

    def step():
        out = model(x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        after_step(model, out, cfg)
        return float(out.loss.detach())

    step()  # optimizer state exists from the second step on
    _, c = count_ops(step)
    _HOST_OPS[key] = float(c.kernels)
    return _HOST_OPS[key]


def simulate_train(c: TrainConfig, expert_impl: str = "loop", expert_kernels: str | None = "torch") -> dict:
    """One reference-trainer step of the config on the ``h100-single`` preset (profile read automatically),
    with the row's AdamW (``c.adamw``) and MoE expert path (`expert_options`)."""
    from semoe import Run, Workload, cluster_preset, sizing
    from semoe.plan_spec import ParallelPlan
    from semoe.presets import model_preset
    from simulator.engine import Sim
    from simulator.workload.training import TrainingIteration

    m = model_preset(c.preset).replace(layers=c.layers, hidden=c.hidden, heads=TRAIN_HEADS, ffn=c.ffn,
                                       experts=c.experts, top_k=c.top_k, dtype=c.dtype, name=f"{c.preset}-scaled")
    n = sizing.count_params(m).total
    if n != c.params:
        raise ValueError(f"validate: rebuilt model has {n} parameters, train.csv says {c.params}")
    plan = ParallelPlan(data_parallel=c.world, expert_parallel=c.ep, alltoall=c.alltoall,
                        fusion_bucket_bytes=c.bucket, zero_stage=c.zero)
    run = Run(model=m, cluster=cluster_preset("h100-single"), plan=plan,
              workload=Workload(micro_batch=c.batch, seq_len=c.seq, steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # profile fallbacks (roofline / borrowed curves)
        ops = reference_host_ops(m)
        sim = Sim(run.cluster, seed=run.workload.seed, trace=False)
        # before 676c520 the reference trainer's torch-backend experts saw fp32 activations (fp32 masters, fp32
        # residual stream under autocast) and GroupedExperts looped over experts (torch._grouped_mm needs
        # bf16); from 676c520 they are cast to bf16 and run torch._grouped_mm; moe-triton runs our kernels.
        # torchrun rows (backend nccl / gloo) run reference.parallel's GradSync even on one rank; "auto" at
        # world 1 (reference.train._setup_distributed) makes no process group
        from simulator.train_host import train_program

        # the trainer's host program (kernels per segment, host syncs; None for an uncounted code path, which
        # keeps the host_ops floor)
        prog = train_program(m, c.adamw, "triton" if expert_kernels == "triton" else "torch")
        s = TrainingIteration(run, sim, impl="reference", host_ops=0.0 if prog is not None else ops,
                              host_program=prog, expert_impl=expert_impl,
                              expert_kernels=expert_kernels, ref_optimizer=c.adamw,
                              grad_sync=c.backend in ("nccl", "gloo")).run()
    return s


def train_rows(path: Path) -> list[dict]:
    df = pd.read_csv(path, dtype={"commit": str})
    rows = []
    for r in df.itertuples():
        src, run = "train", f"{r.commit} {r.date}"
        c = parse_train_config(r.config)
        if c.world != 1:
            rows.append(_row(src, run, r.config, r.metric, r.value, status="not_modelled",
                             note="multi-GPU training rows: see source multigpu"))
            continue
        ei, ek = expert_options(c, r.commit, r.date)
        opts = f"experts {ei}/{ek}, AdamW {c.adamw}"
        if r.metric == "tokens_per_s":
            s = simulate_train(c, ei, ek)
            rows.append(_row(src, run, r.config, r.metric, r.value, s["tokens_per_s"],
                             note=f"simulated step {s['step_time_s'] * 1e3:.1f} ms (device {s['device_step_s'] * 1e3:.1f}, "
                                  f"host {s['host_s'] * 1e3:.1f} ms, {s.get('host_syncs', 0)} syncs "
                                  f"({s.get('host_program') or 'host_ops floor'})), MFU {s['mfu']:.3f}; {opts}"))
        elif r.metric == "mfu":
            s = simulate_train(c, ei, ek)
            rows.append(_row(src, run, r.config, r.metric, r.value, s["mfu"], status="derived",
                             note="tokens_per_s x training FLOPs per token / peak: same error as tokens_per_s"))
        else:
            rows.append(_row(src, run, r.config, r.metric, r.value, status="not_modelled",
                             note="loss values: the simulator models time and memory, not convergence"))
    return rows


# ---------------------------------------------------------------------------------------- inference
def infer_rows(path: Path) -> list[dict]:
    from simulator.validate_infer import predict_all

    measured = pd.read_csv(path, dtype={"commit": str})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = predict_all(measured)
    rows = []
    for (_, m), (_, p) in zip(measured.iterrows(), pred.iterrows()):
        src, run = "infer", f"{m['commit']} {m['date']}"
        metric = f"{m['mode']} B{int(m['batch'])} {m['metric']}"
        kind, note = p["kind"], p["note"] if isinstance(p["note"], str) else ""
        k = "time" if kind == "throughput" else kind
        status = p.get("status", "validated") if isinstance(p.get("status", None), str) else "validated"
        if status in ("superseded_code", "measurement_bug", "by_definition"):
            # simulator.validate_infer's verdict: measured with engine code that no longer exists, a known
            # measurement bug, or true by definition: shown, not scored
            rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], status="not_modelled",
                             note=f"{status}: {note}" if note else status))
        elif kind == "not_modelled" or status == "not_modelled":
            # includes the spread rows of repeated timings (kind ``spread``: min / max / repeat count)
            rows.append(_row(src, run, m["config"], metric, m["value"], status="not_modelled",
                             note=note or "no simulator model of this metric"))
        elif kind == "input" or status == "input":
            if str(m["metric"]).startswith("host_"):
                # the run's host probe (the engine's code path at tiny widths): an input of that run's predictions
                if pd.isna(p["predicted"]):
                    rows.append(_row(src, run, m["config"], metric, m["value"], status="not_modelled",
                                     note="host probe of this run (an input of its predictions): " + (note or "count")))
                else:
                    rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], status="fitted",
                                     fitted=True, note="host probe of this run, an input of its predictions; predicted "
                                                       "= the counted-kernels model it replaces" + (f": {note}" if note else "")))
            elif str(m["metric"]).startswith("h2d_adj_"):
                rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], status="fitted", fitted=True,
                                 note="copy probe of this run (pinned H2D next to the row's timed passes), an input of "
                                      "its copy-bound rows; predicted = the preset's bandwidth"))
            else:
                rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], status="fitted", fitted=True,
                                 note="model input: the preset's PCIe bandwidth is HARDWARE.md's measurement of this link"))
        elif m["value"] == 0:
            # no relative error: e.g. an expert-aware pool statistic at a batch where the engine fell back to the ring
            rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], status="not_modelled",
                             note=f"measured 0, predicted {p['predicted']:.3g} (no relative error)"
                                  + (f"; {note}" if note else "")))
        elif m["metric"] == "prefetched_used_frac" and m["mode"] != "expert":
            rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], status="not_modelled",
                             note="0 by definition without the predictor"))
        elif (m["mode"] == "resident" and m["metric"] == "decode_tokens_per_s"
              and str(m["date"]).startswith(RUN1_DATE)):
            rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], status="not_modelled",
                             note="measurement bug: " + explain_run1()))
        else:
            rows.append(_row(src, run, m["config"], metric, m["value"], p["predicted"], note=note, kind=k))
    return rows


RUN1_DATE = "2026-11-24T04:05"  # inference bench run 1 (simulator.validate_infer.explain)


def explain_run1() -> str:
    return "run 1's cuDNN SDPA rebuilt a plan every decode step (~205 ms/step, NOTES.md), fixed in run 2"


# ---------------------------------------------------------------------------------------- offload
def offload_rows(path: Path) -> list[dict]:
    from simulator.validate_offload import rows

    return rows(path)


# ---------------------------------------------------------------------------------------- multi-GPU
def multigpu_rows(folder: Path) -> list[dict]:
    """Every ``collectives.csv`` / ``moe.csv`` / ``train.csv`` under ``results/multigpu`` (and its run folders)
    beside the simulator: `simulator.validate_multigpu.rows`."""
    from simulator.validate_multigpu import rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # profile fallbacks (roofline / borrowed curves)
        return rows(folder)


# ---------------------------------------------------------------------------------------- driver
def collect(results: Path = RESULTS) -> pd.DataFrame:
    """Every committed GPU measurement vs its simulation (one row each, columns `COLUMNS`)."""
    rows: list[dict] = []
    for name, fn in (("bench/moe_layer.csv", kernel_rows), ("bench/train.csv", train_rows),
                     ("bench/infer.csv", infer_rows), ("bench/offload_train.csv", offload_rows)):
        p = results / name
        if p.is_file():
            rows += fn(p)
    rows += multigpu_rows(results / "multigpu")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _stats(d: pd.DataFrame) -> dict:
    a = d["error"].abs()
    n = len(d)
    sp = float(d["predicted"].corr(d["measured"], method="spearman")) if n >= 3 else float("nan")
    nan = float("nan")
    return {"rows": n, "mape": float(a.mean()) if n else nan, "max_error": float(a.max()) if n else nan,
            "spearman": sp, "within_5pct": int((a <= 0.05).sum()), "within_15pct": int((a <= 0.15).sum())}


def latest_runs(v: pd.DataFrame) -> pd.DataFrame:
    """The rows of each source's most recent run: the run whose ``run`` label carries the latest ISO date
    (``<commit> 2026-11-24T13:10:45Z``); a source whose runs carry no date keeps all its rows. A view of the
    current bench methods beside the statistics over every committed run, not a replacement for them."""
    dates = v["run"].astype(str).str.extract(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z)")[0]
    keep = pd.Series(True, index=v.index)
    for src, idx in v.groupby("source").groups.items():
        d = dates.loc[idx].dropna()
        if len(d):
            keep.loc[idx] = dates.loc[idx] == d.max()
    return v[keep]


def summarise(df: pd.DataFrame) -> dict:
    """Statistics over the validated (unfitted, modelled) rows, overall and per source."""
    v = df[(df["status"] == "validated") & ~df["used_for_fitting"].astype(bool)]
    out = _stats(v)
    out["goal_met"] = bool(out["rows"] >= GOAL_ROWS and out["mape"] <= GOAL_MAPE and out["max_error"] <= GOAL_MAX)
    out["by_source"] = {s: _stats(g) for s, g in v.groupby("source")}
    out["by_kind"] = {k: _stats(g) for k, g in v.groupby("kind")}
    lv = latest_runs(v)
    out["latest"] = _stats(lv)
    out["latest_by_source"] = {s: dict(_stats(g), run=", ".join(sorted(set(g["run"].astype(str)))))
                               for s, g in lv.groupby("source")}
    f = df[df["used_for_fitting"].astype(bool)]
    out["fitted"] = _stats(f)
    e = df[df["status"] == "extrapolated"]
    out["extrapolated"] = _stats(e)
    out["extrapolated_by_source"] = {s: _stats(g) for s, g in e.groupby("source")}
    out["not_modelled"] = int((df["status"] == "not_modelled").sum())
    out["derived"] = int((df["status"] == "derived").sum())
    return out


def format_table(df: pd.DataFrame, s: dict) -> str:
    v = df[df["status"].isin(["validated", "fitted", "extrapolated"])].copy()
    v["error"] = v["error"].map(lambda e: f"{e:+.1%}")
    cols = ["source", "config", "metric", "measured", "predicted", "error", "used_for_fitting"]
    lines = [v[cols].to_string(index=False, max_colwidth=40, float_format=lambda x: f"{x:.4g}")]
    lines.append("")
    lines.append(f"validated rows (not used for fitting): {s['rows']}   MAPE {s['mape']:.1%}   max |error| "
                 f"{s['max_error']:.1%}   Spearman {s['spearman']:.3f}   within 5%: {s['within_5pct']}   "
                 f"within 15%: {s['within_15pct']}")
    for src, t in s["by_source"].items():
        lines.append(f"  {src:10s} rows {t['rows']:3d}   MAPE {t['mape']:.1%}   max {t['max_error']:.1%}   "
                     f"Spearman {t['spearman']:.3f}")
    for k, t in s["by_kind"].items():
        lines.append(f"  kind {k:7s} rows {t['rows']:3d}   MAPE {t['mape']:.1%}   max {t['max_error']:.1%}   "
                     f"Spearman {t['spearman']:.3f}")
    t = s["latest"]
    lines.append(f"latest run of each source only (the current bench methods; the goal is over all rows above): "
                 f"{t['rows']} rows   MAPE {t['mape']:.1%}   max {t['max_error']:.1%}")
    for src, t in s["latest_by_source"].items():
        lines.append(f"  {src:10s} rows {t['rows']:3d}   MAPE {t['mape']:.1%}   max {t['max_error']:.1%}   run {t['run']}")
    x = s["extrapolated"]
    if x["rows"]:
        lines.append(f"extrapolated rows (kernel profile of another GPU; not in the statistics above): {x['rows']}   "
                     f"MAPE {x['mape']:.1%}   max {x['max_error']:.1%}")
    lines.append(f"fitted rows: {s['fitted']['rows']} (MAPE {s['fitted']['mape']:.1%});  "
                 f"derived rows: {s['derived']};  not modelled: {s['not_modelled']} (listed with reasons in the CSV)")
    goal = f"MAPE <= {GOAL_MAPE:.0%} and max <= {GOAL_MAX:.0%} over >= {GOAL_ROWS} unfitted rows"
    lines.append(f"goal ({goal}): {'MET' if s['goal_met'] else 'NOT MET'}")
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    """Scatter of predicted vs measured (log-log), one colour per source, fitted rows hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    d = df[df["status"].isin(["validated", "fitted", "extrapolated"]) & (df["measured"] > 0) & (df["predicted"] > 0)]
    fig, ax = plt.subplots(figsize=(6.5, 6))
    lo = min(d["measured"].min(), d["predicted"].min()) * 0.5
    hi = max(d["measured"].max(), d["predicted"].max()) * 2
    x = np.geomspace(lo, hi, 50)
    ax.fill_between(x, 0.85 * x, 1.15 * x, color="0.88", label="±15%", zorder=0)
    ax.fill_between(x, 0.95 * x, 1.05 * x, color="0.75", label="±5%", zorder=0)
    ax.plot(x, x, "k-", lw=0.7, zorder=1)
    for i, (src, g) in enumerate(d.groupby("source")):
        c = plt.cm.tab10(i)
        fit = g["used_for_fitting"].astype(bool)
        ax.scatter(g.loc[~fit, "measured"], g.loc[~fit, "predicted"], s=18, color=c, label=src, zorder=3)
        if fit.any():
            ax.scatter(g.loc[fit, "measured"], g.loc[fit, "predicted"], s=40, facecolors="none", edgecolors=c,
                       label=f"{src} (fitted)", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured on the H100 (native unit of each metric)")
    ax.set_ylabel("simulated")
    s = summarise(df)
    ax.set_title(f"semoe validate: {s['rows']} unfitted rows, MAPE {s['mape']:.1%}, max {s['max_error']:.0%}, "
                 f"Spearman {s['spearman']:.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def run(out: Path = RESULTS / "validation", results: Path = RESULTS) -> tuple[pd.DataFrame, dict]:
    """Collect, write ``out/summary.csv`` and ``out/summary.png``; return the frame and the statistics."""
    from semoe.io import atomic_write_text

    if not results.is_dir():
        raise FileNotFoundError(f"validate: results folder not found: {results}")
    df = collect(results)
    s = summarise(df)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.csv", df.to_csv(index=False, float_format="%.6g"))
    plot(df, out / "summary.png")
    return df, s
