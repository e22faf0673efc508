"""Shared driver of the mmdet / mmseg transfer runs (transfer.detect, transfer.segment).

Loads a normal mm config file (transfer/configs/), fills in what depends on the run (backbone
checkpoint and arch, the VOC root, the dataset's classes, the schedule, seed, work dir), trains with
mmengine's Runner and evaluates once on the test split at the end. mmdet / mmseg are imported only
here and in transfer.mm_backbone, never from pretext/ or eval/.

The mmengine work dir is ``<run_dir>/work`` (its logs, and a checkpoint every ``checkpoint_every``
iterations and after the last: a killed run resumes from it, exactly; transfer.mm_resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from mmengine.hooks import Hook
from tqdm import tqdm

from core import run_folder, tb
from core.atomic_io import append_jsonl, atomic_write_text, read_jsonl
from core.config import ConfigError
from core.models import ARCHS, Geometry, detection_geometry
from core.pretrained import Pretrained
from core.stage_inputs import Input
from core.voc_splits import check_entries, check_objects, dataset_classes, voc_root

log = logging.getLogger(__name__)


@dataclass
class MMConfig:
    """Fields common to detect and segment (each subclass sets its own defaults)."""

    checkpoint: str = ""  # pretext checkpoint (.pt) or pretext run folder
    data: str = "data/minivoc/VOC2007"  # VOC year folder (built-in mini-VOC generated if missing)
    run_dir: str = "runs/transfer/default"
    seed: int = 0
    arch: str = ""  # expected checkpoint arch ("" = any AlexNet-style arch)
    classes: tuple[str, ...] = ()  # expected class list (() = the dataset's)
    mm_config: str = ""  # the mm config file
    train_split: str = "trainval"
    test_split: str = "test"
    max_iters: int = 300
    batch_size: int = 8
    optimizer: Literal["sgd", "adamw"] = "sgd"  # sgd: momentum 0.9, as in the mm configs
    lr: float = 0.02
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 1.0  # the encoder's lr = lr * this (the new heads get lr)
    warmup_iters: int = 50
    frozen_stages: int = 0  # conv1..conv{k} of the encoder are not trained
    checkpoint_every: int = 100
    threads: int = 0
    num_workers: int = 0
    progress: bool = True
    # objects whose class is not in the class list: error (naming the files), or skip (counted)
    unknown_classes: Literal["error", "skip"] = "error"
    force: bool = False
    log: tb.LogConfig = field(default_factory=tb.LogConfig)  # TensorBoard: transfer.mm_tensorboard


# Keys that may change between a run and a re-run of its folder (core.run_folder.open_run).
FREE_KEYS = {"force", "num_workers", "threads", "progress", "log.tensorboard"}


def encoder_geometry(arch: str) -> tuple[int, Geometry]:
    """(conv5 channels, conv5 geometry: stride, first-cell centre, receptive field) of an
    AlexNet-style arch, from its layer arithmetic (alexnet227: stride 16, small64: 8)."""
    encoder = ARCHS[arch]().encoder
    spec = getattr(encoder, "spec", None)
    if spec is None:
        raise run_folder.CheckpointError(
            f"arch {arch!r} has no AlexNet-style encoder; detection / segmentation support "
            "small64*, alexnet227*"
        )
    return spec.channels[4], detection_geometry(arch)[2]


class ProgressHook(Hook):
    """A tqdm bar over training iterations + one metrics.jsonl line every ``every`` iterations."""

    priority = "VERY_LOW"

    def __init__(self, metrics_path: Path, total: int, desc: str, enabled: bool, every: int = 10):
        self.metrics_path, self.total, self.every = metrics_path, total, every
        self.desc, self.enabled, self.bar = desc, enabled, None

    def before_train(self, runner) -> None:
        truncate_metrics(self.metrics_path, runner.iter)
        self.bar = tqdm(total=self.total, initial=runner.iter, desc=self.desc,
                        disable=not self.enabled, file=sys.stderr)  # fmt: skip

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.bar.update(1)
        step = runner.iter + 1
        if outputs and (step % self.every == 0 or step == self.total):
            record = {k: float(v.detach()) for k, v in outputs.items() if torch.is_tensor(v)}
            record.update(iter=step, lr=runner.optim_wrapper.get_lr()["lr"][0])
            append_jsonl(self.metrics_path, record)
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}")

    def after_train(self, runner) -> None:
        self.bar.close()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after the checkpoint a run resumes from (and a test line), so that no
    iteration appears twice."""
    records = read_jsonl(path)
    kept = [r for r in records if r.get("iter", 0) <= step and "test" not in r]
    if len(kept) != len(records) or (path.exists() and not path.read_text().endswith("\n")):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def check_schedule(cfg: MMConfig) -> MMConfig:
    """The LR schedule needs iterations after its warm-up (mmengine: 'end should be larger than
    begin'); checked when the config is parsed, before anything is written."""
    if cfg.max_iters < 1:
        raise ConfigError(f"max_iters: {cfg.max_iters} is not a positive number of iterations")
    if cfg.warmup_iters < 0 or cfg.warmup_iters >= cfg.max_iters:
        raise ConfigError(
            f"max_iters: {cfg.max_iters} must be larger than warmup_iters ({cfg.warmup_iters}); "
            f"raise max_iters or set warmup_iters below it (e.g. warmup_iters={cfg.max_iters // 5})"
        )
    return cfg


def check_data(cfg: MMConfig, seg_task: str) -> tuple[Path, tuple[str, ...], int]:
    """(VOC root, its classes, objects of unknown classes left out): the root, its class list
    (``cfg.classes`` when given), the ``ImageSets/<seg_task>`` train / test split files, every
    entry's JPEG and annotation, and (detection) every object's class, checked before anything
    is read."""
    root = voc_root(cfg.data)
    classes = dataset_classes(root, cfg.classes)
    unknown = 0
    for split in (cfg.train_split, cfg.test_split):
        ids = check_entries(root, split, seg_task)
        if seg_task == "Main":  # mmdet's VOCDataset drops such objects without a word
            unknown += check_objects(root, ids, classes, cfg.unknown_classes == "skip")
    return root, classes, unknown


def input_checks(cfg: MMConfig, seg_task: str) -> list[Input]:
    """The run's inputs with the checks :func:`run` makes of them (orchestrate.preflight)."""

    def checkpoint() -> None:
        encoder_geometry(Pretrained.load(cfg.checkpoint, cfg.arch).arch)

    return [
        Input("checkpoint", cfg.checkpoint, checkpoint),
        Input("data", cfg.data, lambda: check_data(cfg, seg_task)),
    ]


def mm_config(
    cfg: MMConfig,
    source: dict[str, Any],
    work_dir: Path,
    resume_from: Path | None,
    configure: Callable[[Any], None],
) -> Any:
    """The mm config file with what depends on the run filled in: the backbone checkpoint, the
    task's part (``configure``), loaders, one test evaluation after training, the optimiser and
    schedule (:func:`set_schedule`), the work dir and what to resume from."""
    from mmengine.config import Config as MMEngineConfig

    mm = MMEngineConfig.fromfile(cfg.mm_config)
    mm.model.backbone.update(
        checkpoint=source["path"], arch=source["arch"], frozen_stages=cfg.frozen_stages
    )
    configure(mm)
    mm.train_dataloader.batch_size = cfg.batch_size
    for loader in ("train_dataloader", "test_dataloader"):
        mm[loader].num_workers = cfg.num_workers
        mm[loader].persistent_workers = cfg.num_workers > 0
    # One evaluation, on the test split, after training (no validation loop in between).
    mm.val_dataloader = mm.val_evaluator = mm.val_cfg = None
    mm.train_cfg = dict(type="IterBasedTrainLoop", max_iters=cfg.max_iters, val_interval=10**9)
    set_schedule(mm, cfg)
    mm.default_hooks.checkpoint = None  # mm_resume.ResumeHook saves plain-data checkpoints
    mm.default_hooks.pop("visualization", None)  # no images written
    mm.work_dir = str(work_dir)
    mm.randomness = dict(seed=cfg.seed, deterministic=False)
    mm.resume = resume_from is not None
    mm.load_from = str(resume_from) if resume_from is not None else None
    mm.launcher = "none"
    return mm


def set_schedule(mm: Any, cfg: MMConfig) -> None:
    """The optimiser (the encoder's lr scaled by ``backbone_lr_mult``), a linear warm-up over
    ``warmup_iters`` then cosine decay to 1% of ``lr``."""
    if cfg.optimizer == "adamw":
        mm.optim_wrapper.optimizer = dict(type="AdamW", lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        mm.optim_wrapper.optimizer = dict(
            type="SGD", lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
        )
    if cfg.backbone_lr_mult != 1.0:
        mm.optim_wrapper.paramwise_cfg = dict(
            custom_keys={"backbone": dict(lr_mult=cfg.backbone_lr_mult)}
        )
    warmup = min(cfg.warmup_iters, cfg.max_iters)
    schedule = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=warmup)]
    schedule.append(dict(type="CosineAnnealingLR", by_epoch=False, begin=warmup,
                         end=cfg.max_iters, eta_min=cfg.lr * 0.01))  # fmt: skip
    mm.param_scheduler = schedule if warmup > 0 else schedule[1:]


def train_and_test(
    task: str, cfg: MMConfig, mm: Any, run_dir: Path, t0: float
) -> tuple[dict, float]:
    """Train with mmengine's Runner (our progress, resume and TensorBoard hooks), then evaluate
    once on the test split. Returns (the evaluator's metrics, training seconds over resumes)."""
    from transfer import mm_resume

    runner = mm_resume.DataOnlyRunner.from_cfg(mm)
    runner.register_hook(
        ProgressHook(
            run_dir / "metrics.jsonl", cfg.max_iters, f"{task} {run_dir.name}", cfg.progress
        )
    )
    resume = mm_resume.ResumeHook(Path(mm.work_dir), cfg.checkpoint_every, cfg.max_iters, t0)
    runner.register_hook(resume)
    if cfg.log.tensorboard:
        from transfer.mm_tensorboard import TensorboardHook

        runner.register_hook(TensorboardHook(run_dir, cfg.max_iters, cfg.checkpoint_every))
    runner.train()
    test_metrics = runner.test()
    return {k: float(v) for k, v in test_metrics.items()}, resume.elapsed_s()


def run(
    task: str,
    cfg: MMConfig,
    configure: Callable[[Any, MMConfig, Path, tuple[str, ...], int, Geometry], None],
    seg_task: str,
    metrics: Callable[[dict[str, float]], dict[str, float]],
) -> dict[str, float]:
    """Run one mm transfer. ``configure(mm_cfg, cfg, root, classes, channels, geometry)`` edits the
    loaded mm config in place; ``metrics`` maps the test evaluator's dict to our flat result."""
    check_schedule(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    source = Pretrained.load(cfg.checkpoint, cfg.arch).source
    done = run_folder.open_run(run_dir, cfg, FREE_KEYS, {"checkpoint": source})
    if done is not None:
        return done
    channels, geometry = encoder_geometry(source["arch"])
    root, classes, unknown = check_data(cfg, seg_task)
    meta = {"task": task, "source": source, "seed": cfg.seed, "data": str(root),
            "classes": list(classes), "mm_config": cfg.mm_config,
            "conv5_geometry": dataclasses.asdict(geometry)}  # fmt: skip
    run_folder.start(run_dir, cfg, meta, {"checkpoint": source})
    from transfer import mm_resume  # imports mmengine.runner (seconds): only when a run starts

    work_dir = run_dir / "work"
    resume_from = mm_resume.resume_checkpoint(work_dir)
    if resume_from is None:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    mm = mm_config(cfg, source, work_dir, resume_from,
                   lambda mm: configure(mm, cfg, root, classes, channels, geometry))  # fmt: skip
    test_metrics, elapsed = train_and_test(task, cfg, mm, run_dir, t0)
    result = metrics(test_metrics)
    if seg_task == "Main":
        result["unknown_class_objects_skipped"] = float(unknown)
    result["time_s"] = elapsed
    append_jsonl(run_dir / "metrics.jsonl", {"iter": cfg.max_iters, "test": result})
    return run_folder.finish(run_dir, result, {**meta, "elapsed_s": result["time_s"]})
