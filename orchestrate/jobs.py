"""The job graph of a profile (:mod:`orchestrate.profile`) and the run records of its jobs.

:func:`expand` turns a profile into :class:`Job` records: module, argv, run folder, dependencies,
resources. Both executors run these jobs (:mod:`orchestrate.local`: local processes;
:mod:`orchestrate.slurm`: submitit on SLURM), record them with :func:`write_run_json` and read
their state with :func:`job_state`; the tables read the same run folders.

Run folders (one scheme, :func:`run_dir_for`): ``<runs_root>/<stage>/<task>/<variant>/seed<k>``,
``<runs_root>/pretext/<variant>/seed<k>`` for the pretext stage.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import run_folder
from core.atomic_io import atomic_write_json
from orchestrate.profile import Profile, Task, Variant

SUBMITIT_DEFAULT_TIMEOUT_MIN = 5  # the time limit submitit asks SLURM for without timeout_min


@dataclass(frozen=True)
class Job:
    """One stage run: ``python -m <module> <argv>`` writing ``run_dir``."""

    stage: str  # pretext | transfer | eval
    task: str  # pretext | classify | detect | segment | frozen | inpainting | retrieval
    variant: str
    seed: int
    module: str
    argv: tuple[str, ...]
    run_dir: str
    deps: tuple[str, ...] = ()  # run_dirs that must be finished first
    resources: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.task}/{self.variant}/seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "task": self.task,
            "variant": self.variant,
            "seed": self.seed,
            "module": self.module,
            "argv": list(self.argv),
            "deps": list(self.deps),
        }


def run_dir_for(runs_root: str | Path, stage: str, task: str, variant: str, seed: int) -> str:
    """``<runs_root>/<stage>/<task>/<variant>/seed<k>`` (``<task>/`` left out when it is the stage)."""
    parts = [stage] if task == stage else [stage, task]
    return str(Path(runs_root, *parts, variant, f"seed{seed}"))


def _seeds(spec: Variant, profile: Profile) -> list[int]:
    return list(profile.seeds) if spec.seeds == "all" else list(spec.seeds)


def _resources(profile: Profile, key: str, *resources: dict[str, Any]) -> dict[str, Any]:
    out = dict(profile.site.resources)
    for extra in resources:
        out.update(extra)
    return {**out, **profile.site.stages.get(key, {})}


def expand(profile: Profile) -> list[Job]:
    """All jobs of ``profile``, dependencies first."""
    jobs: list[Job] = []
    root = profile.runs_root
    pre = profile.pretext
    pretext_dirs: dict[tuple[str, int], str] = {}
    for variant, spec in pre.variants.items():
        for seed in _seeds(spec, profile):
            run_dir = run_dir_for(root, "pretext", "pretext", variant, seed)
            argv = (
                "--config", spec.config or pre.config,
                f"run_dir={run_dir}", f"seed={seed}", f"data.root={spec.data or pre.data or profile.data}",
                *pre.overrides, *spec.overrides,
            )  # fmt: skip
            resources = _resources(profile, "pretext", pre.resources, spec.resources)
            jobs.append(
                Job("pretext", "pretext", variant, seed, pre.module, argv, run_dir, (), resources)
            )
            pretext_dirs[(variant, seed)] = run_dir
    for (stage, task), spec in profile.tasks().items():
        jobs.extend(_downstream_jobs(profile, stage, task, spec, pretext_dirs))
    return jobs


def _downstream_jobs(
    profile: Profile,
    stage: str,
    task: str,
    spec: Task,
    pretext_dirs: dict[tuple[str, int], str],
) -> list[Job]:
    """Jobs of a transfer task or an eval stage (``spec.per``: once per pretext run of its
    variants, or once for the profile); ``spec.data`` (default: the profile's) is its data set."""
    jobs = []
    resources = _resources(profile, task, spec.resources)
    data = spec.data or profile.data
    if spec.per == "profile":
        deps, argv = [], []
        for arg in spec.args:
            for (variant, seed), ckpt in pretext_dirs.items():
                token = f"{{checkpoint:{variant}}}"
                if token in arg and seed == min(s for v, s in pretext_dirs if v == variant):
                    arg = arg.replace(token, ckpt)
                    deps.append(ckpt)
            argv.append(arg)
        run_dir = run_dir_for(profile.runs_root, stage, task, "all", 0)
        argv += [f"run_dir={run_dir}", f"data={data}"]
        job = Job(stage, task, "all", 0, spec.module, tuple(argv), run_dir, tuple(deps), resources)
        return [job]
    for variant in spec.variants:
        for seed in [s for (v, s) in pretext_dirs if v == variant]:
            ckpt = pretext_dirs[(variant, seed)]
            run_dir = run_dir_for(profile.runs_root, stage, task, variant, seed)
            argv = [a.replace("{checkpoint}", ckpt) for a in spec.args]
            argv += [f"run_dir={run_dir}", f"seed={seed}", f"data={data}"]
            jobs.append(
                Job(
                    stage, task, variant, seed, spec.module, tuple(argv), run_dir, (ckpt,),
                    resources,
                )
            )  # fmt: skip
    return jobs


# --- run.json and job state: the one writer and the one reader of both executors ----------------


def write_run_json(job: Job, status: str, **extra: Any) -> None:
    """``<run_dir>/run.json``: what the run is (for the tables), its status and how it was run."""
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(job.run_dir) / "run.json", {**job.identity(), "status": status, **extra})


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


# SLURM states (sacct / squeue spelling) in which a job may still finish by itself.
ACTIVE_STATES = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending",
    "REQUEUE_FED": "pending", "RESV_DEL_HOLD": "pending", "CONFIGURING": "running",
    "RUNNING": "running", "COMPLETING": "running", "RESIZING": "running",
    "SIGNALING": "running", "STAGE_OUT": "running", "SUSPENDED": "running",
}  # fmt: skip
SUBMIT_GRACE_S = 30  # a job may take this long to show up in sacct / squeue


@dataclass
class State:
    """done | running | failed | blocked | missing (local); pending | unknown too (SLURM)."""

    state: str
    reason: str | None = None
    job_id: str | None = None
    scheduler_state: str | None = None
    log: str | None = None


def job_state(run_dir: str | Path, scheduler_state: str | None = None) -> State:
    """The state of one run folder: ``result.json`` means done; else its ``run.json`` record, read
    with the job's SLURM state (``scheduler_state``, for jobs the SLURM executor submitted) and
    submitit's result pickle (the stage's Python error)."""
    info = read_run_json(run_dir)
    done = run_folder.is_finished(run_dir)
    if info.get("executor") != "slurm":
        if done:
            return State("done", log=info.get("log"))
        return State(info.get("status", "missing"), info.get("reason"), log=info.get("log"))
    state = State("done", job_id=info["job_id"], scheduler_state=scheduler_state, log=info["log"])
    if done:
        return state
    if scheduler_state in ACTIVE_STATES:
        state.state = ACTIVE_STATES[scheduler_state]
        return state
    state.state = "failed"
    try:
        with open(info["result_pickle"], "rb") as fh:
            kind, payload = pickle.load(fh)
        lines = str(payload).strip().splitlines()
        state.reason = (lines[-1] if lines else "error") if kind == "error" else None
        state.reason = state.reason or "the stage returned without writing result.json"
    except FileNotFoundError:
        if scheduler_state in (None, "UNKNOWN"):
            just = time.time() - info.get("submitted", 0) < SUBMIT_GRACE_S
            state.state = "pending" if just else "unknown"
            # "unknown" is not provably dead: it is not resubmitted
            state.reason = (
                "just submitted, not in sacct/squeue yet"
                if just
                else "no job state from sacct/squeue"
            )
        else:
            state.reason = f"job ended {scheduler_state} without a result"
    except Exception as err:  # a half-written pickle is not a verdict on the stage
        state.reason = f"unreadable result pickle {info['result_pickle']}: {err}"
    return state


class PipelineBusy(RuntimeError):
    """Another pipeline process holds the runs folder."""


@contextlib.contextmanager
def runs_lock(runs_root: str | Path):
    """Exclusive hold of ``<runs_root>/.pipeline.lock`` for one pipeline process at a time (two
    ``make table`` on one folder would run, or submit, the same jobs twice). The kernel drops the
    lock when the holder dies, kill -9 included, so a stale file never blocks."""
    path = Path(runs_root) / ".pipeline.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise PipelineBusy(
                f"{path}: another pipeline (pid {holder}) is running on {runs_root}; "
                "wait for it or stop it"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
