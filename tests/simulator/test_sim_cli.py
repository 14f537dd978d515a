"""`semoe simulate`: files written, YAML inputs, one-line errors naming the field."""

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from semoe import plan_preset
from simulator.cli import register


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)

    @a.command("noop")
    def _noop() -> None:  # a second command keeps `simulate` a named subcommand
        pass

    return a


def invoke(app, *args):
    return CliRunner().invoke(app, ["simulate", *args])


def test_simulate_writes_outputs(app, tmp_path):
    out = tmp_path / "o"
    r = invoke(app, "--model", "tiny", "--cluster", "dgx-a100-80g", "--nodes", "2", "--plan", "semoe",
               "--skew", "1.0", "--seq-len", "64", "--out", str(out))
    assert r.exit_code == 0, r.output
    s = pd.read_csv(out / "summary.csv")
    assert len(s) == 1
    for col in ("step_time_s", "tokens_per_s", "peak_hbm_bytes", "peak_dram_bytes", "peak_ssd_bytes"):
        assert col in s.columns and s[col].iloc[0] >= 0
    assert s["routing"].iloc[0] == "zipf"
    b = pd.read_csv(out / "breakdown.csv")
    assert len(b) == 16 and {"compute_s", "comm_s", "copy_s", "idle_s"} <= set(b.columns)
    for f in ("trace.json", "trace.csv", "breakdown.png", "memory.png"):
        assert (out / f).stat().st_size > 0


def test_simulate_accepts_yaml_files(app, tmp_path):
    from semoe import cluster_preset, model_preset

    m, c = tmp_path / "m.yaml", tmp_path / "c.yaml"
    model_preset("tiny").to_yaml(m)
    cluster_preset("dgx-a100-40g", 1).to_yaml(c)
    p = tmp_path / "p.yaml"
    plan_preset("deepspeed", 8, 4).to_yaml(p)
    r = invoke(app, "--model", str(m), "--cluster", str(c), "--plan", str(p), "--seq-len", "64",
               "--backend", "flow", "--out", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output


def test_bad_values_name_the_field(app, tmp_path):
    from semoe import SpecError

    r = invoke(app, "--model", "tiny", "--cluster", "dgx-a100-80g", "--plan", "nope", "--out", str(tmp_path))
    assert isinstance(r.exception, SpecError) and "plan" in str(r.exception)
    r = invoke(app, "--model", "tiny", "--cluster", "dgx-a100-80g", "--plan", "semoe", "--backend", "x", "--out", str(tmp_path))
    assert r.exit_code == 2 and "backend" in r.output
    r = invoke(app, "--model", "tiny", "--cluster", "dgx-a100-80g", "--plan", "semoe", "--skew", "-1", "--out", str(tmp_path))
    assert isinstance(r.exception, SpecError) and "skew" in str(r.exception)
