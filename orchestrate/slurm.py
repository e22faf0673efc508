"""The SLURM executor of the job graph (:mod:`orchestrate.jobs`), through submitit.

Jobs that wait for nothing just submitted go in job arrays (one per set of resources); a job that
waits for jobs submitted or still running gets ``--dependency=afterok:<ids>`` with
``--kill-on-invalid-dep=yes`` (a failed upstream cancels it instead of leaving it pending; jobs
share an array only when they wait for the very same jobs, since SLURM applies a dependency, and
its cancellation, to a whole array). Only missing or failed jobs are submitted; one whose
dependency failed or is unknown waits for a later submit. Each job is ``StageJob(module, argv)``:
on the time-limit / preemption signal submitit calls its ``checkpoint()``, which requeues the same
call, and the stage resumes from its own checkpoint in its run folder. A job's id, log and
submitit result pickle are kept in its ``run.json``; its state comes from sacct (through
submitit), else squeue, else that pickle (:func:`orchestrate.jobs.job_state`).

Before anything is submitted, :func:`check_cluster` asks SLURM whether it would take each set of
resources (sinfo, ``sbatch --test-only``). A SLURM command that cannot reach the controller or
refuses (no controller, unknown partition / account, a time over the partition's limit) is a
:class:`ClusterError`: one line with the command's own message and the cluster file to fix; the
jobs submitted before a refused submission keep their ``run.json`` records.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cli import UserError
from orchestrate.jobs import (
    SUBMITIT_DEFAULT_TIMEOUT_MIN,
    Job,
    State,
    job_state,
    read_run_json,
    write_run_json,
)
from orchestrate.preflight import Problem, one_line

TO_SUBMIT = ("missing", "failed", "blocked")
COMMAND_TIMEOUT_S = 120  # SLURM's commands retry an unreachable controller for up to a minute


class ClusterError(UserError):
    """A SLURM command that cannot reach the controller or refuses; the message names the
    cluster file to fix and quotes the command's own words."""


def cluster_file(cluster: str | None) -> str:
    """The file to fix in a message about the cluster."""
    return cluster or "(no cluster file: give one with --cluster FILE)"


def _command(argv: list[str]) -> tuple[int, str, str]:
    """(return code, stdout, stderr on one line) of a SLURM command; 127 when it is missing."""
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{argv[0]}: no answer within {COMMAND_TIMEOUT_S} s"
    return run.returncode, run.stdout, " ".join(run.stderr.split())


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


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """``logger``'s warnings left out while inside."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _squeue(cluster: str | None = None) -> dict[str, str]:
    """Job id ("12" or "12_3") -> state of this user's jobs still in the queue; ClusterError when
    squeue cannot answer (sacct did not know these jobs either)."""
    code, out, err = _command(["squeue", "--me", "-h", "-r", "-o", "%i %T"])
    if code != 0:
        raise ClusterError(
            f"{cluster_file(cluster)}: cannot read the state of the submitted jobs (sacct does "
            f"not know them): {err or f'squeue exited with {code}'}"
        )
    return dict(line.split()[:2] for line in out.splitlines() if line.strip())


def scheduler_states(
    records: dict[str, dict[str, Any]], cluster: str | None = None
) -> dict[str, str]:
    """Run dir -> SLURM state of its job: one sacct call (submitit's watcher), squeue for what
    sacct does not know (no accounting, or not recorded yet)."""
    import submitit

    jobs = {
        d: submitit.SlurmJob(folder=r["folder"], job_id=r["job_id"]) for d, r in records.items()
    }
    # a failing sacct (no accounting) is no error: squeue answers for what it does not know
    with _quiet(logging.getLogger("submitit")):
        if jobs:
            submitit.SlurmJob.watcher.update()  # now, not after submitit's adaptive delay
        states = {d: job.state.split()[0] for d, job in jobs.items()}  # "CANCELLED by 0"
    if "UNKNOWN" in states.values():
        queued = _squeue(cluster)
        for d, state in states.items():
            if state == "UNKNOWN" and records[d]["job_id"] in queued:
                states[d] = queued[records[d]["job_id"]]
    return states


def states(jobs: list[Job], cluster: str | None = None) -> dict[str, State]:
    """Run dir -> state of every job; a local run that did not finish counts as missing."""
    records = {j.run_dir: read_run_json(j.run_dir) for j in jobs}
    slurm = {d: r for d, r in records.items() if r.get("executor") == "slurm"}
    queue = scheduler_states(slurm, cluster)
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


def _executor(folder: str | Path, name: str, resources: dict[str, Any]):
    """submitit's SLURM executor for one group (files in ``folder/<job id>``)."""
    import submitit

    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster="slurm")
    executor.update_parameters(name=name, **resources)
    return executor


def submit(
    jobs: list[Job],
    state: dict[str, State],
    folder: str | Path,
    name: str,
    dry_run: bool = False,
    out=None,
    only: list[str] | None = None,
    cluster: str | None = None,
) -> list[Group]:
    """Submit the missing / failed jobs (``state``: :func:`states`); submitit files in ``folder``.

    A refused submission is a ClusterError (sbatch's message, the ``cluster`` file to fix); the
    groups submitted before it keep their records, so the next run shows them and waits for them.
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError

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
        task = group.jobs[0].task
        try:
            # submitit prints sbatch's complaint itself before raising it: it is in our one line
            with contextlib.redirect_stderr(io.StringIO()):
                executor = _executor(folder, f"{name}.{task}", resources)
                with executor.batch():
                    submitted = [
                        executor.submit(StageJob(j.module, list(j.argv))) for j in group.jobs
                    ]
        except (FailedJobError, FailedSubmissionError, OSError) as err:
            before = sum(len(gr.jobs) for gr in groups[:g])
            kept = (
                f"the {before} job(s) submitted before it are recorded in their run.json: run the "
                "same command again to see them and submit the rest"
                if before
                else "nothing was submitted"
            )
            unsure = isinstance(err, FailedSubmissionError)  # sbatch answered, unreadably
            raise ClusterError(
                f"{cluster_file(cluster)}: sbatch {'answered' if unsure else 'refused'} "
                f"{len(group.jobs)} {task} job(s) ({one_line(err)})"
                + ("; they may have been submitted: check squeue" if unsure else "")
                + f"; {kept}"
            ) from None
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


def _minutes(limit: str) -> float | None:
    """sinfo's time limit (``infinite``, ``30:00``, ``2:00:00``, ``1-12:00:00``) in minutes."""
    if limit in ("infinite", "n/a", ""):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(x) for x in clock.split(":")]  # H:MM:SS, MM:SS or minutes alone
    hours, minutes, seconds = [0] * (3 - len(parts)) + parts if len(parts) > 1 else (0, *parts, 0)
    return (int(days or 0) * 24 + hours) * 60 + minutes + seconds / 60


def check_cluster(jobs: list[Job], cluster: str | None, name: str) -> list[Problem]:
    """Would SLURM take ``jobs``? Asked before anything is submitted: SLURM is installed and its
    controller answers (sinfo), each set of resources passes submitit's parameter check, its time
    fits its partition's limit (sinfo: a cluster that does not enforce it at submission would
    leave the job pending for ever), and ``sbatch --test-only`` takes the job script submitit
    would submit (unknown partition, account, QOS, GRES, memory). No job is submitted."""
    where = cluster_file(cluster)
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(json.dumps(job.resources, sort_keys=True), []).append(job)

    def problem(message: str, members: list[Job]) -> list[Problem]:
        return [Problem("cluster", where, message, j.name) for j in members]

    if not jobs:
        return []
    missing = [c for c in ("sbatch", "sinfo", "srun") if shutil.which(c) is None]
    if missing:
        return problem(
            f"{', '.join(missing)} not found: this machine is not a SLURM submit host", jobs
        )
    code, out, err = _command(["sinfo", "-h", "-o", "%P|%l"])
    if code != 0:
        return problem(
            f"the SLURM controller does not answer: {err or f'sinfo: exit {code}'}", jobs
        )
    limits, default = {}, None
    for line in out.splitlines():
        partition, _, limit = line.strip().partition("|")
        if partition.endswith("*"):
            partition = default = partition[:-1]
        limits[partition] = _minutes(limit)
    problems: list[Problem] = []
    with tempfile.TemporaryDirectory(prefix="ce-preflight-") as tmp:
        for members in groups.values():
            resources = members[0].resources
            partition = resources.get("slurm_partition") or default
            asked = resources.get("timeout_min", SUBMITIT_DEFAULT_TIMEOUT_MIN)
            limit = limits.get(partition)
            if limit is not None and asked > limit:
                problems += problem(
                    f"timeout_min={asked} is over the time limit of partition {partition} "
                    f"({limit:g} min, sinfo): lower it or choose another partition",
                    members,
                )
            try:
                executor = _executor(tmp, f"{name}.{members[0].task}", resources)
            except (ValueError, NameError, AssertionError) as err:  # submitit's parameter check
                problems += problem(f"submitit refuses {resources}: {one_line(err)}", members)
                continue
            script = Path(tmp) / "job.sh"
            # the very script submitit would hand to sbatch (its text, through its executor)
            script.write_text(executor._executor._make_submission_file_text("true", "preflight"))
            code, _, err = _command(["sbatch", "--test-only", str(script)])
            if code != 0:
                problems += problem(f"sbatch --test-only refuses {resources}: {err}", members)
    return problems


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
