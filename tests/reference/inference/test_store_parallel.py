"""The model store written and read by several threads: the same bytes as one thread, errors named and raised.

``workers=1`` / ``threads=1`` are the sequential paths; the parallel ones must write byte-identical files and
manifest, name a bad file in :class:`StoreError` (the first bad one in file order, as the sequential path does),
and raise a worker's exception in the caller with the blocks not yet started left unwritten.
"""

from __future__ import annotations

import gc
import json
import mmap
import threading
import time

import pytest
import torch

from reference.inference.build import build_random_store
from reference.inference.store import (
    MANIFEST,
    ModelStore,
    StoreError,
    StoreWriter,
    default_workers,
    layer_file,
    run_pool,
    save_model,
)
from reference.model import MoEDecoder
from semoe.presets import model_preset

# MoE every other block (dense FFN blocks between), SwiGLU + biases: every expert tensor kind, MoE blocks 1, 3, 5
SPEC = model_preset("tiny").replace(layers=6, experts=4, hidden=64, ffn=96, dtype="bf16", activation="swiglu",
                                    bias=True, moe_every=2, position="rope", kv_heads=2, norm="rmsnorm")


def files(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_parallel_build_is_byte_identical(tmp_path):
    logs = {}
    for w in (1, 3):
        logs[w] = []
        build_random_store(tmp_path / f"w{w}", SPEC, torch.bfloat16, seed=4, gen_device="cpu", workers=w,
                           progress=logs[w].append)
    one, three = files(tmp_path / "w1"), files(tmp_path / "w3")
    assert sorted(one) == ["dense.bin", *(layer_file(b) for b in (1, 3, 5)), MANIFEST]  # no temp files left
    assert one == three  # every .bin and the manifest, byte for byte
    m = json.loads(one[MANIFEST])
    assert list(m["experts"]["layers"]) == ["1", "3", "5"]  # block order whatever order the threads finished in
    assert len({one[layer_file(b)] for b in (1, 3, 5)}) == 3  # each block drawn from its own generator
    for w, lines in logs.items():  # one line per file, from the caller's thread, and the total
        assert sum(line.startswith("dense weights written") for line in lines) == 1
        assert sorted(line.split(":")[0] for line in lines if line.startswith("block ")) == ["block 1", "block 3",
                                                                                              "block 5"]
        assert lines[-1].startswith("store written:") and f"({w} workers)" in lines[-1]
    assert logs[1][0].startswith("dense weights written")  # the sequential path keeps the old order
    other = build_random_store(tmp_path / "w2", SPEC, torch.bfloat16, seed=5, gen_device="cpu", workers=2)
    assert files(other.parent)[layer_file(1)] != one[layer_file(1)]  # the seed matters


def test_parallel_save_and_load_equal_sequential(tmp_path):
    model = MoEDecoder(SPEC.replace(dtype="fp32"), seed=2)
    save_model(model, tmp_path / "seq", workers=1)
    save_model(model, tmp_path / "par", workers=4)
    assert files(tmp_path / "seq") == files(tmp_path / "par")
    lines: list[str] = []
    a = ModelStore.load(tmp_path / "par", threads=1)
    b = ModelStore.load(tmp_path / "par", threads=4, progress=lines.append)
    assert a.moe_blocks == b.moe_blocks == [1, 3, 5]
    sd = model.state_dict()
    for blk in b.moe_blocks:
        assert torch.equal(a.layer_buffers[blk], b.layer_buffers[blk])
        for name, v in b.layer_views(blk).items():
            assert torch.equal(v, sd[f"blocks.{blk}.ffn.experts.{name}"]), (blk, name)
    assert a.dense_state.keys() == b.dense_state.keys()
    assert all(torch.equal(a.dense_state[k], b.dense_state[k]) for k in a.dense_state)
    assert sorted(line.split()[1] for line in lines[:-1]) == ["dense.bin", *(layer_file(x) for x in (1, 3, 5))]
    assert lines[-1].startswith("store read: 4 files") and "4 threads" in lines[-1]


def test_manifest_lists_layers_in_block_order_however_written(tmp_path):
    src = ModelStore.load(build_random_store(tmp_path / "ref", SPEC, torch.bfloat16, gen_device="cpu").parent)
    for name, order in (("fwd", (1, 3, 5)), ("rev", (5, 1, 3))):
        w = StoreWriter(tmp_path / name, SPEC, torch.bfloat16, {"init": "random", "seed": 0, "gen_device": "cpu"})
        for b in order:  # what threads finishing out of order do
            w.write_layer(b, src.layer_views(b))
        w.write_dense(src.dense_state)
        w.finish()
    assert files(tmp_path / "fwd") == files(tmp_path / "rev") == files(tmp_path / "ref")


def _corrupt(path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("threads", [1, 4])
def test_parallel_load_names_the_bad_file(tmp_path, threads):
    root = tmp_path / "s"
    build_random_store(root, SPEC, torch.bfloat16, gen_device="cpu", workers=2)
    _corrupt(root / layer_file(5))
    with pytest.raises(StoreError, match=r"experts_L00005\.bin is corrupt: sha256"):
        ModelStore.load(root, threads=threads)
    _corrupt(root / layer_file(3))  # two bad files: the first in file order is named, as sequentially
    with pytest.raises(StoreError, match=r"experts_L00003\.bin is corrupt"):
        ModelStore.load(root, threads=threads)
    data = (root / layer_file(1)).read_bytes()
    (root / layer_file(1)).write_bytes(data[:-7])
    with pytest.raises(StoreError, match=r"experts_L00001\.bin has \d+ bytes, the manifest says"):
        ModelStore.load(root, threads=threads)
    (root / layer_file(1)).unlink()
    with pytest.raises(StoreError, match=r"store file missing: .*experts_L00001\.bin"):
        ModelStore.load(root, threads=threads)
    _corrupt(root / "dense.bin")  # the dense file is read beside the experts, and comes first
    with pytest.raises(StoreError, match=r"dense\.bin is corrupt"):
        ModelStore.load(root, threads=threads)


def test_load_without_verify_skips_only_the_checksum(tmp_path):
    root = tmp_path / "s"
    build_random_store(root, SPEC, torch.bfloat16, gen_device="cpu", workers=2)
    _corrupt(root / layer_file(3), at=0)
    st = ModelStore.load(root, threads=3, verify=False)  # corrupt bytes load unchecked
    assert st.moe_blocks == [1, 3, 5]
    (root / layer_file(3)).write_bytes(b"short")
    with pytest.raises(StoreError, match=r"experts_L00003\.bin has 5 bytes"):  # sizes are still checked
        ModelStore.load(root, threads=3, verify=False)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_exception_reaches_the_caller(tmp_path, workers):
    w = StoreWriter(tmp_path / "s", SPEC, torch.bfloat16)
    good = build_random_store(tmp_path / "ref", SPEC, torch.bfloat16, gen_device="cpu", workers=1)
    ref = ModelStore.load(good.parent, threads=1)

    def make(block):
        if block == 3:
            raise Boom(f"cannot draw block {block}")
        return ref.layer_views(block)

    with pytest.raises(Boom, match="cannot draw block 3"):
        w.write_layers([1, 3, 5], make, dense=lambda: ref.dense_state, workers=workers)
    assert not (tmp_path / "s" / MANIFEST).exists()
    assert not list((tmp_path / "s").glob("*.tmp")) and not list((tmp_path / "s").glob(".*"))
    with pytest.raises(ValueError, match=r"MoE blocks \['3'(, '5')?\] were not written"):
        w.finish()

    def bad_shape(block):
        v = dict(ref.layer_views(block))
        v["w2_EFD"] = v["w2_EFD"][:, :-1]
        return v

    with pytest.raises(ValueError, match=r"tensor w2_EFD is"):  # an error inside a file's write, not its draw
        StoreWriter(tmp_path / "t", SPEC, torch.bfloat16).write_layers([1, 3, 5], bad_shape, workers=workers)
    assert not list((tmp_path / "t").glob(f"{layer_file(1)}*")) and not list((tmp_path / "t").glob(".*tmp"))


def test_run_pool_raises_the_earliest_failure_and_cancels_the_rest():
    started: list[int] = []
    lock = threading.Lock()

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        if i == 0:
            time.sleep(0.2)
            raise Boom("item 0")
        if i == 1:
            raise Boom("item 1")  # fails first in time
        time.sleep(0.2)
        return i

    with pytest.raises(Boom, match="item 0"):  # the earliest in item order, as the sequential path would raise
        run_pool(fn, list(range(12)), workers=2)
    assert 0 in started and 1 in started and len(started) < 12  # the queued items were cancelled
    done: list[int] = []
    assert run_pool(lambda i: i * i, [3, 1, 2], workers=2, done=lambda i, r: done.append(i)) == {3: 9, 1: 1, 2: 4}
    assert sorted(done) == [1, 2, 3]
    calls: list[int] = []

    def fail_at_1(i: int) -> int:
        calls.append(i)
        if i == 1:
            raise Boom("item 1")
        return i

    with pytest.raises(Boom, match="item 1"):
        run_pool(fail_at_1, [0, 1, 2], workers=1)
    assert calls == [0, 1]  # sequentially, nothing after the failure runs


def test_bad_worker_counts():
    assert 1 <= default_workers() <= 8
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        run_pool(lambda i: i, [1, 2], workers=0)
    with pytest.raises(ValueError, match="items repeat"):
        run_pool(lambda i: i, [1, 1], workers=2)
    with pytest.raises(ValueError, match="build_random_store: workers must be >= 1, got 0"):
        build_random_store("/nonexistent/never", SPEC, torch.bfloat16, gen_device="cpu", workers=0)


def test_bad_pin_with(tmp_path):
    root = tmp_path / "s"
    build_random_store(root, SPEC, torch.bfloat16, gen_device="cpu", workers=2)
    with pytest.raises(ValueError, match=r"pin_with must be one of \('alloc', 'register'\), got 'mlock'"):
        ModelStore.load(root, pin_with="mlock")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_register_pins_in_place_and_copies(tmp_path):
    root = tmp_path / "s"
    build_random_store(root, SPEC, torch.bfloat16, seed=1, workers=3)  # drawn on the GPU
    assert files(root) == files(build_random_store(tmp_path / "s1", SPEC, torch.bfloat16, seed=1, workers=1).parent)
    a = ModelStore.load(root, pin_with="alloc")
    b = ModelStore.load(root, pin_with="register", threads=3)
    for blk in a.moe_blocks:
        ha, hb = a.layer_buffers[blk], b.layer_buffers[blk]
        assert ha.is_pinned() and hb.is_pinned() and torch.equal(ha, hb)
        dev = hb.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(dev.cpu(), ha)
    del b, dev, hb
    gc.collect()
    for _ in range(2):  # registering a range again fails unless the freed pages were unregistered
        c = ModelStore.load(root, pin_with="register", threads=3)
        assert all(c.layer_buffers[blk].is_pinned() for blk in c.moe_blocks)
        del c
        gc.collect()


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls (the CPU has no CUDA runtime)."""

    def __init__(self, fail: bool = False) -> None:
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.fail = fail

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        assert ptr not in self.registered, "registered twice"
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        assert ptr in self.registered and ptr not in self.unregistered
        self.unregistered.append(ptr)
        return 0


@pytest.mark.parametrize("threads", [1, 3])
def test_register_pins_each_expert_file_once_and_unpins_when_freed(tmp_path, monkeypatch, threads):
    root = tmp_path / "s"
    build_random_store(root, SPEC, torch.bfloat16, gen_device="cpu", workers=2)
    ref = ModelStore.load(root, pin=False)
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    st = ModelStore.load(root, pin=True, pin_with="register", threads=threads)
    assert st.pinned
    bufs = {b: st.layer_buffers[b] for b in st.moe_blocks}
    assert sorted(fake.registered.values()) == [ref.layer_bytes] * 3  # exact sizes, experts only
    assert sorted(fake.registered) == sorted(t.data_ptr() for t in bufs.values())
    assert all(p % mmap.PAGESIZE == 0 for p in fake.registered)
    for b, t in bufs.items():
        assert torch.equal(t, ref.layer_buffers[b])
        for name, v in st.layer_views(b).items():
            assert torch.equal(v, ref.layer_views(b)[name])
    assert st.read_times.keys() == {"dense.bin", *(layer_file(b) for b in (1, 3, 5))}
    views = st.layer_views(3)
    del st, t, v
    gc.collect()
    assert fake.unregistered == [] and bufs  # the buffers are still referenced
    bufs.pop(1)
    gc.collect()
    assert len(fake.unregistered) == 1
    del bufs
    gc.collect()
    assert len(fake.unregistered) == 2  # block 3's pages live on in its views
    assert float(views["w1_EDF"].float().abs().sum()) > 0
    del views
    gc.collect()
    assert sorted(fake.unregistered) == sorted(fake.registered)


def test_register_failure_names_the_file(tmp_path, monkeypatch):
    root = tmp_path / "s"
    build_random_store(root, SPEC, torch.bfloat16, gen_device="cpu", workers=2)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(fail=True))
    with pytest.raises(StoreError, match=r"cannot page-lock store file .*experts_L00001\.bin .*cudaError 2"):
        ModelStore.load(root, pin=True, pin_with="register", threads=2)
