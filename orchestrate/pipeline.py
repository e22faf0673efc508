"""``make table``: run what is missing of a profile (pretext -> transfer -> eval), then the tables.

    python -m orchestrate.pipeline --profile builtin            # orchestrate/profiles/builtin.yaml
    python -m orchestrate.pipeline --profile paper --dry-run    # the job graph, state, GPU-hours
    python -m orchestrate.pipeline --profile paper --executor slurm [--cluster FILE]   # on SLURM
    python -m orchestrate.pipeline --profile paper --executor slurm --status   # progress only

Local executor (:mod:`orchestrate.local`): each job runs as its own process (``python -m
<module> <argv>``), so a crash or a kill loses at most that job's progress since its last
checkpoint: run the command again and finished jobs are skipped (their ``result.json`` exists),
half-finished ones resume from their checkpoints, and failed ones are retried. SLURM executor
(:mod:`orchestrate.slurm`): submits what is missing or failed and returns with the job ids; run
again, it shows progress (and resubmits what failed); when every job is done it writes the tables.
A job's ``run.json`` records what it is, its command and its status; one lock per runs folder
keeps two pipelines from running the same jobs.

Pre-flight (:mod:`orchestrate.preflight`): before the first job starts or is submitted, every job
that would run is checked — its argv by its stage's parse_config, its inputs by its stage's own
checks, the cluster by :func:`orchestrate.slurm.check_cluster` — and every problem is printed at
once, grouped by cause; then nothing starts (exit 2). ``--dry-run`` prints the job graph
(:mod:`orchestrate.dry_run`) and the pre-flight's findings, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from core.cli import ArgumentParser
from orchestrate import preflight
from orchestrate.dry_run import print_graph, shown_state
from orchestrate.jobs import Job, PipelineBusy, expand, job_state, runs_lock
from orchestrate.local import prepare_data, run_pipeline
from orchestrate.profile import Profile, load_profile, profile_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile",
        default=os.environ.get("PROFILE", "builtin"),
        help="builtin | paper | a YAML path",
    )
    parser.add_argument("--executor", choices=["local", "slurm"], default="local")
    parser.add_argument("--cluster", default=None, help="cluster file (default: the profile's)")
    parser.add_argument(
        "--parallel", type=int, default=None, help="local jobs at once (default: the profile's)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the job graph, its state and GPU-hours, and the pre-flight; run nothing",
    )
    parser.add_argument(
        "--status", action="store_true", help="slurm: show progress, submit nothing"
    )
    parser.add_argument("--no-tables", action="store_true", help="run the jobs only")
    parser.add_argument(
        "--only", nargs="+", choices=["pretext", "transfer", "eval"], help="run these stages only"
    )
    return parser.parse_args(argv)


def write_tables(profile: Profile, wall: float, argv: list[str] | None) -> None:
    from orchestrate.report import write_report

    command = " ".join(
        ["python -m orchestrate.pipeline", *(sys.argv[1:] if argv is None else argv)]
    )
    write_report(profile, pipeline_wall_s=wall, command=command)


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies under it (as the user typed it)."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def run_preflight(profile: Profile, jobs: list[Job], outcome: str, cluster: bool = False) -> int:
    """The pre-flight of ``jobs`` (those that would run): 0, or 2 after printing every problem."""
    produced = {j.run_dir for j in expand(profile)}
    problems = preflight.check_jobs(jobs, produced, _shown(profile.path))
    if cluster:
        from orchestrate import slurm

        problems += slurm.check_cluster(jobs, profile.cluster, profile.name)
    if not problems:
        return 0
    print(preflight.report(problems, _shown(profile.path), len(jobs), outcome), file=sys.stderr)
    return 2


def _selected(jobs: list[Job], only: list[str] | None) -> list[Job]:
    return [j for j in jobs if only is None or j.stage in only]


def run_slurm(profile: Profile, args: argparse.Namespace, argv: list[str] | None) -> int:
    """Submit what is missing or failed (after the pre-flight); tables once every job is done."""
    from orchestrate import slurm

    jobs = expand(profile)
    folder = Path(profile.runs_root) / ".submitit"
    if args.dry_run:  # no lock, no data generated: nothing is written
        state = slurm.states(jobs, profile.cluster)
        shown = {d: shown_state(s.state, "slurm") for d, s in state.items()}
        where = f"cluster file {profile.cluster}" if profile.cluster else "no cluster file"
        print_graph(jobs, shown, profile.runs_root, f"pipeline {profile.name} (slurm, {where}):")
        print("submission plan:")
        slurm.submit(jobs, state, folder, profile.name, True, only=args.only)
        groups, _ = slurm.plan(jobs, state, args.only)
        todo = [j for g in groups for j in g.jobs]
        outcome = "it would submit nothing (the cluster is checked when submitting)"
        return run_preflight(profile, todo, outcome)
    with runs_lock(profile.runs_root):
        state = slurm.states(jobs, profile.cluster)
        todo = [j for j in jobs if state[j.run_dir].state != "done"]
        print(f"pipeline {profile.name} (slurm): {len(jobs) - len(todo)}/{len(jobs)} jobs done")
        slurm.print_status(jobs, state, all_jobs=args.status)
        if todo and not args.status:
            groups, _ = slurm.plan(jobs, state, args.only)
            to_submit = [j for g in groups for j in g.jobs]
            if run_preflight(profile, to_submit, "nothing was submitted", cluster=True):
                return 2
            prepare_data(profile)
            slurm.submit(jobs, state, folder, profile.name, only=args.only, cluster=profile.cluster)
    if todo or args.status:
        if todo:
            print("run the same command again for progress; it writes the tables when all is done")
        return 0
    if not args.no_tables:
        write_tables(profile, 0.0, argv)
    print(f"pipeline {profile.name}: all jobs done; tables in {profile.results_dir}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = load_profile(profile_path(args.profile), cluster=args.cluster)
    try:
        if args.executor == "slurm":
            return run_slurm(profile, args, argv)
        jobs = expand(profile)
        state = {j.run_dir: shown_state(job_state(j.run_dir).state, "local") for j in jobs}
        todo = [j for j in _selected(jobs, args.only) if state[j.run_dir] != "done"]
        if args.dry_run or args.status:
            title = f"pipeline {profile.name} (local; resources: what the SLURM executor asks for):"
            print_graph(jobs, state, profile.runs_root, title, commands=True)
            return run_preflight(profile, todo, "it would not start") if args.dry_run else 0
        if run_preflight(profile, todo, "nothing was started"):
            return 2
        t0 = time.perf_counter()
        prepare_data(profile)
        states = run_pipeline(profile, args.parallel, only=args.only)
    except PipelineBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    if not args.no_tables:
        write_tables(profile, wall, argv)
    bad = sorted(name for name, s in states.items() if s != "done")
    if bad:
        print(f"{len(bad)} job(s) not done: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(
        f"pipeline {profile.name}: all jobs done in {wall / 60:.1f} min; tables in {profile.results_dir}/"
    )
    return 0


if __name__ == "__main__":
    from core.cli import run_cli

    run_cli(main)
