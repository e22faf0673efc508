"""Profiles of fake stages for the SLURM tests, written next to a tmp runs root."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from orchestrate import slurm
from orchestrate.jobs import ACTIVE_STATES, expand
from orchestrate.profile import load_profile

FAST = {"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 1}
CLUSTER = str(Path(__file__).resolve().parents[2] / "slurm" / "clusters" / "local.yaml")


def run_slurm(path, *flags) -> int:
    """``make table EXECUTOR=slurm CLUSTER=slurm/clusters/local.yaml`` on the profile ``path``."""
    from orchestrate import pipeline

    return pipeline.main(
        ["--profile", str(path), "--executor", "slurm", "--cluster", CLUSTER, *flags]
    )


def two_stage(tmp: Path, name: str = "p", **pretext) -> dict:
    """fake 'pretext' (4 steps) per variant x seed, then fake 'classify' (2 steps) reading it."""
    return {
        "name": name,
        "runs_root": str(tmp / "runs"),
        "results_dir": str(tmp / "results"),
        "data": "/nowhere",
        "seeds": [0, 1],
        "pretext": {
            "module": "fake_stage",
            "overrides": ["steps=4"],
            "resources": FAST,
            "variants": {"ce": {}},
            **pretext,
        },
        "transfer": {
            "classify": {
                "module": "fake_stage",
                "args": ["checkpoint={checkpoint}", "steps=2"],
                "variants": list(pretext.get("variants") or {"ce": {}}),
                "resources": FAST,
            }
        },
    }


def write_profile(tmp: Path, spec: dict, cluster: str | None = None):
    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, load_profile(path, cluster=cluster)


def wait_settled(profile, timeout_s: float) -> dict:
    """Polls until no job is pending/running or still active in SLURM (a job's result.json lands a
    moment before SLURM sees it end, and sacct records it a moment later); returns the states."""
    jobs = expand(profile)
    end = time.monotonic() + timeout_s
    while True:
        state = slurm.states(jobs)
        if not any(
            s.state in ("pending", "running")
            or s.scheduler_state in ACTIVE_STATES
            or (s.job_id and s.scheduler_state == "UNKNOWN")
            for s in state.values()
        ):
            return {j.name: state[j.run_dir] for j in jobs}
        if time.monotonic() > end:
            raise TimeoutError({j.name: state[j.run_dir] for j in jobs})
        time.sleep(1.0)
