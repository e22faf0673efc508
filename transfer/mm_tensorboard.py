"""TensorBoard event files of a detect / segment run (``core.tb``), written by an mmengine hook
into the run folder: the training losses and lr every ``every`` iterations (the values of
mm_run.ProgressHook's metrics.jsonl lines), the test metrics after the last iteration.

Not mmengine's TensorboardVisBackend: it writes under ``work/<timestamp>/vis_data``, so a resumed
run would show as a second TensorBoard run repeating the iterations after the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mmengine.hooks import Hook

from core import tb


class TensorboardHook(Hook):
    """Event files in ``run_dir``; flushed every ``checkpoint_every`` iterations (when
    transfer.mm_resume checkpoints) and closed after the test."""

    priority = "VERY_LOW"

    def __init__(self, run_dir: Path, total: int, checkpoint_every: int, every: int = 10):
        self.run_dir, self.total = run_dir, total
        self.checkpoint_every, self.every = checkpoint_every, every
        self.events: tb.EventLog | None = None

    def open(self, runner) -> tb.EventLog:
        """From the iteration the runner resumed at: the events after it and any test dropped."""
        if self.events is None:
            first = runner.iter + 1
            self.events = tb.EventLog(self.run_dir, first_step=first, drop_tags=("test/",))
        return self.events

    def before_train(self, runner) -> None:
        self.open(runner)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        events, step = self.open(runner), runner.iter + 1
        if outputs and (step % self.every == 0 or step == self.total):
            record = {k: float(v.detach()) for k, v in outputs.items() if torch.is_tensor(v)}
            record["lr"] = runner.optim_wrapper.get_lr()["lr"][0]
            events.scalars(step, record, "train/")
        if step % self.checkpoint_every == 0 or step == self.total:
            events.flush()

    def after_test_epoch(self, runner, metrics=None) -> None:
        events = self.open(runner)
        events.scalars(runner.iter, metrics or {}, "test/")
        events.close()
        self.events = None
