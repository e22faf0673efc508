"""A profile (``orchestrate/profiles/*.yaml``): the one description of an experiment, typed.

:func:`load_profile` reads a profile through :mod:`core.config`, as every stage reads its config:
an unknown key or a wrong type is the same one-line ``error:`` listing the valid keys. Then the
grids are expanded, the variants a task names resolved, and the cluster file read.

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

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.config import ConfigError, config_from_dict, load_config, read_yaml

PROFILES_DIR = Path(__file__).parent / "profiles"
REQUIRED = {"required": True}  # field metadata: a profile file must set this key


@dataclass
class Resources:
    """The generic submitit parameters of a job (typed here); any ``slurm_*`` key is passed on as
    well (submitit checks those itself, and the pre-flight asks sbatch)."""

    timeout_min: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    nodes: int | None = None
    stderr_to_stdout: bool | None = None


@dataclass
class Variant:
    """One pretext variant: a config (default ``pretext.config``) with overrides."""

    title: str = ""  # its row title in the tables (default: its name)
    config: str = ""  # default: pretext.config
    data: str = ""  # default: pretext.data, then the profile's data
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] | Literal["all"] = "all"  # all: the profile's seeds
    grid: dict[str, Any] = field(default_factory=dict)  # key -> values, one variant per combination
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pretext:
    module: str = "pretext.train"
    config: str = ""
    data: str = ""  # default: the profile's data
    overrides: list[str] = field(default_factory=list)  # every variant's, before its own
    resources: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)  # after loading: grids expanded


@dataclass
class Task:
    """A transfer or eval task: ``python -m <module> <args>`` on pretext runs.

    ``per: variant`` runs once per pretext (variant, seed) listed in ``variants``, ``{checkpoint}``
    in ``args`` standing for that run's folder; ``per: profile`` runs once (seed 0), with
    ``{checkpoint:<variant>}`` placeholders for several pretext runs."""

    module: str = ""  # required: python -m <module>
    args: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)  # after loading: grid names expanded
    data: str = ""  # default: the profile's data
    per: Literal["variant", "profile"] = "variant"
    rows: dict[str, str] = field(default_factory=dict)  # result name -> row title (tables)
    figures: list[str] = field(default_factory=list)  # files of its run copied to results/figures
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class Cluster:
    """A cluster file: site facts, every job's ``resources`` and those of a task's jobs."""

    resources: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> resources


@dataclass
class Profile:
    name: str = field(default="", metadata=REQUIRED)
    runs_root: str = field(default="", metadata=REQUIRED)
    results_dir: str = field(default="", metadata=REQUIRED)
    data: str = field(default="", metadata=REQUIRED)  # the transfer / eval data set
    seeds: list[int] = field(default_factory=list, metadata=REQUIRED)
    pretext: Pretext = field(default_factory=Pretext, metadata=REQUIRED)
    transfer: dict[str, Task] = field(default_factory=dict)
    eval: dict[str, Task] = field(default_factory=dict)
    parallel: int = 1  # local jobs at once
    cluster: str | None = None  # the cluster file
    path: str = field(default="", init=False)  # the file it was read from
    site: Cluster = field(default_factory=Cluster, init=False)  # the cluster file's content

    def tasks(self) -> dict[tuple[str, str], Task]:
        """(stage, task) -> its spec: the transfer tasks, then the eval ones."""
        return {
            (stage, t): s for stage in ("transfer", "eval") for t, s in getattr(self, stage).items()
        }


def profile_path(name: str) -> Path:
    """A shipped profile's file (``builtin`` -> orchestrate/profiles/builtin.yaml), or a path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return PROFILES_DIR / f"{name}.yaml"


def check_resources(where: str, resources: dict[str, Any]) -> None:
    generic = {k: v for k, v in resources.items() if not k.startswith("slurm_")}
    try:
        config_from_dict(Resources, generic, where)
    except ConfigError as err:
        more = " (and any slurm_* of submitit)" if str(err).startswith("unknown key") else ""
        raise ConfigError(f"{err}{more}") from None


def load_cluster(path: str | Path | None) -> Cluster:
    """A cluster file: ``{resources: {...}, stages: {<task>: {...}}}`` (site facts)."""
    if not path:
        return Cluster()
    cluster = load_config(Cluster, path)
    try:
        check_resources("resources", cluster.resources)
        for task, resources in cluster.stages.items():
            if not isinstance(resources, dict):
                raise ConfigError(f"stages.{task}: expected a mapping, got {resources!r}")
            check_resources(f"stages.{task}", resources)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cluster


def format_value(value: Any) -> str:
    """A value as the stages' ``key=value`` parser (YAML) reads it back."""
    return value if isinstance(value, str) else json.dumps(value)


def expand_grid(name: str, spec: Variant, where: str) -> dict[str, Variant]:
    """``{name: spec}``, or one variant per combination of ``spec.grid`` (file order, last key
    fastest), named ``name,k=v,...``, with ``k=v`` added to its overrides."""
    grid = spec.grid
    if not grid:
        return {name: spec}
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}.grid: expected a mapping key -> non-empty list of values")
    if "seed" in grid:
        raise ConfigError(f"{where}.grid: use `seeds:` for seeds, not a grid key")
    out = {}
    for combo in itertools.product(*grid.values()):
        values = [f"{k}={format_value(v)}" for k, v in zip(grid, combo)]
        suffix = ",".join(v.replace("/", "_") for v in values)
        title = f"{spec.title or name} ({', '.join(values)})"
        overrides = [*spec.overrides, *values]
        out[f"{name},{suffix}"] = dataclasses.replace(
            spec, grid={}, title=title, overrides=overrides
        )
    return out


def _check(profile: Profile, raw: dict[str, Any]) -> None:
    """What the types do not say: required keys, resources, grids, the variants tasks name."""
    missing = [
        f.name
        for f in dataclasses.fields(Profile)
        if f.metadata.get("required") and f.name not in raw
    ]
    if missing:
        raise ConfigError(f"missing key(s) {missing}")
    pre = profile.pretext
    check_resources("pretext.resources", pre.resources)
    variants: dict[str, Variant] = {}
    members: dict[str, list[str]] = {}  # a name a task may list -> the variants it stands for
    for name, spec in pre.variants.items():
        where = f"pretext.variants.{name}"
        check_resources(f"{where}.resources", spec.resources)
        expanded = expand_grid(name, spec, where)
        variants.update(expanded)
        members[name] = list(expanded)
        members.update({v: [v] for v in expanded})
    pre.variants = variants
    for (stage, task), spec in profile.tasks().items():
        where = f"{stage}.{task}"
        check_resources(f"{where}.resources", spec.resources)
        if not spec.module:
            raise ConfigError(f"{where}: missing key 'module'")
        if spec.figures and spec.per != "profile":
            raise ConfigError(f"{where}.figures: only a `per: profile` task has one run")
        unknown = [v for v in spec.variants if v not in members]
        if unknown:
            raise ConfigError(
                f"{where}: names pretext variant {unknown[0]!r}, which is not defined"
            )
        spec.variants = [v for name in spec.variants for v in members[name]]


def load_profile(
    path: str | Path, overrides: dict[str, Any] | None = None, cluster: str | None = None
) -> Profile:
    """Read and check ``path`` (its top-level keys replaced by ``overrides``); grids expanded,
    ``cluster`` (a file) instead of the profile's ``cluster:``."""
    raw = {**read_yaml(path), **(overrides or {})}
    try:
        profile = config_from_dict(Profile, raw)
        _check(profile, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    profile.cluster = cluster or profile.cluster
    profile.path = str(path)
    profile.site = load_cluster(profile.cluster)
    return profile
