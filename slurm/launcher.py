"""The thin layer between a sweep and the cluster: one job class, one executor factory.

Stages know nothing of SLURM. A stage module exposes ``parse_config(argv) -> cfg`` and
``main(cfg) -> dict[str, float]``, writes into ``cfg.run_dir`` and resumes from
``run_dir/checkpoints/last.pt`` when started again on the same folder. Rank and world size for
multi-GPU jobs come from the SLURM/torchrun environment, read by the stage, never injected here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import submitit

CLUSTERS = ("slurm", "local")


class StageJob:
    """``StageJob("pretext.train", ["--config", "...", "run_dir=..."])()`` runs one stage.

    Picklable (only the module name and argv travel to the node); the module is imported on the
    node, lazily, so the submitting process needs none of the stage's dependencies.
    """

    def __init__(self, module: str, argv: list[str]) -> None:
        self.module = module
        self.argv = list(argv)

    def __call__(self) -> dict[str, float]:
        stage = importlib.import_module(self.module)
        return stage.main(stage.parse_config(self.argv))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        # Called by submitit on the time-limit / preemption signal. The stage checkpoints into its
        # run folder by itself, so requeuing the same call is enough to resume from there.
        return submitit.helpers.DelayedSubmission(self)

    def __repr__(self) -> str:
        return f"StageJob({self.module!r}, {self.argv!r})"


def make_executor(
    cluster: str, folder: str | Path, resources: dict[str, Any]
) -> submitit.AutoExecutor:
    """An executor for ``cluster`` ("slurm" or "local") writing its logs/pickles under ``folder``.

    ``resources`` are submitit AutoExecutor parameters, verbatim (``timeout_min``, ``cpus_per_task``,
    ``gpus_per_node``, ``mem_gb``, ``slurm_partition``, ``slurm_account``, ...); ``slurm_*`` ones
    are ignored by the local executor. submitit rejects unknown names and lists the valid ones.
    """
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; expected one of {CLUSTERS}")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**resources)
    return executor
