"""One offload bench case and its simulation (`simulator.validate_offload`): the bench ``config`` parsed
(`parse_config`; format in that module's docstring) and written (`config_string`), the case's `Run` (`build_run`),
the reference-trainer step simulated (`simulate`, cached per arguments) and each bench metric's simulated value
(`_predict`).

Torch- and pandas-free at import: `reference.offload.bench` imports `config_string` on the GPU box.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

# bench metrics by kind (`simulator.validate_offload.rows` passes the kind to semoe validate)
TIME_METRICS = ("step_ms", "step_s", "tokens_per_s", "cpu_adam_ms_per_step", "ratio_vs_gpu")
RATIO_METRICS = ("hit_rate", "cache_hit_rate")
BYTES_METRICS = ("h2d_gb_per_step", "d2h_gb_per_step", "ssd_read_gb_per_step", "ssd_write_gb_per_step")
MEMORY_METRICS = ("peak_mem_gb",)
# placement names of the bench -> the tier holding expert states (`parse_placement`)
PLACEMENTS = {"gpu": "gpu", "hbm": "gpu", "all-in-hbm": "gpu", "none": "gpu", "cpu": "cpu", "cpu-offload": "cpu",
              "dram": "cpu", "ssd": "ssd", "ssd-offload": "ssd", "nvme": "ssd", "disk": "ssd"}
_LETTERS = {"L": "layers", "D": "hidden", "F": "ffn", "E": "experts", "k": "top_k", "B": "batch", "S": "seq",
            "H": "heads", "V": "vocab"}
_KEYS = {"layers", "hidden", "ffn", "experts", "top_k", "batch", "seq", "heads", "vocab", "steps", "params",
         "cache", "depth", "budget", "beta", "K", "admit", "skew", "preset", "warmup", "micro_batches"}
_KEY_ALIASES = {"k": "top_k", "topk": "top_k", "b": "batch", "s": "seq", "l": "layers", "d": "hidden", "f": "ffn",
                "e": "experts", "h": "heads", "v": "vocab", "cache_experts": "cache", "prefetch_depth": "depth",
                "budget_gb": "budget", "decay": "beta", "decay_every": "K", "admit_hits": "admit",
                "mb": "micro_batches", "accum": "micro_batches", "microbatches": "micro_batches"}
DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class OffloadConfig:
    preset: str = "paper-13.9b"
    layers: int | None = None
    hidden: int | None = None
    ffn: int | None = None
    experts: int | None = None
    top_k: int | None = None
    heads: int | None = None
    vocab: int | None = None
    dtype: str | None = None
    batch: int = 8
    seq: int = 1024
    steps: int = 20
    params: int | None = None
    cache: int = 0
    depth: int | None = None
    budget_gb: float | None = None
    beta: float | None = None
    decay_every: int | None = None
    admit: float | None = None
    skew: float | None = None
    warmup: int = 0
    micro_batches: int = 1  # gradient-accumulation micro-batches per optimizer step (of ``batch`` sequences)
    spec: tuple = ()  # other ModelSpec fields: ((name, value), ...)


def parse_config(config: str) -> OffloadConfig:
    """The config string of a bench row -> `OffloadConfig` (format in the module docstring)."""
    import dataclasses

    from semoe.model_spec import ModelSpec

    spec_fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"name"}
    vals: dict = {}
    spec: dict = {}
    name = None
    for tok in str(config).replace(",", " ").split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            if k not in _KEYS:
                k = _KEY_ALIASES.get(k, _KEY_ALIASES.get(k.lower(), k))
            if k in _KEYS:
                vals[k] = v
            elif k in spec_fields:
                spec[k] = _value(v)
        elif tok in DTYPES:
            vals["dtype"] = tok
        elif (m := re.fullmatch(r"(steps|params|warmup)(\d+)", tok)):
            vals[m[1]] = m[2]
        elif (m := re.fullmatch(r"([LDFEkBSHV])(\d+)", tok)):
            vals[_LETTERS[m[1]]] = m[2]
        elif name is None and re.fullmatch(r"[A-Za-z][\w.\-]*", tok) and not re.fullmatch(r"(lr|world|ep|bucket|zero)\S*", tok):
            name = tok
    from semoe.presets import MODEL_PRESETS

    base = name.removesuffix("-scaled") if name else None
    if "preset" in vals:
        base = vals.pop("preset").removesuffix("-scaled")
    elif base not in MODEL_PRESETS:
        sized = {"layers", "hidden", "ffn", "experts"} & set(vals)
        if name is not None and not sized and not spec:
            raise ValueError(f"validate_offload: config {config!r} names no model preset and no model sizes "
                             "(write it with simulator.validate_offload.config_string)")
        base = "paper-13.9b"
    out: dict = {"preset": base, "spec": tuple(sorted(spec.items()))}
    ints = ("layers", "hidden", "ffn", "experts", "top_k", "heads", "vocab", "batch", "seq", "steps", "params",
            "cache", "depth", "warmup", "micro_batches")
    try:
        for k in ints:
            if k in vals:
                out[k] = int(float(vals[k]))
        if "budget" in vals:
            out["budget_gb"] = float(vals["budget"].removesuffix("GB").removesuffix("G"))
        for k, field in (("beta", "beta"), ("admit", "admit"), ("skew", "skew")):
            if k in vals:
                out[field] = float(vals[k])
        if "K" in vals:
            out["decay_every"] = int(vals["K"])
    except ValueError as e:
        raise ValueError(f"validate_offload: bad value in config {config!r}: {e}") from None
    if "dtype" in vals:
        out["dtype"] = vals["dtype"]
    return OffloadConfig(**out)


def _value(v: str):
    low = v.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for typ in (int, float):
        try:
            return typ(v)
        except ValueError:
            pass
    return v


def config_string(spec, batch: int, seq: int, *, label: str | None = None, base: str = "tiny", steps: int = 0,
                  warmup: int = 0, cache: int = 0, budget_gb: float | None = None, micro_batches: int = 1) -> str:
    """A bench ``config`` for ``spec`` that `parse_config` reads back exactly: ``label`` (default the spec's
    name), ``preset=<base>``, the compact sizes, then every other field that differs from the base preset."""
    import dataclasses

    from semoe.presets import model_preset

    ref = model_preset(base)
    toks = [label or spec.name, f"preset={base}", f"L{spec.layers}", f"D{spec.hidden}", f"F{spec.ffn}",
            f"E{spec.experts}", f"k{spec.top_k}", f"H{spec.heads}", f"V{spec.vocab}", spec.dtype, f"B{batch}",
            f"S{seq}"]
    done = {"name", "layers", "hidden", "ffn", "experts", "top_k", "heads", "vocab", "dtype"}
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        if f.name not in done and v != getattr(ref, f.name):
            toks.append(f"{f.name}={v}")
    for key, val in (("steps", steps), ("warmup", warmup), ("cache", cache),
                     ("micro_batches", micro_batches if micro_batches > 1 else 0)):
        if val:
            toks.append(f"{key}={val}")
    if budget_gb is not None:
        toks.append(f"budget={budget_gb:g}")
    return " ".join(toks)


def parse_placement(placement: str) -> str:
    key = str(placement).strip().lower()
    if key not in PLACEMENTS:
        raise ValueError(f"validate_offload: unknown placement {placement!r}; one of {', '.join(sorted(PLACEMENTS))}")
    return PLACEMENTS[key]


def parse_prefetch(prefetch, depth: int | None) -> int:
    s = str(prefetch).strip().lower()
    if s in ("-", ""):
        return 0
    if s in ("on", "true", "yes", "y"):
        return depth if depth else 1
    if s in ("off", "false", "no", "n", "none"):
        return 0
    try:
        return max(0, int(float(s)))
    except ValueError:
        raise ValueError(f"validate_offload: prefetch must be on/off or a depth, got {prefetch!r}") from None


def build_run(cfg: OffloadConfig, placement: str, depth: int):
    from semoe import Run, Workload, cluster_preset, sizing
    from semoe.plan_spec import OffloadPlacement, ParallelPlan
    from semoe.presets import GB, model_preset

    try:
        m = model_preset(cfg.preset)
    except Exception as e:  # noqa: BLE001  (SpecError: unknown preset)
        raise ValueError(f"validate_offload: {e}") from None
    over = {k: getattr(cfg, k) for k in ("layers", "hidden", "ffn", "experts", "top_k", "vocab", "dtype", "heads")
            if getattr(cfg, k) is not None}
    over.update(dict(cfg.spec))
    if over:
        if "heads" not in over and "hidden" in over:
            over["heads"] = max(1, over["hidden"] // 128)
        try:
            m = m.replace(**over, name=f"{m.name}-scaled")
        except Exception as e:  # noqa: BLE001  (SpecError: an inconsistent model)
            raise ValueError(f"validate_offload: {e}") from None
    if cfg.params is not None and sizing.count_params(m).total != cfg.params:
        raise ValueError(f"validate_offload: rebuilt model has {sizing.count_params(m).total} parameters, "
                         f"the config says {cfg.params}")
    tier = parse_placement(placement)
    pol = {k: v for k, v in (("cache_decay", cfg.beta), ("cache_decay_every", cfg.decay_every),
                             ("cache_admit_hits", cfg.admit)) if v is not None}
    off = OffloadPlacement() if tier == "gpu" else OffloadPlacement(expert_params=tier, expert_optimizer=tier)
    # the CPU cache sits in front of the SSD: only the ssd placement has one (as reference.offload.bench)
    plan = ParallelPlan(offload=off, prefetch_depth=depth, cpu_cache_experts=cfg.cache if tier == "ssd" else 0, **pol)
    cluster = cluster_preset("h100-single")
    if cfg.budget_gb is not None:
        cluster = cluster.replace(gpu=cluster.gpu.replace(memory_bytes=int(cfg.budget_gb * GB)))
    wl = {"routing": "lognormal", "routing_skew": cfg.skew} if cfg.skew else {}
    return Run(model=m, cluster=cluster, plan=plan, workload=Workload(
        micro_batch=cfg.batch, seq_len=cfg.seq, micro_batches=max(cfg.micro_batches, 1),
        steps=max(cfg.steps, 1) + cfg.warmup, **wl))


_SIM_CACHE: dict = {}


def simulate(cfg: OffloadConfig, placement: str, depth: int, io: tuple = ()) -> dict:
    """The reference-trainer step of the configuration (cached per arguments); ``io``: ``((key, rate), ..)``
    measured host-side rates (`TrainingIteration` ``io_rates``)."""
    key = (cfg, placement, depth, io)
    if key not in _SIM_CACHE:
        _SIM_CACHE[key] = _iteration(cfg, placement, depth, io, trace=False)[0]
    return _SIM_CACHE[key]


def _iteration(cfg: OffloadConfig, placement: str, depth: int, io: tuple, trace: bool):
    """Run the reference-trainer step of the configuration: ``(summary, iteration, sim)`` (`simulate`)."""
    from simulator.engine import Sim
    from simulator.train_host import train_program
    from simulator.workload.training import TrainingIteration

    opts = {k[1:]: v for k, v in io if k.startswith("_")}
    io = tuple((k, v) for k, v in io if not k.startswith("_"))
    run = build_run(cfg, placement, depth)
    # the trainer's host program (kernels per segment, host syncs); None for an uncounted structure
    prog = train_program(run.model, opts.get("ref_optimizer", "foreach"), "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # profile fallbacks (roofline / borrowed curves)
        sim = Sim(run.cluster, seed=run.workload.seed, trace=trace)
        it = TrainingIteration(run, sim, impl="reference", measured_steps=max(cfg.steps, 1), io_rates=dict(io),
                               expert_kernels="torch", host_program=prog, **opts)
        return it.run(), it, sim


def _predict(s: dict, metric: str, cfg: OffloadConfig, placement: str, io: tuple = ()) -> float | None:
    """The simulated value of a bench ``metric`` from the case's `simulate` summary ``s`` (None: no model of it)."""
    if metric == "step_ms":
        return s["step_time_s"] * 1e3
    if metric == "step_s":
        return s["step_time_s"]
    if metric == "tokens_per_s":
        return s["tokens_per_s"]
    if metric in RATIO_METRICS:
        return s["cache_hit_rate_measured"]
    if metric == "h2d_gb_per_step":
        return (s["bytes"].get("h2d_prefetch", 0.0) + s["bytes"].get("h2d_params", 0.0)) / 1e9
    if metric == "d2h_gb_per_step":
        return s["bytes"].get("d2h_grads", 0.0) / 1e9
    if metric == "ssd_read_gb_per_step":
        return s["bytes"].get("ssd_read", 0.0) / 1e9
    if metric == "ssd_write_gb_per_step":
        return (s["bytes"].get("ssd_write", 0.0) + s["bytes"].get("ssd_writeback", 0.0)) / 1e9
    if metric == "cpu_adam_ms_per_step":
        return s["busy_s"].get("cpu_adam", 0.0) * 1e3
    if metric == "peak_mem_gb":
        # the bench loop's peak (zero_grad, then the micro-batches): simulator.train_memory at the simulated
        # routing (the largest rows any rank's experts receive per layer); the run's AdamW (io's options)
        from simulator.train_memory import run_peak

        opts = {k[1:]: v for k, v in io if str(k).startswith("_")}
        try:
            pk = run_peak(build_run(cfg, placement, 1), tokens_in=s.get("routed_rows"), trainer="bench",
                          optimizer=opts.get("ref_optimizer", "foreach"))
        except (ValueError, FileNotFoundError):  # a structure the model does not cover: the workload's own peak
            return s["peak_hbm_bytes"] / 1e9
        return pk.peak / 1e9
    if metric == "ratio_vs_gpu":
        return s["step_time_s"] / simulate(cfg, "gpu", 0, io)["step_time_s"]
    return None
