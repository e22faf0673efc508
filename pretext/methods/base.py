"""What the trainer (``pretext.train``) asks of a pretext method, and the pieces methods share.

Every method trains the suite's network (:class:`core.models.ContextEncoder`) or its ``encoder``,
the module every transfer / frozen protocol reads from a checkpoint's ``model``. A method is one
class over :class:`Method` (solo-learn's ``solo/methods/<name>.py`` over ``base.py``) holding

- its batch transform: :meth:`Method.items`, what a dataset item becomes (indexed by
  ``(index, sample_seed)``, so every random choice is a function of (seed, step, slot));
- its head: the trainable modules beside the encoder, in ``net`` (what the ``gen`` optimiser trains
  and DDP wraps), saved as the checkpoint's ``head``; an optional ``disc`` (its own optimiser);
- its loss: :meth:`Method.make_step`, one optimisation step on a batch;
- its evaluation: :meth:`Method.evaluate`, the entries of ``result.json``; optionally what
  TensorBoard shows while it trains, :meth:`Method.snapshot` (e.g. an inpainting grid).

A training-free method sets ``trains = False`` and may set the encoder from data in
:meth:`Method.init_encoder` (called once, before the step-0 checkpoint, never on resume).
The trainer owns the rest: seeds, optimisers and their schedule, resume, DDP, checkpoints, logging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from core import machine
from core.config import ConfigError
from core.data import SeededViews
from core.models import ContextEncoder
from core.splits import open_split, split_folder
from core.stage_inputs import Input


@dataclass(frozen=True)
class Placement:
    """Where and how a step runs: device, autocast dtype (None: fp32), memory format."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format

    def autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)


def resolve_precision(cfg: Any, device: torch.device) -> tuple[torch.dtype | None, str]:
    """(autocast dtype or None for fp32, why) of ``cfg.amp`` on ``device``: core.machine's rule,
    with pretext's bf16 on a CPU only once it is in ``core.machine.CPU_BF16_STAGES``."""
    return machine.resolve_amp(cfg.amp, device, "pretext" in machine.CPU_BF16_STAGES)


def step_settings(
    cfg: Any, device: torch.device
) -> tuple[torch.memory_format, torch.dtype | None, bool]:
    """(memory format, autocast dtype or None, torch.compile the model?) for ``cfg`` on ``device``."""
    use_gpu = device.type == "cuda"
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and use_gpu)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return memory_format, resolve_precision(cfg, device)[0], cfg.compile


def build_images(
    cfg: Any, split: str, train: bool, image_size: int, labels: bool = False, class_names=None
):
    """The dataset of ``split`` of ``cfg.data`` (uint8 [3, S, S] items; ``labels``: with its VOC
    labels or class index, core.splits.open_split) under the intake rule of ``cfg.images``."""
    d = cfg.data
    return open_split(d.root, split, image_size, train, labels, d.format, class_names, cfg.images)


def check_data(cfg: Any, splits: tuple[str, ...]) -> None:
    """What :func:`build_images` opens for ``splits``, checked without reading an image: a VOC
    root's ``ImageSets/Main/<split>.txt``, or a split's image folder; ``cfg``: the ``data`` section."""
    from core.datasets import image_folder
    from core.voc import read_split

    for split in splits:
        if cfg.format == "voc":
            read_split(cfg.root, split)
        else:
            image_folder(split_folder(cfg.root, split))


def data_inputs(cfg: Any) -> list[Input]:
    """The data root with its train and val splits (every method's evaluation reads val), and the
    image store of ``data.store`` when one is given."""
    d = cfg.data
    inputs = [Input("data.root", d.root, lambda: check_data(d, (d.split, d.val_split)))]
    if d.store:
        inputs.append(Input("data.store", d.store, lambda: open_store(cfg)))
    return inputs


def open_store(cfg: Any):
    """The image store of ``data.store`` (core.image_store.ImageStore), checked against
    ``data.root`` / ``format`` / ``split``, the network's input size and the intake rule
    ``images.*``, and its sources unchanged (stats them; reads no image): StoreError otherwise."""
    from core.image_store import ImageStore, StoreError
    from core.models import build_model

    path = Path(cfg.data.store)
    if not path.is_dir():
        raise StoreError(
            f"{path}: data.store: no such image store; build it with "
            f"python -m core.image_store build {cfg.data.root} {path} --short-side <input size>"
        )
    with torch.device("meta"):  # the input size of model.arch, no weights allocated
        size = build_model(cfg.model.arch, 0.0, cfg.model.output).input_size
    store = ImageStore(path)
    d, rule = cfg.data, cfg.images
    store.check(d.root, d.format, d.split, size, True, rule.strict, rule.skip_bad)
    return store


def without_masks(cfg: Any) -> Any:
    """``mask.kind=none``: the method's input is not a masked image, and its config says so."""
    return dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, kind="none"))


def check_no_adversary(cfg: Any) -> None:
    if cfg.loss.adversarial:
        raise ConfigError("loss.adversarial applies to method=context_encoder only")


def eval_picks(n: int, max_images: int) -> np.ndarray:
    """Up to ``max_images`` indices spread evenly over ``range(n)`` (0: all)."""
    m = n if max_images <= 0 else min(n, max_images)
    return np.unique(np.linspace(0, n - 1, m).round().astype(int))


class TrainStep(Protocol):
    """One optimisation step: batch tensors in, logged values out (``loss`` among them, the
    global batch's under DDP). ``poison``: the testing aid ``fail_at_step`` (a NaN loss)."""

    poison: bool

    def __call__(self, *batch: torch.Tensor) -> dict[str, float]: ...


class EncoderHead(nn.Module):
    """encoder -> head: x [N, 3, S, S] in [-1, 1] -> head(encoder(x))."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Method:
    """A pretext method over ``model`` (see the module docstring). Built once per run, after the
    network (``torch.manual_seed(cfg.seed)``, then the model, then the method's modules: the order
    in which their initial weights are drawn)."""

    trains: ClassVar[bool] = True
    # the parts (core.checkpoint.PARTS) whose weights the method sets, recorded in the checkpoint
    trained_parts: ClassVar[tuple[str, ...]] = ("encoder", "head")
    disc_lr_scale: ClassVar[float] = 1.0  # the ``disc`` optimiser's lr relative to ``optim.lr``
    # data.store: the batch transform can be made on whole batches of store crops and holes
    # (core.batched_source, :meth:`store_batch`); the silhouettes of random-region holes
    batches_from_store: ClassVar[bool] = False
    shapes: Sequence[np.ndarray] = ()

    def __init__(self, cfg: Any, model: ContextEncoder):
        self.cfg, self.model = cfg, model
        self.train_images: Dataset = self.open_train_images()
        self.head: nn.Module | None = None
        self.disc: nn.Module | None = None

    @classmethod
    def resolve_config(cls, cfg: Any) -> Any:
        """The method's derived settings and cross-field checks (default: no masks, no adversary)."""
        check_no_adversary(cfg)
        return without_masks(cfg)

    @classmethod
    def input_checks(cls, cfg: Any) -> list[Input]:
        """The inputs a run of ``cfg`` (resolved) opens, each with the check the run makes of it
        (``orchestrate.preflight`` runs them before a pipeline starts); default: :func:`data_inputs`."""
        return data_inputs(cfg)

    # ---- set-up ---------------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        return self.model.input_size

    def open_train_images(self) -> Dataset:
        """The training split (train views: random crop + flip) at the network's input size."""
        return build_images(self.cfg, self.cfg.data.split, train=True, image_size=self.input_size)

    @property
    def net(self) -> nn.Module:
        """The module the ``gen`` optimiser trains (DDP wraps it): the network, or encoder + head."""
        return self.model

    def init_encoder(self, encoder: nn.Module, images: Dataset) -> None:
        """Set ``encoder``'s weights from ``images`` (a data-dependent init); default: keep them."""

    def extra_state(self) -> dict[str, Any]:
        """Checkpoint entries beside ``model`` / ``discriminator``: ``head`` (and what else)."""
        return {} if self.head is None else {"head": self.head.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.head is not None:
            self.head.load_state_dict(state["head"])

    def to(self, device: torch.device, memory_format: torch.memory_format) -> None:
        """Move the method's modules (the network is moved by the trainer)."""
        if self.net is not self.model:
            self.net.to(device, memory_format=memory_format)
        if self.disc is not None:
            self.disc.to(device, memory_format=memory_format)

    # ---- training -------------------------------------------------------------------------------

    def items(self) -> SeededViews:
        """The batch transform: a dataset indexed by (index, sample_seed)."""
        raise NotImplementedError

    def store_batch(self, images: torch.Tensor, hole: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch of :meth:`items` from a store batch (``data.store``): images uint8
        [N, 3, S, S] (train views) and holes bool [N, 1, S, S] on the device; default: as is."""
        return images, hole

    def make_step(
        self,
        net: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer | None,
        mean: torch.Tensor,
        placement: Placement,
    ) -> TrainStep:
        """The optimisation step over ``net`` (``self.net``, DDP-wrapped / compiled by the trainer)."""
        raise NotImplementedError

    def snapshot(
        self, device: torch.device, mean: list[float]
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """What TensorBoard shows of the network every ``log.images_every`` steps (rank 0, outside
        the step; it must change no state the training reads): (scalars, uint8 [H, W, 3] images
        by tag); default none."""
        return {}, {}

    # ---- the end --------------------------------------------------------------------------------

    def evaluate(
        self, run_dir: Path, device: torch.device, mean: list[float], progress: dict[str, float]
    ) -> dict[str, Any]:
        """``result.json``: the method's metrics and ``progress`` (steps, train_time_s, images_per_s)."""
        raise NotImplementedError
