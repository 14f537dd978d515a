"""Time building and loading the inference bench's random model store, sequential against parallel.

``python -m reference.inference.bench_store --out DIR`` builds a Mixtral-geometry store (``--layers`` MoE
blocks, 2.82 GB of bf16 experts each) into ``--store`` (``/dev/shm`` as the bench does) once per
``--build`` worker count, checks every build's manifest (sizes and sha256 of every file) equals the first
one's, then loads it once per ``--load`` case ``THREADS:PIN_WITH`` (``alloc``: torch's pinned allocator;
``register``: ``cudaHostRegister`` in place, see :meth:`reference.inference.store.ModelStore.load`) and,
with CUDA, times a pinned host-to-device copy of one loaded block (a buffer that is not really
page-locked copies at pageable speed). Each case runs in its own process, cold as at the bench's start
(no pinned memory cached by an earlier case). The store is removed at the end unless ``--keep``.

Writes ``DIR/store_bench.csv`` (tidy: case, workers, pin_with, metric, value; flushed after every row),
``DIR/store_bench.json`` (every case's numbers, rewritten after each) and prints progress.
A case given twice is timed twice (``rep`` column; the summary compares medians). ``--quick``: a tiny CPU
model under ``DIR`` (CI smoke test). About 2.5 minutes on the H100 with the defaults (4 blocks, 11.3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BUILD_DEFAULT = "8,1,8"
LOAD_DEFAULT = "8:alloc,1:alloc,8:register,8:alloc,8:register"
CSV_COLUMNS = ("date", "commit", "device", "preset", "case", "workers", "pin_with", "rep", "metric", "value")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bench_spec(a: argparse.Namespace):
    from semoe.presets import model_preset

    if a.quick:
        return model_preset("tiny").replace(layers=4, experts=4, hidden=128, ffn=256, dtype="bf16",
                                            name="tiny-L4")
    spec = model_preset(a.preset).replace(layers=a.layers, name=f"{a.preset}-L{a.layers}", dtype="bf16")
    over = {k: getattr(a, k) for k in ("hidden", "ffn", "vocab") if getattr(a, k)}
    if over:
        spec = spec.replace(**over, name=spec.name + "-" + "-".join(f"{k}{v}" for k, v in over.items()))
    return spec


def run_case(a: argparse.Namespace) -> dict:
    """One case in this process: ``build:W`` or ``load:T:PIN_WITH``; returns its numbers."""
    import torch

    from reference.inference.build import build_random_store
    from reference.inference.store import MANIFEST, ModelStore

    kind, *rest = a.case.split(":")
    spec = bench_spec(a)
    cuda = torch.cuda.is_available()
    if kind == "build":
        shutil.rmtree(a.store, ignore_errors=True)  # a build from scratch, never the reuse of an old store
        workers = int(rest[0])
        if cuda:
            torch.cuda.init()  # the context's start is not the build's
        t0 = time.perf_counter()
        build_random_store(a.store, spec, torch.bfloat16, seed=0, gen_device="cuda" if cuda else "cpu",
                           workers=workers, progress=log)
        sec = time.perf_counter() - t0
        nbytes = sum(f.stat().st_size for f in Path(a.store).glob("*.bin"))
        return {"seconds": sec, "GB": nbytes / 1e9, "GBps": nbytes / 1e9 / sec,
                "manifest": (Path(a.store) / MANIFEST).read_text()}
    threads, pin_with = int(rest[0]), rest[1]
    if cuda:
        torch.cuda.init()
    t0 = time.perf_counter()
    store = ModelStore.load(a.store, threads=threads, pin_with=pin_with, progress=log)
    sec = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in Path(a.store).glob("*.bin"))
    out = {"seconds": sec, "GB": nbytes / 1e9, "GBps": nbytes / 1e9 / sec, "pinned": float(store.pinned)}
    times = store.read_times.values()
    for k in ("alloc_s", "read_s", "pin_s"):
        out[f"max_{k}"] = max(t[k] for t in times)
        out[f"sum_{k}"] = sum(t[k] for t in times)
    buf = store.layer_buffers[store.moe_blocks[0]]
    out["all_pinned"] = float(all(b.is_pinned() for b in store.layer_buffers.values())) if cuda else 0.0
    if cuda:  # H2D of one block: page-locked memory copies at ~50 GB/s on the H100, pageable far slower
        dst = torch.empty_like(buf, device="cuda")
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ms = []
        for _ in range(3):
            ev[0].record()
            dst.copy_(buf, non_blocking=True)
            ev[1].record()
            torch.cuda.synchronize()
            ms.append(ev[0].elapsed_time(ev[1]))
        out["h2d_GBps"] = buf.numel() / 1e6 / min(ms)
        out["h2d_equal"] = float(torch.equal(dst[: 1 << 20].cpu(), buf[: 1 << 20]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--store", type=Path, default=None, help="default /dev/shm/semoe_store_bench (--quick: OUT/store)")
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=None, help="override (a smaller model for a CPU timing)")
    p.add_argument("--ffn", type=int, default=None, help="override")
    p.add_argument("--vocab", type=int, default=None, help="override")
    p.add_argument("--build", default=None,
                   help=f"worker counts, one build each, the first build the reference (default {BUILD_DEFAULT}: the "
                        "first also warms the machine's memory, first touches are slow on a fresh VM)")
    p.add_argument("--load", default=None, help=f"THREADS:PIN_WITH cases, one load each (default {LOAD_DEFAULT})")
    p.add_argument("--case-timeout-s", type=float, default=120.0)
    p.add_argument("--keep", action="store_true", help="keep the store at the end")
    p.add_argument("--quick", action="store_true", help="a tiny CPU model (CI smoke test)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    a = p.parse_args(argv)
    if a.store is None:
        a.store = a.out / "store" if a.quick else Path("/dev/shm/semoe_store_bench")
    a.build = a.build or ("1,2" if a.quick else BUILD_DEFAULT)
    a.load = a.load or ("2:alloc,1:alloc" if a.quick else LOAD_DEFAULT)
    if a.case:
        print("CASE_RESULT " + json.dumps(run_case(a)), flush=True)
        return 0
    cases = []
    for w in a.build.split(","):
        if not w.strip().isdigit() or int(w) < 1:
            p.error(f"--build takes worker counts >= 1, got {w!r}")
        cases.append(f"build:{int(w)}")
    for c in a.load.split(","):
        t, _, pw = c.partition(":")
        if not t.strip().isdigit() or int(t) < 1 or pw not in ("alloc", "register"):
            p.error(f"--load takes THREADS:alloc|register cases, got {c!r}")
        cases.append(f"load:{int(t)}:{pw}")
    return orchestrate(a, cases)


def orchestrate(a: argparse.Namespace, cases: list[str]) -> int:
    import torch

    from semoe.io import RowAppender

    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    spec = bench_spec(a)
    rows = RowAppender(a.out / "store_bench.csv", CSV_COLUMNS, device)
    summary: dict = {"preset": spec.name, "store": str(a.store), "device": device, "cpus": os.cpu_count(),
                     "cases": {}}
    log(f"store bench: {spec.name} into {a.store}, cases {cases}")
    ref_manifest, failed = None, 0
    base = [sys.executable, "-m", "reference.inference.bench_store", "--out", str(a.out), "--store", str(a.store),
            "--preset", a.preset, "--layers", str(a.layers)]
    base += [f"--{k}={getattr(a, k)}" for k in ("hidden", "ffn", "vocab") if getattr(a, k)]
    base += ["--quick"] if a.quick else []
    root = str(Path(__file__).resolve().parents[2])  # the repository, importable from any working directory
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        for i, case in enumerate(cases):
            rep = cases[:i].count(case)  # a case given several times: its repeats, interleaved with the others
            key = case if rep == 0 else f"{case}#{rep}"
            if case.startswith("load") and ref_manifest is None:
                log(f"{case}: skipped (no store was built)")
                continue
            log(f"--- {case}")
            t0 = time.perf_counter()
            try:
                r = subprocess.run([*base, "--case", case], capture_output=True, text=True, env=env,
                                   timeout=a.case_timeout_s, check=False)
            except subprocess.TimeoutExpired:
                log(f"{case}: timed out after {a.case_timeout_s:.0f} s")
                failed += 1
                continue
            for line in r.stdout.splitlines():
                if not line.startswith("CASE_RESULT "):
                    print("    " + line, flush=True)
            res = [json.loads(line[len("CASE_RESULT "):]) for line in r.stdout.splitlines()
                   if line.startswith("CASE_RESULT ")]
            if r.returncode != 0 or not res:
                log(f"{case}: failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
                failed += 1
                continue
            res = res[0]
            kind, workers, *pw = case.split(":")
            if kind == "build":
                manifest = res.pop("manifest")
                ref_manifest = ref_manifest or manifest
                res["identical_to_first"] = float(manifest == ref_manifest)
                if manifest != ref_manifest:
                    failed += 1
            res["process_s"] = time.perf_counter() - t0
            for k, v in res.items():
                rows.write(spec.name, kind, workers, pw[0] if pw else "-", rep, k, float(v))
            summary["cases"][key] = res
            (a.out / "store_bench.json").write_text(json.dumps(summary, indent=1))
            log(f"{key}: " + ", ".join(f"{k} {v:.3g}" for k, v in res.items()))
    finally:
        rows.close()
        if not a.keep:
            shutil.rmtree(a.store, ignore_errors=True)
    secs: dict[str, list[float]] = {}
    for key, res in summary["cases"].items():
        secs.setdefault(key.split("#")[0], []).append(res["seconds"])
    med = {k: statistics.median(v) for k, v in secs.items()}  # each case's median over its repeats
    summary["median_seconds"] = med
    (a.out / "store_bench.json").write_text(json.dumps(summary, indent=1))
    for kind, ref in (("build", "build:1"), ("load", "load:1:alloc")):
        for case, sec in med.items():
            if case.startswith(kind) and case != ref and ref in med:
                log(f"{case}: {med[ref]:.2f} s -> {sec:.2f} s ({med[ref] / sec:.2f}x vs {ref}, medians)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
