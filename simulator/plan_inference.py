"""``semoe plan-inference``: choose how to serve an MoE model on N GPUs of G GB each (issue 11).

Candidates, each with bf16 / int8 / fp8 experts (``--quant`` restricts to one):

* ``resident_ep``: every expert on the GPUs, split over N GPUs (expert parallelism); fits when one
  GPU holds the dense weights, the KV cache and activations of its share of the batch and ``ceil(E /
  N)`` experts of every MoE block (+ the dequant workspace of its experts when quantised).
* ``ring``: ring memory on one GPU per replica, K slots chosen from the budget
  (`simulator.workload.inference`);
* ``expert``: expert-aware offload (LRU cache of experts, the ring for the prefill).

Offload candidates run ``min(N, batch)`` data-parallel replicas, one per GPU, each serving
``ceil(batch / replicas)`` sequences with its own PCIe link (as on a DGX H100; the host keeps one
pinned copy of the experts that all replicas read).

Resident EP is modelled simply: each GPU runs attention and the gate for its share of the batch
(data parallel), the routed tokens go to the experts' GPUs and back by an all-to-all per MoE block
(`simulator.collectives`, ``dgx-h100``: NVLink inside a node), and the expert FFN of a GPU costs what
the same routed rows cost on one GPU (load balanced: uniform routing). Per step time = the
single-GPU resident simulation of the GPU's share (host-bound decode included) + 2 all-to-alls per
block. Limits: no overlap of the all-to-all with compute, no routing imbalance across GPUs, no
tensor parallelism of the dense part, and the host program is the single-GPU engine's (an EP engine
adds the all-to-all's own kernels and syncs, not counted).

Every number comes from the simulator (kernel profile, PCIe preset, host seconds per kernel and the
reference's kernel counts); nothing is fitted to a plan's measurement.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from semoe import ClusterSpec, ModelSpec, SpecError, cluster_preset
from simulator.workload.inference_costs import BlockCosts

QUANT_CHOICES = ("none", "int8", "fp8")
OBJECTIVES = ("decode", "prefill")
PLANS = ("resident_ep", "ring", "expert")


@dataclass(frozen=True)
class PlanRequest:
    model: ModelSpec
    gpus: int
    gpu_mem_gb: float
    batch: int = 1
    prompt_len: int = 256
    gen_len: int = 32
    quants: tuple[str, ...] = QUANT_CHOICES
    objective: str = "decode"
    dequant: str = "workspace"  # quantised experts: the reference's dequant pass, or "fused" (inference_quant)
    cluster: str = "h100-single"  # one GPU with its PCIe link (offload candidates)
    ep_cluster: str = "dgx-h100"  # the GPUs of resident expert parallelism

    def __post_init__(self) -> None:
        if not self.model.moe_layers:
            raise SpecError(f"model: {self.model.name} has no MoE layers")
        if self.gpus < 1:
            raise SpecError(f"gpus: must be >= 1, got {self.gpus}")
        if not self.gpu_mem_gb > 0:
            raise SpecError(f"gpu-mem-gb: must be > 0, got {self.gpu_mem_gb}")
        for name in ("batch", "prompt_len", "gen_len"):
            if getattr(self, name) < 1:
                raise SpecError(f"{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.gen_len < 2:
            raise SpecError(f"gen-len: must be >= 2 (decode tokens/s needs a decode step), got {self.gen_len}")
        bad = [q for q in self.quants if q not in QUANT_CHOICES]
        if bad or not self.quants:
            raise SpecError(f"quant: {bad[0] if bad else ''!r} is not one of {', '.join(QUANT_CHOICES)}")
        if self.objective not in OBJECTIVES:
            raise SpecError(f"objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        from simulator.workload.inference_quant import DEQUANT

        if self.dequant not in DEQUANT:
            raise SpecError(f"dequant: {self.dequant!r} is not one of {', '.join(DEQUANT)}")


@dataclass
class Candidate:
    plan: str
    quant: str
    gpus_used: int
    fits: bool
    prefill_tokens_per_s: float = float("nan")
    decode_tokens_per_s: float = float("nan")
    gpu_mem_GB: float = float("nan")  # peak per GPU
    host_mem_GB: float = 0.0  # pinned host copy of the experts (offload)
    decode_GB_copied_per_step: float = 0.0  # per replica
    slots: str = ""  # ring K / pool C / experts per GPU
    note: str = ""

    def score(self, objective: str) -> float:
        v = self.decode_tokens_per_s if objective == "decode" else self.prefill_tokens_per_s
        return v if self.fits and not math.isnan(v) else -math.inf


def _q(quant: str) -> str | None:
    return None if quant == "none" else quant


def _single_cluster(name: str) -> ClusterSpec:
    c = cluster_preset(name)
    if c.world_size != 1:
        raise SpecError(f"cluster: {name} has {c.world_size} GPUs; offload candidates run on a single-GPU preset")
    return c


class LocalDequant(BlockCosts):
    """Expert parallelism: a GPU dequantises only its own share ``frac`` of a block's experts."""

    def __init__(self, m: ModelSpec, cm, quant, dequant: str, frac: float) -> None:
        super().__init__(m, cm, quant, dequant)
        self.frac = frac

    def dequant(self, experts: int, kernels: int = 1) -> float:
        return super().dequant(max(1, math.ceil(experts * self.frac)), kernels)


def _simulate(model: ModelSpec, cluster: ClusterSpec, cfg, dequant_frac: float = 1.0):
    """``simulate_inference``; ``dequant_frac``: share of a block's experts this GPU dequantises (EP)."""
    from simulator.cost import CostModel
    from simulator.workload.inference import simulate_inference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # roofline fallbacks outside the profile's range
        costs = None
        if dequant_frac != 1.0:
            cm = CostModel.auto(cluster.gpu, impl=("torch", "triton"), loglog=True)
            costs = LocalDequant(model, cm, cfg.quant, cfg.dequant, dequant_frac)
        return simulate_inference(model, cluster, cfg, trace=False, costs=costs)[1]


def offload_candidate(req: PlanRequest, plan: str, quant: str) -> Candidate:
    """Ring or expert-aware offload, ``min(gpus, batch)`` data-parallel replicas."""
    from simulator.workload.inference import InferConfig

    replicas = min(req.gpus, req.batch)
    b = math.ceil(req.batch / replicas)
    cfg = InferConfig(mode=plan, batch=b, prompt_len=req.prompt_len, gen_len=req.gen_len,
                      gpu_budget_bytes=req.gpu_mem_gb * 1e9, quant=_q(quant), dequant=req.dequant)
    cluster = _single_cluster(req.cluster)
    try:
        res = _simulate(req.model, cluster, cfg)
    except SpecError as e:
        return Candidate(plan, quant, replicas, False, note=str(e).split(": ", 1)[-1])
    p = res.plan
    host = p.blocks * p.experts * p.expert_bytes
    problems = []
    if p.peak_hbm_bytes > req.gpu_mem_gb * 1e9:
        problems.append(f"peak {p.peak_hbm_bytes / 1e9:.1f} GB > {req.gpu_mem_gb:g} GB")
    if host > cluster.host_memory_bytes:  # the SSD store is not needed once loaded: not checked
        problems.append(f"experts {host / 1e9:.0f} GB > host DRAM {cluster.host_memory_bytes / 1e9:.0f} GB")
    scale = req.batch / b  # replicas x b sequences, of which `batch` are real
    return Candidate(
        plan, quant, replicas, not problems,
        prefill_tokens_per_s=res.prefill_tokens_per_s * scale,
        decode_tokens_per_s=res.decode_tokens_per_s * scale,
        gpu_mem_GB=p.peak_hbm_bytes / 1e9,
        host_mem_GB=p.blocks * p.experts * p.expert_bytes / 1e9,
        decode_GB_copied_per_step=res.bytes_copied_decode / max(1, req.gen_len - 1) / 1e9,
        slots=f"K={p.ring_slots}" if plan == "ring" else f"C={p.pool_slots}",
        note="; ".join(problems) or (f"{replicas} replicas x batch {b}" if replicas > 1 else ""),
    )


def a2a_seconds(cluster: ClusterSpec, n: int, per_rank_bytes: float) -> float:
    """One all-to-all in which each of ``n`` GPUs holds ``per_rank_bytes`` destined evenly to all ``n``
    GPUs (its own share stays local, ``(n - 1) / n`` of it moves; `simulator.collectives.all_to_all`,
    the analytic network)."""
    if n <= 1 or per_rank_bytes <= 0:
        return 0.0
    from simulator import collectives as C
    from simulator.engine import Sim

    sim = Sim(cluster, profile=None, trace=False)
    group = np.arange(n)
    M = np.full((n, n), per_rank_bytes / n)
    np.fill_diagonal(M, 0.0)
    took: list[float] = []

    def proc(r):
        t0 = sim.env.now
        yield sim.collective("a2a", r, n, lambda: C.all_to_all(sim.topo, group, M))
        took.append(sim.env.now - t0)

    for r in range(n):
        sim.env.process(proc(r))
    sim.env.run()
    return max(took)


def resident_ep_candidate(req: PlanRequest, quant: str) -> Candidate:
    """Every expert resident, split over ``gpus`` GPUs (see the module docstring for the model)."""
    from semoe.sizing import count_params
    from simulator.workload.inference import (
        InferConfig,
        activation_estimate_bytes,
        kv_cache_bytes,
    )
    from simulator.workload.inference_quant import expert_bytes, workspace_bytes

    m, N = req.model, req.gpus
    q = _q(quant)
    if N > 1 and m.experts < N:
        return Candidate("resident_ep", quant, N, False, note=f"{m.experts} experts cannot be split over {N} GPUs")
    e_loc = math.ceil(m.experts / N)
    dp = min(N, req.batch)  # attention data parallel over the GPUs that have sequences
    b = math.ceil(req.batch / dp)
    max_len = req.prompt_len + req.gen_len
    dense = count_params(m).dense * m.dtype_bytes
    kv = kv_cache_bytes(m, b, max_len)
    act = activation_estimate_bytes(m, b * req.prompt_len, b)
    ws = workspace_bytes(m, q, req.dequant) * e_loc / m.experts
    experts = m.moe_layers * e_loc * expert_bytes(m, q)
    need = dense + kv + 1.5 * act + ws + experts
    peak = dense + kv + act + ws + experts
    budget = req.gpu_mem_gb * 1e9
    slots = f"{e_loc}/{m.experts} experts per GPU"
    if need > budget:
        return Candidate("resident_ep", quant, N, False, gpu_mem_GB=need / 1e9, slots=slots,
                         note=f"needs {need / 1e9:.1f} GB per GPU > {req.gpu_mem_gb:g} GB")
    single = _single_cluster(req.cluster)
    cfg = InferConfig(mode="resident", batch=b, prompt_len=req.prompt_len, gen_len=req.gen_len,
                      gpu_budget_bytes=None, quant=q, dequant=req.dequant)
    # the GPU's work is simulated on one GPU with room for every expert (the memory check is above)
    big = single.replace(gpu=single.gpu.replace(memory_bytes=int(max(single.gpu.memory_bytes, 2 * need + 4 * experts * N))))
    res = _simulate(m, big, cfg, dequant_frac=e_loc / m.experts)
    prefill_s, decode_s = res.prefill_s, res.decode_s
    note = "one GPU" if N == 1 else f"{dp} GPUs x batch {b}; 2 all-to-alls per block"
    if N > 1:
        ep = cluster_preset(req.ep_cluster, math.ceil(N / cluster_preset(req.ep_cluster).gpus_per_node))
        tok_bytes = m.top_k * m.hidden * m.dtype_bytes  # routed rows of a token (a2a_seconds keeps 1/N local)
        a2a_prefill = 2 * m.moe_layers * a2a_seconds(ep, N, b * req.prompt_len * tok_bytes)
        a2a_decode = 2 * m.moe_layers * a2a_seconds(ep, N, b * tok_bytes)
        prefill_s += a2a_prefill
        decode_s += (req.gen_len - 1) * a2a_decode
    scale = req.batch / b
    return Candidate(
        "resident_ep", quant, N, True,
        prefill_tokens_per_s=scale * b * req.prompt_len / prefill_s,
        decode_tokens_per_s=scale * b * (req.gen_len - 1) / decode_s,
        gpu_mem_GB=peak / 1e9, slots=slots, note=note,
    )


def plan(req: PlanRequest) -> tuple[list[Candidate], Candidate | None]:
    """Every candidate and the recommended one (highest ``req.objective`` tokens/s among those that fit)."""
    cands: list[Candidate] = []
    for quant in req.quants:
        cands.append(resident_ep_candidate(req, quant))
        for mode in ("ring", "expert"):
            cands.append(offload_candidate(req, mode, quant))
    best = max(cands, key=lambda c: c.score(req.objective))
    return cands, (best if best.score(req.objective) > -math.inf else None)


def write_out(path: Path, req: PlanRequest, cands: list[Candidate], best: Candidate | None) -> None:
    from semoe.io import atomic_write_text

    rows = [dict(asdict(c), recommended=c is best, objective=req.objective, model=req.model.name, gpus=req.gpus,
                 gpu_mem_gb=req.gpu_mem_gb, batch=req.batch, prompt_len=req.prompt_len, gen_len=req.gen_len)
            for c in cands]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        atomic_write_text(path, json.dumps({"recommended": asdict(best) if best else None, "candidates": rows},
                                           indent=1, default=float) + "\n")
    elif path.suffix == ".csv":
        import pandas as pd

        atomic_write_text(path, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
    else:
        raise SpecError(f"out: {path} must end in .csv or .json")


def print_table(req: PlanRequest, cands: list[Candidate], best: Candidate | None) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    t = Table(title=f"{req.model.name} on {req.gpus} GPU(s) x {req.gpu_mem_gb:g} GB: batch {req.batch}, "
                    f"prompt {req.prompt_len}, gen {req.gen_len}")
    for col, j in (("plan", "left"), ("experts", "left"), ("GPUs", "right"), ("fits", "left"),
                   ("prefill tok/s", "right"), ("decode tok/s", "right"), ("GB/GPU", "right"),
                   ("host GB", "right"), ("copied GB/step", "right"), ("slots", "left")):
        t.add_column(col, justify=j, no_wrap=col in ("plan", "slots"))
    notes = []
    for i, c in enumerate(cands, 1):
        mark = " *" if c is best else ""
        t.add_row(f"{i}. {c.plan}{mark}", "bf16" if c.quant == "none" else c.quant, str(c.gpus_used),
                  "yes" if c.fits else "no", f(c.prefill_tokens_per_s, ",.0f"), f(c.decode_tokens_per_s, ",.1f"),
                  f(c.gpu_mem_GB, ".1f"), f(c.host_mem_GB, ".1f"), f(c.decode_GB_copied_per_step, ".2f"), c.slots)
        if c.note:
            notes.append(f"  {i}. {c.note}")
    con = Console(width=max(120, Console().width))
    con.print(t)
    if notes:
        con.print("notes:\n" + "\n".join(notes), highlight=False)
    con.print("GB/GPU: peak GPU memory per GPU; host GB: pinned host copy of the experts; copied GB/step: H2D "
              "bytes per decode step per GPU", highlight=False)
    con.print("limits: resident_ep is a simple expert-parallel model (balanced routing, all-to-all not overlapped "
              "with compute, the single-GPU engine's host program); offload plans run one replica per GPU with its "
              "own PCIe link; * = recommended", highlight=False)
    if best is None:
        con.print("no candidate fits: more GPUs, more memory per GPU, a smaller batch or quantised experts")
    else:
        q = "bf16" if best.quant == "none" else best.quant
        con.print(f"recommended (objective: {req.objective} tokens/s): {best.plan} with {q} experts on "
                  f"{best.gpus_used} GPU(s): prefill {best.prefill_tokens_per_s:,.0f} tok/s, decode "
                  f"{best.decode_tokens_per_s:,.1f} tok/s, {best.gpu_mem_GB:.1f} GB per GPU")
