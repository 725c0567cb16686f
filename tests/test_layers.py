"""The floors of docs/design.md §3, checked by import-linter against the real import graph.

`lint-imports` also runs in `.ci/run`; this test keeps a local `pytest` run honest too, and
checks that a violation (here a lazy import inside a function) is caught, not ignored.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))

pytestmark = pytest.mark.skipif(not Path(LINT).exists(), reason="import-linter is in the test extra")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=240,
                          env={"PYTHONPATH": str(cwd), "PATH": str(Path(LINT).parent)})


def test_every_contract_is_kept():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_a_lazy_upward_import_breaks_the_floors(tmp_path: Path):
    for pkg in ("packers", "strategies", "balancer", "dataloader", "hydraulis"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.parquet"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "balancer" / "fit.py", "a") as f:
        f.write("\n\ndef _sneaky():\n    import dataloader  # a lazy arrow from floor 3 up to floor 4\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "balancer.fit -> dataloader" in res.stdout


def test_package_faces_give_functions_not_submodules():
    """`from balancer import dispatch` is the function even after `balancer.stage1` (the module) was imported."""
    code = (
        "import balancer.selector, balancer.simulation, balancer.validation, types\n"
        "from balancer import dispatch, simulate, validate\n"
        "assert not any(isinstance(f, types.ModuleType) for f in (dispatch, simulate, validate)), (dispatch, simulate)\n"
        "import balancer.stage1 as mod; assert isinstance(mod, types.ModuleType)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_no_import_circles_between_modules():
    """No module imports (directly or through others) a module that imports it back."""
    grimp = pytest.importorskip("grimp")  # comes with import-linter
    graph = grimp.build_graph("packers", "strategies", "balancer", "dataloader", "hydraulis")
    circles = sorted(
        {
            tuple(sorted((module, imported)))
            for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.find_shortest_chain(importer=imported, imported=module)
        }
    )
    assert circles == []
