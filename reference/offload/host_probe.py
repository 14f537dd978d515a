"""Issue 6 follow-up (task hB2): why the host's CPU AdamW rate drifts 2x within minutes (NUMA / binding probe).

Run from the repository root on the GPU machine::

    PYTHONPATH=. python -m reference.offload.host_probe --out DIR [--quick] [--duration-s 60] [--budget-s 150]

What it measures (rows ``date,commit,device,case,metric,value`` appended to ``DIR/host_probe.csv``, one at a
time, flushed, so a killed run keeps what it measured; ``case`` is ``key=value`` tokens, `parse_case`):

1. facts (``DIR/host_facts.txt``): lscpu, ``numactl -H``, ``nvidia-smi topo -m``, transparent huge pages
   (enabled, defrag, khugepaged), automatic NUMA balancing, the cpufreq governor, nproc, the affinity mask, torch's
   thread count, the engine's AdamW thread rule, the NUMA node and SMT siblings of every CPU, cgroup CPU limits
   and pressure (PSI); the numeric ones also as rows (``scope=facts``);
2. ``scope=main``: the engine's AdamW (`reference.offload.cpu_adam.adamw_layer_`, fused, bf16 gradients, on
   config (b)'s layer: 16 experts of d 1024 x F 4096, as `bench.measure_engine_adam` probes it) on the engine's
   optimizer worker (`reference.offload.engine.host_executors`: intra-op threads = the engine's rule), every
   ``--interval-s`` over ``--duration-s``, on buffers laid out as `VARIANTS` (``pinned``: states, gradients and
   mirror pinned, as the engine holds tier ``cpu`` on CUDA; ``plain``: all pageable; ``states_plain``: the fp32
   states pageable, the DMA buffers pinned; ``registered``: pageable memory pinned in place by
   ``cudaHostRegister``; ``plain_thp``: pageable, madvised to huge pages before first touch, as ``registered`` is),
   one call each per tick in a rotating order; beside each call a read of the layer's
   states (``state_read_GBps``, ``torch.sum`` on the same worker) and, per tick, the host's steal time, mean
   MHz, CPU pressure and page-migration / THP counters over the tick (time series: shows drift);
3. ``scope=child``: the same (layouts ``pinned`` and ``plain``) in fresh processes whose CPU mask is set before
   the interpreter starts (so before torch's OpenMP runtime reads it), buffers allocated and first-touched inside
   them: one per NUMA node (or, with one node, each half of the CPUs), one thread per physical core (with SMT),
   the whole mask with ``OMP_PROC_BIND=close`` / ``spread`` (``OMP_PLACES=cores``), plain allocations on huge
   pages (``THP_MEM_ALLOC_ENABLE=1``) and an unbound fresh process (per-process state vs time). Before each child, the
   main process takes one more tick (``scope=ref``): the time reference it is compared against;
4. ``scope=alloc``: where each buffer's pages are: the NUMA node of 512 of its pages (``move_pages(2)`` in query
   mode: is torch's pinned memory on one node?), the VMA that holds it (``/proc/<pid>/maps``), that VMA's pages
   per node and page size (``numa_maps``) and its huge pages (``smaps`` AnonHugePages), at the start and the end.

``--quick``: tiny layer on the CPU (pinned = plain: no CUDA), 2 ticks, two short children (CI smoke test, < 15 s).
Nothing here changes the engine; NOTES.md says what the data showed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from semoe.io import RowAppender

COLUMNS = ("date", "commit", "device", "case", "metric", "value")
CSV_NAME = "host_probe.csv"
FACTS_NAME = "host_facts.txt"
# buffer layouts of one layer's host state (see the module docstring); without CUDA pinned = plain, no registered
VARIANTS = ("pinned", "plain", "states_plain", "plain_thp", "registered")
VARIANTS_CPU = ("pinned", "plain", "plain_thp")
CHILD_VARIANTS = ("pinned", "plain")  # the bound children: the engine's layout and the pageable one (time budget)
MOVE_PAGES_NR = {"x86_64": 279, "aarch64": 239}  # move_pages(2) syscall numbers (query mode: nodes = NULL)
VMSTAT_KEYS = ("numa_pages_migrated", "pgmigrate_success", "numa_hint_faults", "thp_fault_alloc",
               "thp_collapse_alloc", "compact_stall")
MEMINFO_KEYS = r"(MemTotal|MemFree|MemAvailable|AnonHugePages|HugePages_|Hugepagesize|Mlocked)"
NODE_ROOT = Path("/sys/devices/system/node")
CPU_ROOT = Path("/sys/devices/system/cpu")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Rows(RowAppender):
    """Appends rows to DIR/host_probe.csv, flushed after each one (children append to the same file)."""

    def __init__(self, path: Path, device: str, commit: str | None = None) -> None:
        super().__init__(path, COLUMNS, device, commit)

    def add(self, case: str, metric: str, value, quiet: bool = False) -> None:
        value = self.write(case, metric, value)
        if not quiet:
            log(f"  {case}: {metric} = {value}")


def case_name(**kv) -> str:
    """``case`` column: ``key=value`` tokens in the given order (values without spaces)."""
    for k, v in kv.items():
        if " " in str(v) or "=" in str(v):
            raise ValueError(f"host_probe: case value {k}={v!r} must not contain spaces or '='")
    return " ".join(f"{k}={v}" for k, v in kv.items())


def parse_case(case: str) -> dict[str, str]:
    """The ``key=value`` tokens of a ``case`` column back as a dict."""
    out = {}
    for tok in case.split():
        k, sep, v = tok.partition("=")
        if not sep:
            raise ValueError(f"host_probe: case token {tok!r} is not key=value")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------ CPU topology
def parse_cpulist(s: str) -> list[int]:
    """A kernel CPU list (``"0-3,8,10-11"``) -> sorted CPU ids."""
    out: set[int] = set()
    for part in s.strip().split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"host_probe: bad CPU list {s!r}")
        out.update(range(int(lo), int(hi if sep else lo) + 1))
    return sorted(out)


def format_cpulist(cpus) -> str:
    """Sorted CPU ids -> the kernel's compact list form (``[0, 1, 2, 5]`` -> ``"0-2,5"``)."""
    cpus = sorted(set(cpus))
    parts, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def read_text(path) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def numa_nodes(root: Path = NODE_ROOT) -> dict[int, list[int]]:
    """NUMA node -> its CPUs (``/sys/devices/system/node/node<N>/cpulist``); ``{}`` where sysfs has none."""
    out = {}
    for d in sorted(root.glob("node[0-9]*")) if root.is_dir() else []:
        text = read_text(d / "cpulist")
        if text is not None and text.strip():
            out[int(d.name[4:])] = parse_cpulist(text)
    return out


def smt_siblings(root: Path = CPU_ROOT) -> dict[int, list[int]]:
    """CPU -> the hardware threads of its core (``topology/thread_siblings_list``), for the CPUs that have it."""
    out = {}
    for d in root.glob("cpu[0-9]*") if root.is_dir() else []:
        text = read_text(d / "topology" / "thread_siblings_list")
        if text is not None and text.strip():
            out[int(d.name[3:])] = parse_cpulist(text)
    return out


def one_per_core(cpus, siblings: dict[int, list[int]]) -> list[int]:
    """The first allowed hardware thread of each core among ``cpus`` (CPUs without sibling info count as cores)."""
    allowed, seen, out = set(cpus), set(), []
    for c in sorted(allowed):
        core = tuple(s for s in siblings.get(c, [c]) if s in allowed)
        if core not in seen:
            seen.add(core)
            out.append(c)
    return out


def bind_cases(affinity, nodes: dict[int, list[int]],
               siblings: dict[int, list[int]]) -> list[tuple[str, list[int], dict]]:
    """The child processes of part 3, most informative first: ``(name, cpus, extra env)``. One per NUMA node
    with CPUs in ``affinity`` (with one such node: each half of ``affinity``, ``half0`` / ``half1``), ``fresh``
    (the whole mask, nothing set: per process vs in time), ``close`` / ``spread`` (OMP_PROC_BIND, OMP_PLACES=cores),
    ``physcores`` (one thread per core, only with SMT), ``thp`` (plain allocations madvised to huge pages)."""
    aff = sorted(set(affinity))
    if not aff:
        raise ValueError("host_probe: empty affinity mask")
    per_node = [(n, [c for c in cpus if c in set(aff)]) for n, cpus in sorted(nodes.items())]
    per_node = [(n, cpus) for n, cpus in per_node if cpus]
    out: list[tuple[str, list[int], dict]] = [("fresh", aff, {})]
    if len(per_node) > 1:
        out += [(f"node{n}", cpus, {}) for n, cpus in per_node]
    elif len(aff) > 1:
        h = len(aff) // 2
        out += [("half0", aff[:h], {}), ("half1", aff[h:], {})]
    out += [("close", aff, {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}),
            ("spread", aff, {"OMP_PROC_BIND": "spread", "OMP_PLACES": "cores"})]
    phys = one_per_core(aff, siblings)
    if len(phys) < len(aff):
        out.append(("physcores", phys, {}))
    out.append(("thp", aff, {"THP_MEM_ALLOC_ENABLE": "1"}))
    return out


# ------------------------------------------------------------------------------------ host counters
def cpu_times() -> dict[str, int] | None:
    """The aggregate ``cpu`` line of /proc/stat: total and steal jiffies (None where unreadable)."""
    text = read_text("/proc/stat")
    if not text:
        return None
    f = [int(x) for x in text.splitlines()[0].split()[1:]]
    return {"total": sum(f[:8]), "steal": f[7] if len(f) > 7 else 0, "idle": f[3] + (f[4] if len(f) > 4 else 0)}


def vmstat() -> dict[str, int]:
    text = read_text("/proc/vmstat") or ""
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k in VMSTAT_KEYS:
            out[k] = int(v)
    return out


def cpu_mhz_mean() -> float | None:
    """Mean ``cpu MHz`` over /proc/cpuinfo (what the hypervisor reports; None where absent)."""
    vals = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", read_text("/proc/cpuinfo") or "", re.MULTILINE)]
    return sum(vals) / len(vals) if vals else None


def pressure(kind: str = "cpu") -> float | None:
    """``some avg10`` of /proc/pressure/<kind> (percent of the last 10 s some task waited; None where absent)."""
    m = re.search(r"^some avg10=([0-9.]+)", read_text(f"/proc/pressure/{kind}") or "", re.MULTILINE)
    return float(m.group(1)) if m else None


class Counters:
    """Host counters over an interval: steal %, busy %, mean MHz, CPU / memory pressure, vmstat deltas."""

    def __init__(self) -> None:
        self.t0, self.v0 = cpu_times(), vmstat()

    def take(self) -> dict[str, float]:
        t1, v1 = cpu_times(), vmstat()
        out: dict[str, float] = {}
        if self.t0 and t1 and t1["total"] > self.t0["total"]:
            dt_ = t1["total"] - self.t0["total"]
            out["steal_pct"] = 100.0 * (t1["steal"] - self.t0["steal"]) / dt_
            out["busy_pct"] = 100.0 * (1 - (t1["idle"] - self.t0["idle"]) / dt_)
        for k in VMSTAT_KEYS:
            if k in v1 and k in self.v0:
                out[k] = float(v1[k] - self.v0[k])
        for name, val in (("cpu_mhz_mean", cpu_mhz_mean()), ("psi_cpu_some10", pressure("cpu")),
                          ("psi_mem_some10", pressure("memory"))):
            if val is not None:
                out[name] = val
        self.t0, self.v0 = t1, v1
        return out


def proc_maps(pid: str = "self") -> dict[str, str]:
    """The texts of ``/proc/<pid>/{maps,numa_maps,smaps}`` (read once: `vma_info` looks many buffers up in them)."""
    return {k: read_text(f"/proc/{pid}/{k}") or "" for k in ("maps", "numa_maps", "smaps")}


def vma_info(ptr: int, texts: dict[str, str] | None = None) -> dict:
    """Where the pages at address ``ptr`` are: the VMA that holds it (``maps``: start, size, path), its pages per
    NUMA node, page size and policy (``numa_maps``) and its Rss / AnonHugePages / Locked (``smaps``), from
    ``texts`` (`proc_maps`; default: this process now). Missing files leave their keys out."""
    texts = proc_maps() if texts is None else texts
    out: dict = {}
    start = None
    for line in texts.get("maps", "").splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi:
            start = lo
            out.update(vma_start=f"{lo:x}", vma_MB=(hi - lo) / 2**20, path=parts[5] if len(parts) > 5 else "[anon]")
            break
    if start is None:
        return out
    for line in texts.get("numa_maps", "").splitlines():
        parts = line.split()
        if parts and int(parts[0], 16) == start:
            out["policy"] = parts[1]
            for tok in parts[2:]:
                k, _, v = tok.partition("=")
                if re.fullmatch(r"N\d+", k):
                    out[f"node{k[1:]}_pages"] = int(v)
                elif k == "kernelpagesize_kB":
                    out[k] = int(v)
            break
    m = re.search(rf"^0*{start:x}-[0-9a-f]+ .*?\n((?:[A-Z][A-Za-z_]*:.*\n)+)", texts.get("smaps", ""), re.MULTILINE)
    if m:
        for k in ("Rss", "AnonHugePages", "Locked"):
            mm = re.search(rf"^{k}:\s+(\d+) kB", m.group(1), re.MULTILINE)
            if mm:
                out[f"{k}_kB"] = int(mm.group(1))
    return out


def page_nodes(ptr: int, nbytes: int, samples: int = 512) -> dict[int, int]:
    """NUMA node of ``samples`` pages spread evenly over ``[ptr, ptr + nbytes)``, asked of the kernel with
    ``move_pages(2)`` in query mode (nodes = NULL: nothing moves): ``{node: pages}``; a negative key is the errno
    the kernel gave for those pages (-2 ENOENT: not present, -14 EFAULT: not a normal page). ``{}`` where the
    syscall is not available (other architectures, no libc)."""
    import ctypes
    import platform

    nr = MOVE_PAGES_NR.get(platform.machine())
    page = os.sysconf("SC_PAGE_SIZE")
    n = max(1, min(samples, nbytes // page))
    if nr is None or nbytes <= 0:
        return {}
    addrs = (ctypes.c_void_p * n)(*[(ptr + (nbytes - 1) * i // max(n - 1, 1)) // page * page for i in range(n)])
    status = (ctypes.c_int * n)()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(ctypes.c_long(nr), 0, ctypes.c_ulong(n), addrs, None, status, 0)
    except (OSError, AttributeError):
        return {}
    if rc != 0:
        return {}
    out: dict[int, int] = {}
    for st in status:
        out[int(st)] = out.get(int(st), 0) + 1
    return out


# ------------------------------------------------------------------------------------ facts
def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        return (r.stdout + r.stderr).strip() or f"(no output, rc {r.returncode})"
    except (OSError, subprocess.SubprocessError) as e:
        return f"(not available: {type(e).__name__}: {e})"


def collect_facts(path: Path, rows: Rows) -> dict:
    """Part 1: writes ``path`` (text) and the numeric facts as rows; returns the topology the children need."""
    import torch

    from reference.offload.cpu_adam import adam_threads

    aff = sorted(os.sched_getaffinity(0))
    nodes, sib = numa_nodes(), smt_siblings()
    thp = {k: (read_text(f"/sys/kernel/mm/transparent_hugepage/{k}") or "?").strip()
           for k in ("enabled", "defrag", "khugepaged/defrag", "khugepaged/pages_collapsed", "khugepaged/full_scans")}
    gov = sorted({(read_text(d / "cpufreq" / "scaling_governor") or "?").strip() for d in CPU_ROOT.glob("cpu[0-9]*")})
    sections = [
        ("date / python / torch", (f"{dt.datetime.now(dt.UTC).isoformat()}  python {sys.version.split()[0]}  "
                                  f"torch {torch.__version__}  cuda {torch.cuda.is_available()}")),
        ("nproc", _run(["nproc"])),
        ("os.sched_getaffinity(0)", f"{format_cpulist(aff)} ({len(aff)} CPUs); os.cpu_count() {os.cpu_count()}"),
        ("torch.get_num_threads / engine adam_threads", f"{torch.get_num_threads()} / {adam_threads()}"),
        ("NUMA node -> CPUs (/sys/devices/system/node)",
         "\n".join(f"node{n}: {format_cpulist(c)}" for n, c in nodes.items()) or "(no node directories)"),
        ("NUMA node meminfo", "\n".join((read_text(NODE_ROOT / f"node{n}" / "meminfo") or "").strip()
                                        for n in nodes) or "(none)"),
        ("SMT siblings (cpu: siblings)",
         ", ".join(f"{c}:{format_cpulist(s)}" for c, s in sorted(sib.items())) or "(none)"),
        ("transparent_hugepage", "\n".join(f"{k}: {v}" for k, v in thp.items())),
        ("kernel.numa_balancing", (read_text("/proc/sys/kernel/numa_balancing") or "(absent)").strip()),
        ("cpufreq scaling_governor (all CPUs)", ", ".join(gov)),
        ("cgroup cpu.max / cpuset.cpus.effective", " / ".join((read_text(f"/sys/fs/cgroup/{f}") or "(absent)").strip()
                                                              for f in ("cpu.max", "cpuset.cpus.effective"))),
        ("/proc/pressure/cpu, memory", "\n".join((read_text(f"/proc/pressure/{k}") or "(absent)").strip()
                                                  for k in ("cpu", "memory"))),
        ("/proc/meminfo (huge pages, totals)",
         "\n".join(line for line in (read_text("/proc/meminfo") or "").splitlines()
                   if re.match(MEMINFO_KEYS, line))),
        ("lscpu", _run(["lscpu"])),
        ("numactl -H", _run(["numactl", "-H"])),
        ("numactl --show", _run(["numactl", "--show"])),
        ("nvidia-smi topo -m", _run(["nvidia-smi", "topo", "-m"]) if torch.cuda.is_available() else "(no CUDA)"),
    ]
    path.write_text("".join(f"== {title}\n{body}\n\n" for title, body in sections))
    log(f"facts -> {path}")
    fc = case_name(scope="facts")
    for metric, value in (("nproc", os.cpu_count() or 0), ("affinity_cpus", len(aff)), ("numa_nodes", len(nodes)),
                          ("smt_threads_per_core", max((len(s) for s in sib.values()), default=1)),
                          ("torch_threads", torch.get_num_threads()), ("engine_adam_threads", adam_threads()),
                          ("thp_always", int("[always]" in thp["enabled"])),
                          ("thp_madvise", int("[madvise]" in thp["enabled"]))):
        rows.add(fc, metric, value)
    nb = (read_text("/proc/sys/kernel/numa_balancing") or "").strip()
    if nb.isdigit():
        rows.add(fc, "numa_balancing", int(nb))
    return {"affinity": aff, "nodes": nodes, "siblings": sib}


# ------------------------------------------------------------------------------------ the update
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


# ------------------------------------------------------------------------------------ child processes
def child_main(args) -> int:
    """Part 3 inside a bound process (its mask was set before the interpreter started)."""
    import torch

    cuda = torch.cuda.is_available()
    rows = Rows(args.out / CSV_NAME, torch.cuda.get_device_name() if cuda else "cpu", os.environ.get("SEMOE_COMMIT"))
    name = args.child
    variants = CHILD_VARIANTS
    base = {"scope": "child", "bind": name}
    aff = sorted(os.sched_getaffinity(0))
    rows.add(case_name(**base, variant="-"), "affinity_cpus", len(aff))
    log(f"child {name}: cpus {format_cpulist(aff)}, OMP_PROC_BIND={os.environ.get('OMP_PROC_BIND', '-')}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '-')}")
    E, P, bufs, worker, io, threads, scratch = setup(rows, base, args.quick, variants)
    variants = list(bufs)
    try:
        rows.add(case_name(**base, variant="-"), "threads_adam", threads["adam"])
        wa = worker.submit(os.sched_getaffinity, 0).result()
        rows.add(case_name(**base, variant="-"), "worker_affinity_cpus", len(wa))
        log(f"  child {name}: worker thread affinity {format_cpulist(wa)}")
        record_pages(rows, "child", bufs, "start", bind=name)
        counters = Counters()
        order = list(variants)
        for i in range(args.ticks):
            tick(rows, worker, bufs, scratch, order, counters, E, P, **base, tick=i)
            order = order[1:] + order[:1]
    finally:
        worker.shutdown(wait=True)
        io.shutdown(wait=True)
        for b in bufs.values():
            b.close()
        rows.close()
    return 0


def run_child(args, name: str, cpus: list[int], env: dict, timeout_s: float) -> int:
    cmd = [sys.executable, "-m", "reference.offload.host_probe", "--out", str(args.out.resolve()), "--child", name,
           "--ticks", str(args.child_ticks)] + (["--quick"] if args.quick else [])
    repo = Path(__file__).resolve().parents[2]
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = os.pathsep.join(x for x in (str(repo), os.environ.get("PYTHONPATH", "")) if x)
    for k in ("OMP_PROC_BIND", "OMP_PLACES", "THP_MEM_ALLOC_ENABLE"):  # only what the case names
        if k not in env:
            full.pop(k, None)
    # the child inherits the CPU mask of the thread that starts it: set this thread's mask for the spawn only (no
    # Python code runs between fork and exec), so the interpreter, and torch's OpenMP runtime, start bound
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        proc = subprocess.Popen(cmd, env=full, cwd=repo)
    finally:
        os.sched_setaffinity(0, old)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        log(f"  child {name} timed out after {timeout_s:.0f} s")
        return 124


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reference.offload.host_probe", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny layer on the CPU, 2 ticks, 2 children (CI smoke test)")
    p.add_argument("--duration-s", type=float, default=None,
                   help="length of the main time series (default 60; quick 0.2)")
    p.add_argument("--interval-s", type=float, default=None, help="time between ticks (default 3; quick 0.1)")
    p.add_argument("--budget-s", type=float, default=150.0, help="children start only while this much is left")
    p.add_argument("--child-ticks", type=int, default=None, help="ticks per child (default 2; quick 1)")
    p.add_argument("--children", default=None, help="comma list of child cases to run (default: all that apply)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ticks", type=int, default=3, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child_main(args)
    t_start = time.perf_counter()
    duration = args.duration_s if args.duration_s is not None else (0.2 if args.quick else 60.0)
    interval = args.interval_s if args.interval_s is not None else (0.1 if args.quick else 3.0)
    args.child_ticks = args.child_ticks or (1 if args.quick else 2)
    if duration < 0 or interval <= 0 or args.child_ticks < 1:
        raise SystemExit("host_probe: need --duration-s >= 0, --interval-s > 0 and --child-ticks >= 1")

    import torch

    from semoe.io import git_commit

    cuda = torch.cuda.is_available()
    commit = git_commit()
    os.environ.setdefault("SEMOE_COMMIT", commit)  # the children label their rows with the same commit
    rows = Rows(args.out / CSV_NAME, torch.cuda.get_device_name() if cuda else "cpu", commit)
    topo = collect_facts(args.out / FACTS_NAME, rows)
    variants = VARIANTS if cuda else VARIANTS_CPU
    log(f"part 2: main process, variants {', '.join(variants)}")
    E, P, bufs, worker, io, threads, scratch = setup(rows, {"scope": "main"}, args.quick, variants)
    variants = list(bufs)
    try:
        rows.add(case_name(scope="main", variant="-"), "threads_adam", threads["adam"])
        record_pages(rows, "main", bufs, "start")
        counters = Counters()
        t0 = time.perf_counter()
        order = list(variants)
        i = 0
        while True:
            tick(rows, worker, bufs, scratch, order, counters, E, P, scope="main", tick=i,
                 t_s=f"{time.perf_counter() - t0:.1f}")
            order = order[1:] + order[:1]
            i += 1
            nxt = t0 + i * interval
            if nxt - t0 > duration:
                break
            time.sleep(max(0.0, nxt - time.perf_counter()))

        log("part 3: bound children (a main-process tick before each: the time reference)")
        cases = bind_cases(topo["affinity"], topo["nodes"], topo["siblings"])
        if len(topo["nodes"]) <= 1:
            log(f"  {len(topo['nodes'])} NUMA node(s): binding to halves of the CPUs instead")
        if args.children:
            want = args.children.split(",")
            cases = [c for c in cases if c[0] in want]
        if args.quick:
            cases = cases[:2]
        est = None
        for name, cpus, env in cases:
            left = args.budget_s - (time.perf_counter() - t_start)
            if est is not None and left < est * 1.2:
                rows.add(case_name(scope="child", bind=name, variant="-"), "skipped_budget", 1)
                continue
            tick(rows, worker, bufs, scratch, list(variants), counters, E, P, scope="ref", before=name,
                 t_s=f"{time.perf_counter() - t0:.1f}")
            log(f"  child {name}: cpus {format_cpulist(cpus)} env {env or '-'}")
            t = time.perf_counter()
            rc = run_child(args, name, cpus, env, timeout_s=max(30.0, left))
            est = max(est or 0.0, time.perf_counter() - t)
            rows.add(case_name(scope="child", bind=name, variant="-"), "child_s", time.perf_counter() - t)
            if rc != 0:
                rows.add(case_name(scope="child", bind=name, variant="-"), "child_rc", rc)
        record_pages(rows, "main", bufs, "end")
    finally:
        worker.shutdown(wait=True)
        io.shutdown(wait=True)
        for b in bufs.values():
            b.close()
    rows.add(case_name(scope="facts"), "total_s", time.perf_counter() - t_start)
    rows.close()
    log(f"done: {args.out / CSV_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
