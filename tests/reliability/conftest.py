"""Fixtures of the reliability suite: a fork server for cheap kill -9 restarts, tiny run configs."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class ForkServer:
    """Client of ``fork_server.py``: start real runs (``python -m module argv``), kill them, wait."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fork_server.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,  # replies are read line by line next to select()
            cwd=REPO,
            env=env,
        )
        self.exited: dict[int, int] = {}
        self.count = 0

    def _read(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"fork server died (rc {self.proc.poll()})")
        return json.loads(line)

    def start(
        self, module: str, argv: list[str], pause: dict | None = None, env: dict | None = None
    ) -> tuple[int, Path]:
        """Fork ``python -m module argv`` (``env``: extra variables); returns (pid, log file)."""
        self.count += 1
        log = self.workdir / f"run{self.count:03d}.log"
        request = {"module": module, "argv": argv, "log": str(log), "cwd": str(REPO)}
        if pause:
            request["pause"] = pause
        if env:
            request["env"] = env
        self.proc.stdin.write((json.dumps(request) + "\n").encode())  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        while True:
            reply = self._read()
            if "pid" in reply:
                return reply["pid"], log
            self.exited[reply["exited"]] = reply["returncode"]

    def running(self, pid: int) -> bool:
        """Whether ``pid`` still runs (reads the server's pending replies without blocking)."""
        while select.select([self.proc.stdout], [], [], 0)[0]:
            reply = self._read()
            if "exited" in reply:
                self.exited[reply["exited"]] = reply["returncode"]
        return pid not in self.exited

    def wait(self, pid: int, timeout: float = 120.0) -> int:
        """The child's return code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        while pid not in self.exited:
            if time.monotonic() > deadline:
                self.kill(pid)
                raise TimeoutError(f"run {pid} did not finish in {timeout} s")
            reply = self._read()
            if "exited" in reply:
                self.exited[reply["exited"]] = reply["returncode"]
        return self.exited[pid]

    def kill(self, pid: int) -> int:
        """kill -9 the run's whole process group; returns its return code."""
        for kill in (os.kill, os.killpg):  # the pid itself, also if it has not called setsid yet
            with contextlib.suppress(ProcessLookupError):
                kill(pid, signal.SIGKILL)
        return self.wait(pid)

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # starved on a loaded machine: end of session, stop it
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forked_logs"))
    yield server
    server.close()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="session")
def waiter():
    """``wait_for(predicate, timeout, what)`` as a fixture (test modules never import conftest)."""
    return wait_for


@pytest.fixture()
def pretext_args(tiny_voc):
    """``pretext_args(run_dir, steps)``: overrides of a ~2-5 s pretext run on the tiny mini-VOC."""

    def make(run_dir: Path, steps: int = 24, *extra: str) -> list[str]:
        return [
            f"data.root={tiny_voc}",
            f"run_dir={run_dir}",
            "data.num_workers=0",
            "optim.batch_size=8",
            f"optim.steps={steps}",
            "optim.warmup_steps=2",
            "checkpoint_every=2",
            "log_every=1",
            "eval_images=4",
            "threads=1",
            *extra,
        ]

    return make
