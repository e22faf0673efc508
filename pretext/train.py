"""Train a context encoder (or the autoencoder / random-init baselines): ``python -m pretext.train``.

    python -m pretext.train --config pretext/configs/builtin.yaml run_dir=runs/ce mask.kind=central

A run folder holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per logged step),
``checkpoints/last.pt`` (atomic), and when finished ``inpainting.json``, ``inpainting_grid.png`` and
``result.json``. Started again on the same folder, a run resumes from its last checkpoint and
produces the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from core import run_folder
from core.atomic_io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from core.checkpoint import (
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from core.cli import run_cli
from core.config import ConfigError, parse_cli, to_dict
from core.data import (
    MaskedImages,
    SeededViews,
    StepBatchSampler,
    dataset_mean,
    ensure_builtin,
    fill_holes,
    make_loader,
    to_unit_range,
)
from core.inpainting import evaluate_inpainting
from core.masks import MaskGenerator, builtin_shapes, central_square
from core.models import ARCHS, Discriminator, build_model
from core.preflight import Input
from pretext import distributed
from pretext.losses import (
    discriminator_loss,
    generator_adversarial_loss,
    hole_value_count,
    joint_loss,
    masked_l2_loss,
    reconstruction_weights,
)
from pretext.supervised import (
    Classifier,
    SupervisedStep,
    evaluate,
    labelled_images,
)

log = logging.getLogger("pretext.train")


@dataclass
class DataConfig:
    format: Literal["voc", "folder"] = "voc"
    root: str = "data/minivoc_pretrain/VOC2007"  # built-in pretraining set, generated if missing
    split: str = "train"
    val_split: str = "val"
    skip_bad: bool = False
    num_workers: int = 2


@dataclass
class MaskConfig:
    kind: Literal["random_region", "random_block", "central", "none"] = "random_region"
    overlap: int = 4  # central: px of the S/2 square left visible around the hole (§4)
    # The loss on a band of ``overlap`` px of known context, weighted ``overlap_weight`` (§4): a
    # device of the central inpainting network. auto: on for central masks, off otherwise -- the
    # feature-learning loss is Eq. 1, the removed region only (§3.2). Resolved to on/off.
    overlap_loss: Literal["auto", "on", "off"] = "auto"
    overlap_weight: float = 10.0
    max_coverage: float = 0.25
    # Random-region silhouettes (§3.3): the paper's come from PASCAL VOC 2012 SegmentationObject.
    # auto: shapes_root if set, else data.root when it is a VOC root with SegmentationObject/, else
    # the built-in blobs (a stated fallback, logged and recorded in result.json).
    shapes: Literal["auto", "builtin", "voc"] = "auto"
    shapes_root: str = ""  # a VOC root (e.g. VOCdevkit/VOC2012) whose object silhouettes are used


@dataclass
class ModelConfig:
    arch: str = "small64"
    dropout: float = 0.0
    output: Literal["auto", "full", "center"] = (
        "auto"  # auto: centre for central masks on inpaint128
    )


@dataclass
class LossConfig:
    adversarial: bool = False  # reconstruction-only is the paper's choice for feature learning
    lambda_rec: float = 0.999
    lambda_adv: float = 0.001
    disc_lr_ratio: float = 0.1  # generator learning rate is 10x the discriminator's (§5.1)


@dataclass
class OptimConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    cosine: bool = True


@dataclass
class HeadConfig:
    """method=supervised: the classifier trained on pool5 with the encoder, AlexNet's fc6-fc7-fc8
    (``mlp``: Linear-ReLU-Dropout twice, then Linear) or one Linear (``linear``)."""

    kind: Literal["mlp", "linear"] = "mlp"
    hidden: int = 4096  # fc6 / fc7 width (AlexNet's)
    dropout: float = 0.5


@dataclass
class Config:
    method: Literal["context_encoder", "autoencoder", "random_init", "supervised"] = (
        "context_encoder"
    )
    run_dir: str = "runs/pretext/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    checkpoint_every: int = 100
    log_every: int = 10
    eval_images: int = 256
    device: str = "auto"  # auto | cpu | cuda
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, off on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on GPU only
    compile: bool = False
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    force: bool = False  # resume a run folder whose saved config differs
    fail_at_step: int = -1  # testing aid: inject a NaN loss at this step


# What a run folder written before a key existed was trained with: before mask.overlap_loss every
# mask kind had the 10x context band in its loss (not Eq. 1), so such a run is not an Eq. 1 run.
LEGACY_VALUES = {"mask.overlap_loss": "on"}

# Keys that may differ between a run and its resumption without changing its results.
RESUME_FREE_KEYS = {"force", "data.num_workers", "device", "log_every", "fail_at_step", "threads"}


def resolve(cfg: Config) -> Config:
    """Derived settings and cross-field checks (unknown keys and types are checked on load)."""
    if cfg.model.arch not in ARCHS:
        raise ConfigError(
            f"model.arch: unknown arch {cfg.model.arch!r}; choose one of {sorted(ARCHS)}"
        )
    mask = cfg.mask
    if cfg.method in ("autoencoder", "supervised"):
        # The autoencoder baseline: same network, no mask, reconstructs the whole image; the
        # supervised upper bound classifies whole images.
        mask = dataclasses.replace(mask, kind="none")
    elif mask.kind == "none" and cfg.method == "context_encoder":
        raise ConfigError("mask.kind=none trains an autoencoder: set method=autoencoder instead")
    if mask.overlap_loss == "auto":
        mask = dataclasses.replace(mask, overlap_loss="on" if mask.kind == "central" else "off")
    output = cfg.model.output
    if output == "auto":
        output = "center" if mask.kind == "central" and cfg.model.arch == "inpaint128" else "full"
    if output == "center" and mask.kind != "central":
        raise ConfigError(
            "model.output=center predicts only the central square: use mask.kind=central"
        )
    if cfg.loss.adversarial and cfg.method != "context_encoder":
        raise ConfigError("loss.adversarial applies to method=context_encoder only")
    model = dataclasses.replace(cfg.model, output=output)
    return dataclasses.replace(cfg, mask=mask, model=model)


def parse_config(argv: list[str] | None = None) -> Config:
    return resolve(parse_cli(Config, argv, __doc__, "mask.kind=central optim.steps=100"))


# ---- set-up helpers --------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_images(cfg: DataConfig, split: str, train: bool, image_size: int):
    """The image dataset of ``split`` (uint8 [3, S, S] items)."""
    from core.datasets import ImageFolderImages, VOCImages

    root = Path(cfg.root)
    if cfg.format == "voc":
        ensure_builtin(root)
        return VOCImages(root, split, image_size, train=train, skip_bad=cfg.skip_bad)
    return ImageFolderImages(
        split_folder(cfg, split), image_size, train=train, skip_bad=cfg.skip_bad
    )


def split_folder(cfg: DataConfig, split: str) -> Path:
    """data.format=folder: ``<root>/<split>`` when it is a folder, else ``<root>`` itself."""
    root = Path(cfg.root)
    return root / split if (root / split).is_dir() else root


def mask_shapes_root(cfg: Config) -> str:
    """The VOC root whose SegmentationObject silhouettes the random-region masks use, "" for none
    (another mask kind, random init, or the built-in blobs); raises for a source that is asked
    for but missing (also the pre-flight's check, :func:`input_checks`)."""
    if (
        cfg.mask.kind != "random_region"
        or cfg.method == "random_init"
        or cfg.mask.shapes == "builtin"
    ):
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


def region_shapes(cfg: Config) -> tuple[list[np.ndarray], str]:
    """(shapes for random-region masks, where they came from: ``voc:<root> (N shapes)``,
    ``builtin blobs (N)`` or ``none`` for other mask kinds)."""
    if cfg.mask.kind != "random_region" or cfg.method == "random_init":  # no masks drawn
        return [], "none"
    root = mask_shapes_root(cfg)
    if root:
        from core.voc import object_shapes

        shapes = object_shapes(root)
        return shapes, f"voc:{root} ({len(shapes)} shapes)"
    shapes = builtin_shapes()
    return shapes, f"builtin blobs ({len(shapes)})"


def check_data(data: DataConfig) -> None:
    """What :func:`build_images` / ``labelled_images`` open, checked without reading an image:
    ``ImageSets/Main/<split>.txt`` of a VOC root, or the image folder of a split (train, val)."""
    from core.datasets import image_folder
    from core.voc import read_split

    for split in (data.split, data.val_split):
        if data.format == "voc":
            read_split(data.root, split)
        else:
            image_folder(split_folder(data, split))


def input_checks(cfg: Config) -> list[Input]:
    """The inputs of a run, each with the check main makes of it (core.preflight runs them before
    a pipeline starts): the data root and the random-region shapes' source."""
    cfg = resolve(cfg)
    shapes_source = cfg.mask.shapes_root or cfg.data.root
    return [
        Input("data.root", cfg.data.root, lambda: check_data(cfg.data)),
        Input("mask.shapes_root", shapes_source, lambda: mask_shapes_root(cfg)),
    ]


def open_run_folder(run_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """:func:`core.run_folder.open_run` with pretext's rules: refuse (RunFolderError) a run folder
    started with another config (keys outside RESUME_FREE_KEYS; LEGACY_VALUES for keys added since),
    unless ``force=true``; the recorded result of a finished folder, else None."""
    return run_folder.open_run(
        run_dir, cfg, RESUME_FREE_KEYS, defaults=resolve(Config()), legacy=LEGACY_VALUES
    )


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up then cosine decay to 1% (or constant).

    Kept hand-written rather than torch.optim.lr_scheduler: a pure function of the step, so a
    resumed run needs no scheduler state. SequentialLR(LinearLR, CosineAnnealingLR) gives the same
    schedule to 6e-15 (relative) but computes it recursively (bit-equal on 57 of 1500 steps), needs
    its state in every checkpoint (and a fallback for the checkpoints written without it) and a
    second scheduler for the discriminator: longer, for nothing the step function lacks."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if not cfg.cosine:
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# ---- the training step -------------------------------------------------------------------------


@dataclass
class Step:
    """The networks, optimizers and loss settings of one training step."""

    model: torch.nn.Module
    disc: torch.nn.Module | None
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    cfg: Config
    mean: torch.Tensor
    device: torch.device
    autocast_dtype: torch.dtype | None
    memory_format: torch.memory_format

    @staticmethod
    def settings(
        cfg: Config, device: torch.device
    ) -> tuple[torch.memory_format, torch.dtype | None, bool]:
        """(memory format, autocast dtype or None, torch.compile the model?) for ``cfg`` on ``device``."""
        use_gpu = device.type == "cuda"
        channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and use_gpu)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        if cfg.amp == "auto" and use_gpu:
            autocast_dtype = torch.bfloat16
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return memory_format, autocast_dtype, cfg.compile

    def _autocast(self) -> torch.autocast:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=enabled)

    def __call__(self, images: torch.Tensor, hole: torch.Tensor) -> dict[str, float]:
        """images: uint8 [N, 3, S, S]; hole: bool [N, 1, S, S]. One optimisation step."""
        x = to_unit_range(images.to(self.device, non_blocking=True))
        hole = hole.to(self.device, non_blocking=True).float()
        context = fill_holes(x, hole, self.mean).contiguous(memory_format=self.memory_format)
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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---- main --------------------------------------------------------------------------------------


def main(cfg: Config) -> dict[str, float]:
    """Train (or resume) the run in ``cfg.run_dir``; returns the final metrics (also in result.json)."""
    cfg = resolve(cfg)
    env = distributed.read_env()
    distributed.init(env)
    device = pick_device(cfg.device)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    done = open_run_folder(run_dir, cfg)
    if done is not None and ckpt_path.exists():
        return done
    meta: dict[str, Any] = {"task": "pretext", "method": cfg.method}
    if ckpt_path.exists():  # provenance of the checkpoint this run resumes from
        meta["resumed_from"] = run_folder.provenance(ckpt_path)
    if env.is_main:
        run_folder.start(run_dir, cfg, meta)
        for tmp in remove_stale_temp_files(ckpt_path):  # left by a kill during a checkpoint write
            log.info("removed %s, left by an interrupted checkpoint write", tmp)
        if env.world_size > 1:
            ensure_builtin(cfg.data.root)  # by rank 0 alone, before the others read it
    distributed.barrier()

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model.arch, cfg.model.dropout, cfg.model.output)
    size = model.input_size
    classifier = None  # method=supervised: the encoder + a head, trained in place of the network
    if cfg.method == "supervised":
        ensure_builtin(cfg.data.root)
        d = cfg.data
        train_images = labelled_images(d.format, d.root, d.split, size, True, d.skip_bad)
        names = train_images.class_names
        val_labelled = labelled_images(
            d.format, d.root, d.val_split, size, False, d.skip_bad, names
        )
        h = cfg.head
        classifier = Classifier(model.encoder, len(names), h.kind, h.hidden, h.dropout)
    else:
        train_images = build_images(cfg.data, cfg.data.split, train=True, image_size=size)
    disc = Discriminator.for_input(model.output_size) if cfg.loss.adversarial else None
    opt_g = torch.optim.Adam(
        (classifier or model).parameters(),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=cfg.optim.weight_decay,
    )
    opt_d = (
        torch.optim.Adam(
            disc.parameters(), lr=cfg.optim.lr * cfg.loss.disc_lr_ratio, betas=cfg.optim.betas
        )
        if disc is not None
        else None
    )
    if env.world_size > 1:  # one torch RNG stream (dropout) per rank; DDP makes weights rank 0's
        torch.manual_seed(cfg.seed + 1_000_003 * env.rank)
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        if classifier is not None:
            classifier.head.load_state_dict(state["head"])
        if disc is not None:
            disc.load_state_dict(state["discriminator"])
            opt_d.load_state_dict(state["optimizers"]["disc"])  # type: ignore[union-attr]
        opt_g.load_state_dict(state["optimizers"]["gen"])
        rngs = state.get("rng_ranks") or [state["rng"]]  # rng_ranks: saved by a DDP run
        _set_rng_state(rngs[env.rank] if len(rngs) == env.world_size else state["rng"])
        step, elapsed, mean_list = state["step"], state["elapsed_s"], state["data_mean"]
        _truncate_metrics(run_dir / "metrics.jsonl", step)
        log.info("resuming %s from step %d", run_dir, step)
    else:
        mean_list = dataset_mean(
            build_images(cfg.data, cfg.data.split, train=False, image_size=size)
        )

    def checkpoint_state(rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "method": cfg.method,
            "arch": cfg.model.arch,
            "output": cfg.model.output,
            "dropout": cfg.model.dropout,
            "model": _unwrap(model).state_dict(),
            "discriminator": disc.state_dict() if disc is not None else None,
            "optimizers": {
                "gen": opt_g.state_dict(),
                "disc": opt_d.state_dict() if opt_d else None,
            },
            "step": step,
            "rng": rngs[0],
            **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
            "data_mean": mean_list,
            "config": to_dict(cfg),
            "elapsed_s": elapsed,
            **(
                {"head": classifier.head.state_dict(), "class_names": list(names)}
                if classifier is not None
                else {}
            ),
        }

    total = 0 if cfg.method == "random_init" else cfg.optim.steps
    # every rank has resumed (or not) before rank 0 may write a step-0 checkpoint
    steps_rngs = distributed.all_gather_object((step, _rng_state()))
    if len({s for s, _ in steps_rngs}) > 1:
        raise RuntimeError(f"{ckpt_path}: ranks resumed from different steps {steps_rngs}")
    if step == 0 and env.is_main and not ckpt_path.exists():
        save_checkpoint(
            ckpt_path, checkpoint_state([r for _, r in steps_rngs])
        )  # a loadable step-0 checkpoint from the start

    use_gpu = device.type == "cuda"
    memory_format, autocast_dtype, compile_model = Step.settings(cfg, device)
    model.to(device, memory_format=memory_format)
    if classifier is not None:
        classifier.to(device, memory_format=memory_format)
    if disc is not None:
        disc.to(device, memory_format=memory_format)
    _move_optimizer(opt_g, device)
    if opt_d is not None:
        _move_optimizer(opt_d, device)
    train_model: torch.nn.Module = classifier or model
    if env.world_size > 1:
        # BatchNorm over the global batch, so that the statistics are one process's
        train_model = distributed.sync_batchnorm(train_model, device)
        ids = [device.index] if use_gpu else None
        train_model = DistributedDataParallel(train_model, device_ids=ids)
        if disc is not None:  # not DDP-wrapped (see average_gradients): same start, global BN
            disc = distributed.sync_batchnorm(disc, device)
            distributed.broadcast_module(disc)
    if compile_model:
        train_model = torch.compile(train_model)
    mean = torch.tensor(mean_list, device=device)
    train_step: Step | SupervisedStep
    if classifier is not None:
        train_step = SupervisedStep(train_model, opt_g, device, autocast_dtype, memory_format)
    else:
        train_step = Step(
            train_model, disc, opt_g, opt_d, cfg, mean, device, autocast_dtype, memory_format
        )

    shapes, shapes_source = region_shapes(cfg)
    if cfg.mask.kind == "random_region":
        log.info("random-region mask shapes: %s", shapes_source)
        if shapes_source.startswith("builtin") and cfg.mask.shapes == "auto":
            log.warning(
                "no VOC object shapes (data.root is not a VOC root with SegmentationObject/ and "
                "mask.shapes_root is unset): falling back to the built-in blobs"
            )
    if step < total:
        masks = MaskGenerator(cfg.mask.kind, size, cfg.mask.overlap, cfg.mask.max_coverage, shapes)
        sampler = StepBatchSampler(
            len(train_images), cfg.optim.batch_size, cfg.seed, step, total, env.rank, env.world_size
        )
        # items: (image, hole), or (image, label target) for method=supervised
        items = SeededViews(train_images) if classifier else MaskedImages(train_images, masks)
        loader = make_loader(items, sampler, cfg.data.num_workers, pin_memory=use_gpu)
        model.train()
        bar = tqdm(
            total=total,
            initial=step,
            desc=f"pretext {run_dir.name}",
            disable=not env.is_main,
            mininterval=2,
            file=sys.stderr,
        )
        t_last, n_last = time.perf_counter(), 0
        for images, hole in loader:
            for group in opt_g.param_groups:
                group["lr"] = lr_at(step, cfg.optim)
            if opt_d is not None:
                for group in opt_d.param_groups:
                    group["lr"] = lr_at(step, cfg.optim) * cfg.loss.disc_lr_ratio
            t0 = time.perf_counter()
            if step == cfg.fail_at_step and isinstance(train_step, SupervisedStep):
                train_step.poison = True
            elif step == cfg.fail_at_step:
                images = images.clone()
                hole = hole.clone()
                train_step.mean = torch.full_like(mean, float("nan"))
            losses = train_step(images, hole)
            if not math.isfinite(losses["loss"]):
                raise FloatingPointError(
                    f"{run_dir}: non-finite loss {losses['loss']} at step {step}; stopped without saving. "
                    f"The last good checkpoint is {ckpt_path} (step {load_checkpoint(ckpt_path)['step']})"
                )
            elapsed += time.perf_counter() - t0
            step += 1
            n_last += len(images) * env.world_size
            bar.update(1)
            if env.is_main and (step % cfg.log_every == 0 or step == total):
                now = time.perf_counter()
                record = {
                    "step": step,
                    "lr": lr_at(step - 1, cfg.optim),
                    **losses,
                    "images_per_s": n_last / max(now - t_last, 1e-9),
                    "train_time_s": elapsed,
                }
                append_jsonl(run_dir / "metrics.jsonl", record)
                bar.set_postfix(loss=f"{losses['loss']:.4f}")
                t_last, n_last = now, 0
            if step % cfg.checkpoint_every == 0 or step == total:
                rngs = distributed.all_gather_object(_rng_state())  # every rank's, for resuming
                if env.is_main:
                    save_checkpoint(ckpt_path, checkpoint_state(rngs))
        bar.close()

    if not env.is_main:
        return {}
    if classifier is not None:
        result = _finish_supervised(
            cfg, classifier, train_images, val_labelled, step, elapsed, device
        )
        return _finish(run_dir, result, meta)
    eval_images = build_images(cfg.data, cfg.data.val_split, train=False, image_size=size)
    inpaint = evaluate_inpainting(
        model,
        eval_images,
        mean_list,
        overlap=cfg.mask.overlap,
        max_images=cfg.eval_images,
        device=device,
        grid_path=run_dir / "inpainting_grid.png",
    )
    atomic_write_json(run_dir / "inpainting.json", inpaint)
    last = read_jsonl(run_dir / "metrics.jsonl")
    result = {
        **{f"inpaint_{k}": v for k, v in inpaint.items()},
        "steps": float(step),
        "train_time_s": elapsed,
        "images_per_s": step * cfg.optim.batch_size / elapsed if elapsed > 0 else 0.0,
        "mask_shapes_source": shapes_source,  # a string: the table builder reads numbers only
    }
    if cfg.data.skip_bad:  # the header scan's finds + decode failures in this process (with
        # data.num_workers > 0 those happen in the workers: there they are only in log.txt)
        result["skipped_train_images"] = float(len(train_images.skipped))
        result["skipped_eval_images"] = float(len(eval_images.skipped))
    if last:  # none for random init (and before the first logged step): no NaN in the JSON
        result["final_loss_rec"] = last[-1]["loss_rec"]
    return _finish(run_dir, result, meta)


def _finish(run_dir: Path, result: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json (with the provenance of the checkpoint written: path, sha256), then result.json."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    meta = {**meta, "checkpoint": run_folder.provenance(ckpt)}
    return run_folder.finish(run_dir, result, meta)


def _finish_supervised(
    cfg: Config,
    classifier: torch.nn.Module,
    train_images: Any,
    val_images: Any,
    step: int,
    elapsed: float,
    device: torch.device,
) -> dict[str, float]:
    """result.json of a supervised run: val (and train, eval views) mAP or top-1 on up to
    ``eval_images`` images; no inpainting evaluation (the decoder is untrained)."""
    d = cfg.data
    train_eval = labelled_images(
        d.format, d.root, d.split, train_images.image_size, False, d.skip_bad,
        train_images.class_names,
    )  # fmt: skip
    result = {
        **evaluate(classifier, val_images, device, cfg.eval_images, "val"),
        **evaluate(classifier, train_eval, device, cfg.eval_images, "train"),
        "steps": float(step),
        "train_time_s": elapsed,
        "images_per_s": step * cfg.optim.batch_size / elapsed if elapsed > 0 else 0.0,
        "num_classes": float(len(train_images.class_names)),
    }
    last = read_jsonl(Path(cfg.run_dir) / "metrics.jsonl")
    if last:
        result["final_loss"] = last[-1]["loss"]
    return result


def _move_optimizer(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so no step appears twice."""
    records = read_jsonl(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records) or (path.exists() and not path.read_text().endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def cli(argv: list[str] | None = None) -> dict[str, float]:
    """Mistakes in the user's config, data or checkpoint: one line naming the file and the
    problem, exit 2 (core.cli.run_cli)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        return run_cli(lambda: main(parse_config(argv)))
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    cli()
