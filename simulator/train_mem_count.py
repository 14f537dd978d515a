"""Activation bytes the reference model saves for backward, counted from its autograd graph (offline, torch).

`simulator.train_memory` models the peak HBM of the reference trainer's step from mechanisms; the largest of
them, the tensors autograd keeps from the forward until their backward, is counted here: one forward of the
reference model (`reference.model.MoEDecoder`, the torch MoE backend, bf16 autocast over fp32 master weights
as `reference.train` and `reference.offload.bench` run it) under ``torch.autograd.graph.saved_tensors_hooks``
records every saved tensor once per storage (a view saved twice, or q / k / v viewing one qkv output, counts
once), skipping the parameters' own storages. Each saved storage is attributed to the innermost module that
saved it (`REGIONS`) and classified:

    rows T   one row per token (``numel / T``: [T, D] rows, [B, S, D], [B, H, S, Dh] -> D, [B, H, S] -> H, ...)
    rows N   one row per routed (kept) row of an MoE layer (leading dimension N = kept assignments): the
             expert inputs / activations, the dispatch indices and the combine's saved rows
    rows P   a cast of a parameter (the bf16 copy of an fp32 master that a GEMM saved): bytes per parameter
             of the region's weights
    rows 1   anything else (per-expert counts, scalars): bytes per call

and its bytes per row are written in units of the model's widths (``unit`` D, F, V, E, kE, k, H or 1; the
counting widths `WIDTHS` are pairwise distinct so that the classification is unambiguous). So a block saves
``sum_T(bytes_per_unit x unit) x T + sum_N(...) x N + sum_P(...) x params`` bytes, for any widths of the
same code path (`simulator.train_memory.saved_coeffs`); a CPU test recounts a config at other widths and
checks the prediction.

Attention: the CPU autocast takes ``_scaled_dot_product_flash_attention_for_cpu``, which saves q, k, v, the
output and the log-sum-exp [B, H, S] (fp32): O(S) per token, not the [S, S] probabilities. That is what the
GPU's fused backends save too (derivatives.yaml: ``_scaled_dot_product_flash_attention``,
``_scaled_dot_product_cudnn_attention`` and ``_efficient_attention`` save query, key, value, output and
logsumexp, plus RNG seeds), so the CPU count stands for the GPU's; ``--device cuda`` recounts on a GPU
(the ``_cuda`` table) to confirm it, with CUDA's own autocast lists (norms and softmax in fp32).
CPU and CUDA autocast agree on every large tensor of this model: linear / SDPA / the grouped GEMMs in bf16,
layer norms of the fp32 residual stream in fp32; they differ on the router's [T, E] softmax (bf16 on the
CPU, fp32 on CUDA), a few bytes per token.

``python -m simulator.train_mem_count`` writes ``results/profiles/train_mem_saved.csv`` for `CONFIGS` (the
code paths of the measured training rows); ``--check`` exits 1 when the committed table differs.
``--probe --out FILE.csv`` (on a GPU, ~30 s) measures real steps (`PROBE_CASES`: the offload bench's config a in
HBM at a smaller batch, the paper-13.9b-scaled model on one GPU) with ``torch.cuda.max_memory_allocated`` and
``memory_allocated`` after the forward / backward, beside `simulator.train_memory.step_peak` (``--quick``: a
tiny model on the CPU, the live tracker standing for the allocator).
`track_step` (used by the tests) runs a whole training step on the CPU and follows the bytes of every live
tensor storage (a dispatch mode, weak references to storages), returning the step's peak and the live bytes
at each phase's peak: the ground truth the analytic model is checked against at small sizes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simulator.op_count_table import check_or_write, to_csv
from simulator.train_memory import config_key, unit_widths

ROOT = Path(__file__).resolve().parent.parent
SAVED_CSV = ROOT / "results" / "profiles" / "train_mem_saved.csv"
SAVED_CSV_CUDA = ROOT / "results" / "profiles" / "train_mem_saved_cuda.csv"
COLUMNS = ("config", "region", "rows", "unit", "dtype", "bytes_per_unit")
# counting widths, pairwise distinct and no one a multiple of another that could be confused: hidden (head dim
# 16), ffn, vocab, max_seq; tokens T = 3 x 20 = 60 and routed rows (k T) differ from every width and parameter
# dimension
WIDTHS = {"hidden": 64, "heads": 4, "kv_heads": None, "ffn": 80, "vocab": 112, "max_seq": 128}
BATCH, SEQ = 3, 20
# module regions (innermost wins): per block norm1, attn, norm2, gate, experts, ffn (dispatch / combine: the MoE
# layer outside its gate and experts, or a dense FFN), block (the residual adds); then final_norm, head (the LM
# head and loss, outside every block), embedding
REGIONS = ("embedding", "norm1", "attn", "norm2", "gate", "experts", "ffn", "block", "final_norm", "head")
UNITS = ("D", "F", "V", "E", "kE", "k", "H", "1")
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int64": "int64",
               "torch.int32": "int32", "torch.bool": "bool", "torch.float64": "fp64", "torch.uint8": "uint8"}
# (preset, overrides) of the measured training rows' code paths: the offload bench's GPT-MoE (tiny preset at
# bench widths: top-2, no capacity, GELU, layer norm, learned positions, tied) and the paper-13.9b rows
# (top-1 and top-2, capacity factor 1.0)
CONFIGS = (
    ("tiny", {"layers": 2, "experts": 8, "top_k": 2, "heads": 16, "dtype": "bf16"}),
    ("paper-13.9b", {"layers": 2, "top_k": 1}),
    ("paper-13.9b", {"layers": 2, "top_k": 2}),
)


def _unit(width: int, m, region: str) -> str:
    """The unit of a per-row width ``width`` in the counting model ``m``'s widths (a multiple of D or F, or
    exactly one of the others)."""
    D, F, V, E, k, H = m.hidden, m.ffn, m.vocab, m.experts, m.top_k, m.heads
    if width == 1:
        return "1"
    if region == "attn" and width == H:
        return "H"
    if width % D == 0:
        return "D"
    if width % F == 0:
        return "F"
    for u, w in (("V", V), ("E", E), ("kE", k * E), ("k", k), ("H", H)):
        if width == w:
            return u
    raise ValueError(f"train_mem_count: a saved tensor of {width} elements per row in {region} matches no width "
                     f"of {WIDTHS}")


def count_saved(m, device: str = "cpu", batch: int = BATCH, seq: int = SEQ) -> list[dict]:
    """Rows of the table (`COLUMNS`) for model ``m``'s code path, counted at ``m``'s own widths on ``device``
    (``m`` must already have distinct widths, e.g. `counting_model`). Per-block rows are the mean over the
    model's blocks (they are equal; a test checks)."""
    import torch

    from reference.model import MoEDecoder

    dev = torch.device(device)
    torch.manual_seed(0)
    model = MoEDecoder(m, seed=0).to(dev)
    for layer in model.moe_layers():
        layer.backend = "torch"  # the torch MoE backend (the offload bench's and the EP path's dispatch)
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    stack: list[tuple[str, int]] = [("head", -1)]
    hooks = []

    def push(name, i):
        return lambda mod, args: stack.append((name, i))

    def pop(mod, args, out):
        stack.pop()

    def tag(mod, name, i):
        hooks.append(mod.register_forward_pre_hook(push(name, i)))
        hooks.append(mod.register_forward_hook(pop))

    tag(model.tok_emb, "embedding", -1)
    if model.pos_emb is not None:
        tag(model.pos_emb, "embedding", -1)
    tag(model.norm, "final_norm", -1)
    for i, blk in enumerate(model.blocks):
        tag(blk, "block", i)
        tag(blk.norm1, "norm1", i)
        tag(blk.attn, "attn", i)
        tag(blk.norm2, "norm2", i)
        tag(blk.ffn, "ffn", i)
        if blk.is_moe:
            tag(blk.ffn.gate, "gate", i)
            tag(blk.ffn.experts, "experts", i)
    seen: dict[int, tuple] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen and st.nbytes() > 0:
            seen[ptr] = (stack[-1], tuple(t.shape), t.dtype, st.nbytes(), t)
        return t

    x = torch.randint(0, m.vocab, (batch, seq + 1), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(m.dtype)
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None)):
        out = model(x[:, :-1], x[:, 1:])
    for h in hooks:
        h.remove()
    T = batch * seq
    kept = [int(a["tokens_per_expert"].sum()) for a in out.aux]
    moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
    n_of = dict(zip(moe_blocks, kept))
    pshapes = {}
    for p in model.parameters():
        pshapes.setdefault(tuple(p.shape), p.numel())
        pshapes.setdefault(tuple(p.shape)[::-1], p.numel())
    acc: dict[tuple, float] = {}
    casts: dict[tuple, tuple[float, float]] = {}
    widths = unit_widths(m)
    blocks = len(model.blocks)
    for (region, i), shape, dtype, nbytes, t in seen.values():
        dt = DTYPE_NAMES.get(str(dtype), str(dtype))
        N = n_of.get(i)
        numel = nbytes // t.element_size()
        scale = 1.0 / blocks if i >= 0 else 1.0  # per block: the mean over the blocks
        if shape in pshapes and t.is_floating_point() and numel == pshapes[shape]:
            key = (region, dt)  # bytes per parameter: the region's cast bytes over its casted parameters
            b, n = casts.get(key, (0.0, 0.0))
            casts[key] = (b + nbytes * scale, n + numel * scale)
            continue
        # N == T (a capacity gate that dropped nothing): the MoE layer's leading-N tensors are routed rows
        if N is not None and len(shape) >= 1 and shape[0] == N and (N != T or region in ("experts", "ffn")):
            rows, unit = "N", _unit(numel // N, m, region)
            per = nbytes / N / widths[unit]
        elif numel % T == 0 and numel >= T:
            rows, unit = "T", _unit(numel // T, m, region)
            per = nbytes / T / widths[unit]
        else:
            rows, unit, per = "1", "1", float(nbytes)
        key = (region, rows, unit, dt)
        acc[key] = acc.get(key, 0.0) + per * scale
    for (region, dt), (b, n) in casts.items():
        acc[(region, "P", "1", dt)] = b / n
    cfg = config_key(m)
    order = {r: j for j, r in enumerate(REGIONS)}
    return [{"config": cfg, "region": r, "rows": rows, "unit": u, "dtype": dt, "bytes_per_unit": f"{v:.6g}"}
            for (r, rows, u, dt), v in sorted(acc.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:]))]


def counting_model(m):
    """``m``'s code path at the counting widths `WIDTHS`."""
    return m.replace(name="mem", **WIDTHS)


def count_all(configs=CONFIGS, device: str = "cpu") -> list[dict]:
    from semoe.presets import model_preset

    rows = []
    for preset, over in configs:
        rows.extend(count_saved(counting_model(model_preset(preset).replace(**over)), device))
    return rows


# ----------------------------------------------------------------------------------------- live tracker
def track_step(m, batch: int, seq: int, *, micro_batches: int = 1, trainer: str = "train", steps: int = 2,
               amp: bool = True, placement: str = "gpu") -> dict:
    """One training step of ``m`` on the CPU (after ``steps - 1`` untracked ones) as ``trainer`` runs it, with
    the live bytes of every tensor storage followed: ``{"peak": bytes, "phase": phase of the peak,
    "phases": {phase: peak bytes in it}}``. ``trainer``: ``"train"`` (`reference.train`: forward, zero_grad,
    backward, clip, AdamW) or ``"bench"`` (`reference.offload.bench`'s ``gpu`` placement: zero_grad, then
    ``micro_batches`` x (forward, backward), clip, AdamW). AdamW is the fused one (what the GPU runs); bf16
    autocast on the CPU when ``amp``. Phases: ``fwd<i>`` / ``bwd<i>`` per micro-batch, ``clip``, ``opt``.
    ``placement`` ``cpu`` / ``ssd``: the experts in `reference.offload.ExpertOffload` (prefetch depth 1, bf16
    compute) as the bench runs them; on the CPU its host buffers (weight mirror, gradient buffers, fp32 states)
    and its step's host work are not counted (they are host memory on a GPU), its pool slots are."""
    import collections
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from reference.model import MoEDecoder

    if trainer not in ("train", "bench"):
        raise ValueError(f"track_step: trainer must be 'train' or 'bench', got {trainer!r}")
    torch.manual_seed(0)
    model = MoEDecoder(m, seed=0)
    for layer in model.moe_layers():
        layer.backend = "torch"
    eng = None
    if placement != "gpu":
        from reference.offload.engine import ExpertOffload
        from semoe import ParallelPlan
        from semoe.plan_spec import OffloadPlacement

        plan = ParallelPlan(offload=OffloadPlacement(expert_params=placement, expert_optimizer=placement),
                            prefetch_depth=1)
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="semoe_track_")
        eng = ExpertOffload(model, plan, device="cpu", compute_dtype=torch.bfloat16 if amp else None,
                            ssd_dir=tmp.name)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)

    class Live(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, int] = {}
            self.refs: dict[int, object] = {}
            self.cur = self.peak = 0
            self.phase = "before"
            self.peak_phase = ""
            self.phases: dict[str, int] = collections.defaultdict(int)

        def add(self, st) -> None:
            key = st._cdata
            if key in self.live or key in host or self.phase == "engine_step":
                return
            nb = st.nbytes()
            self.live[key] = nb
            self.cur += nb

            def gone(_r, key=key):
                self.cur -= self.live.pop(key, 0)
                self.refs.pop(key, None)

            self.refs[key] = weakref.ref(st, gone)
            self.phases[self.phase] = max(self.phases[self.phase], self.cur)
            if self.cur > self.peak:
                self.peak, self.peak_phase = self.cur, self.phase

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.add(t.untyped_storage())
            return out

    live = None
    prev_out: list = [None]

    def step(tr: Live | None) -> None:
        def ph(name):
            if tr is not None:
                tr.phase = name

        def fwd(i):
            ph(f"fwd{i}")
            x = torch.randint(0, m.vocab, (batch, seq + 1), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x[:, :-1], x[:, 1:])
            prev_out[0] = out  # the caller's ``out`` variable: alive until the next forward returns
            return out

        if trainer == "bench":
            opt.zero_grad(set_to_none=True)
            for i in range(micro_batches):
                out = fwd(i)
                ph(f"bwd{i}")
                (out.loss / micro_batches).backward()
                del out
        else:
            out = fwd(0)
            opt.zero_grad(set_to_none=True)
            ph("bwd0")
            out.loss.backward()
            del out
        ph("clip")
        if eng is not None:
            eng.clip_grad_norm_(model, 1.0)
            ph("engine_step")
            eng.step(1e-4)
            eng.wait()
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ph("opt")
        opt.step()

    host: set = set()
    for _ in range(steps - 1):
        step(None)
    if eng is not None:
        for L in eng.layers:
            for t in [*L.mirror.values(), *L.grads.values(), *([L.state] if L.state is not None else [])]:
                host.add(t.untyped_storage()._cdata)
    live = Live()
    if eng is not None:
        for slot in eng.slots:
            for t in slot.tensors.values():
                live.add(t.untyped_storage())
    for p in model.parameters():
        live.add(p.untyped_storage())
        if p.grad is not None:
            live.add(p.grad.untyped_storage())
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                live.add(v.untyped_storage())
    if prev_out[0] is not None:
        for t in tree_flatten([prev_out[0].logits_BSV, prev_out[0].loss, prev_out[0].lm_loss,
                               prev_out[0].aux_loss])[0]:
            if isinstance(t, torch.Tensor):
                live.add(t.untyped_storage())
    base = live.cur
    with live:
        step(live)
    if eng is not None:
        eng.close()
        tmp.cleanup()
    return {"peak": live.peak, "phase": live.peak_phase, "phases": dict(live.phases), "base": base}


# ----------------------------------------------------------------------------------------- GPU probe
PROBE_COLUMNS = ("device", "case", "point", "measured_bytes", "predicted_bytes", "error")
# (case, preset, overrides, batch, seq, micro-batches, trainer): the offload bench's config a in HBM (its gpu
# placement: bf16 expert copies, the bench loop) at 1/6 of its batch, and the paper-13.9b-scaled training rows'
# model on one GPU as reference.train steps it
PROBE_CASES = (
    ("a_gpu_B8", "tiny", {"layers": 4, "hidden": 1024, "ffn": 4096, "experts": 8, "top_k": 2, "heads": 16,
                          "vocab": 256, "max_seq": 2048, "dtype": "bf16"}, 8, 2048, 2, "bench"),
    ("paper13.9b_L2_k1_B8", "paper-13.9b", {"layers": 2, "hidden": 2048, "heads": 16, "ffn": 8192, "top_k": 1},
     8, 1024, 1, "train"),
)
PROBE_QUICK = (("quick", "tiny", {"layers": 2, "experts": 8, "top_k": 2, "heads": 4, "hidden": 64, "ffn": 256,
                                  "vocab": 32, "max_seq": 128, "dtype": "bf16"}, 2, 64, 2, "bench"),)


def _cuda_case(m, B: int, S: int, micro: int, trainer: str) -> tuple[dict[str, float], list[int]]:
    """One probe case on CUDA: a warm-up step, then a measured one (``max_memory_allocated`` over it,
    ``memory_allocated`` after the last forward and after the backward) and the rows each MoE layer routed."""
    import gc

    import torch

    from reference.model import MoEDecoder

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MoEDecoder(m, seed=0).to(dev)
    for layer in model.moe_layers():
        layer.backend = "torch"
    if trainer == "bench":
        from reference.offload.bench import _bf16_experts

        _bf16_experts(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    meas: dict[str, float] = {}
    rows: list[int] = []
    holder: list = [None]  # the caller's ``out``: alive until the next forward returns

    def step(record: bool) -> None:
        if trainer == "bench":
            opt.zero_grad(set_to_none=True)
        for i in range(micro):
            x = torch.randint(0, m.vocab, (B, S + 1), device=dev, generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                holder[0] = out = model(x[:, :-1], x[:, 1:])
            if record and i == micro - 1:
                torch.cuda.synchronize()
                meas["after_forward"] = torch.cuda.memory_allocated()
                rows[:] = [int(a["tokens_per_expert"].sum()) for a in out.aux]
            if trainer == "train":
                opt.zero_grad(set_to_none=True)
            (out.loss / micro).backward()
            del out
        if record:
            torch.cuda.synchronize()
            meas["after_backward"] = torch.cuda.memory_allocated()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step(False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(True)
    torch.cuda.synchronize()
    meas["step_peak"] = torch.cuda.max_memory_allocated()
    holder[0] = None
    model = opt = None  # the step closure's cells: let the model and its states go
    gc.collect()
    torch.cuda.empty_cache()
    return meas, rows


def probe(out: Path, quick: bool = False) -> int:
    """Measured vs modelled peak of a real step on ``cuda`` (or the CPU with ``quick``: the live tracker's peak
    stands for ``max_memory_allocated``): per case the step's peak and the live bytes after the forward and after
    the backward, beside `simulator.train_memory.step_peak` at the routed rows the step really had. One CSV row per
    number, flushed (`PROBE_COLUMNS`); about 30 s on an H100."""
    import csv
    import time

    import torch

    from semoe import ParallelPlan
    from semoe.presets import model_preset
    from simulator.train_memory import step_peak

    cuda = torch.cuda.is_available() and not quick
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out.parent.mkdir(parents=True, exist_ok=True)
    fh = out.open("w", newline="")
    w = csv.writer(fh)
    w.writerow(PROBE_COLUMNS)
    for case, preset, over, B, S, micro, trainer in (PROBE_QUICK if quick else PROBE_CASES):
        t0 = time.perf_counter()
        m = model_preset(preset).replace(**over)
        if not cuda:
            tr = track_step(m, B, S, micro_batches=micro, trainer=trainer)
            rows = [int(B * S * m.top_k)] * m.moe_layers
            meas = {"step_peak": tr["peak"]}
        else:
            meas, rows = _cuda_case(m, B, S, micro, trainer)
        pk = step_peak(m, ParallelPlan(), tokens=B * S, routed_rows=rows, micro_batches=micro, trainer=trainer)
        after_fwd = pk.points["forward_loss"] - pk.parts["loss_fwd_fp32"] - pk.parts["prev_logits"]
        pred = {"step_peak": pk.peak, "after_forward": after_fwd, "after_backward": pk.points["end_backward"]}
        for point, v in meas.items():
            p = pred.get(point)
            w.writerow([name, case, point, int(v), "" if p is None else int(p),
                        "" if p is None else f"{p / v - 1:.4f}"])
        w.writerow([name, case, f"model_point={pk.point}", "", int(pk.peak), ""])
        fh.flush()
        print(f"train_mem_count probe {case}: measured {meas['step_peak'] / 1e9:.3f} GB, model "
              f"{pk.peak / 1e9:.3f} GB ({pk.point}), {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    for r in leak_runs("cuda" if cuda else "cpu", zero_stages=(3,) if quick else (0, 3)):
        case = f"leak_zero{r['zero']}_run{r['run']}"
        w.writerow([name, case, "alive_models", r["alive_models"], r["run"] + 1, ""])
        if "allocated_after_bytes" in r:
            v, p = r["allocated_after_bytes"], r["predicted_if_leaking"]
            w.writerow([name, case, "allocated_after_bytes", v, int(p), f"{p / v - 1:.4f}" if v else ""])
        fh.flush()
        print(f"train_mem_count probe {case}: {r}", flush=True)
    print(f"train_mem_count probe leaks: {time.perf_counter() - t0:.1f} s", flush=True)
    fh.close()
    return 0


def leak_runs(device: str = "cpu", zero_stages=(0, 3), runs: int = 2) -> list[dict]:
    """`reference.train` run ``runs`` times per ZeRO stage in this process, as `paper_repro.multigpu_run` runs its
    variants: after each run (and ``gc.collect()``), how many of the runs' models are still alive (weak references
    to every `MoEDecoder` built) and, on CUDA, the bytes still allocated, beside
    `simulator.train_memory.leaked_state_bytes` (8 B per parameter) per leaked model. On CUDA each run owns a NCCL
    group of one (``RANK`` / ``WORLD_SIZE`` set: the parallel path, GradSync and the EP dispatcher, as a
    torchrun rank); on the CPU only ZeRO-3 takes the parallel path at world size one."""
    import gc
    import os
    import weakref

    import torch

    import reference.model as RM
    from reference.moe.layer import moe_backend_env
    from reference.train import TrainConfig, train
    from semoe import ParallelPlan
    from semoe.presets import model_preset
    from simulator.train_memory import leaked_state_bytes

    cuda = device.startswith("cuda")
    spec = model_preset("tiny").replace(dtype="bf16" if cuda else "fp32")
    refs: list = []
    orig = RM.MoEDecoder.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        refs.append(weakref.ref(self))

    saved_env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = []
    RM.MoEDecoder.__init__ = init
    try:
        port = 29400 + os.getpid() % 500
        for zero in zero_stages:
            plan = ParallelPlan(zero_stage=zero)
            per_model = leaked_state_bytes(spec, plan)
            base = torch.cuda.memory_allocated() if cuda else 0
            first = len(refs)
            for i in range(runs):
                if cuda:
                    port += 1
                    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port))
                with moe_backend_env("torch"):  # the EP runs' path (and no Triton compile here)
                    train(spec, TrainConfig(steps=2, batch_size=2, seq_len=32, synthetic=True, progress=False,
                                            device=device, backend="nccl" if cuda else "auto", plan=plan, lr=1e-3))
                gc.collect()
                alive = sum(r() is not None for r in refs[first:])
                row = {"zero": zero, "run": i, "alive_models": alive, "predicted_if_leaking": per_model * (i + 1)}
                if cuda:
                    torch.cuda.synchronize()
                    row["allocated_after_bytes"] = torch.cuda.memory_allocated() - base
                out.append(row)
    finally:
        RM.MoEDecoder.__init__ = orig
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m simulator.train_mem_count", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default {SAVED_CSV} ({SAVED_CSV_CUDA.name} with --device cuda); the CSV of --probe")
    ap.add_argument("--check", action="store_true", help="compare with the committed table, exit 1 if it differs")
    ap.add_argument("--device", default="cpu", help="cpu (the committed table) or cuda: recount with CUDA's autocast")
    ap.add_argument("--probe", action="store_true",
                    help="measure real steps' peaks on the GPU against simulator.train_memory (needs --out)")
    ap.add_argument("--quick", action="store_true", help="--probe on a tiny model on the CPU (CI smoke test)")
    a = ap.parse_args(argv)
    if a.probe:
        if a.out is None:
            ap.error("--probe needs --out FILE.csv")
        return probe(a.out, a.quick)
    if a.device != "cpu":
        out = a.out or SAVED_CSV_CUDA
        if out.resolve() == SAVED_CSV.resolve():
            ap.error("--device writes a table other than the committed CPU one")
    else:
        out = a.out or SAVED_CSV
    try:
        text = to_csv(count_all(device=a.device), COLUMNS)
    except (ValueError, RuntimeError) as e:
        print(f"train_mem_count: error: {e}", file=sys.stderr)
        return 2
    return check_or_write("train_mem_count", [(out, text)], a.check)


if __name__ == "__main__":
    sys.exit(main())
