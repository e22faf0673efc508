"""What a stage's ``input_checks(cfg)`` returns: each input of one run with the run's own check of
it, so that the pre-flight (``orchestrate.preflight``) checks every job before any starts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Input:
    """One input of a stage run, as its ``input_checks(cfg)`` lists it: the config key naming it,
    its path, and the stage's own check of it (raises what the run would raise at start; reads
    no image)."""

    key: str
    path: str
    check: Callable[[], Any]
