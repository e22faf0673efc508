"""Submit a sweep to SLURM (or run it locally), show each cell's state, resubmit what is missing.

    python -m slurm.sweep submit SWEEP.yaml [--cluster slurm|local] [--dry-run]
    python -m slurm.sweep status SWEEP.yaml
    python -m slurm.sweep results SWEEP.yaml      # one JSON line per finished cell

A cell of a stage is done when ``<run dir>/result.json`` exists. Job ids and log paths of every
submission are kept in ``<runs_root>/<name>/.sweep/jobs.json``; submitit's pickles and logs in
``<runs_root>/<name>/.submitit/<stage>/<job id>/``. ``submit`` only (re)submits cells that are
missing or failed. The root stage's cells go in one job array; each cell of a dependent stage is
one job waiting for its own upstream cell (``afterok:<array>_<task>``, or none when that cell is
done), with ``kill-on-invalid-dep`` so that a failed upstream cancels it instead of leaving it
pending forever (and the next ``submit`` resubmits both).
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from core.atomic_io import atomic_write_text
from core.cli import ArgumentParser
from slurm.launcher import CLUSTERS, StageJob, make_executor
from slurm.sweep_file import (
    Cell,
    Stage,
    Sweep,
    expand_grid,
    load_cluster,
    load_sweep,
    run_dir,
    stage_argv,
    stage_resources,
)

# SLURM states in which a job still may finish by itself (sacct/squeue spelling).
ACTIVE_STATES = {
    "PENDING": "pending",
    "REQUEUED": "pending",
    "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending",
    "RESV_DEL_HOLD": "pending",
    "CONFIGURING": "running",
    "RUNNING": "running",
    "COMPLETING": "running",
    "RESIZING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
    "SUSPENDED": "running",
}
RESUBMIT = ("missing", "failed")
SUBMIT_GRACE_S = 30  # a job may take this long to show up in sacct/squeue


@dataclass
class CellStatus:
    """State of one (stage, cell): done | pending | running | failed | missing | unknown."""

    stage: str
    cell: str
    state: str
    run_dir: Path
    job_id: str | None = None
    scheduler_state: str | None = None
    log: str | None = None
    reason: str | None = None


@dataclass
class Task:
    stage: Stage
    cell: Cell
    run_dir: Path
    argv: list[str]


@dataclass
class Dependency:
    """``afterok`` on a job id already known, or on task ``index`` of plan group ``group``."""

    kind: str
    job_id: str | None = None
    group: int | None = None
    index: int | None = None


@dataclass
class Group:
    """One submission: the tasks of one stage that share one dependency (one job array)."""

    stage: Stage
    tasks: list[Task]
    dependency: Dependency | None = None
    jobs: list[Any] = field(default_factory=list)


def sweep_dir(sweep: Sweep, runs_root: Path) -> Path:
    return runs_root / sweep.name


def records_path(sweep: Sweep, runs_root: Path) -> Path:
    return sweep_dir(sweep, runs_root) / ".sweep" / "jobs.json"


def submitit_folder(sweep: Sweep, runs_root: Path, stage: str) -> Path:
    return sweep_dir(sweep, runs_root) / ".submitit" / stage / "%j"


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text()) if path.exists() else {}


def save_records(path: Path, records: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1, sort_keys=True))


def _local_alive(pid: str) -> bool:
    try:
        cmdline = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"submitit" in cmdline


def _job_outcome(record: dict[str, Any]) -> tuple[str, str] | None:
    """("success"|"error", text) from submitit's result pickle, or None while it is absent."""
    paths = submitit.core.utils.JobPaths(record["folder"], job_id=record["job_id"])
    if not paths.result_pickle.exists():
        return None
    try:
        with open(paths.result_pickle, "rb") as f:
            kind, payload = pickle.load(f)
    except Exception as err:  # a half-written or foreign pickle is not a verdict
        return ("error", f"unreadable result pickle {paths.result_pickle}: {err}")
    return kind, str(payload)


def _squeue_states() -> dict[str, str]:
    """Job id ("12" or "12_3") -> state of this user's jobs still in the queue."""
    try:
        run = subprocess.run(
            ["squeue", "--me", "-h", "-r", "-o", "%i %T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return (
        dict(line.split()[:2] for line in run.stdout.splitlines() if line.strip())
        if run.returncode == 0
        else {}
    )


def scheduler_states(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Key -> SLURM state: one sacct call for all slurm jobs (through submitit's watcher), squeue
    for those sacct does not know (no accounting, or not recorded yet)."""
    slurm_jobs = {
        key: submitit.SlurmJob(folder=rec["folder"], job_id=rec["job_id"])
        for key, rec in records.items()
        if rec["cluster"] == "slurm"
    }
    if slurm_jobs:
        submitit.SlurmJob.watcher.update()  # now, not after submitit's adaptive delay
    states = {key: job.state.split()[0] for key, job in slurm_jobs.items()}  # "CANCELLED by 0"
    if "UNKNOWN" in states.values():
        queued = _squeue_states()
        for key, state in states.items():
            if state == "UNKNOWN" and records[key]["job_id"] in queued:
                states[key] = queued[records[key]["job_id"]]
    for key, rec in records.items():
        if rec["cluster"] == "local":
            states[key] = "RUNNING" if _local_alive(rec["job_id"]) else "UNKNOWN"
    return states


def cell_status(
    stage: str,
    cell: str,
    directory: Path,
    record: dict[str, Any] | None,
    scheduler_state: str | None,
) -> CellStatus:
    status = CellStatus(stage=stage, cell=cell, state="missing", run_dir=directory)
    if (directory / "result.json").exists():
        status.state = "done"
    if record is None:
        return status
    status.job_id, status.log = record["job_id"], record.get("stdout")
    status.scheduler_state = scheduler_state
    if status.state == "done":
        return status
    if scheduler_state in ACTIVE_STATES:
        status.state = ACTIVE_STATES[scheduler_state]
        return status
    outcome = _job_outcome(record)
    if outcome is not None and outcome[0] == "error":
        status.state = "failed"
        status.reason = outcome[1].strip().splitlines()[-1] if outcome[1].strip() else "error"
    elif outcome is not None:
        status.state, status.reason = "failed", "the stage returned without writing result.json"
    elif scheduler_state == "UNKNOWN" and time.time() - record.get("submitted", 0) < SUBMIT_GRACE_S:
        status.state, status.reason = "pending", "just submitted, not in sacct/squeue yet"
    elif scheduler_state == "UNKNOWN" and record["cluster"] == "slurm":
        # sacct has no record of it (no accounting, or purged): not provably dead, not resubmitted.
        status.state, status.reason = "unknown", "no job state from sacct"
    else:
        status.state, status.reason = "failed", f"job ended {scheduler_state} without a result"
    return status


def sweep_status(sweep: Sweep, runs_root: Path) -> dict[tuple[str, str], CellStatus]:
    records = load_records(records_path(sweep, runs_root))
    states = scheduler_states(records)
    out = {}
    for stage in sweep.stages:
        for cell in expand_grid(sweep.grid):
            key = f"{stage}/{cell.name}"
            directory = run_dir(runs_root, sweep.name, stage, cell.name)
            out[stage, cell.name] = cell_status(
                stage, cell.name, directory, records.get(key), states.get(key)
            )
    return out


def plan(sweep: Sweep, statuses: dict[tuple[str, str], CellStatus], runs_root: Path) -> list[Group]:
    """Groups to submit, in order, for the cells whose state is missing or failed."""
    groups: list[Group] = []
    new: dict[
        tuple[str, str], tuple[int, int]
    ] = {}  # (stage, cell) -> (group, index) submitted now
    for stage in sweep.stages.values():
        todo = [
            Task(stage, cell, run_dir(runs_root, sweep.name, stage.name, cell.name), [])
            for cell in expand_grid(sweep.grid)
            if statuses[stage.name, cell.name].state in RESUBMIT
        ]
        for task in todo:
            task.argv = stage_argv(sweep, stage, task.cell, runs_root)
        if stage.after is None:
            if todo:
                groups.append(Group(stage, todo))
            _note_new(new, groups)
            continue
        waiting_on_new: list[tuple[tuple[int, int], Task]] = []
        by_job: dict[str | None, list[Task]] = {}
        for task in todo:
            upstream = (stage.after, task.cell.name)
            if upstream in new:
                waiting_on_new.append((new[upstream], task))
                continue
            up = statuses[upstream]
            if up.state == "done":
                by_job.setdefault(None, []).append(task)
            elif up.state in ("pending", "running"):
                by_job.setdefault(up.job_id, []).append(task)
            # else: upstream failed/unknown and not resubmitted now: the cell waits for a later submit.
        for job_id, tasks in by_job.items():
            dep = Dependency("afterok", job_id=job_id) if job_id else None
            groups.append(Group(stage, tasks, dep))
        # One job per cell: SLURM applies a dependency (and kill-on-invalid-dep) to a whole array,
        # so an `aftercorr` array would be cancelled entirely, running tasks included, when one
        # upstream task fails (measured on Slurm 22.05).
        for (g, i), task in waiting_on_new:
            groups.append(Group(stage, [task], Dependency("afterok", group=g, index=i)))
        _note_new(new, groups)
    return groups


def _note_new(new: dict[tuple[str, str], tuple[int, int]], groups: list[Group]) -> None:
    for g, group in enumerate(groups):
        for i, task in enumerate(group.tasks):
            new.setdefault((group.stage.name, task.cell.name), (g, i))


def dependency_text(dep: Dependency | None, groups: list[Group]) -> str | None:
    """The sbatch --dependency value; jobs not yet submitted show as <stage#group[index]>."""
    if dep is None:
        return None
    if dep.job_id is not None:
        return f"{dep.kind}:{dep.job_id}"
    up = groups[dep.group]
    if up.jobs:
        return f"{dep.kind}:{up.jobs[dep.index].job_id}"
    return f"{dep.kind}:<{up.stage.name}#{dep.group}[{dep.index}]>"


def submit(
    sweep: Sweep,
    cluster: str,
    runs_root: Path,
    cluster_file: Path | None = None,
    dry_run: bool = False,
    out=sys.stdout,
) -> list[Group]:
    """Submit (or, local, run to the end) the missing/failed cells; returns the groups."""
    cluster_cfg = load_cluster(cluster_file or sweep.cluster_file)
    statuses = sweep_status(sweep, runs_root)
    groups = plan(sweep, statuses, runs_root)
    skipped = sum(s.state not in RESUBMIT for s in statuses.values())
    print(
        f"sweep {sweep.name}: {sum(len(g.tasks) for g in groups)} cells to submit, {skipped} done or in flight",
        file=out,
    )
    path = records_path(sweep, runs_root)
    records = load_records(path)
    for g, group in enumerate(groups):
        resources = stage_resources(group.stage, cluster_cfg)
        dep = dependency_text(group.dependency, groups)
        head = f"[{g}] {group.stage.name}: {len(group.tasks)} cell(s)" + (
            f", dependency {dep}" if dep else ""
        )
        if dry_run:
            print(f"{head}, resources {resources}", file=out)
            for task in group.tasks:
                print(f"    {task.cell.name}: {group.stage.module} {' '.join(task.argv)}", file=out)
            continue
        if cluster == "local" and not _upstream_done(group):
            print(f"{head}: skipped, upstream result missing", file=out)
            continue
        if dep and cluster == "slurm":
            extra = dict(resources.get("slurm_additional_parameters") or {})
            extra.update(dependency=dep, kill_on_invalid_dep="yes")
            resources = {**resources, "slurm_additional_parameters": extra}
        folder = submitit_folder(sweep, runs_root, group.stage.name)
        executor = make_executor(cluster, folder, resources)
        executor.update_parameters(name=f"{sweep.name}.{group.stage.name}")
        for task in group.tasks:
            write_run_record(sweep, task)
        with executor.batch():
            group.jobs = [
                executor.submit(StageJob(group.stage.module, t.argv)) for t in group.tasks
            ]
        print(f"{head}: job(s) {', '.join(j.job_id for j in group.jobs)}", file=out)
        for task, job in zip(group.tasks, group.jobs):
            records[f"{group.stage.name}/{task.cell.name}"] = {
                "job_id": job.job_id,
                "cluster": cluster,
                "folder": str(folder),
                "stdout": str(job.paths.stdout),
                "stderr": str(job.paths.stderr),
                "submitted": time.time(),
            }
            print(f"    {task.cell.name}: job {job.job_id}, log {job.paths.stdout}", file=out)
        save_records(path, records)
        if cluster == "local":  # no scheduler to hold dependents back: run each group to the end
            for job in group.jobs:
                job.wait()
    return groups


def write_run_record(sweep: Sweep, task: Task) -> None:
    """``run.json``: what this run folder is, for the table builder (eval.tables.collect_runs)."""
    task.run_dir.mkdir(parents=True, exist_ok=True)
    values = task.cell.values
    variant = ",".join(f"{k}={v}" for k, v in values.items() if k != "seed") or "default"
    record = {
        "stage": task.stage.table.get("stage", task.stage.name),
        "task": task.stage.table.get("task", task.stage.name),
        "variant": variant,
        "seed": values.get("seed", 0),
        "module": task.stage.module,
        "argv": task.argv,
        "sweep": sweep.name,
        "cell": task.cell.name,
    }
    atomic_write_text(task.run_dir / "run.json", json.dumps(record, indent=1))


def _upstream_done(group: Group) -> bool:
    if group.stage.after is None:
        return True
    return all(
        (t.run_dir.parent.parent / group.stage.after / t.cell.name / "result.json").exists()
        for t in group.tasks
    )


def collect_results(sweep: Sweep, runs_root: Path) -> list[dict[str, Any]]:
    """One row per finished cell: sweep, stage, cell, the cell's grid values, then its metrics."""
    rows = []
    for stage in sweep.stages:
        for cell in expand_grid(sweep.grid):
            result = run_dir(runs_root, sweep.name, stage, cell.name) / "result.json"
            if result.exists():
                rows.append(
                    {
                        "sweep": sweep.name,
                        "stage": stage,
                        "cell": cell.name,
                        **cell.values,
                        **json.loads(result.read_text()),
                    }
                )
    return rows


def print_status(statuses: dict[tuple[str, str], CellStatus], out=sys.stdout) -> None:
    counts: dict[str, int] = {}
    for s in statuses.values():
        counts[s.state] = counts.get(s.state, 0) + 1
        job = f"job {s.job_id} ({s.scheduler_state})" if s.job_id else "-"
        line = f"{s.stage:<12} {s.cell:<40} {s.state:<8} {job}"
        if s.state != "done" and s.log:
            line += f"  log {s.log}"
        if s.reason:
            line += f"  [{s.reason}]"
        print(line, file=out)
    print("total: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())), file=out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m slurm.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("submit", "status", "results"))
    parser.add_argument("sweep_file", type=Path)
    parser.add_argument("--cluster", choices=CLUSTERS, default="slurm")
    parser.add_argument(
        "--cluster-file", type=Path, default=None, help="overrides the sweep's cluster_file"
    )
    parser.add_argument("--runs-root", type=Path, default=Path("runs"), help="default: ./runs")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, submit nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sweep = load_sweep(args.sweep_file)
    runs_root = args.runs_root.resolve()
    if args.command == "submit":
        submit(sweep, args.cluster, runs_root, args.cluster_file, args.dry_run)
    elif args.command == "status":
        print_status(sweep_status(sweep, runs_root))
    else:
        for row in collect_results(sweep, runs_root):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
