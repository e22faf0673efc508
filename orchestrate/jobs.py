"""One experiment description (a profile, ``eval/profiles/*.yaml``) and its job graph.

:func:`load_profile` reads and checks a profile (and its cluster file); :func:`expand` turns it
into :class:`Job` records: module, argv, run folder, dependencies, resources. Both executors run
these jobs (``eval.pipeline``: local processes; ``core.slurm``: submitit on SLURM), record them
with :func:`write_run_json` and read their state with :func:`job_state`; the tables read the same
run folders.

Run folders (one scheme, :func:`run_dir_for`): ``<runs_root>/<stage>/<task>/<variant>/seed<k>``,
``<runs_root>/pretext/<variant>/seed<k>`` for the pretext stage.

Profile keys beyond the variants / tasks (README, "Profiles"):

- ``pretext.variants.<v>.grid: {mask.kind: [central, random_block], ...}`` expands ``<v>`` into one
  variant per combination, named ``<v>,mask.kind=central,...``; the grid values are added to the
  variant's overrides. A transfer / eval task that lists ``<v>`` runs on all of them.
- ``resources:`` (submitit parameters: ``timeout_min``, ``cpus_per_task``, ``mem_gb``,
  ``gpus_per_node``, ``tasks_per_node``, ``nodes``, ``slurm_*``) on ``pretext``, on a pretext
  variant and on a transfer / eval task; the local executor ignores them.
- ``cluster: FILE`` (or ``--cluster FILE``): site facts, ``{resources: {...}, stages: {<task>: {...}}}``.
  Precedence: cluster ``resources`` < the profile's < cluster ``stages.<task>`` (``pretext`` for
  the pretext stage).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import run_folder
from core.atomic_io import atomic_write_json
from core.config import ConfigError, read_yaml

PROFILE_KEYS = {"name", "runs_root", "results_dir", "data", "seeds", "parallel", "cluster",
                "pretext", "transfer", "eval"}  # fmt: skip
REQUIRED_KEYS = {"name", "runs_root", "results_dir", "data", "seeds", "pretext"}
PRETEXT_KEYS = {"module", "config", "data", "overrides", "resources", "variants"}
VARIANT_KEYS = {"title", "config", "data", "overrides", "seeds", "grid", "resources"}
TASK_KEYS = {"module", "args", "variants", "data", "per", "rows", "resources"}
CLUSTER_KEYS = {"resources", "stages"}
RESOURCE_KEYS = {"timeout_min", "cpus_per_task", "mem_gb", "gpus_per_node", "tasks_per_node",
                 "nodes", "stderr_to_stdout"}  # fmt: skip  # + any slurm_* (submitit checks those)
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


@dataclass
class Profile:
    name: str
    runs_root: str
    results_dir: str
    data: str
    seeds: list[int]
    pretext: dict[str, Any]  # variants: grid-expanded, {name: spec}
    transfer: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    parallel: int = 1
    cluster: str | None = None
    path: str = ""
    site: dict[str, Any] = field(default_factory=dict)  # the cluster file's content


def _check_keys(where: str, data: Any, valid: set[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")


def _check_resources(where: str, resources: Any) -> dict[str, Any]:
    resources = resources or {}
    _check_keys(where, resources, RESOURCE_KEYS | {k for k in resources if k.startswith("slurm_")})
    return dict(resources)


def load_cluster(path: str | Path | None) -> dict[str, Any]:
    """A cluster file: ``{resources: {...}, stages: {<task>: {...}}}`` (site facts)."""
    if not path:
        return {"resources": {}, "stages": {}}
    raw = read_yaml(path)
    _check_keys(str(path), raw, CLUSTER_KEYS)
    stages = raw.get("stages") or {}
    _check_keys(f"{path}: stages", stages, set(stages))
    return {
        "resources": _check_resources(f"{path}: resources", raw.get("resources")),
        "stages": {k: _check_resources(f"{path}: stages.{k}", v) for k, v in stages.items()},
    }


def format_value(value: Any) -> str:
    """A value as the stages' ``key=value`` parser (YAML) reads it back."""
    return value if isinstance(value, str) else json.dumps(value)


def expand_grid(name: str, spec: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """``{name: spec}``, or one variant per combination of ``spec['grid']`` (file order, last key
    fastest), named ``name,k=v,...``, with ``k=v`` added to its overrides."""
    grid = spec.get("grid")
    if not grid:
        return {name: spec}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}.grid: expected a mapping key -> non-empty list of values")
    if "seed" in grid:
        raise ConfigError(f"{where}.grid: use `seeds:` for seeds, not a grid key")
    out = {}
    for combo in itertools.product(*grid.values()):
        values = [f"{k}={format_value(v)}" for k, v in zip(grid, combo)]
        suffix = ",".join(v.replace("/", "_") for v in values)
        title = f"{spec.get('title', name)} ({', '.join(values)})"
        out[f"{name},{suffix}"] = {
            **{k: v for k, v in spec.items() if k != "grid"},
            "title": title,
            "overrides": [*spec.get("overrides", []), *values],
            "grid_of": name,
        }
    return out


def load_profile(
    path: str | Path, overrides: dict[str, Any] | None = None, cluster: str | None = None
) -> Profile:
    """Read and check ``path``; grids are expanded, ``cluster`` (a file) overrides ``cluster:``."""
    raw = {**read_yaml(path), **(overrides or {})}
    _check_keys(str(path), raw, PROFILE_KEYS)
    missing = sorted(REQUIRED_KEYS - set(raw))
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}")
    pre = dict(raw["pretext"])
    _check_keys(f"{path}: pretext", pre, PRETEXT_KEYS)
    _check_resources(f"{path}: pretext.resources", pre.get("resources"))
    variants: dict[str, dict[str, Any]] = {}
    for name, spec in (pre.get("variants") or {}).items():
        where = f"{path}: pretext.variants.{name}"
        spec = spec or {}
        _check_keys(where, spec, VARIANT_KEYS)
        _check_resources(f"{where}.resources", spec.get("resources"))
        variants.update(expand_grid(name, spec, where))
    pre["variants"] = variants
    for stage in ("transfer", "eval"):
        tasks = dict(raw.get(stage) or {})
        for task, spec in tasks.items():
            if stage == "eval" and task == "figures":
                continue
            where = f"{path}: {stage}.{task}"
            _check_keys(where, spec, TASK_KEYS)
            _check_resources(f"{where}.resources", spec.get("resources"))
            if "module" not in spec:
                raise ConfigError(f"{where}: missing key 'module'")
            tasks[task] = {**spec, "variants": _resolve(spec.get("variants", []), variants, where)}
        raw[stage] = tasks
    raw["pretext"] = pre
    cluster = cluster or raw.get("cluster")
    return Profile(**{**raw, "cluster": cluster}, path=str(path), site=load_cluster(cluster))


def _resolve(names: list[str], variants: dict[str, dict[str, Any]], where: str) -> list[str]:
    """Variant names, a gridded variant's name standing for all its grid variants."""
    out = []
    for name in names:
        members = [v for v, spec in variants.items() if v == name or spec.get("grid_of") == name]
        if not members:
            raise ConfigError(f"{where}: names pretext variant {name!r}, which is not defined")
        out += members
    return out


def _seeds(spec: dict[str, Any], profile: Profile) -> list[int]:
    seeds = spec.get("seeds", "all")
    return list(profile.seeds) if seeds == "all" else [int(s) for s in seeds]


def _resources(profile: Profile, key: str, *specs: dict[str, Any]) -> dict[str, Any]:
    out = dict(profile.site.get("resources", {}))
    for spec in specs:
        out.update(spec.get("resources") or {})
    return {**out, **profile.site.get("stages", {}).get(key, {})}


def expand(profile: Profile) -> list[Job]:
    """All jobs of ``profile``, dependencies first."""
    jobs: list[Job] = []
    root = profile.runs_root
    pre = profile.pretext
    pretext_dirs: dict[tuple[str, int], str] = {}
    for variant, spec in pre["variants"].items():
        for seed in _seeds(spec, profile):
            run_dir = run_dir_for(root, "pretext", "pretext", variant, seed)
            argv = (
                "--config", spec.get("config", pre.get("config", "")),
                f"run_dir={run_dir}", f"seed={seed}", f"data.root={spec.get('data', pre.get('data', profile.data))}",
                *pre.get("overrides", []), *spec.get("overrides", []),
            )  # fmt: skip
            module = pre.get("module", "pretext.train")
            resources = _resources(profile, "pretext", pre, spec)
            jobs.append(
                Job("pretext", "pretext", variant, seed, module, argv, run_dir, (), resources)
            )
            pretext_dirs[(variant, seed)] = run_dir
    for stage in ("transfer", "eval"):
        for task, spec in getattr(profile, stage).items():
            if not (stage == "eval" and task == "figures"):
                jobs.extend(_downstream_jobs(profile, stage, task, spec, pretext_dirs))
    return jobs


def _downstream_jobs(
    profile: Profile,
    stage: str,
    task: str,
    spec: dict[str, Any],
    pretext_dirs: dict[tuple[str, int], str],
) -> list[Job]:
    """Jobs of a transfer task or an eval stage.

    ``data`` (default: the profile's) is the dataset root of this task.
    ``per: variant`` (default) runs once per pretext (variant, seed) listed in ``variants``, with
    ``{checkpoint}`` in its args replaced by that pretext run's folder. ``per: profile`` runs once
    (seed 0) with ``{checkpoint:<variant>}`` placeholders for several pretext runs.
    """
    jobs = []
    args = spec.get("args", [])
    resources = _resources(profile, task, spec)
    if spec.get("per", "variant") == "profile":
        deps, argv = [], []
        for arg in args:
            for (variant, seed), ckpt in pretext_dirs.items():
                token = f"{{checkpoint:{variant}}}"
                if token in arg and seed == min(s for v, s in pretext_dirs if v == variant):
                    arg = arg.replace(token, ckpt)
                    deps.append(ckpt)
            argv.append(arg)
        run_dir = run_dir_for(profile.runs_root, stage, task, "all", 0)
        argv += [f"run_dir={run_dir}", f"data={spec.get('data', profile.data)}"]
        job = Job(
            stage, task, "all", 0, spec["module"], tuple(argv), run_dir, tuple(deps), resources
        )
        return [job]
    for variant in spec.get("variants", []):
        for seed in [s for (v, s) in pretext_dirs if v == variant]:
            ckpt = pretext_dirs[(variant, seed)]
            run_dir = run_dir_for(profile.runs_root, stage, task, variant, seed)
            argv = [a.replace("{checkpoint}", ckpt) for a in args]
            argv += [f"run_dir={run_dir}", f"seed={seed}", f"data={spec.get('data', profile.data)}"]
            jobs.append(
                Job(
                    stage,
                    task,
                    variant,
                    seed,
                    spec["module"],
                    tuple(argv),
                    run_dir,
                    (ckpt,),
                    resources,
                )
            )
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
