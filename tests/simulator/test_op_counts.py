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
