"""``make table``: run what is missing of a profile (pretext -> transfer -> eval), then the tables.

    python -m eval.pipeline --profile builtin              # eval/profiles/builtin.yaml, here
    python -m eval.pipeline --profile paper --dry-run      # the job graph, its state, GPU-hours
    python -m eval.pipeline --profile paper --executor slurm [--cluster FILE]   # on SLURM
    python -m eval.pipeline --profile paper --executor slurm --status           # progress only

Local executor: each job runs as its own process (``python -m <module> <argv>``), so a crash or a
kill loses at most that job's progress since its last checkpoint: run the command again and
finished jobs are skipped (their ``result.json`` exists), half-finished ones resume from their
checkpoints, and failed ones are retried. SLURM executor (:mod:`core.slurm`): submits what is
missing or failed and returns with the job ids; run again, it shows progress (and resubmits what
failed); when every job is done it writes the tables. A job's ``run.json`` records what it is, its
command and its status; one lock per runs folder keeps two pipelines from running the same jobs.

Pre-flight (:mod:`core.preflight`): before the first job starts or is submitted, every job that
would run is checked — its argv by its stage's parse_config, its inputs by its stage's own checks,
the cluster by :func:`core.slurm.check_cluster` — and every problem is printed at once, grouped
by cause; then nothing starts (exit 2). ``--dry-run`` prints the job graph (:mod:`core.dry_run`)
and the pre-flight's findings, and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from core import preflight, run_folder
from core.cli import ArgumentParser
from core.dry_run import print_graph, shown_state
from core.jobs import (
    Job,
    PipelineBusy,
    Profile,
    expand,
    job_state,
    load_profile,
    runs_lock,
    write_run_json,
)

PROFILES_DIR = Path(__file__).parent / "profiles"


def profile_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return PROFILES_DIR / f"{name}.yaml"


def run_job(job: Job, threads: int) -> tuple[bool, float]:
    """Run one job to completion in a subprocess; returns (success, wall seconds)."""
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", job.module, *job.argv]
    write_run_json(
        job, "running", command=command, log=str(run_dir / "log.txt"), started=time.time()
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "CE_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "ab") as log:
        log.write(f"\n$ {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.perf_counter() - t0
    ok = proc.returncode == 0 and run_folder.is_finished(run_dir)
    if ok:
        write_run_json(job, "done", command=command, log=str(run_dir / "log.txt"), wall_s=wall)
    else:
        tail = (run_dir / "log.txt").read_text(errors="replace").splitlines()[-15:]
        write_run_json(
            job, "failed", command=command, log=str(run_dir / "log.txt"), wall_s=wall,
            returncode=proc.returncode, log_tail=tail,
        )  # fmt: skip
    return ok, wall


def run_pipeline(
    profile: Profile, parallel: int | None = None, out=sys.stdout, only: list[str] | None = None
) -> dict[str, str]:
    """Run every job of ``profile`` that is not done, respecting dependencies; one pipeline per
    runs folder at a time (PipelineBusy otherwise).

    Returns {job name: final state}. Jobs whose dependency failed are marked ``blocked``.
    """
    with runs_lock(profile.runs_root):
        return _run_jobs(profile, parallel, out, only)


def _run_jobs(
    profile: Profile, parallel: int | None, out, only: list[str] | None
) -> dict[str, str]:
    jobs = [j for j in expand(profile) if only is None or j.stage in only]
    parallel = parallel or profile.parallel
    threads = max(1, (os.cpu_count() or 1) // parallel)
    by_dir = {j.run_dir: j for j in jobs}
    state = {j.run_dir: job_state(j.run_dir).state for j in jobs}
    todo = [j for j in jobs if state[j.run_dir] != "done"]
    print(
        f"pipeline {profile.name}: {len(jobs) - len(todo)}/{len(jobs)} jobs done, {len(todo)} to run",
        file=out,
    )
    running: dict[Future, Job] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while todo or running:
            for job in list(todo):
                if len(running) >= parallel:
                    break
                dep_states = [state[d] if d in state else job_state(d).state for d in job.deps]
                if any(s in ("failed", "blocked") for s in dep_states):
                    state[job.run_dir] = "blocked"
                    write_run_json(job, "blocked", reason=f"a dependency failed: {job.deps}")
                    print(f"  blocked  {job.name} (dependency failed)", file=out)
                    todo.remove(job)
                elif all(s == "done" for s in dep_states):
                    print(f"  start    {job.name}", file=out, flush=True)
                    running[pool.submit(run_job, job, threads)] = job
                    state[job.run_dir] = "running"
                    todo.remove(job)
            if not running:
                if todo:  # dependencies outside this profile that are not done
                    for job in todo:
                        state[job.run_dir] = "blocked"
                        print(f"  blocked  {job.name} (dependency not done)", file=out)
                    break
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                ok, wall = fut.result()
                state[job.run_dir] = "done" if ok else "failed"
                word = "done   " if ok else "FAILED "
                print(
                    f"  {word}  {job.name} ({wall:.0f} s){'' if ok else ' log: ' + job.run_dir + '/log.txt'}",
                    file=out,
                    flush=True,
                )
    return {by_dir[d].name: s for d, s in state.items()}


def prepare_data(profile: Profile) -> None:
    """Generate the built-in mini-VOCs (the transfer set, the pretext variants' sets) once, before
    jobs that read them start in parallel."""
    from core.data import ensure_builtin

    pre = profile.pretext
    roots = [profile.data, pre.get("data", profile.data)]
    roots += [spec["data"] for spec in pre["variants"].values() if spec and "data" in spec]
    for root in dict.fromkeys(roots):
        ensure_builtin(root)


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
    from eval.report import write_report

    command = " ".join(["python -m eval.pipeline", *(sys.argv[1:] if argv is None else argv)])
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
        from core import slurm

        problems += slurm.check_cluster(jobs, profile.cluster, profile.name)
    if not problems:
        return 0
    print(preflight.report(problems, _shown(profile.path), len(jobs), outcome), file=sys.stderr)
    return 2


def _selected(jobs: list[Job], only: list[str] | None) -> list[Job]:
    return [j for j in jobs if only is None or j.stage in only]


def run_slurm(profile: Profile, args: argparse.Namespace, argv: list[str] | None) -> int:
    """Submit what is missing or failed (after the pre-flight); tables once every job is done."""
    from core import slurm

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
