"""Imports go stage -> core, never core -> stage, and stages never import each other: they meet only
through run folders and checkpoints (issue 12, item 5)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretext", "transfer", "eval", "slurm")


def imported_packages(path: Path) -> set[str]:
    """Top-level package names imported anywhere in ``path`` (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_oracle_sees_a_function_level_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\ndef f():\n    from eval.tables import x\n")
    assert imported_packages(src) == {"os", "eval"}


@pytest.mark.parametrize("package", ("core", *STAGES))
def test_imports_follow_the_layers(package):
    allowed_others = set() if package == "core" else {"core"}
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_packages(path) & ({"core", *STAGES} - {package} - allowed_others):
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)
