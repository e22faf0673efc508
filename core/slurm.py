"""The SLURM executor of the job graph (:mod:`core.jobs`), through submitit.

Jobs that wait for nothing just submitted go in job arrays (one per set of resources); a job that
waits for jobs submitted or still running gets ``--dependency=afterok:<ids>`` with
``--kill-on-invalid-dep=yes`` (a failed upstream cancels it instead of leaving it pending; jobs
share an array only when they wait for the very same jobs, since SLURM applies a dependency, and
its cancellation, to a whole array). Only missing or failed jobs are submitted; one whose
dependency failed or is unknown waits for a later submit. Each job is ``StageJob(module, argv)``:
on the time-limit / preemption signal submitit calls its ``checkpoint()``, which requeues the same
call, and the stage resumes from its own checkpoint in its run folder. A job's id, log and
submitit result pickle are kept in its ``run.json``; its state comes from sacct (through
submitit), else squeue, else that pickle (:func:`core.jobs.job_state`).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.jobs import Job, State, job_state, read_run_json, write_run_json

TO_SUBMIT = ("missing", "failed", "blocked")


class StageJob:
    """``StageJob("pretext.train", ["--config", "...", "run_dir=..."])()`` runs one stage.

    Picklable (only the module name and argv travel to the node); the module is imported on the
    node, so the submitting process needs none of the stage's dependencies. Every task of a
    multi-task job runs it; rank and world size come from the SLURM environment, read by the stage.
    """

    def __init__(self, module: str, argv: list[str]) -> None:
        self.module = module
        self.argv = list(argv)

    def __call__(self) -> dict[str, float]:
        stage = importlib.import_module(self.module)
        return stage.main(stage.parse_config(self.argv))

    def checkpoint(self):
        import submitit

        # Called by submitit on the time-limit / preemption signal. The stage checkpoints into its
        # run folder by itself, so requeuing the same call is enough to resume from there.
        return submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"StageJob({self.module!r}, {self.argv!r})"


def _squeue() -> dict[str, str]:
    """Job id ("12" or "12_3") -> state of this user's jobs still in the queue."""
    try:
        run = subprocess.run(["squeue", "--me", "-h", "-r", "-o", "%i %T"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = run.stdout.splitlines() if run.returncode == 0 else []
    return dict(line.split()[:2] for line in lines if line.strip())


def scheduler_states(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Run dir -> SLURM state of its job: one sacct call (submitit's watcher), squeue for what
    sacct does not know (no accounting, or not recorded yet)."""
    import submitit

    jobs = {
        d: submitit.SlurmJob(folder=r["folder"], job_id=r["job_id"]) for d, r in records.items()
    }
    if jobs:
        submitit.SlurmJob.watcher.update()  # now, not after submitit's adaptive delay
    states = {d: job.state.split()[0] for d, job in jobs.items()}  # "CANCELLED by 0"
    if "UNKNOWN" in states.values():
        queued = _squeue()
        for d, state in states.items():
            if state == "UNKNOWN" and records[d]["job_id"] in queued:
                states[d] = queued[records[d]["job_id"]]
    return states


def states(jobs: list[Job]) -> dict[str, State]:
    """Run dir -> state of every job; a local run that did not finish counts as missing."""
    records = {j.run_dir: read_run_json(j.run_dir) for j in jobs}
    slurm = {d: r for d, r in records.items() if r.get("executor") == "slurm"}
    queue = scheduler_states(slurm)
    out = {d: job_state(d, queue.get(d)) for d in records}
    for d, state in out.items():
        if d not in slurm and state.state != "done":
            out[d] = State("failed" if state.state == "failed" else "missing", state.reason)
    return out


@dataclass
class Group:
    """One submission: jobs with the same resources waiting for the same jobs (one array)."""

    jobs: list[Job]
    resources: dict[str, Any]
    after: tuple[str, ...] = ()  # run dirs of the jobs these wait for
    ids: list[str] = field(default_factory=list)


def plan(
    jobs: list[Job], state: dict[str, State], only: list[str] | None = None
) -> tuple[list[Group], list[Job]]:
    """(groups to submit in order, jobs held back because a dependency failed or is unknown);
    ``only``: submit jobs of these stages only."""
    level: dict[str, int] = {}  # run dir -> submission round, for jobs submitted now
    groups: dict[tuple[int, str, tuple[str, ...]], Group] = {}
    held = []
    for job in jobs:  # dependencies first
        if state[job.run_dir].state not in TO_SUBMIT or (only and job.stage not in only):
            continue
        after, rank = [], 0
        for dep in job.deps:
            dep_state = state[dep]
            if dep in level:
                after.append(dep)
                rank = max(rank, level[dep] + 1)
            elif dep_state.state in ("pending", "running"):
                after.append(dep)
            elif dep_state.state != "done":
                held.append(job)
                break
        else:
            level[job.run_dir] = rank
            key = (rank, json.dumps(job.resources, sort_keys=True), tuple(after))
            groups.setdefault(key, Group([], job.resources, tuple(after))).jobs.append(job)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])], held


def submit(
    jobs: list[Job],
    state: dict[str, State],
    folder: str | Path,
    name: str,
    dry_run: bool = False,
    out=None,
    only: list[str] | None = None,
) -> list[Group]:
    """Submit the missing / failed jobs (``state``: :func:`states`); submitit files in ``folder``."""
    import submitit

    out = out or sys.stdout
    groups, held = plan(jobs, state, only)
    by_dir = {j.run_dir: j for j in jobs}
    ids = {d: s.job_id for d, s in state.items() if s.state in ("pending", "running")}
    for job in held:
        print(f"  held     {job.name}: a dependency failed or is unknown", file=out)
    for g, group in enumerate(groups):
        waits = [ids.get(d, f"<{by_dir[d].name}>") for d in group.after]
        resources = dict(group.resources)
        if waits:
            extra = dict(resources.get("slurm_additional_parameters") or {})
            extra.update(dependency="afterok:" + ":".join(waits), kill_on_invalid_dep="yes")
            resources["slurm_additional_parameters"] = extra
        head = f"  [{g}] {len(group.jobs)} job(s)" + (f" after {', '.join(waits)}" if waits else "")
        if dry_run:
            print(f"{head}, resources {group.resources}", file=out)
            for job in group.jobs:
                print(f"      {job.name}: python -m {job.module} {' '.join(job.argv)}", file=out)
            continue
        executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
        executor.update_parameters(name=f"{name}.{group.jobs[0].task}", **resources)
        with executor.batch():
            submitted = [executor.submit(StageJob(j.module, list(j.argv))) for j in group.jobs]
        for job, sub in zip(group.jobs, submitted):
            ids[job.run_dir] = sub.job_id
            group.ids.append(sub.job_id)
            write_run_json(
                job, "submitted", executor="slurm", job_id=sub.job_id, folder=str(sub.paths.folder),
                log=str(sub.paths.stdout), stderr=str(sub.paths.stderr),
                result_pickle=str(sub.paths.result_pickle), submitted=time.time(),
            )  # fmt: skip
        print(f"{head}: job(s) {', '.join(group.ids)}", file=out, flush=True)
    return groups


def print_status(jobs: list[Job], state: dict[str, State], out=None, all_jobs=True) -> None:
    """One line per job (or per job not done), then the totals."""
    out = out or sys.stdout
    counts: dict[str, int] = {}
    for job in jobs:
        s = state[job.run_dir]
        counts[s.state] = counts.get(s.state, 0) + 1
        if s.state == "done" and not all_jobs:
            continue
        line = f"  {s.state:8s} {job.name:55s}"
        if s.job_id:
            line += f" job {s.job_id} ({s.scheduler_state})"
        if s.state != "done" and s.log:
            line += f" log {s.log}"
        print(line + (f" [{s.reason}]" if s.reason else ""), file=out)
    print("  total: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), file=out)
