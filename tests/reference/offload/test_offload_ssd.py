"""The SSD tier: checksums, corruption detection, atomic (all-or-none) flushes, full disk."""

from __future__ import annotations

import errno

import pytest
import torch

from reference.offload.ssd import HEADER, SSDStore, SSDStoreError


def _block(seed: int, n: int = 3 * 40) -> torch.Tensor:
    return torch.randn(3, n // 3, generator=torch.Generator().manual_seed(seed))


def test_round_trip_manifest_and_verify(tmp_path):
    store = SSDStore(tmp_path)
    blocks = {(l, e): _block(10 * l + e) for l in range(2) for e in range(3)}
    store.write_many(blocks.items())
    store.flush_manifest(step=7)
    again = SSDStore(tmp_path)  # a fresh process view: checksums from the block headers
    for key, t in blocks.items():
        assert torch.equal(again.read(key, torch.empty_like(t)), t)
    assert again.verify() == 6
    man = again.load_manifest()
    assert man["step"] == 7 and len(man["blocks"]) == 6
    assert not list(tmp_path.glob("*.tmp"))
    assert store.bytes_written == 6 * blocks[(0, 0)].numel() * 4


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupted_block_is_detected_and_named(tmp_path, where):
    store = SSDStore(tmp_path)
    t = _block(1)
    store.write((0, 2), t)
    store.flush_manifest(1)
    path = store.path((0, 2))
    raw = bytearray(path.read_bytes())
    pos = HEADER.size + 17 if where == "payload" else HEADER.size - 1  # a data byte / the crc itself
    raw[pos] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(SSDStoreError, match=r"checksum mismatch in .*L000_E00002\.bin.*corrupt"):
        SSDStore(tmp_path).read((0, 2), torch.empty_like(t))
    with pytest.raises(SSDStoreError, match="L000_E00002.bin"):
        SSDStore(tmp_path).verify()


def test_truncated_and_missing_blocks(tmp_path):
    store = SSDStore(tmp_path)
    t = _block(2)
    store.write((1, 0), t)
    path = store.path((1, 0))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(SSDStoreError, match="truncated"):
        store.read((1, 0), torch.empty_like(t))
    with pytest.raises(SSDStoreError, match=r"block .*L001_E00001\.bin is missing"):
        store.read((1, 1), torch.empty_like(t))
    with pytest.raises(SSDStoreError, match="holds .* bytes, expected"):
        SSDStore(tmp_path / "other").write((0, 0), t) or SSDStore(tmp_path / "other").read((0, 0), torch.empty(5))


def test_full_disk_during_flush_keeps_the_previous_state(tmp_path):
    old = {(0, e): _block(e) for e in range(4)}
    first = SSDStore(tmp_path)
    first.write_many(old.items())
    first.flush_manifest(step=3)
    calls = []

    def disk_fills_up(path, f, data):  # the second block gets half written, then ENOSPC
        calls.append(path.name)
        if len(calls) == 2:
            f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(data)

    store = SSDStore(tmp_path, write_hook=disk_fills_up)
    new = {k: v + 1.0 for k, v in old.items()}
    with pytest.raises(SSDStoreError, match=r"writing .*L000_E00001\.bin failed \(disk full\); the previous version"):
        store.write_many(new.items())
    assert len(calls) == 2
    assert not list(tmp_path.glob("*.tmp"))  # no half-written leftovers
    fresh = SSDStore(tmp_path)
    assert fresh.verify() == 4 and fresh.load_manifest()["step"] == 3
    for key, t in old.items():  # every block (also the first, fully written one) is the previous version
        assert torch.equal(fresh.read(key, torch.empty_like(t)), t)


def test_bad_tensor_rejected(tmp_path):
    with pytest.raises(ValueError, match="contiguous CPU"):
        SSDStore(tmp_path).write((0, 0), torch.zeros(4, 4).t())
