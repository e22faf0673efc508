"""The job graph of a profile: pretext runs -> transfer / eval runs, with their run folders.

A profile (``eval/profiles/*.yaml``) names the pretext variants (config overrides), the seeds, the
transfer tasks and the eval stages. :func:`expand` turns it into :class:`Job` records; the local
pipeline (:mod:`eval.pipeline`) and the SLURM sweeps both run these same jobs and write the same
run folders, which the table builder reads.

Run-folder scheme (one place, :func:`run_dir_for`): ``<runs_root>/<stage>/<task>/<variant>/seed<k>``,
and ``<runs_root>/pretext/<variant>/seed<k>`` for the pretext stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import ConfigError, read_yaml


@dataclass(frozen=True)
class Job:
    """One stage run: ``python -m <module> <argv>`` writing ``run_dir``."""

    stage: str  # pretext | transfer | eval
    task: str  # pretext | classify | detect | segment | inpainting | retrieval
    variant: str
    seed: int
    module: str
    argv: tuple[str, ...]
    run_dir: str
    deps: tuple[str, ...] = ()  # run_dirs that must be finished first

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
    pretext: dict[str, Any]
    transfer: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    parallel: int = 1
    path: str = ""


PROFILE_KEYS = {
    "name",
    "runs_root",
    "results_dir",
    "data",
    "seeds",
    "pretext",
    "transfer",
    "eval",
    "parallel",
}


def load_profile(path: str | Path, overrides: dict[str, Any] | None = None) -> Profile:
    raw = {**read_yaml(path), **(overrides or {})}
    unknown = sorted(set(raw) - PROFILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(PROFILE_KEYS)}")
    missing = sorted({"name", "runs_root", "results_dir", "data", "seeds", "pretext"} - set(raw))
    if missing:
        raise ConfigError(f"{path}: missing key(s) {missing}")
    return Profile(**raw, path=str(path))


def _seeds(spec: dict[str, Any], profile: Profile) -> list[int]:
    seeds = spec.get("seeds", "all")
    return list(profile.seeds) if seeds == "all" else [int(s) for s in seeds]


def expand(profile: Profile) -> list[Job]:
    """All jobs of ``profile``, dependencies first."""
    jobs: list[Job] = []
    root = profile.runs_root
    pre = profile.pretext
    pretext_dirs: dict[tuple[str, int], str] = {}
    for variant, spec in pre["variants"].items():
        spec = spec or {}
        for seed in _seeds(spec, profile):
            run_dir = run_dir_for(root, "pretext", "pretext", variant, seed)
            argv = (
                "--config", spec.get("config", pre["config"]),
                f"run_dir={run_dir}", f"seed={seed}", f"data.root={spec.get('data', pre.get('data', profile.data))}",
                *pre.get("overrides", []), *spec.get("overrides", []),
            )  # fmt: skip
            jobs.append(Job("pretext", "pretext", variant, seed, "pretext.train", argv, run_dir))
            pretext_dirs[(variant, seed)] = run_dir
    for stage in ("transfer", "eval"):
        for task, spec in getattr(profile, stage).items():
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
        return [Job(stage, task, "all", 0, spec["module"], tuple(argv), run_dir, tuple(deps))]
    for variant in spec.get("variants", []):
        seeds = [s for (v, s) in pretext_dirs if v == variant]
        if not seeds:
            raise ConfigError(
                f"{profile.path}: {stage}.{task} names pretext variant {variant!r}, which is not defined"
            )
        for seed in seeds:
            ckpt = pretext_dirs[(variant, seed)]
            run_dir = run_dir_for(profile.runs_root, stage, task, variant, seed)
            argv = [a.replace("{checkpoint}", ckpt) for a in args]
            argv += [f"run_dir={run_dir}", f"seed={seed}", f"data={spec.get('data', profile.data)}"]
            jobs.append(
                Job(stage, task, variant, seed, spec["module"], tuple(argv), run_dir, (ckpt,))
            )
    return jobs
