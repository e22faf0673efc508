"""The dry run of a job graph (:mod:`orchestrate.jobs`): each job's stage, run folder, dependencies,
resources and state, then the totals and the GPU-hours the jobs to run ask for. It reads run
folders (and, for the SLURM executor, sacct / squeue) and writes nothing.

States: ``done`` (its result.json exists), ``to run`` (never run, or stopped), ``failed`` (its
last run failed: it runs again), and for the SLURM executor ``queued`` / ``running`` (submitted,
not finished) and ``unknown`` (submitted, no state from SLURM: not resubmitted).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from orchestrate.jobs import SUBMITIT_DEFAULT_TIMEOUT_MIN, Job

# orchestrate.jobs / orchestrate.slurm state -> what the dry run shows; anything else is "to run"
SHOWN = {"done": "done", "failed": "failed", "pending": "queued", "running": "running",
         "unknown": "unknown"}  # fmt: skip
WOULD_RUN = ("to run", "failed")


def shown_state(state: str, executor: str) -> str:
    """The state the dry run shows; a local record that says running is a stopped run."""
    if executor == "local" and state == "running":
        return "to run"
    return SHOWN.get(state, "to run")


def gpu_hours(resources: dict[str, Any]) -> float:
    """GPU-hours one job asks SLURM for: time limit x GPUs per node x nodes."""
    minutes = resources.get("timeout_min", SUBMITIT_DEFAULT_TIMEOUT_MIN)
    return minutes / 60 * resources.get("gpus_per_node", 0) * resources.get("nodes", 1)


def _time(minutes: int | None) -> str:
    return "-" if minutes is None else f"{minutes // 60}:{minutes % 60:02d}"


def _relative(path: str, root: str) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def graph_rows(jobs: list[Job], states: dict[str, str], runs_root: str) -> list[list[str]]:
    """One row per job: state, stage, run folder, time (h:mm), nodes, GPUs per node, CPUs per
    task, memory, partition, dependencies (run folders under ``runs_root``)."""
    rows = []
    for job in jobs:
        r = job.resources
        mem = r.get("mem_gb")
        rows.append([
            states[job.run_dir], job.stage, job.run_dir, _time(r.get("timeout_min")),
            str(r.get("nodes", 1)), str(r.get("gpus_per_node", 0)), str(r.get("cpus_per_task", 1)),
            "-" if mem is None else f"{mem:g}G", str(r.get("slurm_partition", "(default)")),
            ", ".join(_relative(d, runs_root) for d in job.deps) or "-",
        ])  # fmt: skip
    return rows


HEADER = ["state", "stage", "run folder", "time", "nodes", "GPUs", "CPUs", "mem", "partition",
          "after"]  # fmt: skip


def print_graph(
    jobs: list[Job],
    states: dict[str, str],
    runs_root: str,
    title: str,
    commands: bool = False,
    out=None,
) -> dict[str, int]:
    """Print the graph (``states``: run dir -> shown state), one row per job (with its command
    when ``commands``), then the totals; returns {shown state: count}."""
    out = out or sys.stdout
    rows = graph_rows(jobs, states, runs_root)
    widths = [max(len(x) for x in col) for col in zip(HEADER, *rows)]
    print(title, file=out)
    for row, job in zip([HEADER, *rows], [None, *jobs]):
        print("  " + "  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip(), file=out)
        if commands and job is not None:
            print(f"      python -m {job.module} {' '.join(job.argv)}", file=out)
    counts: dict[str, int] = {}
    for job in jobs:
        counts[states[job.run_dir]] = counts.get(states[job.run_dir], 0) + 1
    todo = [j for j in jobs if states[j.run_dir] in WOULD_RUN]
    hours = sum(gpu_hours(j.resources) for j in todo)
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(
        f"total: {len(jobs)} jobs ({parts}); the {len(todo)} to run (or to run again) ask for "
        f"{hours:,.1f} GPU-hours (time limit x GPUs x nodes)",
        file=out,
    )
    return counts
