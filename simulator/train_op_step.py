"""The host program of one training step of the reference trainer (`count_step`): the step run on a tiny-width
copy of the model's structure under `simulator.train_op_record`'s recorder, split at module hooks and host syncs
into the segments of `simulator.train_op_counts`' table (`COLUMNS`), with each segment's memory passes per class
(`mem_rows`, `MEM_COLUMNS`).
"""

from __future__ import annotations

from simulator.train_op_record import CAST_UNITS, GEMM_OPS, MEM_CLASSES, _Op, _recorder

COLUMNS = ("config", "segment", "kernels", "lead", "views", "syncs", "sync_op", "cast_D", "cast_F", "cast_V", "cast_E",
           "cast_T")
MEM_COLUMNS = ("config", "segment", "class", "kernels", "mem_D", "mem_F", "mem_V", "mem_E", "mem_T")
ADAMWS = ("fused", "foreach")
BACKENDS = ("torch", "triton")
# tiny widths, pairwise distinct (cast classification by last dimension): hidden, heads (head dim 12),
# ffn, vocab; experts come from the structure
TINY = {"hidden": 48, "heads": 4, "kv_heads": None, "ffn": 80, "vocab": 272, "max_seq": 64}
TINY_BATCH, TINY_SEQ = 2, 20


def config_key(m, adamw: str, backend: str = "torch") -> str:
    """The code-path key of model ``m`` trained with ``adamw`` and the MoE ``backend``."""
    cap = "none" if m.capacity_factor is None else f"{m.capacity_factor:g}"
    parts = [f"moe-{backend}", f"adamw-{adamw}", f"L{m.layers}", f"E{m.experts}", f"k{m.top_k}", m.gate, f"cap{cap}", m.activation, m.norm, m.position]
    if m.tied_embeddings:
        parts.append("tied")
    if m.bias:
        parts.append("bias")
    if m.moe_every != 1:
        parts.append(f"dense{m.moe_every}")
    if m.shared_experts:
        parts.append(f"shared{m.shared_experts}")
    return " ".join(parts)



def _tiny_model(m):
    return m.replace(name="ops", **TINY)


def _tiny_trainer(m, adamw: str, backend: str, device: str):
    """(tiny spec, fp32 model on ``device`` built under MoE ``backend``, AdamW as the reference trainer
    configures it: GPT-2 decay groups, ``adamw`` fused or foreach) for the tiny-width copy of ``m``."""
    import torch

    from reference.model import MoEDecoder
    from reference.moe.layer import moe_backend_env

    with moe_backend_env(backend):
        tiny = _tiny_model(m)
        torch.manual_seed(0)
        model = MoEDecoder(tiny, seed=0).to(device=torch.device(device), dtype=torch.float32)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    kw = {"fused": True} if adamw == "fused" else {"foreach": True}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, **kw)
    return tiny, model, opt


def count_step(m, adamw: str = "fused", backend: str = "torch", device: str = "cpu",
               batch: int = TINY_BATCH, seq: int = TINY_SEQ, mem_out: list | None = None) -> list[dict]:
    """Table rows of one training step of (the tiny-width copy of) model ``m``'s structure, recorded on
    ``device`` (the second step: the optimizer states exist); ``mem_out``: the step's memory-pass rows
    (`MEM_COLUMNS`, `mem_rows`) are appended to it."""
    import torch

    from reference.op_count import count_ops
    from reference.train import TrainConfig, after_step

    if adamw not in ADAMWS:
        raise ValueError(f"train_op_counts: adamw must be one of {ADAMWS}, got {adamw!r}")
    if backend not in BACKENDS:
        raise ValueError(f"train_op_counts: backend must be one of {BACKENDS}, got {backend!r}")
    tiny, model, opt = _tiny_trainer(m, adamw, backend, device)
    dev = torch.device(device)
    cfg = TrainConfig(batch_size=batch, seq_len=seq)
    amp = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, tiny.vocab, (batch, seq), generator=gen).to(dev)
    y = torch.randint(0, tiny.vocab, (batch, seq), generator=gen).to(dev)
    T = batch * seq
    hd = tiny.head_dim
    kv = tiny.n_kv_heads * hd
    # unit -> widths of a tensor's last dimension counted in it; the first is the unit's own width
    dims = {"D": tuple(dict.fromkeys((tiny.hidden, hd, tiny.hidden + 2 * kv))), "F": (tiny.ffn, 2 * tiny.ffn),
            "V": (tiny.vocab,), "E": (tiny.experts,) if tiny.experts else ()}
    if len({w for ws in dims.values() for w in ws}) != sum(len(ws) for ws in dims.values()):
        raise RuntimeError(f"train_op_counts: tiny widths collide {dims}")

    def step(rec=None):
        with torch.autocast(dev.type, dtype=amp):
            out = model(x, y)
        mark(rec, "zero_grad")
        opt.zero_grad(set_to_none=True)
        mark(rec, "backward")
        out.loss.backward()
        mark(rec, "bwd_end")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"), foreach=True)
        mark(rec, "optimizer")
        opt.step()
        mark(rec, "after_step")
        after_step(model, out, cfg)
        mark(rec, "readback")
        stats = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).double()
        return [float(v) for v in stats]  # reference.train reads the step's statistics back

    def mark(rec, label):
        if rec is not None:
            rec.mark(label)

    step()  # optimizer states exist from the second step on
    host_scalars = {id(s["step"]) for s in opt.state.values() if "step" in s and s["step"].device.type == "cpu"}
    if dev.type != "cpu":
        pass  # on a GPU the CPU step counters are the only CPU scalars the step reads
    # parameter-shaped tensors (weights and their gradients, either orientation) are not activations
    params = {tuple(p.shape) for p in model.parameters()}
    if any(s in params for s in ((batch, seq, tiny.hidden), (T, tiny.hidden), (T, tiny.experts))):
        raise RuntimeError("train_op_counts: an activation shape equals a parameter shape")
    rec = _recorder(dims, T, host_scalars, params)
    hooks = []
    for i, blk in enumerate(model.blocks):
        kind = "moe" if blk.is_moe else "dense"

        # backward boundaries: the gradient of block i's input ends block i's backward (and starts block
        # i-1's); the gradient of the last block's output starts the blocks' backward
        def pre(mod, args, kind=kind, i=i):
            rec.mark(("block_start", kind))
            x_in = args[0]
            if x_in.requires_grad:
                x_in.register_hook(lambda g: rec.mark(("bwd_block_end", i)))

        def post(mod, args, out, kind=kind, i=i):
            rec.mark(("block_end", kind))
            y_out = out[0]
            if y_out.requires_grad and i == len(model.blocks) - 1:
                y_out.register_hook(lambda g: rec.mark(("bwd_block_start", i)))

        hooks.append(blk.register_forward_pre_hook(pre))
        hooks.append(blk.register_forward_hook(post))
        hooks.append(blk.ffn.register_forward_pre_hook(lambda mod, args: rec.mark("ffn_start")))
        hooks.append(blk.ffn.register_forward_hook(lambda mod, args, out: rec.mark("ffn_end")))
    import torch.nn.functional as F

    one_hot = F.one_hot

    def one_hot_wrapped(t, num_classes=-1):
        rec.in_one_hot = num_classes >= 0 and t.device.type == "cpu"
        try:
            return one_hot(t, num_classes)
        finally:
            rec.in_one_hot = False

    F.one_hot = one_hot_wrapped
    try:
        with rec:
            _, total = count_ops(step, rec)
    finally:
        F.one_hot = one_hot
        for h in hooks:
            h.remove()
    rows = _segments(rec.seq, model)
    kernels = sum(1 for s in rec.seq if isinstance(s, _Op) and not s.view)
    # count_ops (nested inside the recorder) saw the one_hot checks too: its total less them
    skipped = total.by_name["aten.aminmax"] - sum(1 for s in rec.seq if isinstance(s, _Op) and s.name == "aten.aminmax")
    skipped *= 3  # aminmax and its two reads back per skipped check
    if kernels + skipped != total.kernels:
        raise RuntimeError(f"train_op_counts: recorder saw {kernels} kernels (+{skipped} one_hot checks), "
                           f"count_ops {total.kernels}")
    per_block = {"moe": sum(1 for b in model.blocks if b.is_moe), "dense": sum(1 for b in model.blocks if not b.is_moe)}
    recorded = sum(r["kernels"] * (per_block[r["segment"].split(".")[0]] if "." in r["segment"] else 1) for r in rows)
    if recorded != kernels:
        raise RuntimeError(f"train_op_counts: segments hold {recorded} of {kernels} kernels")
    key = config_key(m, adamw, backend)
    if mem_out is not None:
        mem_out.extend(mem_rows(key, rows))
    return [dict(config=key, **{k: v for k, v in r.items() if k != "mem"}) for r in rows]


def mem_rows(key: str, rows: list[dict]) -> list[dict]:
    """The memory-pass table rows of a counted program: per segment and class, the kernels and the bytes per
    token per unit width (``mem_D`` ... ``mem_T``; ``T``: per token, no width)."""
    out = []
    for r in rows:
        if r["segment"].split("_")[0] in ("clip", "optimizer", "after", "readback", "zero"):
            continue  # parameter-side passes (clipping, AdamW, ...): priced per parameter by the workload
        for cls in MEM_CLASSES:
            if cls in r["mem"]:
                k, by = r["mem"][cls]
                out.append({"config": key, "segment": r["segment"], "class": cls, "kernels": round(k, 4),
                            **{f"mem_{u}": round(by.get(u, 0.0), 4) for u in CAST_UNITS}})
    return out


def _segments(seq: list, model) -> list[dict]:
    """One step's recorded sequence -> table rows (see the module docstring)."""
    step_rows: list[dict] = []
    blocks: dict[str, list[list[dict]]] = {"moe": [], "dense": []}
    bwd_blocks: dict[str, list[list[dict]]] = {"moe": [], "dense": []}
    cur: dict = {}
    state = {"seg": "embedding", "block": None, "kind": None}

    def reset():
        cur.clear()
        cur.update(kernels=0, lead=None, views=0, other=0.0, mem={}, **{f"cast_{u}": 0.0 for u in CAST_UNITS})

    def flush(segment: str, sync_op: str = "") -> None:
        if not (cur["kernels"] or cur["views"] or sync_op) and segment.rpartition("_")[2].isdigit():
            return  # nothing after the segment's last sync
        if cur["other"]:
            raise RuntimeError(f"train_op_counts: {segment}: casts of unclassified widths ({cur['other']:.0f} bytes)")
        row = {"segment": segment, "kernels": cur["kernels"], "lead": cur["lead"] if cur["lead"] is not None else 0,
               "views": cur["views"], "syncs": int(bool(sync_op)),
               "sync_op": sync_op, **{f"cast_{u}": round(cur[f"cast_{u}"], 4) for u in CAST_UNITS},
               "mem": {c: (k, dict(b)) for c, (k, b) in cur["mem"].items()}}
        (state["block"] if state["block"] is not None else step_rows).append(row)
        reset()

    kinds = ["moe" if b.is_moe else "dense" for b in model.blocks]
    reset()
    for item in seq:
        if isinstance(item, tuple):
            tag, kind = item
            if tag == "block_start":
                if state["seg"] == "embedding":
                    flush("embedding")
                elif cur["kernels"] or cur["views"]:
                    raise RuntimeError(f"train_op_counts: {cur['kernels']} kernels between blocks")
                state.update(block=[], kind=kind, seg=f"{kind}.attn")
            elif tag == "block_end":
                flush(state["seg"])
                blocks[kind].append(state["block"])
                state.update(block=None, seg="head")
            elif tag == "bwd_block_start":
                flush(state["seg"])
                k = kinds[kind]
                state.update(block=[], kind=k, seg=f"{k}.bwd")
            elif tag == "bwd_block_end":
                flush(state["seg"])
                bwd_blocks[state["kind"]].append(state["block"])
                if kind > 0:
                    k = kinds[kind - 1]
                    state.update(block=[], kind=k, seg=f"{k}.bwd")
                else:
                    state.update(block=None, seg="bwd_embedding")
            continue
        if isinstance(item, str):
            if item == "ffn_start":
                flush(state["seg"])
                state["seg"] = f"{state['kind']}.ffn"
            elif item == "ffn_end":
                flush(state["seg"])
                state["seg"] = f"{state['kind']}.post"
            elif item in ("zero_grad", "backward"):
                flush(state["seg"])
                state["seg"] = "zero_grad" if item == "zero_grad" else "bwd_head"
            elif item == "bwd_end":
                flush(state["seg"])
                state["seg"] = "clip"
            elif item in ("optimizer", "after_step", "readback"):
                flush(state["seg"])
                state["seg"] = item
            continue
        if cur["lead"] is None and item.name in GEMM_OPS:
            cur["lead"] = cur["kernels"]
        cur["views" if item.view else "kernels"] += 1
        if item.mem:
            cls, by = item.mem
            k, acc = cur["mem"].setdefault(cls, (0, {}))
            for u, b in by.items():
                acc[u] = acc.get(u, 0.0) + b
            cur["mem"][cls] = (k + 1, acc)
        if item.cast:
            for u, b in item.cast.items():
                cur[f"cast_{u}" if u != "other" else "other"] += b
        if item.sync:  # the segment ends here; the rest is <base>_1, <base>_2, ...
            seg = state["seg"]
            flush(seg, item.name)
            base, _, j = seg.rpartition("_")
            state["seg"] = f"{base}_{int(j) + 1}" if j.isdigit() and base else f"{seg}_1"
    flush(state["seg"])

    def same(progs):
        key = [[(r["segment"], r["kernels"], r["lead"], r["views"], r["sync_op"]) for r in p] for p in progs]
        return all(k == key[0] for k in key[1:])

    def mean(progs):
        """The blocks' common program; cast bytes averaged (routed rows depend on the routing)."""
        rows = [dict(r) for r in progs[0]]
        for j, r in enumerate(rows):
            for c in (f"cast_{u}" for u in CAST_UNITS):
                r[c] = round(sum(p[j][c] for p in progs) / len(progs), 4)
            mem: dict = {}
            for p in progs:
                for cls, (k, by) in p[j]["mem"].items():
                    k0, acc = mem.setdefault(cls, (0, {}))
                    for u, b in by.items():
                        acc[u] = acc.get(u, 0.0) + b / len(progs)
                    mem[cls] = (k0 + k / len(progs), acc)
            r["mem"] = mem
        return rows

    out = []
    for kind, progs in blocks.items():
        if progs and not same(progs):
            raise RuntimeError(f"train_op_counts: the {kind} blocks of one step issue different programs")
    for kind, progs in bwd_blocks.items():
        if progs and not same(progs):
            raise RuntimeError(f"train_op_counts: the {kind} blocks' backward issue different programs")
    # program order: embedding, block programs (one per kind), head, zero_grad, bwd_head, block backward
    # programs, bwd_embedding, clip, optimizer, after_step, readback
    fwd_end = next(i for i, r in enumerate(step_rows) if r["segment"].startswith("head"))
    out.extend(step_rows[:fwd_end])
    for kind in ("moe", "dense"):
        if blocks[kind]:
            out.extend(mean(blocks[kind]))
    bwd_start = next(i for i, r in enumerate(step_rows) if r["segment"].startswith("bwd_embedding"))
    out.extend(step_rows[fwd_end:bwd_start])
    for kind in ("moe", "dense"):
        if bwd_blocks[kind]:
            out.extend(mean(bwd_blocks[kind]))
    out.extend(step_rows[bwd_start:])
    return out
