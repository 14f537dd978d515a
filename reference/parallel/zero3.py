"""ZeRO-3-style sharding of the dense parameters inside a node, with the next block's gather prefetched.

SE-MoE's horizontal dimension (SEMOE.md mechanisms 1-3; ZeRO stage 3, Rajbhandari et al. 2020, sec. 5):
dense parameters (attention, norms, router, embeddings, dense FFNs) and their AdamW states are split
over the p ranks of a node; experts stay whole on their EP owner (reference.parallel.ep_dispatcher).

Shape legend: P dense elements of one unit, p ranks of the node group, c = ceil(P / p) shard length.

    units: one per Block (its dense parameters) + one "root" unit (embeddings, final norm, head);
           each unit = up to two flat fp buffers (weight-decayed >= 2-D params, and the rest), so the
           optimizer keeps GPT-2's decay groups; rank i of the node holds flat[i c : (i+1) c] as an
           nn.Parameter (the only dense parameter the optimizer sees)
    forward: model pre-hook  -> gather root (sync), start the gather of block 0
             block i pre-hook -> wait block i's gather, point the module's weights at views of the
                                 full buffer, start block i+1's gather (prefetch: one unit ahead,
                                 plan.prefetch_depth >= 1), so gather i+1 overlaps compute i
             block i post-hook -> drop this module's references to the full buffer
    backward: the gather is an autograd op whose backward is a reduce-scatter (sum over the node)
              into the shard's grad; finish() all-reduces shard grads over the rail group (the
              other nodes' replicas of the same shard) and scales by 1 / data_parallel
    clip:    dense squared norm = sum over the node group of the shard squares

Elements per step and rank, dense part (ring algorithms): all-gather (p-1)/p * P in forward and
again in backward (re-gather), reduce-scatter (p-1)/p * P in backward, plus the cross-node
all-reduce of P/p; resident memory: P/p parameters + their AdamW states (+ one or two units' full
buffers while they compute: the current and the prefetched one).

Reshard after forward (FSDP's ``reshard_after_forward``): while the model runs forward, a
``saved_tensors_hooks`` pair replaces every tensor autograd saves that is a view of a gathered
buffer by a tag (unit, flat, shape, stride, offset), so the full buffers die when the block's
forward ends; in backward the first unpack of a unit re-gathers it (and starts the gather of the
block before it: backward prefetch); the unit's gather-backward (reduce-scatter) drops it again.

One rank on CUDA (a node group of size 1): the "gather" is a copy of the shard into the full buffer;
it runs on a side CUDA stream after an event on the compute stream, and the compute stream waits on
the copy's event (what an NCCL all-gather on its own stream does), so the one-ahead prefetch has the
same structure at world size 1 and its overlap can be measured on one GPU.

Traces: ``on_gather(phase, unit, nbytes, start_s, end_s)`` gets host times (issue to ready);
``on_span(phase, unit, nbytes, start, end)`` gets spans that one timeline can hold next to the offload
engine's copies: perf_counter floats on the CPU, ``torch.cuda.Event`` pairs on CUDA (enable_timing):
``gather_fwd`` / ``gather_bwd`` (issue to ready; with one rank on CUDA the side-stream copy itself) and
``gather_wait_fwd`` / ``gather_wait_bwd`` (how long compute waited for it at the point of use: the
exposed part; gather minus wait is the part hidden behind compute).

Checkpoints store the gathered per-name parameters and AdamW states (:meth:`full_state`,
:meth:`full_optim_state`, :meth:`load_full`), so they load with or without ZeRO-3, at any EP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from reference.parallel.groups import Group, ParallelGroups, _new_groups, _partitions


def _all_gather(out: Tensor, inp: Tensor, pg, async_op: bool):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=pg, async_op=async_op)


def _reduce_scatter(out: Tensor, inp: Tensor, pg):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=pg)


class _Box:
    work = None
    span = None  # (start, end) CUDA events of a single rank's side-stream copy (marks of an inline one)
    inline = None  # a single rank's synchronous copy (no CUDA): its marks, all of it on the critical path


class _StreamWork:
    """A single rank's gather on CUDA: a copy on a side stream; ``wait()`` orders the current stream after it."""

    def __init__(self, done, device) -> None:
        self.done, self.device = done, device

    def wait(self) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.done)


class _GatherStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: Tensor, group: Group, box: _Box, on_backward=None, local_copy=None) -> Tensor:
        ctx.group, ctx.on_backward = group, on_backward
        full = shard.new_empty(shard.numel() * group.size)
        if group.size == 1:
            if local_copy is not None:
                box.work, box.span = local_copy(full, shard)
            else:
                full.copy_(shard)
        else:
            box.work = _all_gather(full, shard.detach().contiguous(), group.pg, async_op=True)
        return full

    @staticmethod
    def backward(ctx, g: Tensor):
        group = ctx.group
        if ctx.on_backward is not None:
            ctx.on_backward()  # every use of the unit is done: drop its re-gathered buffer
        if group.size == 1:
            return g, None, None, None, None
        out = g.new_empty(g.numel() // group.size)
        _reduce_scatter(out, g.contiguous(), group.pg)
        return out, None, None, None, None


class _GatherWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full: Tensor, box: _Box) -> Tensor:
        if box.work is not None:
            box.work.wait()
            box.work = None
        return full.view_as(full)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


@dataclass
class _Flat:
    """One flat buffer of a unit: the parameters (module, attribute name, shape) it holds."""

    slots: list[tuple[nn.Module, str, torch.Size]]
    numel: int
    shard: nn.Parameter
    decay: bool
    pending: object = None  # (full_before_wait, box) while a gather is in flight
    regathered: Tensor | None = None  # backward: the full buffer gathered again (or in flight)
    regather_work: object = None
    started_s: float = 0.0  # perf_counter when the (re)gather was issued (traces)
    issued: object = None  # on_span: issue mark (perf_counter float, or CUDA event)
    regather_span: object = None  # on_span: (start, end) events of a single rank's side-stream re-copy


@dataclass
class _Unit:
    name: str
    index: int = -1  # position in forward order (root -1, blocks 0..)
    flats: list[_Flat] = field(default_factory=list)
    live: bool = False


class Zero3:
    """Shard ``model``'s dense parameters over ``groups.node`` in place (call after parallelize_moe).

    ``shards()`` lists the new trainable dense parameters with their decay flag, for the optimizer;
    ``finish()`` reduces their grads across nodes; ``dense_sq_norm()`` gives the dense part of
    the clipping norm.
    """

    def __init__(self, model: nn.Module, groups: ParallelGroups, expert_ids: set[int], *, prefetch: int = 1,
                 reshard_after_forward: bool = True, on_gather=None, on_span=None) -> None:
        """``on_gather(phase, unit_index, nbytes, start_s, end_s)`` (perf_counter times) receives every
        gather: phase ``"gather_fwd"`` or ``"gather_bwd"``, unit index -1 for the root. ``on_span``: the
        same gathers and their exposed waits as spans for a shared timeline (see the module doc)."""
        self.groups, self.prefetch, self.reshard_after_forward = groups, prefetch, reshard_after_forward
        self.on_gather, self.on_span = on_gather, on_span
        self._side_stream = None
        self._live_ptrs: dict[int, tuple[_Unit, int]] = {}  # storage pointer of a gathered buffer -> (unit, flat)
        self._hooks_ctx = None
        parts = _partitions(groups.world_size, groups.ep.size, groups.gpus_per_node)
        on = dist.is_available() and dist.is_initialized()
        # own communicators: parameter gathers never queue behind token all-to-alls
        self.node = _new_groups(parts["node"], groups.rank, "zero_node", on, "zero")
        self.rail = _new_groups(parts["rail"], groups.rank, "zero_rail", on, "zero")
        self.model = model
        self.blocks = list(getattr(model, "blocks", []))
        claimed: set[int] = set(expert_ids)
        self.units: list[_Unit] = []
        for i, blk in enumerate(self.blocks):
            self.units.append(self._make_unit(f"blocks.{i}", blk, claimed))
            self.units[-1].index = i
        self.root = self._make_unit("root", model, claimed)
        self.holder = nn.ParameterList([f.shard for u in [*self.units, self.root] for f in u.flats])
        model.zero3_shards = self.holder  # registered: .to(), parameters() and the optimizer see the shards
        self._hooks = [model.register_forward_pre_hook(self._model_pre), model.register_forward_hook(self._model_post)]
        for i, blk in enumerate(self.blocks):
            self._hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: self._block_pre(i)))
            self._hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: self._release(self.units[i])))

    # ------------------------------------------------------------------------------ building
    def _make_unit(self, name: str, module: nn.Module, claimed: set[int]) -> _Unit:
        unit = _Unit(name)
        for decay in (True, False):
            slots, tensors = [], []
            for mname, m in module.named_modules():
                for pname, p in list(m._parameters.items()):
                    if p is None or id(p) in claimed or not p.requires_grad or (p.dim() >= 2) != decay:
                        continue
                    claimed.add(id(p))
                    slots.append((m, pname, p.shape))
                    tensors.append(p.detach().reshape(-1))
            if not slots:
                continue
            flat = torch.cat(tensors)
            p_sz = self.node.size
            c = math.ceil(flat.numel() / p_sz)
            padded = torch.cat([flat, flat.new_zeros(c * p_sz - flat.numel())])
            shard = nn.Parameter(padded[self.node.rank * c : (self.node.rank + 1) * c].clone())
            shard.zero3_decay = decay
            for m, pname, _ in slots:
                del m._parameters[pname]
                setattr(m, pname, None)
            unit.flats.append(_Flat(slots, flat.numel(), shard, decay))
        return unit

    def shards(self) -> list[nn.Parameter]:
        return list(self.holder)

    # ------------------------------------------------------------------------------ gathers
    def _start(self, unit: _Unit) -> None:
        for f in unit.flats:
            if f.pending is None:
                box = _Box()
                done = (lambda f=f: self._drop_regathered(f)) if self.reshard_after_forward else None
                f.started_s = time.perf_counter()
                f.issued = self._mark(f.shard)
                f.pending = (_GatherStart.apply(f.shard, self.node, box, done, self._local_copy_fn(f.shard)), box)
                if self.node.size == 1 and box.span is None and f.issued is not None:
                    box.span = box.inline = (f.issued, self._mark(f.shard))  # copied inline: all of it exposed

    def _materialise(self, unit: _Unit) -> None:
        self._start(unit)
        for k, f in enumerate(unit.flats):
            full, box = f.pending
            f.pending = None
            w0 = self._mark(f.shard)
            full = _GatherWait.apply(full, box)
            w1 = self._mark(f.shard)
            self._report("gather_fwd", unit, f)
            self._spans("gather_fwd", unit, f, box.span or (f.issued, w1), box.inline or (w0, w1))
            self._live_ptrs[full.untyped_storage().data_ptr()] = (unit, k)
            off = 0
            for m, pname, shape in f.slots:
                n = shape.numel()
                setattr(m, pname, full[off : off + n].view(shape))
                off += n
        unit.live = True

    def _release(self, unit: _Unit) -> None:
        for f in unit.flats:
            for m, pname, _ in f.slots:
                setattr(m, pname, None)
        # forget the unit's buffers now: once freed, the allocator may hand their addresses to other
        # tensors, which _pack must not mistake for parameter views
        for ptr in [ptr for ptr, (u, _) in self._live_ptrs.items() if u is unit]:
            del self._live_ptrs[ptr]
        unit.live = False

    def _model_pre(self, module, args) -> None:
        if self.reshard_after_forward and torch.is_grad_enabled():
            self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks_ctx.__enter__()
        self._materialise(self.root)
        if self.units and self.prefetch > 0:
            self._start(self.units[0])

    def _model_post(self, module, args, out) -> None:
        self._release(self.root)
        if self._hooks_ctx is not None:
            self._hooks_ctx.__exit__(None, None, None)
            self._hooks_ctx = None
        self._live_ptrs.clear()  # autograd now holds tags, not the gathered buffers: they are freed

    # ------------------------------------------------- reshard after forward, re-gather in backward
    def _pack(self, t: Tensor):
        """Saved for backward: a view of a gathered buffer becomes a tag (unit, flat, geometry)."""
        try:
            hit = self._live_ptrs.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            hit = None
        if hit is None:
            return t
        unit, k = hit
        return ("zero3", unit, k, tuple(t.shape), t.stride(), t.storage_offset())

    def _unpack(self, packed):
        if not (isinstance(packed, tuple) and packed and packed[0] == "zero3"):
            return packed
        _, unit, k, shape, stride, offset = packed
        full = self._regather(unit, k)
        # prefetch: the block before this one is the next that backward needs
        if unit.index > 0 and self.prefetch > 0:
            prev = self.units[unit.index - 1]
            for j in range(len(prev.flats)):
                self._regather(prev, j, wait=False)
        return full.as_strided(shape, stride, offset)

    def _regather(self, unit: _Unit, k: int, wait: bool = True) -> Tensor:
        f = unit.flats[k]
        if f.regathered is None:
            f.started_s = time.perf_counter()
            f.issued, f.regather_span = self._mark(f.shard), None
            f.regathered = f.shard.detach().new_empty(f.shard.numel() * self.node.size)
            copy = self._local_copy_fn(f.shard)
            if self.node.size > 1:
                f.regather_work = _all_gather(f.regathered, f.shard.detach(), self.node.pg, async_op=True)
            elif copy is not None:
                f.regather_work, f.regather_span = copy(f.regathered, f.shard.detach())
            else:  # one rank, synchronous copy: ready at once
                f.regathered.copy_(f.shard.detach())
                now = self._mark(f.shard)
                self._report("gather_bwd", unit, f)
                self._spans("gather_bwd", unit, f, (f.issued, now), (f.issued, now))  # inline: exposed
        if wait and f.regather_work is not None:
            w0 = self._mark(f.shard)
            f.regather_work.wait()
            f.regather_work = None
            w1 = self._mark(f.shard)
            self._report("gather_bwd", unit, f)
            self._spans("gather_bwd", unit, f, f.regather_span or (f.issued, w1), (w0, w1))
        return f.regathered

    def _report(self, phase: str, unit: _Unit, f: _Flat) -> None:
        if self.on_gather is not None:
            nbytes = f.shard.numel() * f.shard.element_size() * self.node.size
            self.on_gather(phase, unit.index, nbytes, f.started_s, time.perf_counter())

    # ------------------------------------------------------------------ one rank on CUDA, span marks
    def _local_copy_fn(self, shard: Tensor):
        """With one rank on CUDA: a function (full, shard) -> (work, span) that copies on the side stream."""
        if self.node.size != 1 or not shard.is_cuda:
            return None
        return self._side_copy

    def _side_copy(self, full: Tensor, shard: Tensor):
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(shard.device)
        s, timing = self._side_stream, self.on_span is not None
        after = torch.cuda.Event()
        after.record(torch.cuda.current_stream(shard.device))  # the shard's latest value, full's memory free
        span = None
        with torch.cuda.stream(s):
            s.wait_event(after)
            if timing:
                span = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                span[0].record(s)
            full.copy_(shard.detach(), non_blocking=True)
            if timing:
                span[1].record(s)
            done = torch.cuda.Event()
            done.record(s)
        return _StreamWork(done, shard.device), span

    def _mark(self, like: Tensor):
        """A point on the timeline of ``on_span``: None (no span hook), a CUDA event, or perf_counter."""
        if self.on_span is None:
            return None
        if like.is_cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(like.device))
            return ev
        return time.perf_counter()

    def _spans(self, phase: str, unit: _Unit, f: _Flat, gather, wait) -> None:
        if self.on_span is None:
            return
        nbytes = f.shard.numel() * f.shard.element_size() * self.node.size
        self.on_span(phase, unit.index, nbytes, gather[0], gather[1])
        self.on_span(phase.replace("gather_", "gather_wait_"), unit.index, 0, wait[0], wait[1])

    def _drop_regathered(self, f: _Flat) -> None:
        if f.regather_work is not None:
            f.regather_work.wait()
        f.regathered, f.regather_work = None, None

    def _block_pre(self, i: int) -> None:
        self._materialise(self.units[i])
        for j in range(i + 1, min(i + 1 + self.prefetch, len(self.units))):
            self._start(self.units[j])

    # ------------------------------------------------------------------------------ gradients
    def finish(self) -> None:
        """Sum shard grads over the other nodes' replicas and scale to the mean over all ranks."""
        scale = 1.0 / self.groups.world_size
        for p in self.holder:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.rail.size > 1:
                dist.all_reduce(p.grad, group=self.rail.pg)
            p.grad.mul_(scale)

    def dense_sq_norm(self) -> Tensor:
        grads = [p.grad for p in self.holder if p.grad is not None]
        acc = torch.float64 if grads and grads[0].dtype == torch.float64 else torch.float32
        sq = sum((g.to(acc).pow(2).sum() for g in grads), torch.zeros((), dtype=acc))
        if self.node.size > 1:
            dist.all_reduce(sq, group=self.node.pg)
        return sq

    # ------------------------------------------------------------------ full views (checkpoints)
    def _flats(self) -> list[_Flat]:
        return [f for u in [*self.units, self.root] for f in u.flats]

    def _slot_names(self, f: _Flat) -> list[str]:
        names = {id(m): n for n, m in self.model.named_modules()}
        return [f"{names[id(m)]}.{p}" if names[id(m)] else p for m, p, _ in f.slots]

    def _gather_flat(self, shard: Tensor) -> Tensor:
        full = shard.new_empty(shard.numel() * self.node.size)
        if self.node.size > 1:
            _all_gather(full, shard.detach().contiguous(), self.node.pg, async_op=False)
        else:
            full.copy_(shard.detach())
        return full

    def _split(self, f: _Flat, full: Tensor) -> dict[str, Tensor]:
        out, off = {}, 0
        for name, (_, _, shape) in zip(self._slot_names(f), f.slots):
            out[name] = full[off : off + shape.numel()].view(shape).clone()
            off += shape.numel()
        return out

    def full_state(self) -> dict[str, Tensor]:
        """Gather every dense parameter (by its original name) on every rank (collective over the node)."""
        out = {}
        for f in self._flats():
            out.update(self._split(f, self._gather_flat(f.shard)))
        return out

    def full_optim_state(self, opt: torch.optim.Optimizer) -> dict[str, dict]:
        """AdamW states of the dense parameters by original name, gathered (collective over the node)."""
        out: dict[str, dict] = {}
        for f in self._flats():
            st = opt.state.get(f.shard)
            if not st:
                continue
            per_name: dict[str, dict] = {n: {} for n in self._slot_names(f)}
            for key, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    for n, t in self._split(f, self._gather_flat(v)).items():
                        per_name[n][key] = t
                else:
                    for n in per_name:
                        per_name[n][key] = v.clone() if torch.is_tensor(v) else v
            out.update(per_name)
        return out

    @torch.no_grad()
    def load_full(self, dense: dict[str, Tensor], optim: dict[str, dict] | None = None,
                  opt: torch.optim.Optimizer | None = None) -> None:
        """Write full per-name parameters (and AdamW states) into this rank's shards."""
        c_of = lambda f: f.shard.numel()  # noqa: E731
        for f in self._flats():
            names = self._slot_names(f)
            missing = [n for n in names if n not in dense]
            if missing:
                raise KeyError(f"ZeRO-3 load: parameters {missing} not in the checkpoint")

            def shard_of(tensors: list[Tensor], like: Tensor) -> Tensor:
                flat = torch.cat([t.reshape(-1).to(like) for t in tensors])
                c = c_of(f)
                flat = torch.cat([flat, flat.new_zeros(c * self.node.size - flat.numel())])
                return flat[self.node.rank * c : (self.node.rank + 1) * c].clone()

            f.shard.copy_(shard_of([dense[n] for n in names], f.shard))
            if opt is not None and optim and all(n in optim for n in names):
                st = {}
                for key, v in optim[names[0]].items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        st[key] = shard_of([optim[n][key] for n in names], f.shard)
                    else:
                        st[key] = v.clone() if torch.is_tensor(v) else v
                opt.state[f.shard] = st
