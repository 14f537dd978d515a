"""reference.offload.bench_loop: the training loop that bench_cases.run_case and bench_2d.run_case share (the timed
steps and the time budget, the step rows, the metrics of the step times, the micro-batches' accumulated gradients);
and the split modules' re-exports (engine, host_probe)."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from reference.offload import bench_loop


def test_timed_steps_budget_counts_only_from_the_first_timed_step():
    calls, hooks = [], []
    budget = iter([-1.0, 5.0, -1.0])  # asked at steps 2, 3, 4 (never during the warm-up steps 0 and 1)

    def train_step() -> float:
        calls.append(len(calls))
        return 0.5

    times, rows = bench_loop.timed_steps(train_step, 6, 2, lambda: next(budget), 10.0, hooks.append)
    # the warm-up steps run whatever the budget; it is first asked at step 2, already gone: nothing timed
    assert calls == [0, 1] and times == [] and hooks == [0, 1, 2]
    budget = iter([5.0, 5.0, -1.0])
    hooks.clear()
    times, rows = bench_loop.timed_steps(lambda: 0.25, 6, 2, lambda: next(budget), 0.0, hooks.append)
    assert hooks == [0, 1, 2, 3, 4] and len(times) == 2 and all(t >= 0 for t in times)
    assert [(r.micro_batch, r.phase, r.layer, r.resource) for r in rows] == [(s, "step", -1, "compute") for s in range(4)]
    assert all(0 <= r.start_s <= r.end_s for r in rows) and rows[0].end_s <= rows[1].start_s


def test_step_metrics_median_order_and_no_step():
    res = bench_loop.step_metrics([0.3, 0.1, 0.2], 2, 4, 8, cuda=False, build_s=1.5)
    assert list(res) == ["step_ms", "tokens_per_s", "build_s", "steps", "micro_batches"]
    assert res["step_ms"] == pytest.approx(200.0) and res["tokens_per_s"] == pytest.approx(2 * 4 * 8 / 0.2)
    assert (res["steps"], res["micro_batches"], res["build_s"]) == (3, 2, 1.5)
    assert list(bench_loop.step_metrics([0.1], 1, 1, 1, cuda=False)) == ["step_ms", "tokens_per_s", "steps",
                                                                          "micro_batches"]
    with pytest.raises(RuntimeError, match="no step measured"):
        bench_loop.step_metrics([], 1, 1, 1, cuda=False)


def test_micro_batches_accumulate_the_mean_gradient_of_the_drawn_tokens():
    V, B, S, M = 11, 2, 5, 3
    emb = torch.nn.Embedding(V, 1)
    model = lambda x, y: SimpleNamespace(loss=(emb(x).squeeze(-1) * (y + 1)).sum())
    before = []
    out = bench_loop.micro_batches(model, SimpleNamespace(vocab=V), B, S, M, torch.device("cpu"), None,
                                   torch.Generator().manual_seed(3), before=before.append)
    assert before == [0, 1, 2]
    want = torch.zeros(V)
    gen = torch.Generator().manual_seed(3)
    for _ in range(M):  # the same draws: d loss / d emb[v] = sum of (target + 1) where the input is v, / M
        x = torch.randint(0, V, (B, S + 1), generator=gen)
        want.index_add_(0, x[:, :-1].reshape(-1), (x[:, 1:] + 1).reshape(-1).float() / M)
    torch.testing.assert_close(emb.weight.grad.squeeze(-1), want)
    assert out.loss.requires_grad


def test_case_device_on_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert bench_loop.case_device() == (False, torch.device("cpu"))


@pytest.mark.parametrize("module", ["reference.offload.engine", "reference.offload.host_probe"])
def test_split_modules_re_export_their_public_names(module):
    m = importlib.import_module(module)
    for name in m.__all__:
        obj = getattr(m, name)
        home = getattr(obj, "__module__", None)
        if home and home.startswith("reference.offload.") and home != module:  # the re-export is the same object
            assert getattr(importlib.import_module(home), name) is obj, name
    assert m.__all__ and len(set(m.__all__)) == len(m.__all__)
