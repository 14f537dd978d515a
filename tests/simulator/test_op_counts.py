"""simulator.op_counts: the committed host-program table matches the reference code, and the counts
depend on the code path, not on the sizes."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from simulator import op_counts
from simulator.workload.inference_host import OP_COUNTS, host_program


def test_committed_table_matches_reference_code(capsys):
    assert op_counts.main(["--check"]) == 0, capsys.readouterr().err


def _rows(spec, paths, tmp_path):
    d = tmp_path / spec.name
    op_counts.build_store(str(d), spec)
    return [op_counts.count_path(q, m, p, str(d)) for q, m, p in paths]


def test_counts_do_not_depend_on_sizes(tmp_path):
    paths = [("none", "expert", "decode"), ("int8", "ring", "prefill"), ("fp8", "resident", "decode")]
    small = op_counts.tiny_spec(hidden=64, ffn=128, layers=2)
    big = op_counts.tiny_spec(hidden=128, ffn=256, layers=3).replace(name="tiny-mixtral-big")
    a, b = _rows(small, paths, tmp_path), _rows(big, paths, tmp_path)
    assert a == b
    # ... but they do depend on the code path: quantised experts add dequantisation, expert-aware a fetch
    assert {r["segment"] for r in a[1]} >= {"copy_block", "dequant_block"}
    assert any(r["marker"] == "fetch" for r in a[0])


def test_host_program_from_table():
    dec = host_program(None, "resident", "decode", OP_COUNTS)
    pre = host_program(None, "resident", "prefill", OP_COUNTS)
    exp = host_program(None, "expert", "decode", OP_COUNTS)
    assert 50 < dec.block_kernels < 150 and dec.block_syncs >= 3
    assert exp.block_syncs > dec.block_syncs  # unique + the remap's bincount
    assert exp.unit("copy_expert") == 3 and host_program("int8", "expert", "decode").unit("copy_expert") == 6
    assert pre.kernels(8) == pre.embedding + 8 * pre.block_kernels + pre.head
    assert host_program("fp8", "ring", "decode").unit("dequant_block") > 0
    assert host_program(None, "ring", "decode").unit("dequant_block") == 0


def test_diff_and_device_check_guard(tmp_path, capsys):
    a = [{"quant": "none", "mode": "ring", "phase": "decode", "segment": "moe_0", "kernels": 6, "syncs": 1, "sync_op": "aten.bincount",
              "marker": ""}]
    b = [dict(a[0], kernels=7)]
    assert op_counts.diff(a, a) == [] and len(op_counts.diff(a, b)) == 1
    assert len(op_counts.diff(a, [])) == 1
    assert op_counts.main(["--device", "cuda", "--out", str(OP_COUNTS)]) == 2  # never overwrites the table


def test_gpu_simulation_reads_the_cuda_counts(tmp_path, monkeypatch):
    """The simulated GPU is a CUDA GPU: the CUDA-measured counts, the CPU table for paths not measured."""
    from semoe import SpecError
    from simulator.workload import inference_host as H

    cuda = host_program(None, "resident", "decode")
    cpu = host_program(None, "resident", "decode", device="cpu")
    assert cuda.source == H.OP_COUNTS_CUDA.name and cpu.source == OP_COUNTS.name
    assert cuda.block[0].name == "attention" and cuda.block[0].kernels < cpu.block[0].kernels  # SDPA on CUDA
    assert cuda.block_syncs == cpu.block_syncs
    with pytest.raises(SpecError, match="device"):
        host_program(None, "ring", "decode", device="tpu")
    # a path the CUDA table lacks falls back to the CPU table, whole
    rows = [r for r in H.OP_COUNTS_CUDA.read_text().splitlines() if not r.startswith("int8,")]
    part = tmp_path / "op_counts_cuda.csv"
    part.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(H, "OP_COUNTS_CUDA", part)
    assert host_program("int8", "ring", "prefill").source == OP_COUNTS.name
    assert host_program("fp8", "ring", "prefill").source == part.name
    monkeypatch.setattr(H, "OP_COUNTS_CUDA", tmp_path / "missing.csv")  # no CUDA table: the CPU one
    assert host_program(None, "ring", "decode").source == OP_COUNTS.name


def test_cuda_table_has_the_cpu_tables_paths_and_segments():
    """Same paths, segments, markers and sync points as the CPU table (only kernel counts differ), so a
    per-path fallback never mixes two different programs and the CUDA table is complete."""
    import csv

    from simulator.workload.inference_host import OP_COUNTS_CUDA

    def load(p):
        with p.open(newline="") as f:
            return {(r["quant"], r["mode"], r["phase"], r["segment"]): (r["syncs"], r["sync_op"], r["marker"])
                    for r in csv.DictReader(f)}

    cpu, cuda = load(OP_COUNTS), load(OP_COUNTS_CUDA)
    assert cpu.keys() == cuda.keys()
    assert {k: v for k, v in cpu.items() if k[3] != "predict"} == {k: v for k, v in cuda.items() if k[3] != "predict"}


def test_simulated_resident_decode_uses_fewer_cuda_kernels():
    from semoe import cluster_preset
    from semoe.presets import model_preset
    from simulator.workload.inference import InferConfig, simulate_inference

    m = model_preset("mixtral-8x7b").replace(layers=2)
    cfg = InferConfig(mode="resident", batch=1, prompt_len=16, gen_len=3)
    _, cuda = simulate_inference(m, cluster_preset("h100-single"), cfg, trace=False)
    _, cpu = simulate_inference(m, cluster_preset("h100-single"), cfg, trace=False, counts_device="cpu")
    assert cuda.decode_s < cpu.decode_s  # host-bound decode: fewer counted kernels per step
