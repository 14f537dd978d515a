"""The update the host probe times (`reference.offload.host_probe`, part 2): config (b)'s layer or a tiny one
(`layer_shapes`), its host buffers in each layout (`Buffers`, `VARIANTS`), one round of updates and state reads
on the engine's optimizer worker (`tick`), the setup of a process's buffers and executors (`setup`) and where
their pages are (`record_pages`, part 4)."""

from __future__ import annotations

import os
import time

from reference.offload.host_probe_facts import Counters, page_nodes, proc_maps, vma_info
from reference.offload.host_probe_rows import Rows, case_name, log

# buffer layouts of one layer's host state (see the module docstring); without CUDA pinned = plain, no registered
VARIANTS = ("pinned", "plain", "states_plain", "plain_thp", "registered")
VARIANTS_CPU = ("pinned", "plain", "plain_thp")


def layer_shapes(quick: bool) -> tuple[int, dict[str, tuple[int, ...]]]:
    """(experts, per-expert shapes) of the probed layer: config (b)'s MoE layer (`bench` defaults), or a tiny one."""
    from reference.offload.bench import build_parser, expert_shapes, specs

    if quick:
        return 2, {"w1_EDF": (64, 256), "w2_EFD": (256, 64)}
    spec = specs(False, build_parser().parse_args(["--out", "."]))["b"][0]
    return spec.experts, expert_shapes(spec)


def madvise_huge(t) -> bool:
    """``madvise(MADV_HUGEPAGE)`` on the whole pages of tensor ``t`` (before it is first touched, so the page
    faults can allocate huge pages where ``transparent_hugepage/enabled`` is ``madvise`` or ``always``): whether
    the call succeeded (False without libc or on error)."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    lo = -(-t.data_ptr() // page) * page
    hi = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if hi <= lo:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 14) == 0  # MADV_HUGEPAGE
    except (OSError, AttributeError):
        return False


class Buffers:
    """One layer's host buffers in one layout (`VARIANTS`): ``state`` ``[E, 3, P]`` fp32, bf16 ``grads`` and
    ``mirror`` ``[E, ...]``, allocated and first-touched by the calling thread. ``plain_thp`` and ``registered``:
    pageable tensors madvised to huge pages before their first touch (`madvise_huge`); ``registered`` then pinned in
    place with ``cudaHostRegister`` (unregistered by `close`)."""

    def __init__(self, variant: str, E: int, shapes: dict, cuda: bool) -> None:
        import torch

        from reference.offload.cpu_adam import expert_layout

        if variant not in VARIANTS:
            raise ValueError(f"host_probe: variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self._reg = variant, []
        self.offsets, self.decay, self.P = expert_layout(shapes)
        pin_state = cuda and variant == "pinned"
        pin_dma = cuda and variant in ("pinned", "states_plain")
        huge = variant in ("plain_thp", "registered")
        self.madvised = 0

        def alloc(shape, dtype, pin):
            t = torch.empty(shape, dtype=dtype, pin_memory=pin)
            if huge:
                self.madvised += madvise_huge(t)
            return t

        self.state = alloc((E, 3, self.P), torch.float32, pin_state).zero_()
        self.state[:, 0].fill_(0.02)
        seed = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 1e-3
        self.grads, self.mirror = {}, {}
        for n, shp in shapes.items():
            g = alloc((E, *shp), torch.bfloat16, pin_dma)
            flat = g.view(-1)
            for i in range(0, flat.numel(), seed.numel()):
                flat[i : i + seed.numel()] = seed[: flat.numel() - i]
            self.grads[n] = g
            self.mirror[n] = alloc((E, *shp), torch.bfloat16, pin_dma).zero_()
        if variant == "registered" and cuda:
            for t in [self.state, *self.grads.values(), *self.mirror.values()]:
                err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
                if int(err) != 0:
                    self.close()
                    raise RuntimeError(f"host_probe: cudaHostRegister failed (cudaError {int(err)})")
                self._reg.append(t.data_ptr())
        self.states = [(e, self.state[e]) for e in range(E)]
        self.step = 0

    def adam(self, scratch: dict) -> float:
        """One engine update of the layer (fused, bf16 gradients upcast into ``scratch``): seconds."""
        from reference.offload.cpu_adam import adamw_layer_

        self.step += 1
        t = time.perf_counter()
        adamw_layer_(self.states, self.grads, self.mirror, self.offsets, self.decay, step=self.step, lr=1e-4,
                     beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01, impl="fused", scratch=scratch)
        return time.perf_counter() - t

    def read(self) -> float:
        """A read of the whole state (``torch.sum``, parallel): seconds."""
        t = time.perf_counter()
        float(self.state.sum())
        return time.perf_counter() - t

    def pages(self, texts: dict[str, str]) -> dict[str, dict]:
        """Where the state's and the first gradient buffer's pages are: `vma_info` of the VMA at the buffer's middle
        (`madvise_huge` splits off the partial first page) in ``texts`` (`proc_maps`), and `page_nodes` of the
        buffer itself as ``sampled_node<N>_pages`` (``sampled_err<errno>_pages``)."""
        out = {}
        for name, t in (("state", self.state), ("grad", next(iter(self.grads.values())))):
            nb = t.numel() * t.element_size()
            info = vma_info(t.data_ptr() + nb // 2, texts)
            for node, k in sorted(page_nodes(t.data_ptr(), nb).items()):
                info[f"sampled_node{node}_pages" if node >= 0 else f"sampled_err{-node}_pages"] = k
            out[name] = info
        return out

    def close(self) -> None:
        import torch

        for p in self._reg:
            torch.cuda.cudart().cudaHostUnregister(p)
        self._reg = []


def record_pages(rows: Rows, scope: str, bufs: dict[str, Buffers], when: str, **extra) -> None:
    """Part 4: rows ``scope=alloc`` with where each variant's state and gradient pages are (a failure to read them
    is logged, not fatal: they are diagnostics)."""
    t = time.perf_counter()
    try:
        texts = proc_maps()
        pages = {v: b.pages(texts) for v, b in bufs.items()}
    except Exception as e:  # noqa: BLE001
        log(f"  page placement not readable: {type(e).__name__}: {e}")
        return
    log(f"  read /proc/self maps, numa_maps, smaps in {time.perf_counter() - t:.2f} s")
    for v, info_by_buf in pages.items():
        for buf, info in info_by_buf.items():
            case = case_name(scope="alloc", proc=scope, when=when, variant=v, buf=buf, **extra)
            for k, val in info.items():
                if isinstance(val, (int, float)):
                    rows.add(case, k, float(val) if k == "vma_MB" else val, quiet=True)
            log(f"  {case}: " + " ".join(f"{k}={val}" for k, val in info.items()))


def tick(rows: Rows, worker, bufs: dict[str, Buffers], scratch: dict, order: list[str], counters: Counters,
         E: int, P: int, **case) -> dict[str, float]:
    """One round: each variant's update and state read on ``worker`` (rotating order), then the host counters over
    the round. Returns ``{variant: Mparams/s}``."""
    rates = {}
    for v in order:
        b = bufs[v]
        ta = worker.submit(b.adam, scratch).result()
        tr = worker.submit(b.read).result()
        rates[v] = E * P / ta / 1e6
        c = case_name(**case, variant=v)
        rows.add(c, "adam_Mparams_per_s", rates[v], quiet=True)
        rows.add(c, "state_read_GBps", b.state.numel() * 4 / tr / 1e9, quiet=True)
    c = case_name(**case, variant="-")
    for k, val in counters.take().items():
        rows.add(c, k, val, quiet=True)
    log(f"  {case_name(**case)}: " + "  ".join(f"{v} {r:.0f}" for v, r in rates.items()) + " Mparams/s")
    return rates


def setup(rows: Rows, case: dict, quick: bool, variants) -> tuple:
    """Allocate every variant's buffers (this thread first-touches them; rows ``alloc_s`` / ``alloc_error`` under
    ``case``), start the engine's executors and warm each variant up once.
    Returns ``(E, P, bufs, worker, io, threads, scratch)``."""
    import torch

    from reference.offload.engine import host_executors

    cuda = torch.cuda.is_available()
    E, shapes = layer_shapes(quick)
    bufs = {}
    for v in variants:
        t = time.perf_counter()
        try:
            bufs[v] = Buffers(v, E, shapes, cuda)
        except Exception as e:  # noqa: BLE001 - one layout that cannot be made must not cost the others
            log(f"  variant {v} not allocated: {type(e).__name__}: {str(e)[:300]}")
            rows.add(case_name(**case, variant=v), "alloc_error", 1)
            continue
        rows.add(case_name(**case, variant=v), "alloc_s", time.perf_counter() - t)
        if bufs[v].madvised:
            rows.add(case_name(**case, variant=v), "madvised_buffers", bufs[v].madvised, quiet=True)
    worker, io, threads = host_executors(None)
    scratch: dict = {}
    for b in bufs.values():
        worker.submit(b.adam, scratch).result()
    if not bufs:
        raise RuntimeError("host_probe: no buffer layout could be allocated")
    return E, next(iter(bufs.values())).P, bufs, worker, io, threads, scratch
