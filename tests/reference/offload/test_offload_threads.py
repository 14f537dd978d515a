"""Task hB: the offload engine's host threads (the optimizer's intra-op team set inside its thread, the I/O thread
single-threaded), the bf16 upcast into a kept scratch, and the bench's SSD I/O-cycle probe, on the CPU."""

from __future__ import annotations

import csv
import threading
import time

import pytest
import torch

from reference.offload import bench
from reference.offload.cpu_adam import (
    RESERVED_THREADS,
    adam_threads,
    adamw_layer_,
    expert_layout,
    host_cores,
)


def test_adam_threads_leaves_the_training_and_io_threads_a_core_each():
    assert RESERVED_THREADS == 2
    assert adam_threads(16) == 14 and adam_threads(3) == 1 and adam_threads(1) == 1
    assert adam_threads(16, reserved=0) == 16
    assert adam_threads() == max(1, host_cores() - 2) and host_cores() >= 1
    for bad in ((0, 2), (4, -1)):
        with pytest.raises(ValueError, match="adam_threads"):
            adam_threads(*bad)


@pytest.mark.parametrize("n", [1, 2, 0])
def test_host_executors_set_the_team_inside_each_thread_and_leave_the_caller_alone(n):
    """What the engine runs on CUDA (on the CPU its executors are inline): the optimizer worker reports ``n``
    intra-op threads (0: torch's default, the caller's), the I/O worker 1, the caller keeps its count, and a thread
    started afterwards gets the caller's count, not the last one set."""
    from reference.offload.engine import host_executors

    main = torch.get_num_threads()
    worker, io, threads = host_executors(n)
    try:
        assert threads == {"main": main, "adam": n or main, "io": 1}
        assert worker.submit(torch.get_num_threads).result() == (n or main)  # kept for every later task
        assert io.submit(torch.get_num_threads).result() == 1
        assert torch.get_num_threads() == main
        later = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [main]
    finally:
        worker.shutdown()
        io.shutdown()


@pytest.mark.parametrize("impl", ["exact", "fused"])
def test_scratch_upcast_gives_the_same_bits_and_is_reused(impl):
    shapes = {"w1_EDF": (8, 16), "w2_EFD": (16, 8), "b2_ED": (8,)}
    offsets, decay, P = expert_layout(shapes)
    E = 3
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn((E, *s), generator=g).to(torch.bfloat16) for n, s in shapes.items()}
    grads["b2_ED"] = grads["b2_ED"].float()  # a full-precision gradient is used as it is
    st0 = torch.randn(E, 3, P, generator=g).abs_()
    out = {}
    scratch: dict = {}
    for key, sc in (("plain", None), ("scratch", scratch)):
        st = st0.clone()
        mirror = {n: torch.empty((E, *s), dtype=torch.bfloat16) for n, s in shapes.items()}
        for step in (1, 2):
            adamw_layer_([(e, st[e]) for e in range(E)], grads, mirror, offsets, decay, step=step, lr=1e-2, beta1=0.9,
                         beta2=0.95, eps=1e-8, weight_decay=0.1, impl=impl, scratch=sc)
            if sc is not None and step == 1:
                ptrs = {n: t.data_ptr() for n, t in sc.items()}
        out[key] = (st, mirror)
    assert torch.equal(out["plain"][0], out["scratch"][0])
    assert all(torch.equal(out["plain"][1][n], out["scratch"][1][n]) for n in shapes)
    assert not torch.equal(out["plain"][0], st0)
    # one fp32 buffer per low-precision tensor, allocated once and reused by the next call
    assert set(scratch) == {"w1_EDF", "w2_EFD"} and {n: t.data_ptr() for n, t in scratch.items()} == ptrs
    assert all(t.dtype == torch.float32 and t.shape == grads[n].shape for n, t in scratch.items())


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ssd_cycle_probe_reads_back_what_it_wrote_and_times_the_rename_as_prep(tmp_path, monkeypatch):
    from reference.offload.ssd import SSDStore

    calls = {"read": 0, "write": 0}
    real_read, real_write = SSDStore.read, SSDStore.write

    def count(kind, real):
        def f(self, *a, **kw):
            calls[kind] += 1
            return real(self, *a, **kw)
        return f

    monkeypatch.setattr(SSDStore, "read", count("read", real_read))
    monkeypatch.setattr(SSDStore, "write", count("write", real_write))
    rows = bench.Rows(tmp_path / "rows.csv", "cpu")
    fast = bench.measure_ssd_cycle(rows, tmp_path / "ssd", True, block_numel=1 << 16, blocks=3, cycles=2)
    # written once, then per cycle every block read back and written over its old version
    assert calls == {"read": 3 * 2, "write": 3 + 3 * 2}
    assert set(fast) == set(bench.SSD_CYCLE) and all(v > 0 for v in fast.values())
    assert not (tmp_path / "ssd" / "cycle_probe").exists()
    # a slow rename over the old version (injected: 50 ms) is prep time, not write time
    import os

    real = os.replace

    def slow_replace(src, dst):
        if os.path.exists(dst) and str(dst).endswith(".bin"):
            time.sleep(0.05)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    slow = bench.measure_ssd_cycle(rows, tmp_path / "ssd", True, block_numel=1 << 16, blocks=3, cycles=2)
    rows.close()
    assert slow["ssd_cycle_prep_GBps"] < (4 << 16) / 0.05 / 1e9 < fast["ssd_cycle_prep_GBps"]
    recs = _rows(tmp_path / "rows.csv")
    assert [r["metric"] for r in recs] == list(bench.SSD_CYCLE) * 2
    assert {(r["config"], r["placement"]) for r in recs} == {("bandwidth", "ssd")}


def test_ab_label_marks_the_torch_threads_twin_and_keeps_the_config():
    from simulator.validate_offload import AB_SUFFIX, parse_config

    cfg = "a_compute_bound preset=tiny L4 D64 F128 E4 k2 H4 V256 fp32 B4 S32 steps=3 cache=3"
    twin = bench.ab_label(cfg)
    assert twin.split()[0] == "a_compute_bound" + bench.AB_SUFFIX and bench.AB_SUFFIX == AB_SUFFIX
    assert parse_config(twin) == parse_config(cfg)
