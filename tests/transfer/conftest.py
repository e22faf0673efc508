"""Fixtures of the transfer tests: a tiny generated VOC and pretext checkpoints written directly."""

from pathlib import Path

import pytest
import torch

from core.checkpoint import save_checkpoint
from core.models import build_model

TINY_IMAGES = 24


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """A tiny mini-VOC2007 (24 images, 8 classes); read-only."""
    from core import minivoc

    return minivoc.generate(tmp_path_factory.mktemp("tvoc"), n_images=TINY_IMAGES, workers=1)


def write_checkpoint(path: Path, method: str = "context_encoder", arch: str = "small64",
                     seed: int = 0) -> Path:  # fmt: skip
    """A loadable pretext checkpoint (random weights, like a step-0 checkpoint)."""
    torch.manual_seed(seed)
    model = build_model(arch)
    save_checkpoint(path, {
        "method": method, "arch": arch, "output": "full", "dropout": 0.0,
        "model": model.state_dict(), "discriminator": None, "optimizers": {}, "step": 0,
        "rng": {}, "data_mean": [0.0, 0.0, 0.0], "config": {}, "elapsed_s": 0.0,
    })  # fmt: skip
    return path


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ce.pt", seed=1)


@pytest.fixture()
def make_checkpoint():
    """write_checkpoint(path, method, arch, seed) as a fixture (test modules cannot import conftest)."""
    return write_checkpoint
