"""Sweep files for the tests, written next to a tmp runs root."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from slurm.sweep import ACTIVE_STATES, sweep_status
from slurm.sweep_file import Sweep, load_sweep


def write_sweep(folder: Path, spec: dict) -> Sweep:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_sweep(path)


def two_stage_spec(
    name: str, grid: dict, pretext_overrides: dict | None = None, resources: dict | None = None
) -> dict:
    """fake 'pretext' over the grid, then fake 'classify' reading the pretext checkpoint."""
    resources = resources or {"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 1}
    return {
        "name": name,
        "grid": grid,
        "stages": {
            "pretext": {
                "module": "fake_stage",
                "overrides": {"steps": 4, **(pretext_overrides or {})},
                "resources": resources,
            },
            "classify": {
                "module": "fake_stage",
                "after": "pretext",
                "grid_keys": ["seed"],
                "table": {"stage": "transfer", "task": "classify"},
                "overrides": {"steps": 2, "checkpoint": "{pretext}/checkpoints/last.pt"},
                "resources": resources,
            },
        },
    }


def wait_settled(sweep: Sweep, runs_root: Path, timeout_s: float) -> dict:
    """Polls until no cell is pending/running and no job is still active (a job's result.json
    lands a moment before SLURM sees it end, and sacct records it a moment later); returns the
    statuses."""
    end = time.monotonic() + timeout_s
    while True:
        statuses = sweep_status(sweep, runs_root)
        if not any(
            s.state in ("pending", "running")
            or s.scheduler_state in ACTIVE_STATES
            # sacct records an ended job a moment after its result/exception file is written
            or (s.job_id and s.scheduler_state == "UNKNOWN")
            for s in statuses.values()
        ):
            return statuses
        if time.monotonic() > end:
            raise TimeoutError({k: (s.state, s.scheduler_state) for k, s in statuses.items()})
        time.sleep(1.0)
