"""Sweep files (what to run) and cluster files (where), read into plain dataclasses.

A sweep file::

    name: ce-masks                    # run folders: <runs_root>/<name>/<stage>/<cell>/
    cluster_file: cluster_local.yaml  # optional, relative to this file; --cluster-file overrides
    grid:                             # cartesian product; one cell per combination
      mask.kind: [central, random_block]
      seed: [0, 1]
    stages:                           # in order; a stage with `after` waits for that stage's cell
      pretext:
        module: pretext.train
        args: [--config, pretext/configs/builtin.yaml]
        overrides: {train.steps: 50}
        resources: {timeout_min: 60, gpus_per_node: 1, cpus_per_task: 8}
      classify:
        module: transfer.classify
        after: pretext
        grid_keys: [seed]             # grid keys passed to this stage (default: all for a stage
                                      # without `after`, none for one with it)
        overrides: {checkpoint: "{pretext}/checkpoints/last.pt"}

Override values may name run folders of the same cell: ``{run_dir}`` (this stage's) or
``{<stage>}`` (that stage's). ``run_dir_key`` (default ``run_dir``) is the key the stage reads
its run folder from. ``resources`` are submitit AutoExecutor parameters. ``table: {stage: transfer,
task: classify}`` names the run for the table builder (``run.json``; default: the stage name for
both); its variant is the cell's grid values other than ``seed``, its seed the ``seed`` value.

A cluster file holds the site facts::

    resources: {slurm_partition: debug, slurm_account: my-lab}   # every stage
    stages: {pretext: {slurm_partition: gpu}}                    # per stage, wins over the sweep
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.cli import UserError

SWEEP_KEYS = {"name", "cluster_file", "grid", "stages"}
STAGE_KEYS = {
    "module",
    "args",
    "overrides",
    "resources",
    "after",
    "grid_keys",
    "run_dir_key",
    "table",
}
CLUSTER_KEYS = {"resources", "stages"}


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    args: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    after: str | None = None
    grid_keys: list[str] = field(default_factory=list)
    run_dir_key: str = "run_dir"
    table: dict[str, str] = field(default_factory=dict)  # run.json stage/task for the tables


@dataclass(frozen=True)
class Cell:
    """One point of the grid: ``values`` in grid-key order, ``name`` = Hydra-style k=v,k=v."""

    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    name: str
    grid: dict[str, list[Any]]
    stages: dict[str, Stage]
    cluster_file: Path | None = None
    path: Path | None = None


@dataclass(frozen=True)
class ClusterConfig:
    resources: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


class SweepFileError(UserError):
    pass


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepFileError(f"{path}: cannot read: {err}") from err
    if not isinstance(data, dict):
        raise SweepFileError(f"{path}: expected a mapping at the top level")
    return data


def _check_keys(where: str, data: dict[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(data) - valid)
    if unknown:
        raise SweepFileError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}")


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    data = _read_mapping(path)
    _check_keys(str(path), data, SWEEP_KEYS)
    for key in ("name", "stages"):
        if key not in data:
            raise SweepFileError(f"{path}: missing required key {key!r}")
    name = str(data["name"])
    if not name or "/" in name or name.startswith("."):
        raise SweepFileError(f"{path}: name {name!r} must be a plain folder name")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise SweepFileError(f"{path}: grid must map override keys to lists of values")
    grid = {str(k): (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    for key, values in grid.items():
        if not values:
            raise SweepFileError(f"{path}: grid key {key!r} has no values")
    stages: dict[str, Stage] = {}
    if not isinstance(data["stages"], dict) or not data["stages"]:
        raise SweepFileError(f"{path}: stages must be a non-empty mapping name -> stage")
    for stage_name, spec in data["stages"].items():
        where = f"{path}: stages.{stage_name}"
        if not isinstance(spec, dict) or "module" not in spec:
            raise SweepFileError(f"{where}: needs at least `module: package.entry_module`")
        _check_keys(where, spec, STAGE_KEYS)
        after = spec.get("after")
        if after is not None and after not in stages:
            raise SweepFileError(
                f"{where}: after={after!r} must name an earlier stage {list(stages)}"
            )
        grid_keys = spec.get("grid_keys", list(grid) if after is None else [])
        if set(grid_keys) - set(grid):
            raise SweepFileError(f"{where}: grid_keys {grid_keys} not all in grid {list(grid)}")
        stages[stage_name] = Stage(
            name=stage_name,
            module=spec["module"],
            args=[str(a) for a in spec.get("args", [])],
            overrides=dict(spec.get("overrides") or {}),
            resources=dict(spec.get("resources") or {}),
            after=after,
            grid_keys=list(grid_keys),
            run_dir_key=spec.get("run_dir_key", "run_dir"),
            table=dict(spec.get("table") or {}),
        )
    cluster_file = data.get("cluster_file")
    return Sweep(
        name=name,
        grid=grid,
        stages=stages,
        cluster_file=(path.parent / cluster_file) if cluster_file else None,
        path=path,
    )


def load_cluster(path: str | Path | None) -> ClusterConfig:
    if path is None:
        return ClusterConfig()
    path = Path(path)
    data = _read_mapping(path)
    _check_keys(str(path), data, CLUSTER_KEYS)
    return ClusterConfig(
        resources=dict(data.get("resources") or {}), stages=dict(data.get("stages") or {})
    )


def stage_resources(stage: Stage, cluster: ClusterConfig) -> dict[str, Any]:
    """Cluster-wide defaults < the sweep's stage resources < the cluster file's stage entry."""
    return {**cluster.resources, **stage.resources, **cluster.stages.get(stage.name, {})}


def format_value(value: Any) -> str:
    """A value as the stages' ``key=value`` parser (YAML) reads it back."""
    return value if isinstance(value, str) else json.dumps(value)


def expand_grid(grid: dict[str, list[Any]]) -> list[Cell]:
    """Cartesian product in file order, last key varying fastest; no grid => one cell 'default'."""
    if not grid:
        return [Cell(name="default", values={})]
    cells = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = ",".join(f"{k}={format_value(v).replace('/', '_')}" for k, v in values.items())
        cells.append(Cell(name=name, values=values))
    return cells


def run_dir(runs_root: str | Path, sweep_name: str, stage: str, cell: str) -> Path:
    """THE path scheme: ``<runs_root>/<sweep name>/<stage>/<cell name>/`` (what `make table` reads)."""
    return Path(runs_root) / sweep_name / stage / cell


def stage_argv(sweep: Sweep, stage: Stage, cell: Cell, runs_root: str | Path) -> list[str]:
    """``args + [run_dir_key=<run dir>] + grid values (grid_keys) + overrides`` for one cell."""
    dirs = {name: str(run_dir(runs_root, sweep.name, name, cell.name)) for name in sweep.stages}
    dirs["run_dir"] = dirs[stage.name]
    argv = list(stage.args) + [f"{stage.run_dir_key}={dirs['run_dir']}"]
    argv += [f"{k}={format_value(cell.values[k])}" for k in stage.grid_keys]
    for key, value in stage.overrides.items():
        try:
            text = value.format(**dirs) if isinstance(value, str) else format_value(value)
        except (KeyError, IndexError) as err:
            raise SweepFileError(
                f"{sweep.path}: stages.{stage.name}.overrides.{key}: unknown placeholder {err}; "
                f"use one of {sorted('{' + d + '}' for d in dirs)}"
            ) from err
        argv.append(f"{key}={text}")
    return argv
