"""``python -m reference.distill`` (the GPU distillation command) in its --quick CPU form, and the
expert grouping's dead-end case."""

from __future__ import annotations

import csv

import torch

from reference.distill import CSV_COLUMNS, _packable, group_experts, main


def test_group_experts_avoids_dead_end():
    """8 experts into 2 groups of <= 4: greedy merging must not reach sizes 3, 3, 2 (no admissible merge)."""
    torch.manual_seed(0)
    for _ in range(20):
        x = torch.randn(8, 5)
        sim = torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1)
        groups = group_experts(sim, 2)
        assert sorted(len(g) for g in groups) == [4, 4]
        assert sorted(e for g in groups for e in g) == list(range(8))
    assert _packable([3, 3, 2], 2, 4) is False and _packable([4, 2, 2], 2, 4) is True


def test_distill_command_quick(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "distill.csv").open()))
    assert list(rows[0]) == list(CSV_COLUMNS)
    models = [r["model"] for r in rows]
    assert models[0] == "teacher" and {"distilled", "scratch", "merged_init", "teacher_int8", "teacher_fp8"} <= set(models)
    loss = {r["model"]: float(r["heldout_loss"]) for r in rows}
    assert loss["distilled"] < loss["merged_init"]  # training the student lowers its held-out loss
    assert int(next(r for r in rows if r["model"] == "teacher")["experts"]) == 8
    assert int(next(r for r in rows if r["model"] == "distilled")["experts"]) == 2
