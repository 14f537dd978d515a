"""The training loop that the offload benches' cases share: `reference.offload.bench_cases.run_case` (one case of
`reference.offload.bench`) and `reference.offload.bench_2d.run_case` (ZeRO-3 + offloaded experts at world size
1). Each case builds its model and its ``train_step`` (they differ: engine or gradient sync, clipping, hooks);
this module holds what they do alike: the case's device (`case_device`), one step's micro-batches
(`micro_batches`), the timed steps with their ``step`` trace rows (`timed_steps`), the metrics of the step times
(`step_metrics`) and freeing the case's memory (`release`)."""

from __future__ import annotations

import gc
import statistics
import time

import torch

from reference.offload.bench_rows import GB, log


def case_device() -> tuple[bool, torch.device]:
    """``(cuda, device)`` of a case (CUDA when there is one), with CUDA's peak-memory counter reset so that each
    case reports its own peak."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return cuda, device


def micro_batches(model, spec, batch: int, seq: int, micro: int, device: torch.device, amp, gen, before=None):
    """Forward and backward of ``micro`` micro-batches of ``batch`` random sequences of ``seq`` tokens (drawn from
    ``gen``; next-token targets), under autocast to ``amp`` (None: off), each loss scaled by 1 / ``micro`` so that
    the accumulated gradients are the step's mean; ``before(m)`` runs before micro-batch ``m``. Returns the last
    micro-batch's output."""
    for m in range(micro):
        if before is not None:
            before(m)
        x = torch.randint(0, spec.vocab, (batch, seq + 1), device=device, generator=gen)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x[:, :-1], x[:, 1:])
        (out.loss / micro).backward()
    return out


def timed_steps(train_step, n_steps: int, first_timed: int, time_left, t_origin: float,
                before_step=None) -> tuple[list[float], list]:
    """Steps ``0 .. n_steps - 1`` of ``train_step`` (returns the loss as a float, which synchronises), each logged:
    ``before_step(step)`` runs first; from step ``first_timed`` on the loop stops once ``time_left()`` is negative
    and the step's wall time counts. Returns ``(times, step_rows)``: the counted steps' seconds and a ``step``
    `semoe.trace.TraceRow` per step run (micro_batch column = step, times from ``t_origin``)."""
    from semoe.trace import TraceRow

    times: list[float] = []
    step_rows: list = []
    for step in range(n_steps):
        if before_step is not None:
            before_step(step)
        if step >= first_timed and time_left() < 0:
            break
        t0 = time.perf_counter()
        loss = train_step()
        t1 = time.perf_counter()
        if step >= first_timed:
            times.append(t1 - t0)
        step_rows.append(TraceRow(0, -1, step, "step", t0 - t_origin, t1 - t_origin, 0, 0, "compute"))
        log(f"    step {step}: {1e3 * (t1 - t0):.1f} ms, loss {loss:.4f}")
    return times, step_rows


def step_metrics(times: list[float], micro: int, batch: int, seq: int, cuda: bool,
                 build_s: float | None = None) -> dict:
    """The case's metrics from its counted step times: step_ms (median), tokens_per_s, build_s (when given),
    steps, micro_batches and, on CUDA, peak_mem_gb (since `case_device`). Raises when no step was counted."""
    if not times:
        raise RuntimeError("no step measured within the time budget")
    med = statistics.median(times)
    res = {"step_ms": 1e3 * med, "tokens_per_s": micro * batch * seq / med}
    if build_s is not None:
        res["build_s"] = build_s
    res.update(steps=len(times), micro_batches=micro)
    if cuda:
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated() / GB
    return res


def release(cuda: bool) -> None:
    """Free what a finished (or failed) case left: a garbage collection, then CUDA's cached blocks."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
