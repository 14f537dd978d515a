"""Mixture-of-Students distillation (reference/distill.py) on CPU with `tiny` (E=4 -> 2)."""

from __future__ import annotations

import csv

import pytest
import torch
import typer
from typer.testing import CliRunner

from reference.data import ByteCorpus
from reference.distill import (
    DistillConfig,
    distill,
    group_experts,
    kd_loss,
    merge_into_student,
    routing_similarity,
    routing_stats,
    split_corpus,
    student_spec,
)
from reference.model import MoEDecoder
from semoe.presets import model_preset


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the other test workers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_group_experts_hand_worked():
    sim = torch.tensor([[1.0, 0.1, 0.9, 0.0],
                        [0.1, 1.0, 0.2, 0.8],
                        [0.9, 0.2, 1.0, 0.1],
                        [0.0, 0.8, 0.1, 1.0]])
    assert group_experts(sim, 2) == [[0, 2], [1, 3]]
    assert group_experts(sim, 4) == [[0], [1], [2], [3]]
    assert group_experts(sim, 1) == [[0, 1, 2, 3]]
    # the size cap ceil(E/G): 0, 1, 2 all alike, but a group holds at most 2 of 4
    alike = torch.ones(4, 4)
    alike[3, :3] = alike[:3, 3] = 0.0
    assert sorted(map(len, group_experts(alike, 2))) == [2, 2]
    with pytest.raises(ValueError, match="groups"):
        group_experts(sim, 5)


def test_kd_loss_zero_on_equal_logits_and_scaled_by_T2():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    assert float(kd_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1).flatten(0, 1), t.log_softmax(-1).flatten(0, 1),
                                     log_target=True, reduction="batchmean")
    assert float(kd_loss(s, t, 1.0)) == pytest.approx(float(ref), rel=1e-5)


def test_config_and_spec_errors():
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(experts=2, alpha=1.5)
    with pytest.raises(ValueError, match="merge"):
        DistillConfig(experts=2, merge="kmeans")
    with pytest.raises(ValueError, match="must be <= the teacher's experts"):
        student_spec(model_preset("tiny"), 8)


def test_merge_with_singleton_groups_reproduces_the_teacher(one_thread):
    """E_small = E: every group is one expert, so the student is the teacher (same logits)."""
    spec = model_preset("tiny")
    teacher = MoEDecoder(spec, seed=3).eval()
    cfg = DistillConfig(experts=4, calib_batches=1)
    train, _ = split_corpus(ByteCorpus(), cfg.heldout_frac)
    stats = routing_stats(teacher, train, cfg)
    groups = [group_experts(routing_similarity(layer, st, "coact"), 4) for layer, st in
              zip(teacher.moe_layers(), stats)]
    assert groups == [[[0], [1], [2], [3]]] * len(groups)
    usage = [st["selected_TE"].sum(0) for st in stats]
    assert all(int(u.sum()) == cfg.batch_size * cfg.seq_len * spec.top_k for u in usage)
    student = merge_into_student(teacher, student_spec(spec, 4), groups, usage).eval()
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(student(x).logits_BSV, teacher(x).logits_BSV)
    # two groups: experts and router rows are usage-weighted averages
    student2 = merge_into_student(teacher, student_spec(spec, 2), [[[0, 1], [2, 3]]] * 2, usage)
    w = usage[0].double() + 1
    lt, ls = teacher.moe_layers()[0], student2.moe_layers()[0]
    want = (w[2] * lt.experts.w1_EDF[2].double() + w[3] * lt.experts.w1_EDF[3].double()) / (w[2] + w[3])
    torch.testing.assert_close(ls.experts.w1_EDF[1].double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student2.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)


def test_distilled_student_beats_scratch_from_a_train_dir(tmp_path, one_thread):
    """`semoe train --out DIR --checkpoint-every N` teacher -> `semoe distill` (E=4 -> 2): the distilled
    student's held-out loss is below the same-size student trained from scratch for the same steps."""
    from reference.cli import register as register_train
    from reference.distill_cli import register as register_distill

    app = typer.Typer()
    register_train(app)
    register_distill(app)
    app.command("noop")(lambda: None)  # a second command so that typer keeps subcommand names
    runner = CliRunner()
    tdir = tmp_path / "teacher"
    r = runner.invoke(app, ["train", "--preset", "tiny", "--steps", "150", "--out", str(tdir), "--device", "cpu",
                            "--checkpoint-every", "150", "--quiet"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "distill"
    r = runner.invoke(app, ["distill", "--teacher", str(tdir), "--experts", "2", "--steps", "60",
                            "--teacher-steps", "0", "--out", str(out), "--eval-batches", "4"])
    assert r.exit_code == 0, r.output
    assert "checkpoint" in r.output and "distilled" in r.output and "scratch" in r.output
    rows = {row["model"]: row for row in csv.DictReader((out / "distill.csv").open())}
    assert set(rows) == {"teacher", "teacher_int8", "teacher_fp8", "merged_init", "distilled", "scratch",
                         "merged_lm", "teacher_plus"}
    loss = {k: float(v["heldout_loss"]) for k, v in rows.items()}
    assert loss["distilled"] < loss["scratch"] - 0.03, loss
    assert loss["teacher"] < 3.6  # the checkpoint was loaded (an untrained model is at ~5.5)
    assert int(rows["distilled"]["experts"]) == 2 and int(rows["teacher"]["experts"]) == 4
    assert rows["teacher"]["device"] == "cpu" and rows["teacher"]["commit"]


def test_teacher_dir_without_checkpoint_needs_teacher_steps(tmp_path):
    """A `semoe train --out` directory without checkpoints: the teacher must be trained here."""
    model_preset("tiny").to_yaml(tmp_path / "model.yaml")
    with pytest.raises(ValueError, match="no checkpoint"):
        distill(str(tmp_path), DistillConfig(experts=2, teacher_steps=0, steps=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.yaml"):
        distill(str(tmp_path / "empty"), DistillConfig(experts=2))
