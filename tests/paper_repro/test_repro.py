"""paper_repro modules of issue 9 and `semoe repro`: quick mode once into a tmp folder (~6 s on 2 cores),
then the CSV schemas, PNGs, report, paper_vs_sim rows and CLI wiring."""

from __future__ import annotations

import csv
import importlib
import shutil
from pathlib import Path

import pytest

from paper_repro import common
from paper_repro.repro import MODULES, SUMMARY, md_table, run_all

NAMES = [m.name for m in MODULES] + [SUMMARY.name]
NEW = ("training_throughput", "alltoall_hierarchical", "inference_throughput", "ring_memory", "paper_vs_sim")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("repro")
    lines: list[str] = []
    run_all(d, quick=True, log=lines.append)
    assert any(line.startswith("report:") for line in lines)
    return d


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


@pytest.mark.parametrize("name", NAMES)
def test_each_module_writes_its_csv_schema_and_a_png(out, name):
    mod = importlib.import_module(f"paper_repro.{name}")
    header, rows = _rows(out / f"{name}.csv")
    assert rows, f"{name}.csv is empty"
    expected = list(mod.COLUMNS)
    if name in NEW:
        expected += [c for c in common.META_COLUMNS if c not in expected]
    assert header == expected
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    assert not list(out.glob("*.tmp")), "a temp file was left behind"


@pytest.mark.parametrize("name", NEW)
def test_new_modules_carry_run_metadata(out, name):
    _, rows = _rows(out / f"{name}.csv")
    for r in rows:
        assert r["commit"] and r["date"].endswith("Z") and "cpu" in r["device"] and r["simpy"] not in ("", "absent")


@pytest.mark.parametrize("name", NAMES)
def test_plot_reads_only_the_csv(out, tmp_path, name):
    mod = importlib.import_module(f"paper_repro.{name}")
    csv_copy = tmp_path / f"{name}.csv"
    shutil.copy(out / f"{name}.csv", csv_copy)
    png = mod.plot(csv_copy)
    assert Path(png).parent == tmp_path and Path(png).read_bytes()[:8] == PNG_MAGIC


def test_report_links_every_figure_with_a_mark(out):
    text = (out / "report.md").read_text()
    for name in NAMES:
        assert f"({name}.png)" in text and f"({name}.csv)" in text
    assert "quick run" in text
    for mark in ("extrapolated", "not measurable"):
        assert mark in text


def test_training_plans_rule_and_ablation(out):
    _, rows = _rows(out / "training_throughput.csv")
    plans = {r["plan"] for r in rows}
    assert {"deepspeed", "semoe-offload", "semoe-gpu", "semoe", "deepspeed+prefetch"} <= plans
    for r in rows:
        assert float(r["tokens_per_s"]) > 0 and float(r["peak_hbm_GB"]) > 0
        if r["plan"] == "semoe":  # the rule: experts on the GPU whenever that fits HBM
            assert r["plan_source"] == "rule: semoe-gpu" and r["expert_params_tier"] == "gpu" and not r["oom"]
        if r["plan"] == "semoe-offload":
            assert r["expert_params_tier"] == "cpu" and r["expert_optimizer_tier"] == "ssd"
    assert {r["experiment"] for r in rows} == {"sweep", "whatif", "ablation"}


def test_alltoall_hierarchical_beats_flat_when_nics_are_scarce_or_flat_is_not_slower_on_a_full_fat_tree(out):
    _, rows = _rows(out / "alltoall_hierarchical.csv")
    coll = [r for r in rows if r["part"] == "collective"]
    assert {r["algo"] for r in coll} == {"flat", "hetu", "rail"}
    t = {(r["whatif"], r["algo"], float(r["bytes_per_rank"])): float(r["a2a_time_s"]) for r in coll}
    big = max(k[2] for k in t)
    assert t[("", "hetu", big)] > t[("", "flat", big)]  # one leader NIC per node: the hotspot
    train = [r for r in rows if r["part"] == "training"]
    assert train and all(0 < float(r["a2a_s"]) < float(r["step_time_s"]) for r in train)
    assert abs(float(train[0]["params_B"]) - 80.7) < 1.0


def test_inference_multi_gpu_rows_are_not_measurable_without_numbers(out):
    _, rows = _rows(out / "inference_throughput.csv")
    multi = [r for r in rows if r["part"] == "paper" and r["gpus"] in ("8", "16")]
    assert len(multi) == 4
    for r in multi:
        assert r["status"].startswith("not measurable") and r["tokens_per_s"] == "" and r["step_time_s"] == ""
    one = [r for r in rows if r["part"] == "paper" and r["gpus"] == "1"]
    assert one and all(float(r["tokens_per_s"]) > 0 for r in one)
    whatif_ds = [r for r in rows if r["part"] == "whatif" and r["system"] == "deepspeed"]
    assert whatif_ds and all("too small" in r["oom"] for r in whatif_ds)  # 104B does not fit one GPU


def test_ring_memory_saves_hbm_and_overlap_is_not_slower(out):
    _, rows = _rows(out / "ring_memory.csv")
    by = {(r["model"], r["batch"], r["variant"]): r for r in rows}
    for (m, b, v), r in by.items():
        if v.startswith("ring"):
            assert float(r["peak_hbm_GB"]) <= 40.0 and float(r["hbm_saved_GB"]) > 0
            assert float(r["prefill_slowdown"]) >= 1.0
    for (m, b, v), r in by.items():
        if v == "ring, overlap":
            assert float(r["prefill_s"]) <= float(by[(m, b, "ring K=1, no overlap")]["prefill_s"])


def test_paper_vs_sim_lists_the_headline_claims(out):
    _, rows = _rows(out / "paper_vs_sim.csv")
    claims = {r["claim"]: r for r in rows}
    assert claims["training throughput SE-MoE vs DeepSpeed"]["paper_value"] == "33.0"
    float(claims["training throughput SE-MoE vs DeepSpeed"]["sim_value"])  # a number, not "not modelled"
    assert claims["UFO elastic training throughput vs unbalanced"]["paper_value"] == "64.0"
    multi = [r for c, r in claims.items() if c.startswith("inference") and "A100-80G" in c and r["sim_value"] == "not modelled"]
    assert len(multi) == 2 and all(r["basis"] == "not measurable" for r in multi)
    assert {r["basis"] for r in rows} <= {"analytic", "calibrated", "extrapolated", "not measurable"}
    assert float(claims["GPT-MoE params, 64 experts"]["sim_value"]) == pytest.approx(104.1, abs=0.1)


def test_write_csv_is_atomic(tmp_path):
    p = tmp_path / "x.csv"
    common.write_csv(p, [{"a": 1}], ["a"])
    with pytest.raises(AttributeError):
        common.write_csv(p, [{"a": 2}, object()], ["a"])  # fails mid-write: the old file stays
    header, rows = _rows(p)
    assert rows == [{**{c: "" for c in header}, "a": "1"}]
    assert not list(tmp_path.glob("*.tmp"))


def test_md_table_formats_and_escapes():
    t = md_table([{"a": 1.23456, "b": "x|y", "c": float("nan")}], ["a", "b", "c"])
    assert t.splitlines()[2] == "| 1.235 | x/y |  |"


def test_cli_registers_repro(monkeypatch, tmp_path):
    import typer
    from typer.testing import CliRunner

    from paper_repro import repro
    from paper_repro.cli import register

    seen = {}
    monkeypatch.setattr(repro, "run_all", lambda out, quick=False, log=print: seen.update(out=out, quick=quick))
    app = typer.Typer()
    register(app)

    @app.command("other")
    def _other() -> None:  # a second command so that typer keeps subcommand names
        pass

    res = CliRunner().invoke(app, ["repro", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen == {"out": tmp_path, "quick": True}


def test_module_main_runs_quick(tmp_path, capsys):
    from paper_repro import ring_memory

    assert ring_memory.main(["--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ring_memory.png").exists() and "wrote" in capsys.readouterr().out
