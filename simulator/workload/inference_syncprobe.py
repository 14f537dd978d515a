"""GPU probe of the resident prefill's host/device overlap per segment (issue 7, small batches): how long the
host takes to issue each segment between the engine's host syncs, how long each sync waits, and when the
device reaches those points, at the run's widths and at the host probe's tiny widths (same engine, same code).

The inference workload prices a pass's host time as its counted kernels x one seconds-per-kernel from the tiny
width probe (`inference_host.HostProbe`), spread evenly over the kernels; the syncs' own cost then lands partly
in the window where the host issues ahead of the expert GEMMs (overlapped) instead of in the serial chain of the
router statistics / dispatch syncs. This probe measures the per-segment split directly.

``python -m simulator.workload.inference_syncprobe --out DIR`` (the GPU machine, repository root; ~1 min on the
H100: a random Mixtral-8x7B store of ``--layers`` blocks is built into ``--store`` first, plus the tiny store)
writes ``DIR/sync.csv`` (flushed after every pass)::

    width,batch,rep,block,marker,host_s,dev_s

one row per marker of one timed resident prefill forward: ``block`` (block start, norm1's pre-hook),
``bincount_call`` / ``bincount_ret`` (the router's, the aux statistics' and the dispatcher's ``torch.bincount``:
host syncs on CUDA), ``int_call`` / ``int_ret`` (the dispatcher's ``int(n_kept)``), ``gmm_call`` / ``gmm_ret``
(each ``torch._grouped_mm``), ``end``; ``host_s`` the host clock and ``dev_s`` the compute stream's CUDA event
recorded at that moment, both from the pass start (the event's time is when the device reached it). And
``DIR/passes.csv`` (``width,batch,rep,plain_ms,instrumented_ms``): the same forward timed without and with the
markers (the markers' own host cost). ``--quick``: the tiny preset on the CPU (CI smoke test; ``dev_s`` =
``host_s``). At the end (and with ``--summary --out DIR`` for a fetched run) it prints `summarise`: per width and
batch, the mean host and device milliseconds per block of each span between the syncs (`SPANS`).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from itertools import pairwise
from pathlib import Path

SYNC_COLS = ("width", "batch", "rep", "block", "marker", "host_s", "dev_s")
PASS_COLS = ("width", "batch", "rep", "plain_ms", "instrumented_ms")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Markers:
    """Host clock + CUDA event at each marker of one forward (patches torch.bincount, Tensor.__int__,
    torch._grouped_mm while active; a pre-hook on every block's norm1)."""

    def __init__(self, model, cuda: bool) -> None:
        import torch

        self.torch, self.cuda = torch, cuda
        self.rows: list = []
        self.block = -1
        self.active = False
        self.hooks = [b.norm1.register_forward_pre_hook(self._on_block) for b in model.blocks]
        self._orig = (torch.bincount, torch.Tensor.__int__, torch._grouped_mm)

    def mark(self, name: str) -> None:
        if not self.active:
            return
        ev = None
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
        self.rows.append((self.block, name, time.perf_counter(), ev))

    def _on_block(self, mod, args):
        self.block += 1
        self.mark("block")

    def _wrap(self, fn, name):
        def wrapped(*a, **k):
            self.mark(f"{name}_call")
            try:
                return fn(*a, **k)
            finally:
                self.mark(f"{name}_ret")
        return wrapped

    def __enter__(self):
        torch = self.torch
        bc, it, gm = self._orig
        torch.bincount = self._wrap(bc, "bincount")
        torch.Tensor.__int__ = self._wrap(it, "int")
        torch._grouped_mm = self._wrap(gm, "gmm")
        self.rows, self.block, self.active = [], -1, True
        self.mark("start")
        return self

    def __exit__(self, *exc):
        self.mark("end")
        self.active = False
        torch = self.torch
        torch.bincount, torch.Tensor.__int__, torch._grouped_mm = self._orig
        return False

    def resolved(self) -> list[tuple]:
        """(block, marker, host_s, dev_s) from the pass start."""
        if self.cuda:
            self.torch.cuda.synchronize()
        _, _, h0, e0 = self.rows[0]
        out = []
        for blk, name, h, ev in self.rows:
            d = (e0.elapsed_time(ev) / 1e3) if self.cuda else h - h0
            out.append((blk, name, h - h0, d))
        return out

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def probe(store, dev: str, width: str, batches: list[int], P: int, reps: int, out: Path) -> None:
    import torch

    from reference.inference.engine import Engine, InferConfig, random_prompts

    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    Bmax = max(batches)
    eng = Engine(store, InferConfig(mode="resident", device=dev, trace=False, gpu_budget_gb=None), batch=Bmax,
                 max_len=P + 8, prefill_tokens=Bmax * P)
    mk = Markers(eng.model, cuda)
    with (out / "sync.csv").open("a", newline="") as fs, (out / "passes.csv").open("a", newline="") as fp:
        ws, wp = csv.writer(fs), csv.writer(fp)
        for B in batches:
            idx = random_prompts(B, P, store.spec.vocab, seed=B).to(dev)
            with torch.no_grad():
                eng.forward(idx, all_logits=False)  # warm-up
                for r in range(reps):
                    sync()
                    t = time.perf_counter()
                    eng.forward(idx, all_logits=False)
                    sync()
                    plain = time.perf_counter() - t
                    sync()
                    t = time.perf_counter()
                    with mk:
                        eng.forward(idx, all_logits=False)
                        sync()
                    inst = time.perf_counter() - t
                    for blk, name, h, d in mk.resolved():
                        ws.writerow((width, B, r, blk, name, f"{h:.7f}", f"{d:.7f}"))
                    wp.writerow((width, B, r, f"{1e3 * plain:.4f}", f"{1e3 * inst:.4f}"))
                    fs.flush()
                    fp.flush()
            log(f"{width} B={B}: plain {1e3 * plain:.2f} ms, instrumented {1e3 * inst:.2f} ms (last rep)")
    mk.close()
    eng.close()
    del eng
    if cuda:
        torch.cuda.empty_cache()


# per block, in the order the engine reaches them: (name, from marker, to marker); ``#i`` the i-th of that marker
# in the block (a block's markers: block, 3 x bincount call/ret, int call/ret, the grouped GEMMs)
SPANS = (("attention+moe_0 issue", "block", "bincount_call#0"), ("moe_0 sync", "bincount_call#0", "bincount_ret#0"),
         ("moe_1 issue", "bincount_ret#0", "bincount_call#1"), ("moe_1 sync", "bincount_call#1", "bincount_ret#1"),
         ("moe_3 issue", "bincount_ret#1", "bincount_call#2"), ("moe_3 sync", "bincount_call#2", "bincount_ret#2"),
         ("moe_4 issue", "bincount_ret#2", "int_call#0"), ("moe_4 sync", "int_call#0", "int_ret#0"),
         ("ffn lead issue", "int_ret#0", "gmm_call#0"), ("ffn rest + post issue", "gmm_call#0", "next_block#0"))


def summarise(sync_csv: str | Path):
    """Mean milliseconds per block of each `SPANS` span, host clock and device clock (the device's span between
    the same two points), per (width, batch); blocks with every marker only (the last block's ``next_block`` is
    the pass's final sync, so its last span is left out). A DataFrame with columns width, batch, span, host_ms, dev_ms."""
    import pandas as pd

    df = pd.read_csv(sync_csv)
    out = []
    for (width, B, rep), g in df.groupby(["width", "batch", "rep"], sort=False):
        g = g.reset_index(drop=True)
        starts = list(g.index[g["marker"] == "block"]) + list(g.index[g["marker"] == "end"])
        for a, b in pairwise(starts):
            blk = g.iloc[a:b]
            pts, seen = {}, {}
            for i, r in blk.iterrows():
                k = seen.get(r["marker"], 0)
                seen[r["marker"]] = k + 1
                pts[f"{r['marker']}#{k}"] = (r["host_s"], r["dev_s"])
            if g.loc[b, "marker"] == "block":  # the last block's rest ends in the pass's final sync: left out
                pts["next_block#0"] = (g.loc[b, "host_s"], g.loc[b, "dev_s"])
            pts["block"] = pts.pop("block#0")
            for name, x, y in SPANS:
                if x in pts and y in pts:
                    out.append((width, int(B), name, 1e3 * (pts[y][0] - pts[x][0]), 1e3 * (pts[y][1] - pts[x][1])))
    res = pd.DataFrame(out, columns=["width", "batch", "span", "host_ms", "dev_ms"])
    order = {n: i for i, (n, _, _) in enumerate(SPANS)}
    res = res.groupby(["width", "batch", "span"], as_index=False)[["host_ms", "dev_ms"]].mean()
    return res.sort_values(["width", "batch", "span"], key=lambda c: c.map(order) if c.name == "span" else c)


SYNC_SEGMENTS = {"moe_0 sync": "moe_0", "moe_1 sync": "moe_1", "moe_3 sync": "moe_3", "moe_4 sync": "moe_4"}
RESULTS = Path(__file__).resolve().parent.parent.parent / "results" / "bench" / "infer_syncprobe"


def sync_shares(sync_csv: str | Path | None = None, width: str = "tiny") -> tuple:
    """The host syncs' shares of a resident prefill block's host time at the engine host probe's tiny widths
    (``width``; the committed H100 run b57d4eb, ``results/bench/infer_syncprobe/sync.csv``, by default): per sync
    segment of the counted program (`SYNC_SEGMENTS`: the router's, the aux statistics' and the dispatcher's
    ``bincount`` and the dispatcher's ``int()``), its span (the call to the return: the op's host cost, the
    wait and the device-to-host round trip; at tiny widths the device keeps up, so nearly all of it is the sync's
    own latency) over the sum of the block's spans, the mean over the probed batches. ``(segment, share)`` pairs,
    in program order (`InferConfig.sync_split`); () when the file is absent. An input measured apart from every
    bench run (the shares, not the seconds: the run's own probe sets the host seconds)."""
    path = Path(sync_csv) if sync_csv is not None else RESULTS / "sync.csv"
    if not path.is_file():
        return ()
    sm = summarise(path)
    sm = sm[sm["width"] == width]
    if sm.empty:
        return ()
    per = []
    for _, g in sm.groupby("batch"):
        tot = float(g["host_ms"].sum())
        per.append({SYNC_SEGMENTS[n]: float(v) / tot for n, v in zip(g["span"], g["host_ms"]) if n in SYNC_SEGMENTS})
    segs = [seg for seg in SYNC_SEGMENTS.values() if all(seg in p for p in per)]
    return tuple((seg, sum(p[seg] for p in per) / len(per)) for seg in segs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--store", type=Path, default=Path("/dev/shm/semoe_sync_store"))
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny preset on the CPU (CI smoke test)")
    ap.add_argument("--summary", action="store_true", help="print the per-span summary of DIR/sync.csv and exit")
    a = ap.parse_args(argv)
    if a.summary:
        if not (a.out / "sync.csv").is_file():
            print(f"inference_syncprobe: {a.out / 'sync.csv'} not found", file=sys.stderr)
            return 2
        print(summarise(a.out / "sync.csv").to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        return 0
    try:
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        batches = []
    if a.layers < 1 or a.prompt_len < 1 or a.reps < 1 or not batches or min(batches) < 1:
        print("inference_syncprobe: --layers, --prompt-len, --reps and every --batches value must be >= 1",
              file=sys.stderr)
        return 2
    import torch

    from reference.inference.bench import PROBE_WIDTHS, QUICK_PROBE_WIDTHS, probe_spec
    from reference.inference.build import build_random_store
    from reference.inference.store import ModelStore
    from simulator.workload.inference_diag import probe_model

    dev, spec = probe_model(a.quick, a.layers)
    if a.quick:
        a.prompt_len, a.reps, batches = 8, 1, [1, 2]
        store_dir, widths = a.out / "store", QUICK_PROBE_WIDTHS
    else:
        store_dir, widths = a.store, PROBE_WIDTHS
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sync.csv").write_text(",".join(SYNC_COLS) + "\n")
    (a.out / "passes.csv").write_text(",".join(PASS_COLS) + "\n")
    t0 = time.perf_counter()
    for width, sp, d in (("tiny", probe_spec(spec, widths), store_dir.with_name(store_dir.name + "_tiny")),
                         ("run", spec, store_dir)):
        log(f"building {sp.name} into {d} on {dev}")
        build_random_store(d, sp, torch.bfloat16, seed=0, gen_device=dev)
        store = ModelStore.load(d)
        probe(store, dev, width, batches, a.prompt_len, a.reps, a.out)
        del store
    log(f"done in {time.perf_counter() - t0:.0f} s: {a.out}")
    print(summarise(a.out / "sync.csv").to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
