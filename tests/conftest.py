"""Shared fixtures: a tiny generated mini-VOC for the whole session."""

from pathlib import Path

import pytest

TINY_IMAGES = 48


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """A tiny mini-VOC (VOC2007 layout) generated once per session; treat it as read-only."""
    from core import minivoc

    return minivoc.generate(tmp_path_factory.mktemp("minivoc"), n_images=TINY_IMAGES, seed=0)


@pytest.fixture()
def tiny_train_args(tiny_voc, tmp_path) -> list[str]:
    """Overrides for a few-second pretext run on the tiny mini-VOC."""
    return [
        f"data.root={tiny_voc}",
        f"run_dir={tmp_path / 'run'}",
        "data.num_workers=0",
        "optim.batch_size=8",
        "optim.steps=12",
        "optim.warmup_steps=2",
        "checkpoint_every=4",
        "log_every=2",
        "eval_images=8",
        "threads=1",
    ]
