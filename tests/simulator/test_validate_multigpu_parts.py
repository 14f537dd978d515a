"""simulator.validate_multigpu is split by concept (code: simulator.validate_multigpu_model, _collectives,
_workloads): every name a part defines is the top module's same object, and no part imports the top module."""

import ast
import importlib
from pathlib import Path

import pytest

from simulator import validate_multigpu as V

PARTS = ("model", "collectives", "workloads")
SIM = Path(V.__file__).resolve().parent


def _defined(mod: str) -> list[str]:
    """Top-level functions, classes and assigned names of ``simulator.validate_multigpu_<mod>``."""
    tree = ast.parse((SIM / f"validate_multigpu_{mod}.py").read_text())
    names = []
    for n in tree.body:
        if isinstance(n, ast.FunctionDef | ast.ClassDef):
            names.append(n.name)
        elif isinstance(n, ast.Assign):
            names += [t.id for t in n.targets if isinstance(t, ast.Name)]
    return names


@pytest.mark.parametrize("mod", PARTS)
def test_every_name_of_a_part_is_re_exported_as_the_same_object(mod):
    part = importlib.import_module(f"simulator.validate_multigpu_{mod}")
    names = _defined(mod)
    assert len(names) >= 10
    missing = [n for n in names if getattr(V, n, None) is not getattr(part, n)]
    assert missing == [], f"not re-exported by simulator.validate_multigpu: {missing}"


@pytest.mark.parametrize("mod", PARTS)
def test_parts_do_not_import_the_top_module(mod):
    tree = ast.parse((SIM / f"validate_multigpu_{mod}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "simulator.validate_multigpu" not in imported
    # the model part is the base: it imports no other part
    if mod == "model":
        assert not any(str(m).startswith("simulator.validate_multigpu_") for m in imported)


def test_top_module_keeps_only_the_driver():
    """What the top module defines itself: the rules (its docstring), `PARTS`, `rows`, `summary`, `main`."""
    own = {n for n, v in vars(V).items() if callable(v) and getattr(v, "__module__", "") == V.__name__}
    assert own == {"rows", "summary", "_part", "main"}
    assert "**Link calibration**" in V.__doc__ and V.PARTS["collectives.csv"] is V.collective_rows
