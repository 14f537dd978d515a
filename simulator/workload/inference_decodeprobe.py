"""GPU probe of the expert-aware DECODE's per-block host / sync / copy / device split (issue 7): where a decode
block's time goes between the router's sync, the pool's expert copies, the syncs after them and the next block,
at the run's widths and at the host probe's tiny widths (same engine, same code).

`simulator.validate_infer` prices an expert-aware decode pass's host time from the tiny-width engine probe (host
seconds per counted kernel) and serialises the copies with the host work per block; on the H100 the measured
decode is always slower than that (per block ~1.3-2.6 ms more non-copy time than the probe's host time). This
probe splits one block of the reference engine's expert-aware decode (``Engine._experts``, pass mode "expert":
router -> ``torch.unique(...).tolist()`` -> ``ExpertPool.fetch`` (pinned H2D copies of the missing experts on the
copy stream; the compute stream waits for them) -> ``remap`` / dispatcher (``torch.bincount`` / ``int()`` host
syncs) -> ``torch._grouped_mm`` -> combine) into spans, with the syncprobe's `Markers`
(`simulator.workload.inference_syncprobe`) extended by `DecodeMarkers`.

``python -m simulator.workload.inference_decodeprobe --out DIR`` (the GPU machine, repository root; ~1.5-2 min on
the H100: a random Mixtral-8x7B store of ``--layers`` blocks is built into ``--store`` first unless an identical
one is there, plus the tiny store) runs, per width (``tiny``: `probe_spec` at the host probe's widths; ``run``),
rep, mode (``expert_nopred``, ``expert`` = with the one-block-ahead prefetch) and batch, two fresh engines on the
same prompts (so the same routing, the same copies): a plain one (prefill through the ring, then ``--gen-len`` - 1
decode steps as ``Engine.generate``, timed) and an instrumented one (the same, the decode steps with the markers
and the engine's copy / compute timeline on). Width ``tiny_wait`` (``--widths``): the tiny engine with every fetch
holding its copies ``--wait-ms-per-expert`` per copied expert on the copy stream (``torch.cuda._sleep``), so the
host waits at the sync after the copies about as long as at the run's widths: is the run's extra host time the
widths' or the long waits'? The pool has ``--pool-slots`` expert slots at both widths (the
engine budget as the bench's host probe computes it, `_probe_budget_gb`). Writes, flushed after every pass:

* ``DIR/decode_sync.csv`` (`SYNC_COLS`): one row per marker of the instrumented decode steps: ``start`` (before
  step 1), per step ``step`` (the forward's call; block -1) ... ``step_ret``, per block ``block`` (norm1's
  pre-hook), ``experts_call`` / ``experts_ret`` (``Engine._experts``: the MoE after attention), ``bincount_*``,
  ``int_*``, ``gmm_*`` (as the syncprobe), ``unique_*`` (``torch.unique``), ``tolist_*`` (``Tensor.tolist``: the
  host sync of the needed experts), ``fetch_*`` (``ExpertPool.fetch``; ``n_copied`` on ``fetch_ret``: experts
  copied by that call), ``prefetch_*`` (``ExpertPool.prefetch``, mode ``expert``; ``n_copied`` likewise),
  ``remap_*`` (the routing remapped to pool slots: its ``bincount`` is the first sync after the copies), and
  ``end`` (after the final synchronisation); ``host_s`` the host clock and ``dev_s`` the compute stream's CUDA
  event recorded at that moment (when the device reached it), both from ``start``.
* ``DIR/decode_timeline.csv`` (`TL_COLS`): the engine's own timeline spans of the instrumented steps (CUDA events,
  from ``start``): ``h2d_experts`` / ``h2d_prefetch`` on the copy stream (``pcie_h2d``, with bytes) and
  ``moe_expert`` on the compute stream.
* ``DIR/decode_passes.csv`` (`PASS_COLS`): per pass the plain and the instrumented milliseconds per decode step
  (the markers' own host cost) and the experts each pass copied during its decode steps (the same routing: equal).

At the end (and with ``--summary --out DIR`` for a fetched run) it prints `summarise` (mean host and device
milliseconds per block of each span of `SPANS`) and `split` (per width, mode, batch: the issue-7 split of a
block: host issue before the fetch, the fetch call, the wait at the sync after the copies, the post-copy work's
host and device time, the gap to the next block, and the copy time / GB/s of the copy stream) and writes
``DIR/summary.txt``. ``--quick``: the tiny preset on the CPU (CI smoke test; ``dev_s`` = ``host_s``).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from simulator.workload.inference_syncprobe import Markers, log

SYNC_COLS = ("width", "mode", "batch", "rep", "step", "block", "marker", "host_s", "dev_s", "n_copied")
TL_COLS = ("width", "mode", "batch", "rep", "step", "block", "phase", "resource", "start_s", "end_s", "bytes")
PASS_COLS = ("width", "mode", "batch", "rep", "steps", "plain_ms_per_step", "instrumented_ms_per_step",
             "plain_experts_copied", "instrumented_experts_copied")
MODES = {"expert_nopred": False, "expert": True}  # probe mode -> Engine prediction (as the bench's rows)
WIDTHS = ("tiny", "tiny_wait", "run")  # run order


class DecodeMarkers(Markers):
    """`Markers` of the expert-aware decode: every row also carries the decode step and, on ``fetch_ret`` /
    ``prefetch_ret``, the experts copied by that call; besides the syncprobe's patches (``torch.bincount``,
    ``Tensor.__int__``, ``torch._grouped_mm``, norm1's pre-hook) it patches ``torch.unique``, ``Tensor.tolist`` and
    ``reference.inference.engine.remap`` while active, and wraps the engine's ``_experts`` and its pool's
    ``fetch`` / ``prefetch`` (instance attributes, removed by :meth:`close`)."""

    def __init__(self, eng, cuda: bool) -> None:
        super().__init__(eng.model, cuda)
        import torch

        import reference.inference.engine as engine_mod

        self.eng, self.engine_mod, self.step = eng, engine_mod, 0
        self._orig_extra = (torch.unique, torch.Tensor.__dict__.get("tolist"), torch.Tensor.tolist, engine_mod.remap)
        pool = eng.pool
        eng._experts = self._wrap(eng._experts, "experts")
        pool.fetch = self._counted(pool, pool.fetch, "fetch")
        pool.prefetch = self._counted(pool, pool.prefetch, "prefetch")

    def mark(self, name: str, n_copied: int | None = None) -> None:
        if not self.active:
            return
        ev = None
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
        self.rows.append((self.step, self.block, name, time.perf_counter(), ev, n_copied))

    def _counted(self, pool, fn, name):
        def wrapped(*a, **k):
            self.mark(f"{name}_call")
            c = pool.copies
            try:
                return fn(*a, **k)
            finally:
                self.mark(f"{name}_ret", pool.copies - c)
        return wrapped

    def begin_step(self, step: int) -> None:
        """Before decode step ``step``'s forward: its blocks count from 0 again."""
        self.step, self.block = step, -1
        self.mark("step")

    def __enter__(self):
        torch = self.torch
        self.step = 0
        super().__enter__()
        un, _, tl, rm = self._orig_extra
        torch.unique = self._wrap(un, "unique")
        torch.Tensor.tolist = self._wrap(tl, "tolist")
        self.engine_mod.remap = self._wrap(rm, "remap")
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        torch = self.torch
        un, own_tl, _, rm = self._orig_extra
        torch.unique, self.engine_mod.remap = un, rm
        if own_tl is None:
            del torch.Tensor.tolist  # inherited from TensorBase: back to that
        else:
            torch.Tensor.tolist = own_tl
        return False

    def resolved(self) -> list[tuple]:
        """(step, block, marker, host_s, dev_s, n_copied) from ``start``."""
        if self.cuda:
            self.torch.cuda.synchronize()
        h0, e0 = self.rows[0][3], self.rows[0][4]
        out = []
        for step, blk, name, h, ev, n in self.rows:
            d = (e0.elapsed_time(ev) / 1e3) if self.cuda else h - h0
            out.append((step, blk, name, h - h0, d, n))
        return out

    def timeline_rows(self, spans: list) -> list[tuple]:
        """The engine timeline's spans (``Timeline.spans``: CUDA events or perf_counter) as (step, block, phase,
        resource, start_s, end_s, bytes) from ``start``."""
        if self.cuda:
            self.torch.cuda.synchronize()
        h0, e0 = self.rows[0][3], self.rows[0][4]
        out = []
        for start, end, phase, layer, mb, resource, nbytes, _ in spans:
            if self.cuda:
                s, e = e0.elapsed_time(start) / 1e3, e0.elapsed_time(end) / 1e3
            else:
                s, e = start - h0, end - h0
            out.append((mb, layer, phase, resource, s, max(s, e), nbytes))
        return out

    def close(self) -> None:
        super().close()
        for obj, attr in ((self.eng, "_experts"), (self.eng.pool, "fetch"), (self.eng.pool, "prefetch")):
            if attr in obj.__dict__:
                delattr(obj, attr)


def decode(eng, prompts, G: int, sync, mk: DecodeMarkers | None = None) -> tuple[float, int]:
    """``Engine.generate``'s prefill + ``G - 1`` greedy decode steps (same calls); with ``mk`` the decode steps run
    inside the markers and the engine's timeline. Returns the decode seconds (synchronised before and after) and
    the experts the pool copied during the decode steps."""
    B, P = prompts.shape
    cache = eng.new_cache(B)
    idx = prompts.to(eng.device)
    eng.timeline.micro_batch = 0
    nxt = eng.forward(idx, cache, 0, all_logits=False)[:, -1].argmax(-1)
    sync()
    if mk is not None:
        eng.timeline.spans.clear()
        eng.timeline.enabled = True
        mk.__enter__()
    c0 = eng.pool.copies
    t = time.perf_counter()
    try:
        for step in range(1, G):
            eng.timeline.micro_batch = step
            if mk is not None:
                mk.begin_step(step)
            last = eng.forward(nxt.unsqueeze(1), cache, P + step - 1, all_logits=False)[:, -1]
            if mk is not None:
                mk.mark("step_ret")
            nxt = last.argmax(-1)
        sync()
        sec = time.perf_counter() - t
    finally:
        if mk is not None:
            mk.__exit__(None, None, None)
            eng.timeline.enabled = False
    return sec, eng.pool.copies - c0


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond on this device (timed with CUDA events)."""
    import torch

    n = 20_000_000
    torch.cuda._sleep(n // 10)  # warm-up
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(n)
    b.record()
    b.synchronize()
    return n / a.elapsed_time(b)


class Probe:
    """The passes of one width: engines on ``store`` with ``pool_slots`` expert slots, rows to ``out``."""

    def __init__(self, store, dev: str, width: str, P: int, G: int, pool_slots: int, out: Path,
                 wait_ms_per_expert: float = 0.0) -> None:
        import torch

        self.torch, self.store, self.dev, self.width = torch, store, dev, width
        self.P, self.G, self.pool_slots, self.out = P, G, pool_slots, out
        self.cuda = dev == "cuda"
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.wait_ms = wait_ms_per_expert
        self.cycles_per_ms = sleep_cycles_per_ms() if self.cuda and wait_ms_per_expert > 0 else 0.0

    def _delay_copies(self, pool) -> None:
        """Width ``tiny_wait``: every fetch that copies n experts first holds the copy stream ``n x wait_ms``
        (``torch.cuda._sleep``; CPU: the host sleeps), so the tiny engine waits for its copies about as long as the
        run's engine does, with the same tiny host work around the wait."""
        orig, torch = pool.fetch, self.torch

        def fetch(block, needed):
            n = sum((block, e) not in pool.where for e in needed)
            if n:
                if self.cuda:
                    with torch.cuda.stream(pool.sync.copy):
                        torch.cuda._sleep(int(n * self.wait_ms * self.cycles_per_ms))
                else:
                    time.sleep(n * self.wait_ms / 1e3)
            return orig(block, needed)

        pool.fetch = fetch

    def engine(self, mode: str, B: int):
        from reference.inference.bench_probes import _probe_budget_gb
        from reference.inference.engine import Engine, InferConfig

        budget = _probe_budget_gb(self.store, B, self.P + self.G, B * self.P, self.pool_slots)
        cfg = InferConfig(mode="expert", device=self.dev, trace=False, predict=MODES[mode], gpu_budget_gb=budget)
        eng = Engine(self.store, cfg, batch=B, max_len=self.P + self.G, prefill_tokens=B * self.P)
        if eng.plan.pool_slots != self.pool_slots:
            log(f"{self.width} {mode} B={B}: pool {eng.plan.pool_slots} slots, asked {self.pool_slots}")
        if self.wait_ms > 0:
            self._delay_copies(eng.pool)
        return eng

    def _drop(self, eng) -> None:
        eng.close()
        if self.cuda:
            self.torch.cuda.synchronize()

    def warm(self, mode: str, B: int) -> None:
        """An untimed pass (first-call costs of this shape)."""
        from reference.inference.engine import random_prompts

        eng = self.engine(mode, B)
        decode(eng, random_prompts(B, self.P, self.store.spec.vocab, seed=B), min(self.G, 3), self.sync)
        self._drop(eng)

    def run(self, mode: str, B: int, rep: int) -> tuple[float, float]:
        """A plain and an instrumented pass on rep ``rep``'s prompts (`expert_prompt_seed`, as the bench's
        repeats); rows appended. Returns their milliseconds per decode step."""
        from reference.inference.bench_rows import expert_prompt_seed
        from reference.inference.engine import random_prompts

        prompts = random_prompts(B, self.P, self.store.spec.vocab, seed=expert_prompt_seed(B, rep))
        steps = self.G - 1
        eng = self.engine(mode, B)
        plain, n_plain = decode(eng, prompts, self.G, self.sync)
        self._drop(eng)
        del eng
        eng = self.engine(mode, B)
        mk = DecodeMarkers(eng, self.cuda)
        try:
            inst, n_inst = decode(eng, prompts, self.G, self.sync, mk)
            rows, tl = mk.resolved(), mk.timeline_rows(eng.timeline.spans)
        finally:
            mk.close()
        self._drop(eng)
        del eng
        key = (self.width, mode, B, rep)
        with (self.out / "decode_sync.csv").open("a", newline="") as f:
            csv.writer(f).writerows((*key, s, b, m, f"{h:.7f}", f"{d:.7f}", "" if n is None else n)
                                    for s, b, m, h, d, n in rows)
        with (self.out / "decode_timeline.csv").open("a", newline="") as f:
            csv.writer(f).writerows((*key, s, b, ph, res, f"{st:.7f}", f"{en:.7f}", nb)
                                    for s, b, ph, res, st, en, nb in tl)
        with (self.out / "decode_passes.csv").open("a", newline="") as f:
            csv.writer(f).writerow((*key, steps, f"{1e3 * plain / steps:.4f}", f"{1e3 * inst / steps:.4f}",
                                    n_plain, n_inst))
        log(f"{self.width} {mode} B={B} rep {rep}: plain {1e3 * plain / steps:.2f} ms/step, instrumented "
            f"{1e3 * inst / steps:.2f} ms/step, experts copied in decode {n_plain} (plain) / {n_inst} (instrumented)")
        return 1e3 * plain / steps, 1e3 * inst / steps


# ------------------------------------------------------------------------------------------------ summary
# per block, in program order: (name, from marker, to marker); ``#i`` the i-th of that marker in the block,
# ``#-1`` the last; ``next_block`` the next block's start (the next step's block 0 after a step's last block)
SPANS = (
    ("attention issue", "block#0", "experts_call#0"),
    ("router issue+syncs", "experts_call#0", "unique_call#0"),
    ("unique+tolist sync", "unique_call#0", "tolist_ret#0"),
    ("fetch call", "fetch_call#0", "fetch_ret#0"),
    ("slot map to remap", "fetch_ret#0", "remap_call#0"),
    ("remap (1st sync after copies)", "remap_call#0", "remap_ret#0"),
    ("dispatch issue+syncs", "remap_ret#0", "gmm_call#0"),
    ("expert GEMMs issue", "gmm_call#0", "gmm_ret#-1"),
    ("combine issue", "gmm_ret#-1", "experts_ret#0"),
    ("predict+prefetch", "experts_ret#0", "prefetch_ret#-1"),
    ("gap to next block", "experts_ret#0", "next_block"),
    ("block total", "block#0", "next_block"),
)
SPAN_NAMES = tuple(n for n, _, _ in SPANS)


def _blocks(df):
    """Per instrumented pass and block: (width, mode, batch, rep, step, block, points, crosses_step) with points
    {"marker#i" / "marker#-1": (host_s, dev_s)} plus "next_block" (absent for the pass's last block) and the
    experts copied by the block's fetch / prefetch calls."""
    for (width, mode, B, rep), g in df.groupby(["width", "mode", "batch", "rep"], sort=False):
        g = g.reset_index(drop=True)
        starts = list(g.index[g["marker"] == "block"])
        for j, a in enumerate(starts):
            b = starts[j + 1] if j + 1 < len(starts) else int(g.index[g["marker"] == "end"][0])
            blk = g.iloc[a:b]
            pts, seen = {}, {}
            for _, r in blk.iterrows():
                k = seen.get(r["marker"], 0)
                seen[r["marker"]] = k + 1
                pts[f"{r['marker']}#{k}"] = pts[f"{r['marker']}#-1"] = (r["host_s"], r["dev_s"])
            if j + 1 < len(starts):
                pts["next_block"] = (g.loc[b, "host_s"], g.loc[b, "dev_s"])
            fetched = blk.loc[blk["marker"] == "fetch_ret", "n_copied"].fillna(0).sum()
            prefetched = blk.loc[blk["marker"] == "prefetch_ret", "n_copied"].fillna(0).sum()
            step = int(g.loc[a, "step"])
            crosses = j + 1 < len(starts) and int(g.loc[b, "step"]) != step
            yield width, mode, int(B), int(rep), step, int(g.loc[a, "block"]), pts, crosses, fetched, prefetched


def _order(res, cols):
    order = {n: i for i, n in enumerate(SPAN_NAMES)}
    return res.sort_values(cols, key=lambda c: c.map(order) if c.name == "span" else c).reset_index(drop=True)


def summarise(sync_csv: str | Path):
    """Mean host and device milliseconds per block of each `SPANS` span (the device's span between the same two
    points), per (width, mode, batch), over the blocks that have both points; a block's ``gap to next block`` /
    ``block total`` only when the next block is in the same step (the step boundary's own rows:
    ``... (step boundary)``). A DataFrame: width, mode, batch, span, blocks, host_ms, dev_ms."""
    import pandas as pd

    df = pd.read_csv(sync_csv)
    out = []
    for width, mode, B, _rep, _step, _blk, pts, crosses, _f, _p in _blocks(df):
        for name, x, y in SPANS:
            if y == "next_block" and crosses:
                name += " (step boundary)"
            if x in pts and y in pts:
                out.append((width, mode, B, name, 1e3 * (pts[y][0] - pts[x][0]), 1e3 * (pts[y][1] - pts[x][1])))
    res = pd.DataFrame(out, columns=["width", "mode", "batch", "span", "host_ms", "dev_ms"])
    agg = res.groupby(["width", "mode", "batch", "span"], as_index=False).agg(
        blocks=("host_ms", "size"), host_ms=("host_ms", "mean"), dev_ms=("dev_ms", "mean"))
    order = {n: i for i, n in enumerate(SPAN_NAMES)}
    order.update({f"{n} (step boundary)": i + 0.5 for i, n in enumerate(SPAN_NAMES)})
    return agg.sort_values(["width", "mode", "batch", "span"],
                           key=lambda c: c.map(order) if c.name == "span" else c).reset_index(drop=True)


SPLIT_COLS = ("width", "mode", "batch", "blocks", "experts_copied", "before_fetch_ms", "fetch_call_ms",
              "post_copy_wait_ms", "post_copy_host_ms", "post_copy_dev_ms", "gap_next_ms", "block_ms", "copy_ms",
              "copy_GBps", "copy_wait_dev_ms", "non_copy_ms")


def split(sync_csv: str | Path, timeline_csv: str | Path | None = None):
    """Issue 7's split of an expert-aware decode block, mean milliseconds per block per (width, mode, batch), over
    all blocks of the instrumented steps but each pass's last (no next block): ``before_fetch_ms`` (host, block
    start -> the fetch call: attention, router and the needed-experts sync), ``fetch_call_ms`` (host time in
    ``ExpertPool.fetch``: issuing the copies), ``post_copy_wait_ms`` (host, the fetch's return -> ``remap``'s
    return: the first host sync after the copies, where the host waits for them), ``post_copy_host_ms`` /
    ``post_copy_dev_ms`` (host / device clock from the fetch's return to the MoE's return: on the device, from the
    moment the compute stream passed the wait for the copies), ``gap_next_ms`` (host, the MoE's return -> the next
    block's start; the prefetch of mode ``expert``, a step's head and the next step's embedding across a step
    boundary), ``block_ms`` (host, block start -> next block start), ``experts_copied`` (for the block: its fetch's and the
    previous block's prefetch's), ``copy_ms`` / ``copy_GBps`` (the copy stream's ``h2d_*`` spans for the block in
    ``timeline_csv``: its fetch's and the previous block's prefetch's copies, the engine's own CUDA events; all blocks, 0 without copies), ``copy_wait_dev_ms`` (device:
    the copy span's end -> the compute stream passing the fetch's return; ~0 when the copies are the last thing
    the block waits for), ``non_copy_ms`` = ``block_ms`` - ``copy_ms``. A DataFrame with `SPLIT_COLS`."""
    import pandas as pd

    df = pd.read_csv(sync_csv)
    tl = None
    if timeline_csv is not None and Path(timeline_csv).is_file():
        tl = pd.read_csv(timeline_csv)
        tl = tl[tl["resource"] == "pcie_h2d"]
        tl = tl.assign(sec=tl["end_s"] - tl["start_s"]).groupby(
            ["width", "mode", "batch", "rep", "step", "block"]).agg(sec=("sec", "sum"), nbytes=("bytes", "sum"),
                                                                    end=("end_s", "max"))

    def span(pts, x, y, i):
        return 1e3 * (pts[y][i] - pts[x][i]) if x in pts and y in pts else float("nan")

    out, blocks = [], list(_blocks(df))
    ahead = {(w, m, b, r, s, k + 1): p for w, m, b, r, s, k, _, _, _, p in blocks}  # a prefetch serves the next
    for width, mode, B, rep, step, blk, pts, _c, fetched, _p in blocks:
        if "next_block" not in pts:
            continue
        prefetched = ahead.get((width, mode, B, rep, step, blk), 0)
        sec = nbytes = 0.0
        wait = float("nan")
        if tl is not None and (width, mode, B, rep, step, blk) in tl.index:
            t = tl.loc[(width, mode, B, rep, step, blk)]
            sec, nbytes = float(t["sec"]), float(t["nbytes"])
            if "fetch_ret#0" in pts and fetched:
                wait = 1e3 * (pts["fetch_ret#0"][1] - float(t["end"]))
        out.append((width, mode, B, fetched + prefetched, span(pts, "block#0", "fetch_call#0", 0),
                    span(pts, "fetch_call#0", "fetch_ret#0", 0), span(pts, "fetch_ret#0", "remap_ret#0", 0),
                    span(pts, "fetch_ret#0", "experts_ret#0", 0), span(pts, "fetch_ret#0", "experts_ret#0", 1),
                    span(pts, "experts_ret#0", "next_block", 0), span(pts, "block#0", "next_block", 0),
                    1e3 * sec, nbytes, wait))
    res = pd.DataFrame(out, columns=["width", "mode", "batch", "experts_copied", "before_fetch_ms", "fetch_call_ms",
                                     "post_copy_wait_ms", "post_copy_host_ms", "post_copy_dev_ms", "gap_next_ms",
                                     "block_ms", "copy_ms", "nbytes", "copy_wait_dev_ms"])
    g = res.groupby(["width", "mode", "batch"], sort=True)
    agg = g.mean(numeric_only=True)
    agg["blocks"] = g.size()
    tot_s = g["copy_ms"].sum() / 1e3
    agg["copy_GBps"] = (g["nbytes"].sum() / tot_s.where(tot_s > 0)) / 1e9
    agg["non_copy_ms"] = agg["block_ms"] - agg["copy_ms"]
    return agg.reset_index()[list(SPLIT_COLS)]


def report(out: Path) -> str:
    """`summarise` and `split` of ``out``'s tables as text."""
    import pandas as pd

    fmt = lambda v: f"{v:.4f}"
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        sm = summarise(out / "decode_sync.csv").to_string(index=False, float_format=fmt)
        sp = split(out / "decode_sync.csv", out / "decode_timeline.csv").to_string(index=False, float_format=fmt)
    text = f"per-span means per block (host and device ms):\n{sm}\n\nper-block split (ms):\n{sp}\n"
    ps = out / "decode_passes.csv"
    if ps.is_file():
        p = pd.read_csv(ps).groupby(["width", "mode", "batch"])[["plain_ms_per_step", "instrumented_ms_per_step"]]
        text += f"\ndecode ms per step (mean over reps):\n{p.mean().to_string(float_format=fmt)}\n"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--store", type=Path, default=Path("/dev/shm/semoe_diag_store"),
                    help="run-width store (reused if identical: inference_diag's default-seed store of --layers)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--modes", default="expert_nopred,expert")
    ap.add_argument("--widths", default="tiny,run",
                    help="of tiny, run, tiny_wait (tiny with --wait-ms-per-expert of copy-stream delay per copy)")
    ap.add_argument("--wait-ms-per-expert", type=float, default=6.6,
                    help="tiny_wait: copy-stream delay per copied expert (a Mixtral expert at ~53 GB/s: 6.6 ms)")
    ap.add_argument("--pool-slots", type=int, default=12, help="expert slots (12 at 4 blocks: the bench's 24 at 8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--weights-seed", type=int, default=0)
    ap.add_argument("--until-s", type=float, default=150.0, help="start no rep > 0 after this many seconds")
    ap.add_argument("--quick", action="store_true", help="tiny preset on the CPU (CI smoke test)")
    ap.add_argument("--summary", action="store_true", help="print the summary of DIR's tables and exit")
    a = ap.parse_args(argv)
    if a.summary:
        if not (a.out / "decode_sync.csv").is_file():
            print(f"inference_decodeprobe: {a.out / 'decode_sync.csv'} not found", file=sys.stderr)
            return 2
        print(report(a.out), flush=True)
        return 0
    try:
        batches = [int(x) for x in a.batches.split(",")]
    except ValueError:
        batches = []
    modes, widths = a.modes.split(","), a.widths.split(",")
    if a.layers < 1 or a.prompt_len < 1 or a.reps < 1 or a.pool_slots < 1 or not batches or min(batches) < 1:
        print("inference_decodeprobe: --layers, --prompt-len, --reps, --pool-slots and every --batches value must "
              "be >= 1", file=sys.stderr)
        return 2
    if a.gen_len < 2:
        print("inference_decodeprobe: --gen-len must be >= 2 (one decode step at least)", file=sys.stderr)
        return 2
    if not set(modes) <= set(MODES) or not set(widths) <= set(WIDTHS) or a.wait_ms_per_expert < 0:
        print(f"inference_decodeprobe: --modes from {sorted(MODES)}, --widths from {','.join(WIDTHS)}, "
              f"--wait-ms-per-expert >= 0; got {a.modes!r}, "
              f"{a.widths!r}", file=sys.stderr)
        return 2
    import torch

    from reference.inference.bench_probes import (
        PROBE_WIDTHS,
        QUICK_PROBE_WIDTHS,
        probe_spec,
    )
    from reference.inference.build import build_random_store
    from reference.inference.store import ModelStore
    from simulator.workload.inference_diag import probe_model

    dev, spec = probe_model(a.quick, a.layers)
    if a.quick:
        a.prompt_len, a.gen_len, a.reps, a.pool_slots = 8, 3, 1, 6  # 1.5 blocks of the tiny preset's 4 experts
        batches = [1, 2]
        store_dir, tiny_w = a.out / "store", QUICK_PROBE_WIDTHS
    else:
        store_dir, tiny_w = a.store, PROBE_WIDTHS
    a.out.mkdir(parents=True, exist_ok=True)
    for name, cols in (("decode_sync", SYNC_COLS), ("decode_timeline", TL_COLS), ("decode_passes", PASS_COLS)):
        (a.out / f"{name}.csv").write_text(",".join(cols) + "\n")
    t0 = time.perf_counter()
    tiny = (probe_spec(spec, tiny_w), store_dir.with_name(store_dir.name + "_decodetiny"))
    cases = {"tiny": tiny, "tiny_wait": tiny, "run": (spec, store_dir)}
    for width in WIDTHS:
        if width not in widths:
            continue
        sp, d = cases[width]
        log(f"building {sp.name} into {d} on {dev}")
        build_random_store(d, sp, torch.bfloat16, seed=a.weights_seed, gen_device=dev, progress=log)
        store = ModelStore.load(d, progress=log)
        pr = Probe(store, dev, width, a.prompt_len, a.gen_len, a.pool_slots, a.out,
                   a.wait_ms_per_expert if width == "tiny_wait" else 0.0)
        if pr.cycles_per_ms:
            log(f"{width}: {a.wait_ms_per_expert:g} ms of copy-stream delay per copied expert "
                f"({pr.cycles_per_ms:.0f} sleep cycles per ms)")
        for rep in range(a.reps):
            if rep and time.perf_counter() - t0 > a.until_s:
                log(f"{width}: past --until-s {a.until_s:g} s, {rep} reps")
                break
            for mode in modes:
                for B in batches:
                    if rep == 0:
                        pr.warm(mode, B)
                    pr.run(mode, B, rep)
        del pr, store
        if dev == "cuda":
            torch.cuda.empty_cache()
    log(f"done in {time.perf_counter() - t0:.0f} s: {a.out}")
    text = report(a.out)
    (a.out / "summary.txt").write_text(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
