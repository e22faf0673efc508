"""Stand-ins for SLURM's commands (sbatch, sinfo, squeue, sacct, srun) on PATH, answering with
the real commands' words (recorded from Slurm 22.05), so that cluster failures are tested
without a cluster. Each logs its argv to ``<bin>/calls.log``."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher

# The real commands' words: the issue's config-less host, and a stopped slurmctld.
NO_CONFIG = (
    "{cmd}: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
    "{cmd}: error: fetch_config: DNS SRV lookup failed\n"
    "{cmd}: error: _establish_config_source: failed to fetch config\n"
    "{cmd}: fatal: Could not establish a configuration source"
)
SQUEUE_DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
BAD_ACCOUNT = (
    "sbatch: error: Batch job submission failed: Invalid account or account/partition "
    "combination specified"
)
TEST_ONLY_OK = (
    "sbatch: Job 9 to start at 2030-01-01T00:00:00 using 1 processors on nodes localhost in "
    "partition debug"
)


def _script(body: str) -> str:
    return f'#!/bin/bash\necho "$(basename "$0") $*" >> "$(dirname "$0")/calls.log"\n{body}\n'


def install(
    bin_dir: Path,
    monkeypatch,
    sinfo: tuple[int, str, str] = (0, "debug*|infinite", ""),
    test_only: tuple[int, str] = (0, TEST_ONLY_OK),
    submissions_ok: int = 99,
    refusal: str = BAD_ACCOUNT,
    squeue: tuple[int, str, str] = (0, "", ""),
) -> Path:
    """Fake commands in ``bin_dir``, first on PATH. ``sinfo``: (exit code, stdout, stderr);
    ``sbatch --test-only``: (exit code, stderr); real submissions: the first ``submissions_ok``
    answer ``Submitted batch job <100 + n>`` (their scripts kept as ``script.<n>``), the next
    ones print ``refusal`` and exit 1; ``squeue``: (exit code, stdout, stderr); sacct: no
    accounting (exit 1). submitit's job-state cache is process-wide and keeps finished jobs: a
    fresh one, so the fake job ids (101, ...) never read states of real jobs an earlier test ran."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(submitit.SlurmJob, "watcher", SlurmInfoWatcher(delay_s=600))

    def write(name: str, body: str) -> None:
        path = bin_dir / name
        path.write_text(_script(body))
        path.chmod(0o755)

    def answer(code: int, out: str, err: str) -> str:
        lines = (out, ""), (err, " >&2")
        return "".join(f"printf %s {shlex.quote(t + chr(10))}{to}\n" for t, to in lines if t) + (
            f"exit {code}"
        )

    write("sinfo", answer(*sinfo))
    write("squeue", answer(*squeue))
    write("sacct", answer(1, "", "sacct: error: Slurm accounting storage is disabled"))
    write("srun", "exit 0")
    test_code, test_err = test_only
    write(
        "sbatch",
        f"""if [ "$1" = --test-only ]; then {answer(test_code, "", test_err)}; fi
dir=$(dirname "$0"); n=$(( $(cat "$dir/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$dir/count"
if [ $n -le {submissions_ok} ]; then cp "$1" "$dir/script.$n"; echo "Submitted batch job $((100 + n))"; exit 0; fi
{answer(1, "", refusal)}""",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def calls(bin_dir: Path) -> list[str]:
    log = bin_dir / "calls.log"
    return log.read_text().splitlines() if log.exists() else []
