"""Rank / world size from the environment: SLURM first, then torchrun, else one process.

Launchers never inject ranks; the same ``main`` runs on a laptop, under torchrun and under SLURM.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env(environ: dict[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    return DistEnv()


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodes.split(",")[0]


def init(env: DistEnv) -> None:
    """Join the process group when world_size > 1 (NCCL on GPU, gloo on CPU)."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if "SLURM_PROCID" in os.environ:
        os.environ.setdefault("MASTER_ADDR", _slurm_master_addr())
        os.environ.setdefault(
            "MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", 0)) % 20000)
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
