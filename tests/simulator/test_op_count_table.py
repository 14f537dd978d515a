"""simulator.op_count_table: the command line the op-count tables share (check / write, diff, failed jobs), and
the split of simulator.train_op_counts keeping its names."""

from __future__ import annotations

import pytest

from simulator import op_count_table as table


def test_check_or_write_writes_then_checks(tmp_path, capsys):
    out, mem = tmp_path / "sub" / "t.csv", tmp_path / "sub" / "m.csv"
    files = [(out, table.to_csv([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], ("a", "b"))),
             (mem, table.to_csv([{"c": 3}], ("c",)))]
    assert files[0][1] == "a,b\n1,x\n2,y\n"
    assert table.check_or_write("prog", files, check=True) == 1  # nothing committed yet
    assert "differs from the reference code; rerun python -m simulator.prog" in capsys.readouterr().err
    assert table.check_or_write("prog", files, check=False) == 0
    assert capsys.readouterr().out == f"wrote {out} (2 rows), m.csv (1 rows)\n"
    assert out.read_text() == files[0][1] and mem.read_text() == files[1][1]
    assert table.check_or_write("prog", files, check=True) == 0
    assert capsys.readouterr().out == f"prog: {out} and m.csv match the reference code\n"
    assert table.check_or_write("prog", files[:1], check=True) == 0
    assert capsys.readouterr().out == f"prog: {out} matches the reference code\n"
    mem.write_text("c\n4\n")
    assert table.check_or_write("prog", files, check=True) == 1
    assert f"prog: {mem} differs" in capsys.readouterr().err


def test_diff_rows_reports_changed_and_missing_rows():
    a = [{"k": "x", "s": "1", "n": 3, "o": "q"}, {"k": "y", "s": "2", "n": 4, "o": "q"}]
    b = [{"k": "x", "s": "1", "n": "3", "o": "other"}]  # compared as text; column o is not compared
    assert table.diff_rows(a, b, ("k", "s"), ("n",), "/") == ["y/2: [4] vs missing"]
    b[0]["n"] = "5"
    assert table.diff_rows(a, b, ("k", "s"), ("n",), " / ")[0] == "x / 1: [3] vs ['5']"


def test_count_jobs_reports_or_raises(capsys):
    def bad():
        raise ValueError("no")

    jobs = [("one", lambda: [{"r": 1}]), ("two", bad), ("three", lambda: [{"r": 3}])]
    errors: list = []
    assert table.count_jobs("prog", jobs, errors) == [{"r": 1}, {"r": 3}]
    assert errors == ["two: ValueError: no"] and "prog: two: ValueError: no" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no"):
        table.count_jobs("prog", jobs, None)


def test_print_device_diff_against_committed_or_missing_table(tmp_path, capsys):
    committed = tmp_path / "c.csv"
    committed.write_text("k,n\nx,1\n")
    rows = [{"k": "x", "n": 2}]

    def diff(a, b):
        return table.diff_rows(a, b, ("k",), ("n",), "/")

    table.print_device_diff("prog", "cuda", rows, 1.25, "out.csv", committed, diff, "0 failed")
    assert capsys.readouterr().out == ("prog: cuda: 1 rows in 1.2 s -> out.csv; 1 differ from c.csv; 0 failed\n"
                                       "  x: [2] vs ['1']\n")
    table.print_device_diff("prog", "cuda", rows, 1.0, "out.csv", tmp_path / "none.csv", diff, "0 failed")
    assert "1 differ from none.csv" in capsys.readouterr().out


def test_train_op_counts_keeps_the_names_of_its_parts():
    from simulator import train_op_counts as TC
    from simulator import train_op_rates, train_op_record, train_op_step

    for mod in (train_op_record, train_op_step, train_op_rates):
        names = [n for n, v in vars(mod).items() if getattr(v, "__module__", mod.__name__) == mod.__name__
                 and not n.startswith("__") and n not in ("annotations", "dataclass")]
        assert names
        missing = [n for n in names if getattr(TC, n, None) is not getattr(mod, n)]
        assert not missing, f"{mod.__name__}: {missing} not re-exported by simulator.train_op_counts"
