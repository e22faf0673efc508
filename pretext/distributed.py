"""Rank / world size from the environment: SLURM first, then torchrun, else one process.

Launchers never inject ranks; the same ``main`` runs on a laptop, under torchrun and under SLURM.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

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


# ---- collectives of the training step (no-ops in one process) ----------------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks, in place (no autograd): loss values, pixel counts."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does at construction)."""
    if world_size() > 1:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def average_gradients(module: torch.nn.Module) -> None:
    """Mean of the gradients over the ranks (DDP's reduction, for a module DDP cannot wrap: the
    discriminator, called twice -- real and fake batch -- before one backward)."""
    n = world_size()
    if n == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(n)
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))


class _GatherBatch(torch.autograd.Function):
    """[n, ...] on each rank -> the global batch [world * n, ...] in rank order. Backward: the
    global batch's gradient summed over the ranks (every rank's loss depends on every sample
    through the batch statistics), this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        ctx.lo, ctx.n = dist.get_rank() * x.shape[0], x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.lo : ctx.lo + ctx.n]


class _GlobalBatchStatistics:
    """Training-mode statistics of the global batch, on any device (torch's SyncBatchNorm runs on
    GPUs only). Each rank gathers the global batch, normalises it with the plain batch-norm kernel
    and keeps its own slice: the statistics, the running averages and the output are the ones one
    process computes on the whole batch. Eval mode and one process: plain batch norm. Same
    parameters, buffers and state-dict keys as the torch class it is mixed into."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:  # type: ignore[attr-defined]
            return super().forward(x)  # type: ignore[misc]
        n = x.shape[0]
        full = super().forward(_GatherBatch.apply(x))  # type: ignore[misc]
        lo = dist.get_rank() * n
        return full[lo : lo + n]


class GlobalBatchNorm2d(_GlobalBatchStatistics, torch.nn.BatchNorm2d):
    """BatchNorm2d over the global batch (:class:`_GlobalBatchStatistics`)."""


class GlobalBatchNorm1d(_GlobalBatchStatistics, torch.nn.BatchNorm1d):
    """BatchNorm1d over the global batch (the fc heads of the classification pretext methods)."""


GLOBAL_BATCHNORM = {
    torch.nn.BatchNorm2d: GlobalBatchNorm2d,
    torch.nn.BatchNorm1d: GlobalBatchNorm1d,
}


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm over the global batch when world_size > 1: torch's SyncBatchNorm on GPU,
    :class:`GlobalBatchNorm2d` / :class:`GlobalBatchNorm1d` on CPU (in place: the parameters stay
    the optimizer's)."""
    if world_size() == 1:
        return module
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) in GLOBAL_BATCHNORM:
            m.__class__ = GLOBAL_BATCHNORM[type(m)]
    return module


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
