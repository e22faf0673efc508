"""Fixtures for the eval tests: untrained small64 checkpoints (no training needed, seconds)."""

from pathlib import Path

import pytest
import torch

from core.checkpoint import save_checkpoint
from core.models import build_model

MEAN = [0.1, -0.05, 0.0]


def write_checkpoint(path: Path, seed: int, method: str = "context_encoder") -> Path:
    """A small64 checkpoint with weights drawn from ``seed`` (what pretext.train writes)."""
    torch.manual_seed(seed)
    model = build_model("small64", output="full")
    save_checkpoint(
        path,
        {
            "method": method,
            "arch": "small64",
            "output": "full",
            "dropout": 0.0,
            "model": model.state_dict(),
            "discriminator": None,
            "optimizers": {},
            "step": 0,
            "rng": {},
            "data_mean": MEAN,
            "config": {"mask": {"kind": "central", "overlap": 2}},
            "elapsed_s": 0.0,
        },
    )
    return path


@pytest.fixture(scope="session")
def ckpt_mean() -> list[float]:
    """The data_mean stored in every checkpoint written here."""
    return MEAN


@pytest.fixture(scope="session")
def make_checkpoint():
    """``make_checkpoint(path, seed)`` writes a checkpoint (a fixture: test files never import conftest)."""
    return write_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", seed=0)
