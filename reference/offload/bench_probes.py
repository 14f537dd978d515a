"""The offload bench's ``bandwidth`` probes (`reference.offload.bench`): pinned PCIe copies, the fused CPU AdamW,
the SSD directory's file and block bandwidth and the engine's SSD I/O cycle (`measure_ssd_cycle`)."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from reference.offload.bench_rows import GB, Rows


def _drop_page_cache(path: Path) -> None:
    """Drop a written (fsync'ed, so clean) file's pages, so that the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_bandwidth(rows: Rows, ssd_dir: Path, quick: bool) -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        n = 256 << 20
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        for name, dst, src in (("h2d_pinned_GBps", dev, host), ("d2h_pinned_GBps", host, dev)):
            ts = []
            for _ in range(5):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                dst.copy_(src, non_blocking=True)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / 1e3)
            rows.add("bandwidth", "-", "-", name, n / statistics.median(ts[1:]) / GB)
        del host, dev
    # the CPU AdamW of the offload engine (fused, all intra-op threads) on bf16 gradients
    from reference.offload.cpu_adam import adamw_

    n_par = (1 << 20) if quick else (64 << 20)
    chunks = 16
    ps = [torch.zeros(n_par // chunks) for _ in range(chunks)]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    gs = [torch.randn(n_par // chunks).to(torch.bfloat16) for _ in range(chunks)]
    # bf16 gradients (one micro-batch per step) and fp32 ones (gradient accumulation: the engine ships
    # its fp32 accumulators), which the fused CPU AdamW does not process at the same rate
    for metric, grads in (("cpu_adam_Mparams_per_s", gs), ("cpu_adam_fp32grad_Mparams_per_s", [g.float() for g in gs])):
        ts = []
        for step in range(1, 4):
            t = time.perf_counter()
            adamw_(ps, grads, ms, vs, step=step, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01,
                   impl="fused")
            ts.append(time.perf_counter() - t)
        rows.add("bandwidth", "cpu", "-", metric, n_par / min(ts[1:]) / 1e6)
    rows.add("bandwidth", "cpu", "-", "cpu_threads", torch.get_num_threads())
    del ps, ms, vs, gs, grads
    # the engine's block write as it runs on the I/O thread: every write-back REPLACES the block's previous version,
    # so the rename after the timed write + fsync unlinks that version (on ext4 ~18 ms per cached 100 MB file,
    # measured on the development machine, vs 0.05 ms for a fresh name: the old probe, which renamed to fresh
    # names in 2 of its 3 writes, left this out and read 2.2x the in-run rate). All 4 blocks exist before the
    # timed writes. The I/O thread alternates write-backs and the next step's staged reads, so the probe does
    # too: per round, write (replace) one block, then read another one from the device (its clean pages dropped
    # first) into a freshly allocated tensor, as the engine's staged and on-demand reads do, with the crc32
    # check. Rows: ssd_block_write_GBps (SSDStore's timed part: temp file create + write + fsync),
    # ssd_block_rewrite_prep_GBps (the rest of SSDStore.write: bytes view + crc32 before, the rename over the old
    # version after: the host work between two queued write-backs in the traces) and ssd_block_read_GBps (the
    # timed SSDStore.read), each the median of the rounds after the first.
    from reference.offload.ssd import SSDStore

    ssd_dir.mkdir(parents=True, exist_ok=True)
    timed: dict[str, list[float]] = {"ssd_read": [], "ssd_write": []}
    store = SSDStore(ssd_dir / "prep_probe", on_io=lambda kind, key, nb, t0, t1: timed[kind].append(t1 - t0))
    blk = torch.randn((4 << 20) if quick else (32 << 20))
    nkeys = 4
    for i in range(nkeys):
        store.write((0, i), blk)  # the previous versions
    prep = []
    for i in range(6):
        t = time.perf_counter()
        store.write((0, i % nkeys), blk)
        prep.append(time.perf_counter() - t - timed["ssd_write"][-1])
        key = (0, (i + 2) % nkeys)
        _drop_page_cache(store.path(key))
        store.read(key, torch.empty(blk.shape))
    nbytes = blk.numel() * 4
    wr, rd = timed["ssd_write"][nkeys:], timed["ssd_read"]
    for metric, ts in (("ssd_block_write_GBps", wr), ("ssd_block_rewrite_prep_GBps", prep), ("ssd_block_read_GBps", rd)):
        rows.add("bandwidth", "ssd", "-", metric, nbytes / max(statistics.median(ts[1:]), 1e-9) / GB)
    del blk
    import shutil

    shutil.rmtree(ssd_dir / "prep_probe", ignore_errors=True)
    measure_ssd_cycle(rows, ssd_dir, quick)
    n = (8 << 20) if quick else (512 << 20)
    ssd_dir.mkdir(parents=True, exist_ok=True)
    path = ssd_dir / "bandwidth_probe.bin"
    data = os.urandom(1 << 20) * (n >> 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    rows.add("bandwidth", "ssd", "-", "ssd_write_GBps", n / (time.perf_counter() - t) / GB)
    _drop_page_cache(path)
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    rows.add("bandwidth", "ssd", "-", "ssd_read_GBps", n / (time.perf_counter() - t) / GB)
    path.unlink(missing_ok=True)


SSD_CYCLE = ("ssd_cycle_read_GBps", "ssd_cycle_write_GBps", "ssd_cycle_prep_GBps")


def measure_ssd_cycle(rows: Rows, ssd_dir: Path, quick: bool, block_numel: int | None = None, blocks: int | None = None,
                      cycles: int = 3) -> dict[str, float]:
    """The engine's SSD I/O cycle on one thread, with nothing beside it (task hB): per step the I/O thread reads
    the uncached states (each `SSDStore.read` into a freshly allocated tensor, crc32 checked) that it wrote back
    one step earlier (no page-cache drop: whatever the OS kept of them, as in the run), then writes the updated
    states back over them (`SSDStore.write`: crc32, temp file + fsync, the rename that unlinks the old version).
    ``blocks`` blocks of ``block_numel`` fp32 (default 8 of 3 x 8M: the bench's expert state, 8 uncached per step
    as in (a)), written once, then ``cycles`` x (read all, write all). Rows (config ``bandwidth``, placement
    ``ssd``): `SSD_CYCLE` = bytes over the timed reads, over the timed writes (create + write + fsync), and over
    the rest of each write call (crc32 + rename over the old version); returns them."""
    import shutil

    from reference.offload.ssd import SSDStore

    numel = block_numel or ((1 << 20) if quick else 3 * (8 << 20))
    k = blocks or (4 if quick else 8)
    root = ssd_dir / "cycle_probe"
    shutil.rmtree(root, ignore_errors=True)
    timed: dict[str, list[float]] = {"ssd_read": [], "ssd_write": []}
    store = SSDStore(root, on_io=lambda kind, key, nb, t0, t1: timed[kind].append(t1 - t0))
    src = torch.randn(numel)
    try:
        for i in range(k):
            store.write((0, i), src)
        timed["ssd_write"].clear()
        prep = []
        for _ in range(cycles):
            for i in range(k):
                store.read((0, i), torch.empty(numel))
            for i in range(k):
                t = time.perf_counter()
                store.write((0, i), src)
                prep.append(time.perf_counter() - t - timed["ssd_write"][-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    nbytes = numel * 4
    out = {}
    for metric, ts in zip(SSD_CYCLE, (timed["ssd_read"], timed["ssd_write"], prep)):
        out[metric] = nbytes * len(ts) / max(sum(ts), 1e-9) / GB
        rows.add("bandwidth", "ssd", "-", metric, out[metric])
    return out

