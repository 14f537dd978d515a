"""The MoE layer and training parts of `simulator.validate_multigpu` (its module docstring gives the rules): the
rows of a run's ``moe.csv`` (the reference `MoELayer` with `EPDispatcher`, `moe_prediction`) and ``train.csv``
(`reference.train` steps, `simulate_train` with the trainer's host program and `EPDispatcher`'s work, `ep_program`)
beside the simulation, on the run's cluster with its NVLink calibration."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.validate_multigpu_model import _row, _sim, cluster_for, gpu_cost_model, op_time

_MOE = re.compile(r"(?P<name>\S+) E(?P<E>\d+) k(?P<k>\d+) H(?P<H>\d+) F(?P<F>\d+) T(?P<T>\d+)/rank (?P<gate>\S+) "
                  r"(?P<dtype>\w+) ep(?P<ep>\d+)$")
_TRAIN = re.compile(r"(?P<name>\S+) L(?P<L>\d+) D(?P<D>\d+) E(?P<E>\d+) k(?P<k>\d+) F(?P<F>\d+) (?P<dtype>\w+) "
                    r"B(?P<B>\d+) S(?P<S>\d+) ep(?P<ep>\d+) (?P<a2a>\S+) gpn(?P<gpn>\S+) params(?P<params>\d+) "
                    r"steps(?P<steps>\d+)(?P<traced> traced)?$")
_TRAIN_IMPL = re.compile(r"zero(?P<zero>\d+)_bucket(?P<bucket>\d+)$")
_HETU = re.compile(r"hetu_p(?P<p>\d+)$")
_RAIL = re.compile(r"rail_p(?P<p>\d+)$")


# ------------------------------------------------------------------------------------------ MoE layer
def parse_moe_config(config: str):
    """'mixtral_like E8 k2 H4096 F14336 T16384/rank topk bf16 ep2' -> (MoELayerConfig, dtype, ep)."""
    from semoe.moe_layer_configs import MoELayerConfig

    m = _MOE.match(str(config))
    if m is None:
        raise ValueError(f"validate_multigpu: cannot parse moe.csv config {config!r}")
    cfg = MoELayerConfig(m["name"], int(m["E"]), int(m["k"]), int(m["H"]), int(m["F"]), int(m["T"]), gate=m["gate"])
    return cfg, m["dtype"], int(m["ep"])


def moe_prediction(sim, cfg, ep: int, impl: str, world: int) -> dict:
    """Forward + backward seconds per rank of one EP MoE layer (weak scaling: ``cfg.tokens`` per rank).

    Compute: the torch-backend layer the run times (`simulator.torch_moe_layer`, path ``reference``: the
    reference `MoELayer`'s kernels counted from its code, GEMMs from the kernel profile's torch rows with the rank's
    ``E / ep`` local experts each receiving ``T k ep / E`` rows (balanced routing: the run measured 1.002-1.004
    max/mean received rows), memory passes at the measured class rates scaled to the GPU, the host issuing each
    kernel and waiting at the layer's syncs). `EPDispatcher`'s own work is placed in that kernel order
    (`torch_moe_layer.ep_inserts`): the count all-gather (``E`` int64 per rank, then a host sync), four
    all-to-alls of ``T k H`` bytes per rank (dispatch, combine, and their backward; blocking, no overlap) and four
    regroups of the received rows (``torch.cat``: forward two, backward two). HetuMoE (``hetu_p<p>``): the
    simulator's schedule through the node leader plus the leader's two regroups of the node's ``p T k`` rows per
    all-to-all (`reference.comm.alltoall.AllToAll._hetu`), on the critical path of every rank."""
    from simulator import collectives as C
    from simulator import torch_layer_probe
    from simulator.torch_moe_layer import (
        count_layer,
        ep_inserts,
        layer_time,
        regroup_time,
    )
    from simulator.train_host import mem_rates

    cm = sim.cost
    T, E, k, H, F = cfg.tokens, cfg.experts, cfg.top_k, cfg.hidden, cfg.ffn
    TK = T * k
    ranks = np.arange(ep)
    row_bytes = H * 2  # bf16 rows
    M = np.full((ep, ep), TK * row_bytes / ep)
    rates = mem_rates()
    hetu_regroup = 0.0
    if impl == "flat" or (_RAIL.match(impl) and int(_RAIL.match(impl)["p"]) >= ep):
        a2a = C.all_to_all(sim.topo, ranks, M, "flat")
        algo = "flat"
    elif (h := _HETU.match(impl)) or _RAIL.match(impl):
        algo = "hetu" if h else "rail"
        fn = C.all_to_all_hetu if h else C.all_to_all_rail
        a2a = fn(sim.topo, ranks, M)
        if h:
            p = min(int(h["p"]), ep)
            hetu_regroup = 2 * regroup_time(cm, p * TK, H, rates)
    else:
        raise ValueError(f"validate_multigpu: unknown all-to-all variant {impl!r}")
    t_a2a = op_time(sim, a2a) + hetu_regroup
    t_counts = op_time(sim, C.all_gather(sim.topo, ranks, 8.0 * E * ep))  # gather_counts: [G, E] int64
    rg = regroup_time(cm, TK, H, rates) if ep > 1 else 0.0
    prog = count_layer("reference", E, k, cfg.gate, cfg.renormalize)
    r = layer_time(prog, T, H, F, cm, rates, cm.host_op_impl("reference"), cm.host_op_impl("torch"),
                   groups=E // ep, routed_rows=TK, breakdown=True, inserts=ep_inserts(t_a2a, t_counts, rg),
                   probe=torch_layer_probe.load(cm.gpu.name))
    comm = 4 * t_a2a + t_counts
    total = r["fwd_bwd"]
    return {"fwd_bwd_s": total, "compute_s": total - comm - 4 * rg, "a2a_s": t_a2a, "comm_s": comm,
            "regroup_s": 4 * rg, "algo": algo, "hetu_regroup_s": hetu_regroup,
            "gemm_s": r["fwd_gemm_s"] + r["bwd_gemm_s"],
            "mem_s": sum(r["fwd_mem_s"].values()) + sum(r["bwd_mem_s"].values()),
            "kernels": r["fwd_kernels"] + r["bwd_kernels"]}


def moe_rows(path: Path, cal=None) -> list[dict]:
    df = pd.read_csv(path, dtype={"commit": str})
    rows: list[dict] = []
    cache: dict = {}
    for r in df.itertuples():
        run = f"{path.parent.name} {r.commit}"
        cfg_s = f"{r.config} {r.impl}"
        if r.metric in ("recv_rows_max_over_mean", "max_rel_diff_vs_flat", "agree_with_flat"):
            rows.append(_row(cfg_s, r.metric, r.value, status="not_modelled", kind="ratio", run=run,
                             note="routing balance / correctness vs flat, not a simulated quantity"))
            continue
        cfg, _dtype, ep = parse_moe_config(r.config)
        key = (r.config, r.impl, r.device, int(r.world))
        if key not in cache:
            c = cluster_for(r.device, int(r.world))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # profile borrowing / roofline fallbacks (router GEMM)
                if c is None:
                    cache[key] = None
                else:
                    cost, native = gpu_cost_model(c.gpu)
                    cache[key] = moe_prediction(_sim(c, cost, cal), cfg, ep, r.impl, int(r.world))
                    cache[key]["native"] = native
        p = cache[key]
        if p is None:
            rows.append(_row(cfg_s, r.metric, r.value, status="not_modelled", run=run,
                             note=f"no cluster preset for {r.device} x {r.world}"))
            continue
        ms = p["fwd_bwd_s"] * 1e3
        parts = (f"torch-backend layer {p['kernels']} kernels (GEMMs {p['gemm_s'] * 1e3:.2f} ms, memory passes "
                 f"{p['mem_s'] * 1e3:.2f} ms, host timeline: compute {p['compute_s'] * 1e3:.2f} ms) + 4 regroups "
                 f"{p['regroup_s'] * 1e3:.2f} ms + 4 all-to-alls x {p['a2a_s'] * 1e3:.3f} ms ({p['algo']}) + counts; "
                 + ("the H200's own kernel profile" if p.get("native") else "H100 profile extrapolated to the H200"))
        if r.metric == "fwd_bwd_ms":
            note = parts
            if p["algo"] == "hetu":
                note += ("; the simulator's HetuMoE ships the non-leader's whole buffer through the leader as the "
                         f"reference does, plus the leader's two regroups of the node's rows "
                         f"({p['hetu_regroup_s'] * 1e3:.3f} ms per all-to-all)")
            rows.append(_row(cfg_s, r.metric, r.value, ms, status="validated" if p.get("native") else "extrapolated",
                             note=note, run=run))
        elif r.metric == "fwd_bwd_ms_max":
            rows.append(_row(cfg_s, r.metric, r.value, ms, status="derived", run=run,
                             note="max over ranks; symmetric ranks in the model: scored once, as fwd_bwd_ms"))
        elif r.metric == "tokens_per_s":
            rows.append(_row(cfg_s, r.metric, r.value, cfg.tokens * int(r.world) / p["fwd_bwd_s"], status="derived",
                             run=run, note="global tokens / fwd_bwd_ms_max: same error as its inverse"))
        elif r.metric == "tflops_per_rank":
            rows.append(_row(cfg_s, r.metric, r.value, cfg.flops("fwd_bwd") / p["fwd_bwd_s"] / 1e12, status="derived",
                             kind="throughput", run=run, note="routed FLOPs / fwd_bwd_ms"))
        else:
            rows.append(_row(cfg_s, r.metric, r.value, status="not_modelled", run=run, note="unknown metric"))
    return rows


# ------------------------------------------------------------------------------------------- training
def parse_train(config: str, impl: str) -> dict:
    m = _TRAIN.match(str(config))
    z = _TRAIN_IMPL.match(str(impl))
    if m is None or z is None:
        raise ValueError(f"validate_multigpu: cannot parse train.csv config {config!r} / impl {impl!r}")
    return {"preset": m["name"].removesuffix("-scaled"), "layers": int(m["L"]), "hidden": int(m["D"]),
            "experts": int(m["E"]), "top_k": int(m["k"]), "ffn": int(m["F"]), "dtype": m["dtype"],
            "batch": int(m["B"]), "seq": int(m["S"]), "ep": int(m["ep"]), "a2a": m["a2a"], "params": int(m["params"]),
            "traced": bool(m["traced"]), "zero": int(z["zero"]), "bucket": int(z["bucket"])}


def simulate_train(t: dict, cluster, cal=None, host_program: bool = True, ep_dispatcher: bool = True) -> dict:
    """One `reference.train` step of the parsed config on ``cluster`` (DP = world, EP as parsed), the way
    `paper_repro.validate.simulate_train` does it for the single GPU: ``impl="reference"``, torch MoE backend
    with grouped experts (the run's commit contains 676c520), fused AdamW (42307ef), GradSync (torchrun), the
    trainer's host program (`train_host_program`: kernels per segment, host syncs, memory passes per class;
    ``host_program=False``: the reference's aten operator count as the host floor, the model before issue 9's
    torch-layer work) with `EPDispatcher`'s own work added when EP > 1 (`ep_program`; ``ep_dispatcher=False``
    leaves it out); the run GPU's kernel profile (`gpu_cost_model`)."""
    from paper_repro.validate import TRAIN_HEADS, reference_host_ops
    from semoe import Run, Workload, sizing
    from semoe.plan_spec import ParallelPlan
    from semoe.presets import model_preset
    from simulator.workload.training import TrainingIteration

    W = cluster.world_size
    m = model_preset(t["preset"]).replace(layers=t["layers"], hidden=t["hidden"], heads=TRAIN_HEADS, ffn=t["ffn"],
                                          experts=t["experts"], top_k=t["top_k"], dtype=t["dtype"],
                                          name=f"{t['preset']}-scaled")
    n = sizing.count_params(m).total
    if n != t["params"]:
        raise ValueError(f"validate_multigpu: rebuilt model has {n} parameters, train.csv says {t['params']}")
    if t["batch"] % W:
        raise ValueError(f"validate_multigpu: global batch {t['batch']} not divisible by world {W}")
    plan = ParallelPlan(data_parallel=W, expert_parallel=t["ep"], alltoall=t["a2a"], fusion_bucket_bytes=t["bucket"],
                        zero_stage=t["zero"])
    run = Run(model=m, cluster=cluster, plan=plan, workload=Workload(micro_batch=t["batch"] // W, seq_len=t["seq"],
                                                                     steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops = reference_host_ops(m)
        cost, native = gpu_cost_model(cluster.gpu, ("triton", "torch"))
        sim = _sim(cluster, cost, cal)
        prog, prog_note = train_host_program(m, "fused", "torch") if host_program else (None, "")
        if prog is not None and t["ep"] > 1 and ep_dispatcher:
            prog = ep_program(prog, m.top_k)
            prog_note += "; EPDispatcher's count sync and regroups added (ep_program)"
        out = TrainingIteration(run, sim, impl="reference", host_ops=0.0 if prog is not None else ops,
                                host_program=prog, expert_impl="grouped", expert_kernels="torch",
                                ref_optimizer="fused", grad_sync=True).run()
        out["native"] = native
        out["program_note"] = prog_note or "no host program: the reference's aten operator count as the host floor"
        return out


PROGRAM_LAYERS = (4,)  # the block counts `simulator.train_op_counts.CONFIGS` counts the reference trainer at


def train_host_program(m, adamw: str = "fused", backend: str = "torch"):
    """(`TrainProgram`, note) of the reference trainer for model ``m`` (`simulator.train_host.train_program`: the
    CUDA table, the CPU table as fallback), or None. The tables key the code path with the block count; a model of
    another depth runs the same per-block code, so its program is the counted structure's at `PROGRAM_LAYERS`
    (per-block segments are issued once per block by the workload; the per-step segments (embedding, head, clip,
    fused AdamW) were counted at that depth: the clip's foreach kernels over more tensors, a small overcount)."""
    from simulator.train_host import train_program

    prog = train_program(m, adamw, backend)
    if prog is not None:
        return prog, f"the trainer's host program ({prog.source})"
    for L in PROGRAM_LAYERS:
        prog = train_program(m.replace(layers=L), adamw, backend)
        if prog is not None:
            return prog, (f"the trainer's host program of the same code path counted at L{L} ({prog.source}; "
                          f"per-block segments per block, per-step segments at L{L})")
    return None, ""


EP_COUNT_KERNELS = 3  # gather_counts: the all-gather, the cat of the gathered rows, the copy to the CPU (a sync)
EP_FWD_KERNELS = 4  # dispatch and combine: one all_to_all_single and one regroup cat each
EP_BWD_KERNELS = 4  # the reverse all-to-alls and the split backward's cats
EP_ROW_BYTES = 4  # the dispatcher's rows are the fp32 residual stream under autocast (`workload.training` REF_DISPATCH)


def ep_program(prog, top_k: int, row_bytes: int = EP_ROW_BYTES):
    """``prog`` (counted on one process, `LocalDispatcher`) with `reference.parallel.ep_dispatcher.EPDispatcher`'s
    own work per MoE block: after the permute, ``gather_counts`` (`EP_COUNT_KERNELS` kernels ending in a host
    sync: the counts' ``.cpu()``) as a piece of the forward FFN before its last piece; in that last piece the two
    all-to-all calls and two regroups (``torch.cat`` of the received rows, a ``copy`` pass reading and writing
    ``top_k`` rows of ``row_bytes`` per token and unit of hidden each); in the backward the same four kernels and
    two regroup passes. The all-to-alls' device time is the workload's own (``dispatch_a2a`` ...)."""
    import dataclasses

    from simulator.train_host import TrainProgram

    ffn = prog.group("moe.ffn")
    if not ffn:
        return prog
    last = ffn[-1]
    n = len(ffn)
    cat = ("copy", 2.0, (2.0 * 2 * top_k * row_bytes, 0.0, 0.0, 0.0, 0.0))  # 2 cats, read + write k rows
    sync_piece = dataclasses.replace(last, name=f"moe.ffn_{n - 1}" if n > 1 else "moe.ffn", kernels=EP_COUNT_KERNELS,
                                     sync=True, casts=(0.0,) * len(last.casts), lead=0, mem=())
    new_last = dataclasses.replace(last, name=f"moe.ffn_{n}", kernels=last.kernels + EP_FWD_KERNELS,
                                   mem=tuple(last.mem) + (cat,))
    segs = []
    for sg in prog.segments:
        if sg is last:
            segs += [sync_piece, new_last]
        elif sg.name == "moe.bwd":
            segs.append(dataclasses.replace(sg, kernels=sg.kernels + EP_BWD_KERNELS, mem=tuple(sg.mem) + (cat,)))
        else:
            segs.append(sg)
    if n == 1:  # the router piece itself becomes the sync piece's predecessor: keep the names in order
        segs = [dataclasses.replace(x, name="moe.ffn_1") if x is new_last else x for x in segs]
    return TrainProgram(prog.config + " ep", tuple(segs), prog.source, prog.mem_source)


def train_rows(path: Path, cal=None) -> list[dict]:
    df = pd.read_csv(path, dtype={"commit": str, "rank": str})
    rows: list[dict] = []
    cache: dict = {}
    leaked: dict = {}  # (run, device, world) -> bytes the process's earlier train() runs left allocated
    before: dict = {}  # (run, device, world) + config key -> leaked bytes when that run started
    for r in df.itertuples():
        run = f"{path.parent.name} {r.commit}"
        cfg_s = f"{r.config} {r.impl}"
        metric = r.metric if r.rank == "all" else f"{r.metric} rank{r.rank}"
        t = parse_train(r.config, r.impl)
        if t["traced"]:
            rows.append(_row(cfg_s, metric, r.value, status="not_modelled", run=run,
                             note="traced run (every phase boundary synchronises): not simulated"))
            continue
        key = (r.config, r.impl, r.device, int(r.world))
        if key not in cache:
            c = cluster_for(r.device, int(r.world))
            cache[key] = None if c is None else simulate_train(t, c, cal)
        s = cache[key]
        if s is None:
            rows.append(_row(cfg_s, metric, r.value, status="not_modelled", run=run,
                             note=f"no cluster preset for {r.device} x {r.world}"))
            continue
        desc = (f"simulated step {s['step_time_s'] * 1e3:.1f} ms (device {s['device_step_s'] * 1e3:.1f}, host "
                f"{s['host_s'] * 1e3:.1f}, {s.get('host_syncs', 0)} host syncs); {s.get('program_note', '')}; "
                + ("the H200's own kernel profile" if s.get("native") else "H100 profile extrapolated to the H200"))
        if r.metric == "tokens_per_s":
            rows.append(_row(cfg_s, metric, r.value, s["tokens_per_s"],
                             status="validated" if s.get("native") else "extrapolated", note=desc, run=run))
        elif r.metric == "step_s":
            rows.append(_row(cfg_s, metric, r.value, s["step_time_s"], status="derived", run=run,
                             note="tokens per step / tokens_per_s: same error as its inverse"))
        elif r.metric == "mfu":
            rows.append(_row(cfg_s, metric, r.value, s["mfu"], status="derived", kind="ratio", run=run,
                             note="tokens_per_s x training FLOPs per token / peak: same error as tokens_per_s"))
        elif r.metric.startswith("peak_mem"):
            from simulator.train_memory import multigpu_peak

            proc = (run, r.device, int(r.world))
            if proc + key not in before:  # train.csv lists one process's runs in the order it trained them
                before[proc + key] = leaked.get(proc, 0.0)
                leaked[proc] = leaked.get(proc, 0.0) + s.get("leaked_state_bytes", 0.0)
            # the leak is scored: confirmed on the H100 (results/profiles/train_mem_probe_cuda.csv, leak_* rows:
            # each finished run leaves its fp32 parameters and gradients allocated, zero0 and zero3 alike)
            pred, status, note = multigpu_peak(s, metric, before[proc + key], score_leaked=True)
            rows.append(_row(cfg_s, metric, r.value, pred, status=status, kind="memory", run=run, note=note))
        else:
            rows.append(_row(cfg_s, metric, r.value, status="not_modelled", run=run,
                             note="loss values and wall time with the model build: not simulated"))
    return rows
