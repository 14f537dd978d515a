"""The offload bench's cases (`reference.offload.bench`): the models of configs (a) and (b) and their sizes,
one training case of the offload engine (`run_case`, the all-in-HBM baseline's bf16 experts) and DeepSpeed
ZeRO-Offload in a child process (config (c), `run_deepspeed`)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from reference.offload.bench_loop import (
    case_device,
    micro_batches,
    release,
    step_metrics,
    timed_steps,
)
from reference.offload.bench_rows import GB, Rows, log


# ---------------------------------------------------------------------------------- configurations
def specs(quick: bool, args) -> dict:
    from semoe.presets import load_model

    tiny = load_model("tiny")
    if quick:
        a = tiny.replace(name="bench_a_quick")
        b = tiny.replace(name="bench_b_quick", experts=8)
        return {"a": (a, 4, 32), "b": (b, 4, 32)}
    common = {"heads": 16, "vocab": 256, "max_seq": args.seq, "moe_every": 1, "top_k": 2, "activation": "gelu",
                  "norm": "layernorm", "position": "learned", "dtype": "bf16", "tied_embeddings": True}
    a = tiny.replace(name="bench_a_compute_bound", layers=args.a_layers, hidden=args.a_hidden, ffn=args.a_ffn,
                     experts=args.a_experts, **common)
    b = tiny.replace(name="bench_b_over_budget", layers=args.b_layers, hidden=args.b_hidden, ffn=args.b_ffn,
                     experts=args.b_experts, **common)
    return {"a": (a, args.a_batch, args.seq), "b": (b, args.b_batch, args.seq)}


AB_SUFFIX = "_torch_threads"  # label suffix of the A/B cases: the engine's AdamW on torch's default threads


def ab_label(config: str) -> str:
    """The A/B twin of a case's ``config``: its label + `AB_SUFFIX` (``ExpertOffload(adam_threads=0)``: one
    intra-op thread per core, the engine before task hB), the rest unchanged."""
    label, _, rest = config.partition(" ")
    return f"{label}{AB_SUFFIX} {rest}"


def cache_per_layer(spec, frac: float) -> int:
    """CPU cache capacity of the ``ssd`` placement in experts **per MoE layer** (``ParallelPlan.cpu_cache_experts``,
    as `reference.offload.engine` and `semoe.sizing` count it): ``frac`` of a layer's experts, at least 1."""
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"bench: cache fraction must be in (0, 1], got {frac}")
    return max(1, int(frac * spec.experts))


def states_bytes(spec) -> int:
    """Training states at 16 bytes per parameter (bf16 weight + grad, fp32 master, m, v)."""
    from semoe.sizing import count_params

    return 16 * count_params(spec).total


def expert_params(spec) -> int:
    mult = 3 if spec.activation == "swiglu" else 2
    moe_layers = sum(spec.is_moe_layer(i) for i in range(spec.layers))
    return moe_layers * spec.experts * mult * spec.hidden * spec.ffn


def expert_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Per-expert tensor shapes of one MoE layer of ``spec``, in `reference.offload.engine.EXPERT_TENSORS` order."""
    D, F = spec.hidden, spec.ffn
    glu = spec.activation == "swiglu"
    out = {"w1_EDF": (D, F)}
    if glu:
        out["w3_EDF"] = (D, F)
    out["w2_EFD"] = (F, D)
    if spec.bias:
        out["b1_EF"] = (F,)
        if glu:
            out["b3_EF"] = (F,)
        out["b2_ED"] = (D,)
    return out


# ---------------------------------------------------------------------------------- one case
def _bf16_experts(model) -> None:
    """All-in-HBM baseline: run the experts on bf16 copies of the fp32 weights (what autocast would do),
    so it takes the same torch._grouped_mm path as the offload pool's bf16 slots."""
    from torch.nn.utils.stateless import _reparametrize_module

    for layer in model.moe_layers():
        layer.backend = "torch"  # the same dispatch + grouped experts path as the offload engine's
        ex = layer.experts
        orig = type(ex).forward

        def fwd(x, counts=None, ex=ex, orig=orig):
            params = {n: p.to(torch.bfloat16) for n, p in ex.named_parameters(recurse=False)}
            with _reparametrize_module(ex, params):
                return orig(ex, x.to(torch.bfloat16), counts)

        ex.forward = fwd


def run_case(spec, batch: int, seq: int, placement: str, depth: int, cache: int, steps: int, warmup: int,
             ssd_dir: Path, trace_path: Path | None, time_left, micro: int = 1, base=None,
             profile_path: Path | None = None, adam_threads: int | None = None, adjacent=None) -> dict:
    """Train ``steps`` (after ``warmup``) steps of ``micro`` micro-batches of ``batch`` x ``seq`` tokens
    (gradients accumulated); returns the metrics. ``base``: an initialised CPU model to copy (initialising
    a large MoEDecoder draws its weights in fp64 and takes seconds). ``adam_threads``: the engine's (None: its
    rule; 0: torch's default, the engine before task hB); the thread counts the engine read back inside its
    threads are returned as ``threads_main`` / ``threads_adam`` / ``threads_io``. ``adjacent``: called with
    ``"before"`` once the warm-up's updates drained (right before the counted step) and ``"after"`` once the last
    timed step's updates drained (before a ``profile_path`` step), with the engine idle (`adjacent_recorder`);
    only for an offloaded placement."""
    from reference.model import MoEDecoder
    from reference.offload.engine import ExpertOffload
    from reference.train import TrainConfig, make_optimizer
    from semoe.plan_spec import OffloadPlacement, ParallelPlan
    from semoe.trace import TraceRow, write_csv

    cuda, device = case_device()
    t_build = time.perf_counter()
    # on the CPU: offloaded experts never occupy the GPU in fp32
    model = copy.deepcopy(base) if base is not None else MoEDecoder(spec, seed=0)
    amp = torch.bfloat16 if cuda else None
    eng = None
    if placement == "gpu":
        if cuda:
            _bf16_experts(model)
    else:
        plan = ParallelPlan(offload=OffloadPlacement(expert_params=placement, expert_optimizer=placement),
                            prefetch_depth=depth, cpu_cache_experts=cache if placement == "ssd" else 0)
        eng = ExpertOffload(model, plan, device=device, compute_dtype=amp, ssd_dir=ssd_dir,
                            trace=trace_path is not None, adam_threads=adam_threads)
    model = model.to(device)
    cfg = TrainConfig(steps=warmup + steps, lr=1e-4, warmup_steps=1)
    opt = make_optimizer(model, cfg)
    build_s = time.perf_counter() - t_build
    gen = torch.Generator(device=device).manual_seed(0)

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        out = micro_batches(model, spec, batch, seq, micro, device, amp, gen)
        if eng is not None:
            eng.clip_grad_norm_(model, 1.0)
            eng.step(1e-4)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(out.loss.detach())  # synchronises

    t_origin = eng.t0 if eng is not None else time.perf_counter()
    before = None

    # counters: over steps warmup .. warmup + steps (steps + 1 of them), opened after eng.wait() so that the
    # last warm-up step's host updates and SSD I/O (asynchronous) are not counted in the window; the times
    # are those of the steps after that first counted one (each overlaps its predecessor's updates)
    def open_window(step: int) -> None:
        nonlocal before
        if step == warmup and eng is not None:
            eng.wait()
            if adjacent is not None:
                adjacent("before")
            before = dict(eng.stats())

    try:
        times, step_rows = timed_steps(train_step, warmup + 1 + steps, warmup + 1, time_left, t_origin, open_window)
        after = None
        if eng is not None:
            eng.wait()
            after = dict(eng.stats())  # the counter window ends here: the profiled step below stays out of it
            if adjacent is not None and times:
                adjacent("after")
        if profile_path is not None:  # one more (untimed) step under torch.profiler: where the time goes
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                train_step()
                if eng is not None:
                    eng.wait()
                # its own phase, so that trace readers keep its rows out of the measured steps' windows
                step_rows.append(TraceRow(0, -1, warmup + 1 + steps, "profile_step", t0 - t_origin,
                                          time.perf_counter() - t_origin, 0, 0, "compute"))
            key = "cuda_time_total" if cuda else "cpu_time_total"
            profile_path.write_text(prof.key_averages().table(sort_by=key, row_limit=60))
            log(f"    profile of one step -> {profile_path}")
    finally:
        if eng is not None:
            eng.close()
    res = step_metrics(times, micro, batch, seq, cuda, build_s)
    if eng is not None:
        s, n = after, len(times) + 1  # the counted steps (see above)
        b = before or {k: 0 for k in s}
        d = {k: s[k] - b.get(k, 0) for k in ("h2d_bytes", "d2h_bytes", "cpu_adam_s", "host_wait_s", "fetch_hits",
                                             "fetch_misses", "cache_hits", "cache_misses")}
        res.update({f"threads_{k}": v for k, v in eng.threads.items()})
        res["h2d_gb_per_step"] = d["h2d_bytes"] / n / GB
        res["d2h_gb_per_step"] = d["d2h_bytes"] / n / GB
        res["counted_steps"] = n
        res["cpu_adam_ms_per_step"] = 1e3 * d["cpu_adam_s"] / n
        res["host_wait_ms_per_step"] = 1e3 * d["host_wait_s"] / n
        fetched = d["fetch_hits"] + d["fetch_misses"]
        res["fetch_hit_rate"] = d["fetch_hits"] / fetched if fetched else 0.0
        if placement == "ssd":
            looked = d["cache_hits"] + d["cache_misses"]
            res["cache_hit_rate"] = d["cache_hits"] / looked if looked else 0.0
            res["cache_experts_per_layer"] = cache
            res["ssd_read_gb_per_step"] = (s.get("ssd_read_bytes", 0) - b.get("ssd_read_bytes", 0)) / n / GB
            res["ssd_write_gb_per_step"] = (s.get("ssd_write_bytes", 0) - b.get("ssd_write_bytes", 0)) / n / GB
        if trace_path is not None:
            write_csv(sorted(eng.trace_rows() + step_rows, key=lambda r: r.start_s), trace_path)
    elif trace_path is not None:
        write_csv(step_rows, trace_path)
    model = opt = eng = None  # (not del: train_step closes over them)
    release(cuda)
    return res


# ---------------------------------------------------------------------------------- DeepSpeed child
DS_CHILD = r'''
import json, os, sys, threading, time, statistics
import torch
spec_d, batch, seq, steps, frac = json.loads(sys.argv[1])
T0 = time.perf_counter()
def progress(msg):
    print(f"[child {time.perf_counter() - T0:6.1f} s] {msg}", file=sys.stderr, flush=True)
progress(f"start: torch {torch.__version__}, cuda {torch.cuda.is_available()}")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("DS_PORT", "29517"), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from deepspeed.ops.op_builder import CPUAdamBuilder
progress(f"deepspeed {deepspeed.__version__} imported; building/loading the CPUAdam op (ninja JIT on first use)")
t = time.perf_counter()
done = threading.Event()
def heartbeat():
    while not done.wait(10.0):
        progress(f"  CPUAdam build still running ({time.perf_counter() - t:.0f} s)")
threading.Thread(target=heartbeat, daemon=True).start()
CPUAdamBuilder().load(verbose=True)
done.set()
progress(f"CPUAdam op ready in {time.perf_counter() - t:.1f} s")
print(json.dumps({"metric": "cpu_adam_build_s", "value": time.perf_counter() - t}), flush=True)
if frac:
    torch.cuda.set_per_process_memory_fraction(frac)
from semoe.model_spec import ModelSpec
from reference.model import MoEDecoder
spec = ModelSpec.from_dict(spec_d)
deepspeed.init_distributed(dist_backend="nccl")
model = MoEDecoder(spec, seed=0).cuda()
cfg = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0, "bf16": {"enabled": True},
       "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                 "weight_decay": 0.01}}}
progress("model built; deepspeed.initialize")
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
progress("initialised; training")
times = []
for step in range(2 + steps):
    x = torch.randint(0, spec.vocab, (batch, seq + 1), device="cuda")
    t0 = time.perf_counter()
    out = engine(x[:, :-1], x[:, 1:])
    engine.backward(out.loss)
    engine.step()
    float(out.loss)
    if step >= 2:
        times.append(time.perf_counter() - t0)
    progress(f"step {step}: {1e3 * (time.perf_counter() - t0):.1f} ms")
med = statistics.median(times)
for k, v in (("step_ms", 1e3 * med), ("tokens_per_s", batch * seq / med),
             ("peak_mem_gb", torch.cuda.max_memory_allocated() / 1e9)):
    print(json.dumps({"metric": k, "value": v}), flush=True)
'''


def run_deepspeed(rows: Rows, spec, batch: int, seq: int, steps: int, frac: float | None, cap_s: float,
                  out: Path, config: str = "c_deepspeed") -> str | None:
    """DeepSpeed ZeRO-Offload in a child process; returns why it failed (None if it ran). The child's
    stdout (JSON metric lines) and stderr (progress, the JIT build's compiler output) go to
    ``out/deepspeed_child.log`` as they are written, so a run cut short still shows how far it got."""
    log_path = out / "deepspeed_child.log"
    cmd = [sys.executable, "-u", "-c", DS_CHILD, json.dumps([spec.to_dict(), batch, seq, steps, frac])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))  # ninja's parallelism for the CPUAdam build
    with log_path.open("w") as fh:
        fh.write(f"cap {cap_s:.0f} s; command: {' '.join(cmd[:3])} <DS_CHILD> ...\n")
        fh.flush()
        # its own session, so that a timeout also ends the compilers its JIT build started
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = "timeout"
            fh.write(f"\ntimed out after {cap_s:.0f} s\n")
        fh.write(f"rc={rc}\n")
    text = log_path.read_text(errors="replace")
    got = 0
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "metric" in rec:
            rows.add(config, "zero_offload_cpu", "-", rec["metric"], float(rec["value"]))
            got += 1
    if rc != 0:
        tail = [ln for ln in text.strip().splitlines() if not ln.startswith("rc=")]
        reason = f"timed out after {cap_s:.0f} s" if rc == "timeout" else (tail or ["no output"])[-1][:200]
        last = next((ln for ln in reversed(tail) if ln.startswith("[child")), None)
        if rc == "timeout" and last:
            reason += f"; last progress: {last[:150]}"
        log(f"  DeepSpeed ZeRO-Offload failed ({rc}): {reason} (see {log_path})")
        rows.add(config, "zero_offload_cpu", "-", "deepspeed_failed", 1)
        return f"rc={rc}: {reason}"
    return None

