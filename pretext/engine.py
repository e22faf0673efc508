"""The pretext training loop and checkpoint state, shared by every method (MAE's
``engine_pretrain.py`` beside ``main_pretrain.py``): what a checkpoint holds (:class:`Training`),
the learning-rate schedule, and the loop over the step-seeded batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core import tb
from core.atomic_io import append_jsonl, atomic_write_text, read_jsonl
from core.batched_source import make_batched_source
from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import to_dict
from core.data import StepBatchSampler, make_loader
from core.models import ContextEncoder
from pretext import distributed
from pretext.distributed import DistEnv
from pretext.methods.base import Method, TrainStep
from pretext.probe import Probe, due

log = logging.getLogger("pretext.engine")


@dataclass
class Run:
    """Where a run lives: its resolved config, process group, device and folder."""

    cfg: Any
    env: DistEnv
    device: torch.device
    run_dir: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"


@dataclass
class Training:
    """What a checkpoint holds: the network, the method (its head / discriminator), the
    optimisers, the data mean, and how far training got."""

    model: ContextEncoder
    method: Method
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    mean: list[float]
    step: int = 0
    elapsed: float = 0.0
    rng: dict[str, Any] | None = (
        None  # resumed: this rank's saved RNG state, set as the loop starts
    )
    data_store: dict[str, Any] | None = None  # data.store: {path, sha256} the batches come from


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up then cosine decay to 1% (or constant); ``cfg``: the ``optim`` section.

    A pure function of the step, so a resumed run needs no scheduler state (docs/decisions.md,
    "Learning-rate schedules")."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.cosine:
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(t: Training, cfg: Any, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint dict (format: ``core/checkpoint.py``); ``rngs``: every rank's RNG state."""
    disc = t.method.disc
    return {
        "method": cfg.method,
        "arch": cfg.model.arch,
        "output": cfg.model.output,
        "dropout": cfg.model.dropout,
        "model": t.model.state_dict(),
        "discriminator": disc.state_dict() if disc is not None else None,
        "optimizers": {
            "gen": t.opt_g.state_dict(),
            "disc": t.opt_d.state_dict() if t.opt_d is not None else None,
        },
        "step": t.step,
        "rng": rngs[0],
        **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
        "data_mean": t.mean,
        "config": to_dict(cfg),
        "elapsed_s": t.elapsed,
        "trained": list(t.method.trained_parts),  # core.checkpoint.PARTS this method sets
        **({"data_store": t.data_store} if t.data_store else {}),
        **t.method.extra_state(),
    }


def load_state(t: Training, state: dict[str, Any], env: DistEnv) -> None:
    """Restore ``t`` (weights, optimisers, this rank's RNG, progress) from a checkpoint dict."""
    t.model.load_state_dict(state["model"])
    t.method.load_extra_state(state)
    if t.opt_d is not None:
        t.opt_d.load_state_dict(state["optimizers"]["disc"])
    t.opt_g.load_state_dict(state["optimizers"]["gen"])
    rngs = state.get("rng_ranks") or [state["rng"]]  # rng_ranks: saved by a DDP run
    t.rng = rngs[env.rank] if len(rngs) == env.world_size else state["rng"]
    set_rng_state(t.rng)
    t.step, t.elapsed, t.mean = state["step"], state["elapsed_s"], state["data_mean"]


def save(t: Training, run: Run) -> None:
    """Checkpoint with every rank's RNG state (a collective: every rank calls it), written by rank 0."""
    rngs = distributed.all_gather_object(rng_state())
    if run.env.is_main:
        save_checkpoint(run.ckpt_path, checkpoint_state(t, run.cfg, rngs))


def set_learning_rates(t: Training, cfg: Any) -> None:
    lr = lr_at(t.step, cfg.optim)
    for group in t.opt_g.param_groups:
        group["lr"] = lr
    if t.opt_d is not None:
        for group in t.opt_d.param_groups:
            group["lr"] = lr * t.method.disc_lr_scale


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so no step appears twice."""
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records) or (path.exists() and not path.read_text().endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def step_loader(t: Training, run: Run, total: int) -> Any:
    """The method's batches of steps ``t.step .. total - 1`` (this rank's part of each)."""
    cfg, env = run.cfg, run.env
    if cfg.data.store:
        return store_batches(t, run, total)
    sampler = StepBatchSampler(
        len(t.method.train_images), cfg.optim.batch_size, cfg.seed, t.step, total, env.rank,
        env.world_size,
    )  # fmt: skip
    return make_loader(
        t.method.items(), sampler, cfg.data.num_workers, pin_memory=run.device.type == "cuda"
    )


def store_batches(t: Training, run: Run, total: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """``data.store``: the method's batches of steps ``t.step .. total - 1`` cut from the image
    store by batched crops, flips and holes on ``run.device`` (core.batched_source): the samples
    of (seed, step, slot) and this rank's slice of each global batch, as StepBatchSampler gives
    them. The store was checked against the config when the run started (train.start_run)."""
    cfg, env = run.cfg, run.env
    source = make_batched_source(cfg, t.model.input_size, run.device, t.step, total,
                                 t.method.shapes, env.rank, env.world_size,
                                 verify_sources=False)  # fmt: skip
    return (t.method.store_batch(*batch) for batch in source)


def one_step(t: Training, train_step: TrainStep, batch: Any, run: Run) -> dict[str, float]:
    """One optimisation step at ``t.step``'s learning rate; ``t.step`` and ``t.elapsed`` advanced.
    A non-finite loss raises FloatingPointError naming the step and the last good checkpoint."""
    set_learning_rates(t, run.cfg)
    t0 = time.perf_counter()
    if t.step == run.cfg.fail_at_step:
        train_step.poison = True
    losses = train_step(*batch)
    if not math.isfinite(losses["loss"]):
        raise FloatingPointError(
            f"{run.run_dir}: non-finite loss {losses['loss']} at step {t.step}; stopped "
            f"without saving. The last good checkpoint is {run.ckpt_path} "
            f"(step {load_checkpoint(run.ckpt_path)['step']})"
        )
    t.elapsed += time.perf_counter() - t0
    t.step += 1
    return losses


class Throughput:
    """Images per second between two log lines."""

    def __init__(self) -> None:
        self.since, self.images = time.perf_counter(), 0

    def per_s(self) -> float:
        """The rate since the last call (or since created), and start counting afresh."""
        now = time.perf_counter()
        rate = self.images / max(now - self.since, 1e-9)
        self.since, self.images = now, 0
        return rate


def log_losses(
    t: Training, run: Run, losses: dict[str, float], images_per_s: float, events: tb.EventLog
) -> None:
    """One metrics.jsonl line (and its TensorBoard scalars) for the step just taken."""
    record = {
        "step": t.step,
        "lr": lr_at(t.step - 1, run.cfg.optim),
        **losses,
        "images_per_s": images_per_s,
        "train_time_s": t.elapsed,
    }
    append_jsonl(run.run_dir / "metrics.jsonl", record)
    events.scalars(t.step, {k: v for k, v in record.items() if k != "step"}, "train/")


def log_snapshot(t: Training, run: Run, events: tb.EventLog) -> None:
    """The method's validation scalars and images (``Method.snapshot``) as TensorBoard events."""
    scalars, images = t.method.snapshot(run.device, t.mean)
    events.scalars(t.step, scalars, "val/")
    for tag, image in images.items():
        events.image(f"val/{tag}", image, t.step)


def log_probe(t: Training, run: Run, probe: Probe, events: tb.EventLog) -> float:
    """The probe's metrics.jsonl line (and its TensorBoard scalars) at ``t.step``, rank 0 only:
    no collective, so the other ranks wait in the next step's all-reduce. Returns its seconds."""
    t0 = time.perf_counter()
    record = {
        "step": t.step,
        "images_seen": t.step * run.cfg.optim.batch_size,  # the global batch
        **probe(t.model, run.device),
    }
    append_jsonl(run.run_dir / "metrics.jsonl", record)
    events.scalars(t.step, {k: v for k, v in record.items() if k != "step"})
    seconds = time.perf_counter() - t0
    log.info("probe at step %d (%.1f s): %s", t.step, seconds, record)
    return seconds


def train_steps(
    t: Training, train_step: TrainStep, run: Run, total: int, probe: Probe | None = None
) -> None:
    """Steps ``t.step .. total - 1`` on the method's batches; logs (rank 0) every ``log_every``
    steps and checkpoints every ``checkpoint_every`` and at the end. A non-finite loss stops the
    run without saving (FloatingPointError naming the step and the last good checkpoint).
    ``probe`` (rank 0): its line at step 0 and at every step ``due``, before the step's loss line
    and checkpoint, so a resumed run drops and recomputes those after its checkpoint."""
    cfg, env = run.cfg, run.env
    probe = probe if env.is_main else None
    loader = step_loader(t, run, total)
    t.model.train()
    t.method.net.train()
    bar = tqdm(
        total=total,
        initial=t.step,
        desc=f"pretext {run.run_dir.name}",
        disable=not env.is_main,
        mininterval=2,
        file=sys.stderr,
    )
    # TensorBoard (rank 0): the steps after t.step written afresh (those of a run stopped after
    # its checkpoint dropped, as in metrics.jsonl); closed, i.e. flushed, however the loop ends
    first = 0 if probe is not None and t.step == 0 else t.step + 1  # step 0: probed afresh
    events = tb.EventLog(run.run_dir, env.is_main and cfg.log.tensorboard, first_step=first)
    throughput = Throughput()
    batches = iter(loader)  # draws the loader's base seed from the global torch RNG
    if t.rng is not None:  # resumed: undo that draw (an uninterrupted run made it at step 0 only),
        set_rng_state(t.rng)  # so dropout continues the saved stream
        t.rng = None
    with contextlib.closing(events):
        if probe is not None and t.step == 0:  # no step taken yet: what an earlier start of
            truncate_metrics(run.run_dir / "metrics.jsonl", -1)  # this run logged at step 0 goes
            log_probe(t, run, probe, events)
        for batch in batches:
            losses = one_step(t, train_step, batch, run)
            throughput.images += len(batch[0]) * env.world_size
            bar.update(1)
            if probe is not None and due(cfg.probe, t.step, total):
                throughput.since += log_probe(t, run, probe, events)  # not in images_per_s
            if env.is_main and (t.step % cfg.log_every == 0 or t.step == total):
                log_losses(t, run, losses, throughput.per_s(), events)
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
            every = cfg.log.images_every
            if events.enabled and every > 0 and (t.step % every == 0 or t.step == total):
                log_snapshot(t, run, events)
            if t.step % cfg.checkpoint_every == 0 or t.step == total:
                save(t, run)
                events.flush()
    bar.close()
