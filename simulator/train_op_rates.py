"""GPU timings that price `simulator.train_op_counts`' counted programs: the host's seconds per kernel of the
training step's forward, backward and optimizer parts (`time_parts` -> ``train_host_rates_cuda.csv``) and the
achieved HBM bandwidth of each memory-pass class with the reference's own kernels (`time_mem_classes` ->
``train_mem_rates_cuda.csv``); `simulator.train_host` reads both.
"""

from __future__ import annotations

from simulator.train_op_record import RATE_CLASSES, _Op, _recorder
from simulator.train_op_step import TINY_BATCH, TINY_SEQ, _tiny_trainer

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
