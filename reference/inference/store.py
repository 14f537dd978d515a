"""Model store for offloaded inference: dense weights in one file, expert weights one file per MoE layer.

No safetensors here (not installed in CI), so a documented flat format with checksums::

    <dir>/manifest.json            written last (temp + rename); the store is complete iff it exists
    <dir>/dense.bin                every non-expert tensor (embeddings, attention, norms, routers,
                                   dense FFNs, shared experts), raw bytes back to back
    <dir>/experts_L00000.bin ...   one file per MoE block (``L`` = block index): the stacked expert
                                   tensors of that block, raw bytes back to back

Each ``.bin`` file is the C-contiguous little-endian bytes of its tensors, each starting at an offset
aligned to :data:`ALIGN` bytes (zero padding between). ``manifest.json``::

    {"format": "semoe-infer-store", "version": 1, "dtype": "bf16", "align": 256,
     "spec": {... ModelSpec.to_dict() ...}, "origin": {"init": "random", "seed": 0} | {...},
     "dense":   {"file": "dense.bin", "bytes": N, "sha256": "...",
                 "tensors": {name: {"dtype": "bf16", "shape": [...], "offset": o}}},
     "experts": {"tensors": {"w1_EDF": {...}, "w2_EFD": {...}, "w3_EDF": {...}, "b1_EF": ...},
                 "layer_bytes": N,
                 "layers": {"<block index>": {"file": "experts_L00003.bin", "bytes": N, "sha256": "..."}}}}

All expert files share one tensor table (same shapes and offsets), so one layer's experts are one
contiguous buffer: the ring copies a layer with one memcpy per tensor, and expert ``e`` of a tensor
``[E, ...]`` is the contiguous slice ``offset + e * nbytes/E`` (what expert-aware mode copies).
Dense tensor names are :class:`reference.model.MoEDecoder` ``state_dict`` keys, expert tensor names
the :class:`reference.moe.experts.ExpertWeights` parameter names.

Every file is written to a temp name, fsynced and renamed; the manifest goes last. Loading checks
every file's size and sha256 before use and raises :class:`StoreError` naming the file.
:meth:`ModelStore.load` reads each expert file once into (pinned, when CUDA is available) host memory.

Files are independent, so both directions run one file per thread (:func:`run_pool`,
:func:`default_workers` threads: sha256, file reads and writes release the GIL on large buffers, and
one file's sha256 is inherently serial): :meth:`StoreWriter.write_layers` draws and writes several
blocks at once, :meth:`ModelStore.load` reads, checks and pins several files at once. ``workers=1`` /
``threads=1`` is the sequential path; the files and the manifest are byte-identical either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from semoe.io import atomic_write_text
from semoe.model_spec import ModelSpec

FORMAT = "semoe-infer-store"
VERSION = 1
ALIGN = 256
MANIFEST = "manifest.json"
DENSE_FILE = "dense.bin"
TORCH_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
EXPERT_TENSORS = ("w1_EDF", "w3_EDF", "w2_EFD", "b1_EF", "b3_EF", "b2_ED")
_CHUNK = 64 << 20


class StoreError(ValueError):
    """A missing, truncated or corrupt store file (the message names the file)."""


def default_workers() -> int:
    """Threads for writing / reading store files: one per file, at most 8 and at most the CPUs."""
    return max(1, min(8, os.cpu_count() or 1))


def run_pool(
    fn: Callable[[Hashable], object],
    items: Sequence[Hashable],
    workers: int,
    done: Callable[[Hashable, object], None] | None = None,
) -> dict:
    """``{item: fn(item)}`` with at most ``workers`` calls running at once (threads).

    ``workers == 1`` calls ``fn`` in order on the caller's thread (the sequential path). ``done(item,
    result)`` runs on the caller's thread as each call returns (progress lines). Calls start in item
    order, so when one raises, the calls not yet started are cancelled, the running ones are waited for,
    and the exception of the earliest failed item is raised in the caller: the same error as the
    sequential path (nothing in a worker is lost or silently dropped).
    """
    if workers < 1:
        raise ValueError(f"store: workers must be >= 1, got {workers}")
    out: dict = {}
    order = {it: i for i, it in enumerate(items)}
    if len(order) != len(items):
        raise ValueError(f"store: run_pool items repeat: {list(items)}")
    if workers == 1 or len(items) <= 1:
        for it in items:
            out[it] = fn(it)
            if done:
                done(it, out[it])
        return out
    ex = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="store")
    futs: dict[Future, Hashable] = {}
    try:
        futs = {ex.submit(fn, it): it for it in items}
        pending = set(futs)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in sorted(finished, key=lambda f: order[futs[f]]):
                if f.exception() is None:
                    out[futs[f]] = f.result()
                    if done:
                        done(futs[f], out[futs[f]])
            if any(f.exception() is not None for f in finished):
                break
    finally:
        ex.shutdown(wait=True, cancel_futures=True)  # running calls return; queued ones never start
    failed = [f for f in futs if f.done() and not f.cancelled() and f.exception() is not None]
    if failed:
        raise min(failed, key=lambda f: order[futs[f]]).exception()
    return out


def layer_file(block: int) -> str:
    return f"experts_L{block:05d}.bin"


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def expert_tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shapes of one MoE block's stacked expert tensors (ExpertWeights names), in file order."""
    E, D, F = spec.experts, spec.hidden, spec.ffn
    swiglu = spec.activation == "swiglu"
    shapes = {"w1_EDF": (E, D, F), "w3_EDF": (E, D, F) if swiglu else None, "w2_EFD": (E, F, D)}
    if spec.bias:
        shapes.update({"b1_EF": (E, F), "b3_EF": (E, F) if swiglu else None, "b2_ED": (E, D)})
    return {k: shapes[k] for k in EXPERT_TENSORS if shapes.get(k) is not None}


def tensor_table(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> tuple[dict[str, dict], int]:
    """Offsets of tensors laid back to back, each aligned to ALIGN bytes: (table, total bytes)."""
    table, off = {}, 0
    esize = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        off = _align(off)
        n = esize
        for s in shape:
            n *= s
        table[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "offset": off, "nbytes": n}
        off += n
    return table, _align(off)


def views(buf_u8: Tensor, table: dict[str, dict]) -> dict[str, Tensor]:
    """Typed views of the tensors of ``table`` inside the flat byte buffer ``buf_u8`` (no copy)."""
    out = {}
    for name, t in table.items():
        raw = buf_u8[t["offset"] : t["offset"] + t["nbytes"]]
        out[name] = raw.view(TORCH_DTYPES[t["dtype"]]).view(t["shape"])
    return out


def _write_file(path: Path, chunks: Iterable[bytes | memoryview]) -> tuple[int, str]:
    """Write chunks to ``path`` atomically (temp + fsync + rename): (bytes, sha256 hex)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, n = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                h.update(c)
                f.write(c)
                n += len(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"cannot write store file {path}: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n, h.hexdigest()


def _tensor_chunks(tensors: dict[str, Tensor], table: dict[str, dict], total: int) -> Iterable[memoryview]:
    off = 0
    for name, t in table.items():
        x = tensors[name]
        want = (tuple(t["shape"]), TORCH_DTYPES[t["dtype"]])
        if (tuple(x.shape), x.dtype) != want:
            raise ValueError(f"store: tensor {name} is {tuple(x.shape)} {x.dtype}, expected {want[0]} {want[1]}")
        if t["offset"] > off:
            yield memoryview(bytes(t["offset"] - off))
        raw = x.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1)
        mv = memoryview(raw.numpy())
        for s in range(0, len(mv), _CHUNK):
            yield mv[s : s + _CHUNK]
        off = t["offset"] + t["nbytes"]
    if total > off:
        yield memoryview(bytes(total - off))


class StoreWriter:
    """Writes a store layer by layer (so a model never needs to fit in memory at once).

    ``write_dense(state_dict)`` and ``write_layer(block, tensors)`` for each MoE block in any order
    (or ``write_layers(blocks, make)`` for several blocks at once, from threads), then ``finish()``
    writes the manifest, its layers in block order. Layer files are written atomically; the store is
    usable only once the manifest exists. ``write_dense`` and ``write_layer`` may run concurrently.
    """

    def __init__(self, root: str | Path, spec: ModelSpec, dtype: torch.dtype, origin: dict | None = None) -> None:
        self.root, self.spec, self.dtype = Path(root), spec, dtype
        self.origin = origin or {}
        self.expert_table, self.layer_bytes = tensor_table(expert_tensor_shapes(spec), dtype)
        self.dense: dict | None = None
        self.layers: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MANIFEST).unlink(missing_ok=True)  # incomplete until finish()

    def write_dense(self, state: dict[str, Tensor]) -> None:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        table, total = tensor_table(shapes, self.dtype)
        tensors = {k: v.to(self.dtype) for k, v in state.items()}
        n, sha = _write_file(self.root / DENSE_FILE, _tensor_chunks(tensors, table, total))
        self.dense = {"file": DENSE_FILE, "bytes": n, "sha256": sha, "tensors": table}

    def write_layer(self, block: int, tensors: dict[str, Tensor]) -> None:
        if not self.spec.is_moe_layer(block):
            raise ValueError(f"store: block {block} of {self.spec.name} is not an MoE block")
        missing = set(self.expert_table) - set(tensors)
        if missing:
            raise ValueError(f"store: layer {block} lacks expert tensors {sorted(missing)}")
        tensors = {k: tensors[k].to(self.dtype) for k in self.expert_table}
        name = layer_file(block)
        n, sha = _write_file(self.root / name, _tensor_chunks(tensors, self.expert_table, self.layer_bytes))
        with self._lock:
            self.layers[str(block)] = {"file": name, "bytes": n, "sha256": sha}

    def write_layers(
        self,
        blocks: Iterable[int],
        make: Callable[[int], dict[str, Tensor]],
        *,
        dense: Callable[[], dict[str, Tensor]] | None = None,
        workers: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        """``write_layer(block, make(block))`` for every block (and ``write_dense(dense())`` first when
        ``dense`` is given), ``workers`` files at a time (threads; :func:`default_workers` when None,
        1 = in order on this thread).

        The tensors of a file exist only inside its task (``make`` / ``dense`` run there), so at most
        ``workers`` files' tensors are in memory at once; tensors on a GPU are copied to the host one
        tensor at a time while their file is written. Progress lines come from this thread. The first
        exception (in file order) is raised here once the running tasks are done; files not yet started
        are not written.
        """
        items: list = (["dense"] if dense is not None else []) + list(blocks)

        def task(item) -> float:
            t0 = time.perf_counter()
            if item == "dense":
                self.write_dense(dense())
            else:
                self.write_layer(item, make(item))
            return time.perf_counter() - t0

        def done(item, sec: float) -> None:
            if not progress:
                return
            if item == "dense":
                progress(f"dense weights written ({self.dense['bytes'] / 1e9:.2f} GB in {sec:.1f} s)")
            else:
                progress(f"block {item}: experts written ({self.layer_bytes / 1e9:.2f} GB in {sec:.1f} s)")

        run_pool(task, items, default_workers() if workers is None else workers, done)

    def finish(self) -> Path:
        if self.dense is None:
            raise ValueError("store: write_dense() was not called")
        want = [str(i) for i in range(self.spec.layers) if self.spec.is_moe_layer(i)]
        missing = [b for b in want if b not in self.layers]
        if missing:
            raise ValueError(f"store: MoE blocks {missing} were not written")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": DTYPE_NAMES[self.dtype],
            "align": ALIGN,
            "spec": self.spec.to_dict(),
            "origin": self.origin,
            "dense": self.dense,
            "experts": {"tensors": self.expert_table, "layer_bytes": self.layer_bytes,
                        "layers": {b: self.layers[b] for b in want}},  # block order, however written
        }
        path = self.root / MANIFEST
        atomic_write_text(path, json.dumps(manifest, indent=1))
        return path


def save_model(
    model, root: str | Path, dtype: torch.dtype | None = None, origin: dict | None = None, workers: int | None = None
) -> Path:
    """Save a :class:`reference.model.MoEDecoder` as a store (experts per MoE block, rest dense),
    ``workers`` files at a time (see :meth:`StoreWriter.write_layers`)."""
    spec: ModelSpec = model.spec
    sd = model.state_dict()
    dtype = dtype or next(iter(sd.values())).dtype
    w = StoreWriter(root, spec, dtype, origin or {"init": "model"})
    prefix = {i: f"blocks.{i}.ffn.experts." for i in range(spec.layers) if spec.is_moe_layer(i)}
    w.write_layers(
        list(prefix),
        lambda i: {k[len(prefix[i]) :]: v for k, v in sd.items() if k.startswith(prefix[i])},
        dense=lambda: {k: v for k, v in sd.items() if not any(k.startswith(p) for p in prefix.values())},
        workers=workers,
    )
    return w.finish()


# ------------------------------------------------------------------------------------------ load
PIN_WITH = ("alloc", "register")


class _HostPages(mmap.mmap):
    """Anonymous page-aligned host memory page-locked in place with ``cudaHostRegister`` once filled
    (``pin_with="register"``). Unlike torch's pinned allocator: the exact size (it rounds up to a power of
    two: 4 GiB for a 2.82 GB Mixtral block), the pages faulted in by the thread that reads the file (in
    parallel, not inside one serialised ``cudaHostAlloc``), and locked after the checksum. Unregistered
    before it is unmapped (``__del__``: when the last tensor on it is gone)."""

    _ptr: int | None = None

    def register(self, ptr: int) -> None:
        """Page-lock the mapping (``ptr``: its address) for every CUDA context (cudaHostRegisterPortable)."""
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, len(self), 1))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister failed with cudaError {err}")
        self._ptr = ptr

    def __del__(self) -> None:
        if self._ptr is not None:
            with contextlib.suppress(RuntimeError, AttributeError, TypeError):  # at interpreter shutdown
                torch.cuda.cudart().cudaHostUnregister(self._ptr)
            self._ptr = None


def _host_buffer(nbytes: int, pin: bool, pin_with: str) -> tuple[Tensor, _HostPages | None]:
    """An empty uint8 host tensor of ``nbytes``: pageable, or pinned by torch's allocator (``alloc``),
    or on anonymous pages to be registered once filled (``register``: the pages are returned too; the
    tensor keeps them alive, ``torch.frombuffer`` holds a reference)."""
    if pin and pin_with == "register" and nbytes:
        pages = _HostPages(-1, nbytes)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):
                pages.madvise(mmap.MADV_HUGEPAGE)  # fewer faults and fewer pages to lock
        return torch.frombuffer(pages, dtype=torch.uint8), pages
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin and pin_with == "alloc"), None


def _read_file(
    path: Path,
    nbytes: int,
    sha256: str | None,
    pin: bool,
    pin_with: str = "alloc",
    times: dict[str, float] | None = None,
) -> Tensor:
    """Read ``path`` into a (pinned) uint8 tensor, checking size and sha256; StoreError names the file.

    ``times`` (when given) gets ``alloc_s`` (buffer allocation, the pinning with ``alloc``),
    ``read_s`` (read + sha256) and ``pin_s`` (``cudaHostRegister`` with ``register``)."""
    if pin_with not in PIN_WITH:
        raise ValueError(f"store: pin_with must be one of {PIN_WITH}, got {pin_with!r}")
    if not path.is_file():
        raise StoreError(f"store file missing: {path}")
    size = path.stat().st_size
    if size != nbytes:
        raise StoreError(f"store file {path} has {size} bytes, the manifest says {nbytes} (truncated or corrupt)")
    t0 = time.perf_counter()
    buf, pages = _host_buffer(nbytes, pin, pin_with)
    t1 = time.perf_counter()
    mv = memoryview(buf.numpy())
    h = hashlib.sha256() if sha256 else None
    with path.open("rb", buffering=0) as f:
        off = 0
        while off < nbytes:
            got = f.readinto(mv[off : off + _CHUNK])
            if not got:
                raise StoreError(f"store file {path} ended early at byte {off} of {nbytes}")
            if h is not None:
                h.update(mv[off : off + got])
            off += got
    del mv
    if h is not None and h.hexdigest() != sha256:
        raise StoreError(f"store file {path} is corrupt: sha256 {h.hexdigest()[:16]}... != manifest {sha256[:16]}...")
    t2 = time.perf_counter()
    if pages is not None:
        try:
            pages.register(buf.data_ptr())
        except RuntimeError as e:
            raise StoreError(f"cannot page-lock store file {path} ({nbytes} bytes) with cudaHostRegister: {e}") from e
    if times is not None:
        times.update(alloc_s=t1 - t0, read_s=t2 - t1, pin_s=time.perf_counter() - t2)
    return buf


@dataclass
class ModelStore:
    """A loaded store: manifest, the dense state dict (CPU) and every MoE block's experts in host memory.

    ``layer_buffers[block]`` is one flat uint8 tensor (pinned when ``pinned``); ``layer_views(block)``
    gives its typed tensors (``w1_EDF`` ...) as views. ``read_times[file]``: the load's seconds per file
    (``alloc_s``, ``read_s``, ``pin_s``, see :func:`_read_file`).
    """

    root: Path
    spec: ModelSpec
    dtype: torch.dtype
    manifest: dict
    dense_state: dict[str, Tensor]
    layer_buffers: dict[int, Tensor]
    pinned: bool
    read_times: dict[str, dict[str, float]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _quantized: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def expert_table(self) -> dict[str, dict]:
        return self.manifest["experts"]["tensors"]

    @property
    def layer_bytes(self) -> int:
        return self.manifest["experts"]["layer_bytes"]

    @property
    def moe_blocks(self) -> list[int]:
        return sorted(self.layer_buffers)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert of one block (all its tensors)."""
        return sum(t["nbytes"] for t in self.expert_table.values()) // self.spec.experts

    @property
    def dense_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.dense_state.values())

    def layer_views(self, block: int) -> dict[str, Tensor]:
        return views(self.layer_buffers[block], self.expert_table)

    def quantized_layers(self, fmt: str) -> dict:
        """Every MoE block's experts quantized to ``fmt`` ("int8" / "fp8", per output channel, see
        :mod:`reference.inference.quantize`), in host memory (pinned when the store is): a
        ``{block: QuantizedLayer}`` built on first use and kept (engines over one store share it)."""
        if fmt not in self._quantized:
            from reference.inference.quantize import quantize_store_layer

            dev = "cuda" if self.pinned and torch.cuda.is_available() else None  # quantize on the GPU
            layers = {}
            for b in self.moe_blocks:
                ql = quantize_store_layer(self, b, fmt, device=dev)
                layers[b] = ql.pin_memory() if self.pinned else ql
            self._quantized[fmt] = layers
        return self._quantized[fmt]

    @staticmethod
    def read_manifest(root: str | Path) -> dict:
        root = Path(root)
        path = root / MANIFEST
        if not root.is_dir():
            raise StoreError(f"model store not found: {root} is not a directory")
        if not path.is_file():
            raise StoreError(f"model store {root} has no {MANIFEST} (not a store, or its writing did not finish)")
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"store manifest {path} is not valid JSON: {e}") from e
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise StoreError(f"{path}: format {m.get('format')!r} v{m.get('version')} is not {FORMAT} v{VERSION}")
        return m

    @classmethod
    def load(
        cls,
        root: str | Path,
        *,
        pin: bool | None = None,
        verify: bool = True,
        threads: int | None = None,
        pin_with: str = "alloc",
        progress: Callable[[str], None] | None = None,
    ) -> ModelStore:
        """Read the whole store once (experts into pinned memory when CUDA is available).

        ``threads`` files at once (:func:`default_workers` when None; 1 = one file after the other on
        this thread): each reads its file, checks its size and sha256 and, for the experts, pins it.
        ``pin_with``: ``"alloc"`` pins through torch's pinned allocator (``cudaHostAlloc`` of the size
        rounded up to a power of two, before the read); ``"register"`` reads into ordinary pages and
        page-locks them in place (``cudaHostRegister``, exact size) after the check. A bad file raises
        :class:`StoreError` naming it (the first one in file order when several are bad)."""
        root = Path(root)
        if pin_with not in PIN_WITH:
            raise ValueError(f"store: pin_with must be one of {PIN_WITH}, got {pin_with!r}")
        m = cls.read_manifest(root)
        spec = ModelSpec.from_dict(m["spec"])
        pin = torch.cuda.is_available() if pin is None else pin
        layers = m["experts"]["layers"]
        want = [i for i in range(spec.layers) if spec.is_moe_layer(i)]
        if sorted(int(b) for b in layers) != want:
            raise StoreError(f"{root / MANIFEST}: expert files for blocks {sorted(layers)} but MoE blocks are {want}")
        recs = {"dense": m["dense"], **{b: layers[str(b)] for b in want}}
        workers = default_workers() if threads is None else threads
        t0 = time.perf_counter()

        def read(key) -> tuple[Tensor, dict[str, float]]:
            rec, times = recs[key], {}
            buf = _read_file(root / rec["file"], rec["bytes"], rec["sha256"] if verify else None,
                             pin=pin and key != "dense", pin_with=pin_with, times=times)
            return buf, times

        def done(key, res: tuple[Tensor, dict[str, float]]) -> None:
            if progress:
                rec, t = recs[key], res[1]
                pin_s = f"pin {t['pin_s']:.1f} s, " if t["pin_s"] >= 0.05 else ""
                progress(f"loaded {rec['file']} ({rec['bytes'] / 1e9:.2f} GB: alloc {t['alloc_s']:.1f} s, "
                         f"{pin_s}read{' + sha256' if verify else ''} {t['read_s']:.1f} s)")

        got = run_pool(read, list(recs), workers, done)
        if progress:
            total = sum(r["bytes"] for r in recs.values())
            progress(f"store read: {len(recs)} files, {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s "
                     f"({min(workers, len(recs))} threads, pinned={pin}{f' with {pin_with}' if pin else ''})")
        dense_state = views(got["dense"][0], m["dense"]["tensors"])
        bufs = {b: got[b][0] for b in want}
        store = cls(root, spec, TORCH_DTYPES[m["dtype"]], m, dense_state, bufs, pin)
        store.read_times = {recs[k]["file"]: got[k][1] for k in recs}
        return store
