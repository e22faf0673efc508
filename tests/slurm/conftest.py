"""A real single-node SLURM cluster for the `slurm`-marked tests, started once per session.

Started with scripts/slurm_cluster.sh (its own state dir and ports, so a cluster you run yourself
is left alone) and stopped, daemon by daemon by pid, at the end. Where it cannot be installed or
started (not root, no apt-get) the tests are skipped with the reason, unless CE_REQUIRE_SLURM=1
(CI), where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
HERE = Path(__file__).resolve().parent


def _unavailable(reason: str) -> None:
    if os.environ.get("CE_REQUIRE_SLURM") == "1":
        pytest.fail(f"CE_REQUIRE_SLURM=1 but the SLURM test cluster is unavailable: {reason}")
    pytest.skip(f"no SLURM test cluster: {reason} (CI sets CE_REQUIRE_SLURM=1 to make this fail)")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Yields the cluster's state dir; SLURM_CONF and PYTHONPATH (for fake_stage) are set."""
    if os.geteuid() != 0:
        _unavailable("scripts/slurm_cluster.sh runs its daemons as root and this is not root")
    state = os.environ.get("CE_SLURM_TEST_STATE", "/tmp/ce-slurm-tests")
    env = {
        **os.environ,
        "CE_SLURM_STATE": state,
        "CE_SLURM_PORT": os.environ.get("CE_SLURM_TEST_PORT", "6837"),
    }
    for action, timeout in (("install", 900), ("start", 120)):
        t0 = time.monotonic()
        run = subprocess.run(
            ["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=timeout
        )
        print(f"slurm_cluster.sh {action}: {time.monotonic() - t0:.1f}s {run.stdout.strip()}")
        if run.returncode != 0:
            if action == "start":
                subprocess.run(
                    ["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120
                )
            _unavailable(
                f"`slurm_cluster.sh {action}` failed: {run.stderr.strip() or run.stdout.strip()}"
            )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", f"{state}/slurm.conf")
        mp.setenv(
            "PYTHONPATH", os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
        )
        yield Path(state)
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture()
def fake_stage_path(monkeypatch):
    """fake_stage importable in this process and in local-executor children."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    )
