"""Pre-flight of a job graph (:mod:`orchestrate.jobs`): every job that would run is checked before
any job starts or is submitted, and every problem is reported at once, grouped by cause.

For each job, its own stage's ``parse_config(argv)`` reads the argv (unknown keys, wrong types,
bad values); then each input the stage lists with ``input_checks(cfg)`` (``core.stage_inputs``:
data roots, split files, class lists, mask-shape sources, checkpoints) is checked by the stage's
own check (the one its ``main`` makes), except what the graph writes itself (a pretext run folder
read by a transfer job) and a built-in mini-VOC root that the pipeline generates before the jobs
start. The SLURM executor adds its cluster checks (:func:`orchestrate.slurm.check_cluster`).

    problems = check_jobs(jobs, produced={j.run_dir for j in all_jobs}, source=profile.path)
    if problems:
        print(report(problems, profile.path, len(jobs), "nothing was started"), file=sys.stderr)
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import subprocess
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from core.cli import USER_ERRORS
from core.config import ConfigError
from core.data import is_builtin_root


@dataclass(frozen=True)
class Problem:
    cause: str  # a key of CAUSES
    path: str  # the file or folder to fix
    message: str  # the stage's (or the SLURM command's) own words
    job: str = ""  # the job it stops (its name)
    key: str = ""  # the config key that names ``path``


# Report order and headings.
CAUSES = {
    "config": "configs (each job's argv as its stage's parse_config reads it)",
    "missing": "missing files and folders",
    "unusable": "present but unusable",
    "cluster": "cluster",
}


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _found_by_a_job(name: str) -> bool:
    """Whether ``python -m name``, started with this environment as the executors start a job,
    finds the module (its PYTHONPATH may hold folders this process does not search)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)"
    return subprocess.run([sys.executable, "-c", probe, name], capture_output=True).returncode == 0


def stage_module(name: str) -> ModuleType | str | None:
    """The stage module ``name``, imported; None for a module without a top-level
    ``parse_config`` (a plain script: it does its work when imported, so it is only run, never
    imported here) or one that only a job's own process finds; a message when there is none."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        if _found_by_a_job(name):
            return None
        return f"module {name!r} not found (python -m {name} would fail)"
    if spec.origin.endswith(".py"):
        tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
        if not any(isinstance(n, ast.FunctionDef) and n.name == "parse_config" for n in tree.body):
            return None
    return importlib.import_module(name)


def _written_by_graph(path: str, produced: Collection[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == d or path.startswith(d + os.sep) for d in produced)


def _cause(path: str, err: BaseException) -> str:
    if isinstance(err, ConfigError) and not path:
        return "config"
    if path and not Path(path).exists():
        return "missing"
    return "config" if isinstance(err, ConfigError) else "unusable"


def check_job(
    module: ModuleType, job: Any, produced: Collection[str], source: str
) -> list[Problem]:
    """The problems of one job: its argv through ``module.parse_config``, then its inputs."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage line: the report says it
            cfg = module.parse_config(list(job.argv))
    except USER_ERRORS as err:
        return [Problem("config", source, one_line(err), job.name)]
    problems = []
    for item in getattr(module, "input_checks", lambda cfg: [])(cfg):
        path = os.path.normpath(item.path) if item.path else ""
        generated = path and is_builtin_root(path) and not Path(path).exists()
        if generated or (path and _written_by_graph(path, produced)):
            continue
        try:
            item.check()
        except USER_ERRORS as err:
            problems.append(Problem(_cause(path, err), path, one_line(err), job.name, item.key))
    return problems


def check_jobs(jobs: Iterable[Any], produced: Collection[str], source: str) -> list[Problem]:
    """The problems of ``jobs`` (:class:`orchestrate.jobs.Job`); ``produced``: the run folders the
    graph writes (not checked: they do not exist yet); ``source``: the profile, named for argv
    problems."""
    produced = {os.path.normpath(d) for d in produced}
    modules: dict[str, ModuleType | str | None] = {}
    problems = []
    for job in jobs:
        if job.module not in modules:
            modules[job.module] = stage_module(job.module)
        module = modules[job.module]
        if isinstance(module, str):
            problems.append(Problem("config", source, module, job.name, "module"))
        elif module is not None:
            problems += check_job(module, job, produced, source)
    return problems


def _jobs_text(jobs: list[str]) -> str:
    jobs = list(dict.fromkeys(j for j in jobs if j))
    if not jobs:
        return ""
    shown = ", ".join(jobs[:2]) + (f" and {len(jobs) - 2} more" if len(jobs) > 2 else "")
    return f"{len(jobs)} job{'s' if len(jobs) > 1 else ''}: {shown}"


def _reason(problem: Problem) -> str:
    prefix = f"{problem.path}: "
    return problem.message[len(prefix) :] if problem.message.startswith(prefix) else problem.message


def report(problems: list[Problem], source: str, n_jobs: int, outcome: str) -> str:
    """The problems grouped by cause, each path (missing / unusable) or message (config,
    cluster) once with the jobs it stops. One problem: one line, ``error: <path>: <message>``."""
    entries: dict[str, dict[str, dict[str, list[str]]]] = {c: {} for c in CAUSES}
    for p in problems:
        if p.cause in ("missing", "unusable"):
            reason = f"{p.key}: {_reason(p)}" if p.key else _reason(p)
            entries[p.cause].setdefault(p.path, {}).setdefault(reason, []).append(p.job)
        else:
            entries[p.cause].setdefault(p.message, {}).setdefault("", []).append(p.job)
    count = sum(len(e) for e in entries.values())
    if count == 1:
        p = problems[0]
        jobs = _jobs_text([q.job for q in problems])
        return f"error: {p.path}: {_reason(p)}" + (f" [{jobs}]" if jobs else "") + f"; {outcome}"
    lines = [f"error: {source}: {count} problems in the {n_jobs} jobs to run; {outcome}"]
    for cause, heading in CAUSES.items():
        if not entries[cause]:
            continue
        where = {p.path for p in problems if p.cause == cause} if cause == "cluster" else set()
        lines.append(f"  {heading}{' ' + ', '.join(sorted(where)) if where else ''}:")
        for head, reasons in entries[cause].items():
            if cause in ("missing", "unusable"):
                lines.append(f"    {head}")
                for reason, jobs in reasons.items():
                    lines.append(f"        {reason} [{_jobs_text(jobs)}]")
            else:
                jobs = _jobs_text(reasons[""])
                lines.append(f"    {head}" + (f" [{jobs}]" if jobs else ""))
    return "\n".join(lines)
