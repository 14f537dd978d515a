"""What the host probe reads about the host (`reference.offload.host_probe`): the CPU topology (NUMA nodes, SMT
siblings) and the bound child processes it implies (`bind_cases`), the host counters over an interval (steal,
MHz, pressure, vmstat: `Counters`), where a buffer's pages are (`vma_info`, `page_nodes`) and part 1, the facts
file (`collect_facts`)."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

from reference.offload.host_probe_rows import Rows, case_name, log

MOVE_PAGES_NR = {"x86_64": 279, "aarch64": 239}  # move_pages(2) syscall numbers (query mode: nodes = NULL)
VMSTAT_KEYS = ("numa_pages_migrated", "pgmigrate_success", "numa_hint_faults", "thp_fault_alloc",
               "thp_collapse_alloc", "compact_stall")
MEMINFO_KEYS = r"(MemTotal|MemFree|MemAvailable|AnonHugePages|HugePages_|Hugepagesize|Mlocked)"
NODE_ROOT = Path("/sys/devices/system/node")
CPU_ROOT = Path("/sys/devices/system/cpu")


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
