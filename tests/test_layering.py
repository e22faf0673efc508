"""Imports go stage -> core, never core -> stage, and stages never import each other: they meet only
through run folders and checkpoints (issue 12, item 5). Orchestration (profiles, job graph,
executors, report) imports core only: it starts the stages by module name (``python -m <module>``,
submitit's call of ``importlib.import_module(job.module)``), never by an import (issue 28, item 3)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretext", "transfer", "eval")
# package -> the project's packages it may import
ALLOWED = {
    "core": set(),
    **{stage: {"core"} for stage in STAGES},
    "orchestrate": {"core"},
    "bench": {"core", *STAGES},
}


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


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_packages(path) & (set(ALLOWED) - {package} - ALLOWED[package]):
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_orchestration_starts_stages_by_a_jobs_module_name_only():
    """Its only dynamic imports take a name from a job (or a profile), never a literal stage."""
    calls = []
    for path in sorted((ROOT / "orchestrate").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                calls.append((path.name, ast.unparse(node.args[0])))
    assert calls and all(not arg.startswith(("'", '"')) for _, arg in calls), calls


def test_the_slurm_folder_holds_cluster_files_not_code():
    assert not list((ROOT / "slurm").rglob("*.py"))
    assert list((ROOT / "slurm" / "clusters").glob("*.yaml"))
