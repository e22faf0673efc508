"""``method=context_encoder``: inpainting a removed region (Pathak et al. 2016, §3), and
``method=autoencoder``: the same network with no mask, reconstructing the whole image (§5.2's
autoencoder baseline).

Batch transform: (uint8 image, bool hole) from :class:`core.data.MaskedImages` (§3.3 masks). Head:
the network's bottleneck and decoder (part of ``model``), plus the adversarial discriminator with
``loss.adversarial`` (§3.2.2). Loss: masked L2 (Eq. 1), + adversarial (Eq. 2-3). Evaluation: the
inpainting metrics of Table 1 on central masks of the val split (and, while it trains, an
inpainting grid for TensorBoard).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core import run_folder
from core.atomic_io import atomic_write_json, read_jsonl
from core.config import ConfigError
from core.data import MaskedImages, fill_holes, to_unit_range
from core.inpainting import evaluate_inpainting, inpainting_grid
from core.masks import MaskGenerator, builtin_shapes, central_square
from core.models import ContextEncoder, Discriminator
from core.stage_inputs import Input
from pretext import distributed
from pretext.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    hole_value_count,
    joint_loss,
    masked_l2_loss,
    reconstruction_weights,
)
from pretext.methods.base import (
    Method,
    Placement,
    build_images,
    check_no_adversary,
    data_inputs,
    without_masks,
)

log = logging.getLogger("pretext.train.context_encoder")


def mask_shapes_root(cfg: Any) -> str:
    """The VOC root whose SegmentationObject silhouettes the random-region masks use, "" for none
    (another mask kind or the built-in blobs); raises for a source asked for but missing (also
    the pre-flight's check, :meth:`ContextEncoderMethod.input_checks`)."""
    if cfg.mask.kind != "random_region" or cfg.mask.shapes == "builtin":
        return ""
    root = cfg.mask.shapes_root
    if not root:
        if cfg.data.format == "voc" and (Path(cfg.data.root) / "SegmentationObject").is_dir():
            return cfg.data.root
        if cfg.mask.shapes == "voc":
            raise ConfigError(
                f"mask.shapes=voc: data.root={cfg.data.root} (data.format={cfg.data.format}) has "
                "no SegmentationObject/ PNGs; set mask.shapes_root=<VOC2012 root> "
                "(e.g. /datasets/VOCdevkit/VOC2012)"
            )
        return ""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: mask.shapes_root is not a folder")
    if not (Path(root) / "SegmentationObject").is_dir():
        raise FileNotFoundError(
            f"{root}: mask.shapes_root has no SegmentationObject/ folder (give a VOC root, e.g. "
            "VOCdevkit/VOC2012)"
        )
    return root


def region_shapes(cfg: Any) -> tuple[list[np.ndarray], str]:
    """(shapes for random-region masks, where they came from: ``voc:<root> (N shapes)``,
    ``builtin blobs (N)`` or ``none`` for other mask kinds)."""
    if cfg.mask.kind != "random_region":
        return [], "none"
    root = mask_shapes_root(cfg)
    if root:
        from core.voc import object_shapes

        shapes = object_shapes(root)
        return shapes, f"voc:{root} ({len(shapes)} shapes)"
    shapes = builtin_shapes()
    return shapes, f"builtin blobs ({len(shapes)})"


@dataclass
class InpaintingStep:
    """One optimisation step of the network (and the discriminator, if any)."""

    model: torch.nn.Module
    disc: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    cfg: Any
    mean: torch.Tensor
    device: torch.device
    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format
    poison: bool = False  # testing aid (fail_at_step): a NaN fill value

    def _autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def __call__(self, images: torch.Tensor, hole: torch.Tensor) -> dict[str, float]:
        """images: uint8 [N, 3, S, S]; hole: bool [N, 1, S, S]. One optimisation step."""
        x = to_unit_range(images.to(self.device, non_blocking=True))
        hole = hole.to(self.device, non_blocking=True).float()
        mean = torch.full_like(self.mean, float("nan")) if self.poison else self.mean
        context = fill_holes(x, hole, mean).contiguous(memory_format=self.memory_format)
        band = self.cfg.mask.overlap if self.cfg.mask.overlap_loss == "on" else 0
        target, weights = x, reconstruction_weights(hole, band, self.cfg.mask.overlap_weight)
        if self.cfg.model.output == "center":
            lo, hi = central_square(x.shape[-1])
            crop = (..., slice(lo, hi), slice(lo, hi))
            target, weights, hole = target[crop], weights[crop], hole[crop]
        with self._autocast():
            pred = self.model(context)
        # DDP: each rank's loss is its share of the global-batch loss (the shares sum to what one
        # process computes on the whole batch); DDP averages gradients, so backward world x share.
        world = distributed.world_size()
        count = None
        if world > 1:  # the global batch's hole values: hole sizes differ between ranks
            count = distributed.all_reduce_sum(hole_value_count(hole, pred.shape[1]))
        rec = masked_l2_loss(pred, target, weights, hole, count)
        out = {"loss_rec": rec}
        loss = rec
        if self.disc is not None:
            # The generator's loss needs D's input gradient only: its weight gradients would be
            # discarded by opt_d.zero_grad below, so they are not computed (same result, less work).
            self.disc.requires_grad_(False)
            with self._autocast():
                adv = generator_adversarial_loss(self.disc(pred).float()) / world
            loss = joint_loss(rec, adv, self.cfg.loss.lambda_rec, self.cfg.loss.lambda_adv)
            out["loss_adv"] = adv
        out["loss"] = loss
        shown = out  # what is logged and checked: the global-batch values, the same on every rank
        if world > 1:
            values = torch.stack([v.detach().float() for v in out.values()])
            shown = dict(zip(out, distributed.all_reduce_sum(values)))
        if not torch.isfinite(shown["loss"]):
            if self.disc is not None:
                self.disc.requires_grad_(True)
            return {k: float(v.detach()) for k, v in shown.items()}
        self.opt_g.zero_grad(set_to_none=True)
        (loss * world if world > 1 else loss).backward()
        self.opt_g.step()
        if self.disc is not None:
            self.disc.requires_grad_(True)
        if self.disc is not None and self.opt_d is not None:
            real = target.contiguous(memory_format=self.memory_format)
            with self._autocast():
                d_loss = discriminator_loss(
                    self.disc(real).float(), self.disc(pred.detach()).float()
                )
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            distributed.average_gradients(self.disc)  # DDP's mean over ranks, by hand
            self.opt_d.step()
            shown["loss_disc"] = distributed.all_reduce_sum(d_loss.detach() / world)
        return {k: float(v.detach()) for k, v in shown.items()}


class ContextEncoderMethod(Method):
    """Context encoder (§3): reconstruct the masked region from its context."""

    trained_parts = ("encoder", "bottleneck", "decoder")
    batches_from_store = True  # (images, holes) is the store batch itself

    def __init__(self, cfg: Any, model: ContextEncoder):
        super().__init__(cfg, model)
        # the adversarial discriminator judges the prediction (§3.2.2; 10x lower lr, §5.1)
        self.disc = Discriminator.for_input(model.output_size) if cfg.loss.adversarial else None
        self.disc_lr_scale = cfg.loss.disc_lr_ratio
        self.shapes, self.shapes_source = self.mask_shapes()
        self.snapshot_images: Any = None  # the val images of :meth:`snapshot`, opened once

    @classmethod
    def resolve_config(cls, cfg: Any) -> Any:
        if cfg.mask.kind == "none":
            raise ConfigError(
                "mask.kind=none trains an autoencoder: set method=autoencoder instead"
            )
        return cfg

    @classmethod
    def input_checks(cls, cfg: Any) -> list[Input]:
        """The data splits and the random-region shapes' source."""
        if cfg.mask.kind != "random_region":
            return data_inputs(cfg)
        source = cfg.mask.shapes_root or cfg.data.root
        return [*data_inputs(cfg), Input("mask.shapes_root", source, lambda: mask_shapes_root(cfg))]

    def mask_shapes(self) -> tuple[list[np.ndarray], str]:
        shapes, source = region_shapes(self.cfg)
        if self.cfg.mask.kind == "random_region":
            log.info("random-region mask shapes: %s", source)
            if source.startswith("builtin") and self.cfg.mask.shapes == "auto":
                log.warning(
                    "no VOC object shapes (data.root is not a VOC root with SegmentationObject/ "
                    "and mask.shapes_root is unset): falling back to the built-in blobs"
                )
        return shapes, source

    def items(self) -> MaskedImages:
        m = self.cfg.mask
        masks = MaskGenerator(m.kind, self.input_size, m.overlap, m.max_coverage, self.shapes)
        return MaskedImages(self.train_images, masks)

    def make_step(
        self,
        net: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer | None,
        mean: torch.Tensor,
        placement: Placement,
    ) -> InpaintingStep:
        p = placement
        return InpaintingStep(
            net,
            self.disc,
            opt_g,
            opt_d,
            self.cfg,
            mean,
            p.device,
            p.autocast_dtype,
            p.memory_format,
        )

    def extra_state(self) -> dict[str, Any]:
        return {}  # the discriminator has its own checkpoint entry

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.disc is not None:
            self.disc.load_state_dict(state["discriminator"])

    def snapshot(
        self, device: torch.device, mean: list[float]
    ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """The inpainting grid (masked input | output | truth) of the first 8 val images with
        central masks, and their Table-1 scores (``grid_l1``, ``grid_l2``, ``grid_psnr``: on 8
        images, a trend)."""
        if self.snapshot_images is None:
            cfg = self.cfg
            self.snapshot_images = build_images(cfg, cfg.data.val_split, False, self.input_size)
        scores, grid = inpainting_grid(
            self.model, self.snapshot_images, mean, self.cfg.mask.overlap, device=device
        )
        return {f"grid_{k}": v for k, v in scores.items()}, {"inpainting_grid": grid}

    def evaluate(
        self, run_dir: Path, device: torch.device, mean: list[float], progress: dict[str, float]
    ) -> dict[str, Any]:
        """Table 1's inpainting metrics on central masks of up to ``eval_images`` val images."""
        cfg = self.cfg
        eval_images = build_images(cfg, cfg.data.val_split, False, self.input_size)
        inpaint = evaluate_inpainting(
            self.model,
            eval_images,
            mean,
            overlap=cfg.mask.overlap,
            max_images=cfg.eval_images,
            device=device,
            grid_path=run_folder.output_path(run_dir, "inpainting_grid.png"),
        )
        atomic_write_json(run_folder.output_path(run_dir, "inpainting.json"), inpaint)
        last = read_jsonl(run_dir / "metrics.jsonl")
        result = {
            **{f"inpaint_{k}": v for k, v in inpaint.items()},
            **progress,
            "mask_shapes_source": self.shapes_source,  # a string: the table builder reads numbers
        }
        if cfg.images.skip_bad:  # the pre-scan's finds + decode failures in this process (with
            # data.num_workers > 0 those happen in the workers: there they are only in log.txt)
            result["skipped_train_images"] = float(len(self.train_images.skipped))
            result["skipped_eval_images"] = float(len(eval_images.skipped))
        if last:  # none for random init (and before the first logged step): no NaN in the JSON
            result["final_loss_rec"] = last[-1]["loss_rec"]
        return result


class AutoencoderMethod(ContextEncoderMethod):
    """The autoencoder baseline (§5.2): same network, no mask, reconstructs the whole image."""

    @classmethod
    def resolve_config(cls, cfg: Any) -> Any:
        check_no_adversary(cfg)
        return without_masks(cfg)
