"""Resume checkpoints of the mmdet / mmseg runs: data, never code, and an exact resume.

mmengine's own CheckpointHook pickles its ``HistoryBuffer`` objects (with bound methods, read back
through ``builtins.getattr``) and NumPy values, so torch's restricted unpickler refuses to reload
them; it also deletes the previous checkpoint before writing the next one in place (a kill in
between leaves nothing to resume from) and keeps no RNG state. :class:`ResumeHook` replaces it:

- ``<work_dir>/iter_<N>.pth`` holds mmengine's checkpoint layout (``meta``, ``state_dict``,
  ``message_hub``, ``optimizer``, ``param_schedulers``, mmengine/runner/runner.py
  ``Runner.save_checkpoint``) as tensors and plain values only -- the log history as tensors, NumPy
  scalars as Python numbers -- plus ``rng`` (torch, NumPy, Python ``random`` and CUDA states, as
  tensors and numbers) and ``meta.elapsed_s``. It is written atomically, then ``last_checkpoint``
  (its path, as mmengine writes it) atomically, and only then is the older file deleted: a kill at
  any moment leaves a complete checkpoint that ``last_checkpoint`` names.
- :class:`DataOnlyRunner` reads it back with ``core.checkpoint.read_tensor_file`` (the restricted
  unpickler, ``weights_only=True``): nothing is allow-listed, and a file that would import or call
  anything is refused with one line naming it, before any of it runs.
- The resume is exact: mmengine replays the ``N`` trained batches to put the data sampler where it
  was (``IterBasedTrainLoop.run``); the RNG states saved after iteration ``N`` are set right after
  that replay, where the uninterrupted run stood when it saved them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint_to_model, weights_to_cpu

from core.atomic_io import atomic_write_text
from core.checkpoint import CheckpointError, read_tensor_file, require_plain_data, save_tensor_file

POINTER = "last_checkpoint"


def resume_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint a run in ``work_dir`` resumes from (None: start afresh), checked to be data.

    Raises :class:`CheckpointError` (one line) for a missing, damaged or refused file, with the way
    to start over."""
    pointer = work_dir / POINTER
    if not pointer.is_file():
        return None
    # by name in the work dir: the pointer holds an absolute path, and run folders get moved
    path = work_dir / Path(pointer.read_text().strip()).name
    restart = f"; delete {work_dir} to train this run again from iteration 0"
    if not path.is_file():
        raise CheckpointError(f"{pointer}: names {path.name}, which does not exist{restart}")
    try:
        state = read_tensor_file(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{restart}") from None
    if not (isinstance(state, dict) and isinstance(state.get("meta"), dict) and "rng" in state):
        raise CheckpointError(f"{path}: not a resume checkpoint of this suite{restart}")
    return path


class DataOnlyRunner(Runner):
    """mmengine's Runner, reading checkpoints with the restricted unpickler (the same steps as
    ``Runner.load_checkpoint`` in mmengine/runner/runner.py, which calls ``torch.load`` with
    torch's default unpickler)."""

    def load_checkpoint(self, filename, map_location="cpu", strict=False,
                        revise_keys=((r"^module.", ""),)):  # fmt: skip
        checkpoint = read_tensor_file(filename, map_location)
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        checkpoint = _load_checkpoint_to_model(
            model, checkpoint, strict, revise_keys=list(revise_keys)
        )
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint


class ResumeHook(Hook):
    """Saves the resume checkpoint every ``every`` iterations and after the last; on resume, turns
    the loaded data back into mmengine's objects and sets the saved RNG states (module docstring)."""

    priority = "LOWEST"  # after the schedulers' step and the metrics line of the same iteration

    def __init__(self, work_dir: Path, every: int, max_iters: int, t0: float):
        self.work_dir, self.every, self.max_iters, self.t0 = Path(work_dir), every, max_iters, t0
        self.elapsed_before = 0.0  # training time of the processes before this one
        self.rng: dict[str, Any] | None = None

    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint["message_hub"]
        hub["log_scalars"] = {key: HistoryBuffer(v["log_history"].cpu().numpy(),
                                                 v["count_history"].cpu().numpy(), v["max_length"])
                              for key, v in hub["log_scalars"].items()}  # fmt: skip
        self.rng = checkpoint["rng"]
        self.elapsed_before = float(checkpoint["meta"].get("elapsed_s", 0.0))

    def before_train(self, runner) -> None:
        for tmp in [*self.work_dir.glob(".iter_*.pth.*.tmp"), *self.work_dir.glob(f".{POINTER}.*")]:
            tmp.unlink(missing_ok=True)  # left by a killed write; this process is the only writer
        loop = runner.train_loop
        if self.rng is not None and runner.iter > 0:
            loop.dataloader_iterator = RestoreRngAfter(
                loop.dataloader_iterator, runner.iter, self.rng
            )

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        step = runner.iter + 1
        if step % self.every == 0 or step == self.max_iters:
            self.save(runner, step)

    def save(self, runner, step: int) -> None:
        path = self.work_dir / f"iter_{step}.pth"
        save_tensor_file(path, checkpoint_state(runner, step, self.elapsed_s()), str(path))
        atomic_write_text(self.work_dir / POINTER, str(path))
        for old in self.work_dir.glob("iter_*.pth"):
            if old != path:
                old.unlink(missing_ok=True)


def checkpoint_state(runner, step: int, elapsed_s: float) -> dict[str, Any]:
    """mmengine's checkpoint dict after iteration ``step`` (``Runner.save_checkpoint``, by_epoch
    False), as plain data, plus the RNG states."""
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    meta = {"epoch": runner.epoch, "iter": step, "seed": runner.seed, "elapsed_s": elapsed_s}
    dataset_meta = getattr(runner.train_dataloader.dataset, "metainfo", None)
    if is_plain(dataset_meta):  # only compared, for a warning, on resume
        meta["dataset_meta"] = dataset_meta
    schedulers = runner.param_schedulers or []
    if isinstance(schedulers, dict):
        scheduler_states: Any = {k: [s.state_dict() for s in v] for k, v in schedulers.items()}
    else:
        scheduler_states = [s.state_dict() for s in schedulers]
    return {
        "meta": meta,
        "state_dict": weights_to_cpu(model.state_dict()),
        "message_hub": message_hub_state(runner.message_hub.state_dict()),
        "optimizer": to_cpu(runner.optim_wrapper.state_dict()),
        "param_schedulers": scheduler_states,
        "rng": rng_state(),
    }


def message_hub_state(state: dict[str, Any]) -> dict[str, Any]:
    """MessageHub.state_dict() with each HistoryBuffer as {log_history, count_history: tensors,
    max_length} and NumPy scalars as Python numbers."""
    scalars = {}
    for key, buffer in state["log_scalars"].items():
        values, counts = buffer.data
        scalars[key] = {"log_history": torch.from_numpy(np.array(values)),
                        "count_history": torch.from_numpy(np.array(counts)),
                        "max_length": int(buffer.max_length)}  # fmt: skip
    info = {
        k: v.item() if isinstance(v, np.generic) else v for k, v in state["runtime_info"].items()
    }
    return {
        "log_scalars": scalars,
        "runtime_info": info,
        "resumed_keys": dict(state["resumed_keys"]),
    }


def to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def is_plain(value: Any) -> bool:
    try:
        require_plain_data(value, "value")
    except TypeError:
        return False
    return True


def rng_state() -> dict[str, Any]:
    """Every RNG the data pipeline and the model draw from, as tensors and numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": {"version": version, "state": list(python_state), "gauss_next": python_gauss},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Set the states of :func:`rng_state` (loaded to any device: mmengine resumes onto the GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].cpu().numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))  # fmt: skip
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class RestoreRngAfter:
    """Yields what ``iterator`` yields, and sets the RNG states ``rng`` just before item ``skip``
    (0-based): after mmengine's replay of the ``skip`` trained batches."""

    def __init__(self, iterator: Iterator, skip: int, rng: dict[str, Any]):
        self.iterator, self.skip, self.rng = iterator, skip, rng

    def __iter__(self) -> RestoreRngAfter:
        return self

    def __next__(self) -> Any:
        if self.skip == 0 and self.rng is not None:
            set_rng_state(self.rng)
            self.rng = None
        self.skip -= 1
        return next(self.iterator)
