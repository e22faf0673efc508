"""``method=random_init``: the network as initialised, no training (Table 2's random-init row).

A training-free method: ``trains = False``; :meth:`init_encoder` is where a data-dependent init
(e.g. Krähenbühl et al. 2016's k-means) sets the encoder instead -- here it keeps the random weights
(``core.models``: Kaiming-normal convolutions, zero biases). Its checkpoint is the step-0 one and its
result the context encoder's inpainting metrics of the untrained network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from core.stage_inputs import Input
from pretext.methods.base import check_no_adversary, data_inputs
from pretext.methods.context_encoder import ContextEncoderMethod


class RandomInit(ContextEncoderMethod):
    """The untrained network (its mask settings are kept in the config but draw nothing)."""

    trains = False
    trained_parts = ()
    batches_from_store = False  # it trains on no batch

    @classmethod
    def resolve_config(cls, cfg: Any) -> Any:
        check_no_adversary(cfg)
        return cfg

    @classmethod
    def input_checks(cls, cfg: Any) -> list[Input]:
        return data_inputs(cfg)  # no mask shapes: none are drawn

    def mask_shapes(self) -> tuple[list[np.ndarray], str]:
        return [], "none"  # no masks are drawn

    def init_encoder(self, encoder: nn.Module, images: Dataset) -> None:
        """Keep the random init."""
