"""The local executor of the job graph (:mod:`orchestrate.jobs`): each job its own process.

``python -m <module> <argv>`` per job, so a crash or a kill loses at most that job's progress since
its last checkpoint; finished jobs are skipped (their ``result.json`` exists), half-finished ones
resume from their checkpoints, failed ones are retried, and a job whose dependency failed is
``blocked``. One pipeline per runs folder at a time (:func:`orchestrate.jobs.runs_lock`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from core import run_folder
from orchestrate.jobs import Job, expand, job_state, runs_lock, write_run_json
from orchestrate.profile import Profile


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
    roots = [profile.data, pre.data or profile.data]
    roots += [spec.data for spec in pre.variants.values() if spec.data]
    for root in dict.fromkeys(roots):
        ensure_builtin(root)
