"""The SSD tier: one checksummed file per expert holding its fp32 master weights and Adam moments.

Block layout (little endian)::

    header  8s magic b"SEMOEXP1" | u64 payload bytes | u32 crc32(payload)
    payload the expert's flat fp32 state [3, P] (master, m, v), P = parameters per expert

Writes go to ``<name>.tmp``, are fsync'ed, then ``os.replace``'d over the old block, so a block file is
always a complete, checksummed version (the old one or the new one). :meth:`SSDStore.write_many` is
two-phase: every block is written to its temp name first and only renamed once all writes succeeded;
on any error the temp files are removed and the previous blocks stay as they were. A full disk
(``ENOSPC``) or any other OSError becomes one :class:`SSDStoreError` line naming the file; a block
whose bytes do not match its checksum raises :class:`SSDStoreError` naming the file on read.
``manifest.json`` (written atomically by :meth:`SSDStore.flush_manifest`) lists every block's crc32
and the step it was flushed at, so :meth:`SSDStore.verify` can check the whole tier.

``write_hook(path, fileobj, data)`` (tests) replaces the payload write, e.g. to raise ``ENOSPC``.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

Key = tuple[int, int]  # (MoE layer index, expert)
MAGIC = b"SEMOEXP1"
HEADER = struct.Struct("<8sQI")
MANIFEST = "manifest.json"


class SSDStoreError(ValueError):
    """A corrupt, missing or unwritable SSD block (the message names the file). A ValueError, so that
    ``semoe train`` and ``python -m reference.train`` report it as one line (their user errors)."""


def _bytes_of(t: Tensor) -> memoryview:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("SSDStore: blocks must be contiguous CPU tensors")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class SSDStore:
    def __init__(self, root: str | Path, *, write_hook: Callable | None = None, on_io: Callable | None = None) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SSDStoreError(f"SSD tier: cannot create directory {self.root}: {e.strerror or e}") from None
        self.write_hook = write_hook
        self.on_io = on_io  # on_io(kind "ssd_read"|"ssd_write", key, nbytes, start_s, end_s) (perf_counter)
        self.crc: dict[Key, int] = {}
        self.bytes_read = self.bytes_written = 0

    def path(self, key: Key) -> Path:
        return self.root / f"L{key[0]:03d}_E{key[1]:05d}.bin"

    def has(self, key: Key) -> bool:
        return self.path(key).is_file()

    # ------------------------------------------------------------------------------ writes
    def _write_tmp(self, key: Key, t: Tensor) -> tuple[Path, int]:
        path = self.path(key)
        tmp = path.with_name(path.name + ".tmp")
        data = _bytes_of(t)
        crc = zlib.crc32(data)
        t0 = time.perf_counter()
        try:
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, len(data), crc))
                if self.write_hook is not None:
                    self.write_hook(tmp, f, data)
                else:
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise SSDStoreError(
                f"SSD tier: writing {path} failed ({why}); the previous version of the block is kept"
            ) from None
        self.bytes_written += len(data)
        if self.on_io is not None:
            self.on_io("ssd_write", key, len(data), t0, time.perf_counter())
        return tmp, crc

    def write(self, key: Key, t: Tensor) -> None:
        """Write one block atomically (temp name, fsync, rename)."""
        self.write_many([(key, t)])

    def write_many(self, items: Iterable[tuple[Key, Tensor]]) -> None:
        """Write several blocks, all or none: temp files first, renamed only once every write succeeded."""
        done: list[tuple[Key, Path, int]] = []
        try:
            for key, t in items:
                tmp, crc = self._write_tmp(key, t)
                done.append((key, tmp, crc))
        except BaseException:
            for _, tmp, _ in done:
                tmp.unlink(missing_ok=True)
            raise
        for key, tmp, crc in done:
            os.replace(tmp, self.path(key))
            self.crc[key] = crc

    def flush_manifest(self, step: int) -> Path:
        """Record every block's checksum (atomically) and fsync the directory. Blocks listed by an earlier
        manifest and not rewritten through this store keep their entries."""
        path = self.root / MANIFEST
        blocks = self.load_manifest()["blocks"] if path.is_file() else {}
        blocks.update({self.path(k).name: c for k, c in sorted(self.crc.items())})
        body = json.dumps({"step": step, "blocks": dict(sorted(blocks.items()))})
        tmp = path.with_name(MANIFEST + ".tmp")
        try:
            with open(tmp, "w") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise SSDStoreError(f"SSD tier: writing {path} failed ({why}); the previous manifest is kept") from None
        return path

    # ------------------------------------------------------------------------------ reads
    def read(self, key: Key, out: Tensor) -> Tensor:
        """Read block ``key`` into ``out`` (contiguous fp32 CPU tensor of the block's size), checking its crc."""
        path = self.path(key)
        buf = _bytes_of(out)
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                if len(head) != HEADER.size:
                    raise SSDStoreError(f"SSD tier: {path} is truncated (no header)")
                magic, nbytes, crc = HEADER.unpack(head)
                if magic != MAGIC:
                    raise SSDStoreError(f"SSD tier: {path} is not an expert block (bad magic)")
                if nbytes != len(buf):
                    raise SSDStoreError(f"SSD tier: {path} holds {nbytes} bytes, expected {len(buf)}")
                if f.readinto(buf) != nbytes:
                    raise SSDStoreError(f"SSD tier: {path} is truncated")
        except FileNotFoundError:
            raise SSDStoreError(f"SSD tier: block {path} is missing") from None
        got = zlib.crc32(buf)
        if got != crc or (key in self.crc and self.crc[key] != crc):
            raise SSDStoreError(
                f"SSD tier: checksum mismatch in {path} (stored {crc:08x}, read {got:08x}): the block is corrupt"
            )
        self.crc[key] = crc
        self.bytes_read += nbytes
        if self.on_io is not None:
            self.on_io("ssd_read", key, nbytes, t0, time.perf_counter())
        return out

    def load_manifest(self) -> dict:
        path = self.root / MANIFEST
        if not path.is_file():
            raise SSDStoreError(f"SSD tier: no manifest in {self.root}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SSDStoreError(f"SSD tier: {path} is not valid JSON ({e.msg})") from None

    def verify(self) -> int:
        """Check every block listed in the manifest against its own header checksum; returns the number
        checked. (Blocks of uncached experts are rewritten after every update, so the manifest's crc is
        the flush-time value; the header's crc is what each complete block carries.)"""
        man = self.load_manifest()
        for name in man["blocks"]:
            path = self.root / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise SSDStoreError(f"SSD tier: block {path} is missing") from None
            magic, nbytes, stored = HEADER.unpack(data[: HEADER.size])
            payload = data[HEADER.size :]
            if magic != MAGIC or len(payload) != nbytes or zlib.crc32(payload) != stored:
                raise SSDStoreError(f"SSD tier: checksum mismatch in {path}: the block is corrupt")
        return len(man["blocks"])
