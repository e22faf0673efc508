"""VOC07 multi-label classification from a pretext checkpoint: ``python -m transfer.classify``.

    python -m transfer.classify --checkpoint runs/dev/ce --data data/minivoc/VOC2007 run_dir=runs/cls

Modes (``modes=[...]``, each adds its own keys to the result):

- ``finetune``: the pretrained encoder + a new head (``finetune.head``: ``mlp`` = fc6/fc7-like
  two hidden layers, or ``linear`` on pool5), all trained end to end (§5.2 of the paper).
- ``linear_pool5`` / ``linear_fc``: a logistic-regression probe on frozen features: pool5, or the
  checkpoint's channel-wise FC bottleneck output (the "fc" level of the context encoder).

Training on ``train_split`` (trainval), testing on ``test_split`` (test) with the VOC07 protocol
(difficult-only entries ignored, 11-point AP by default). Result keys: ``mAP`` (the first mode's),
``<mode>_mAP``, ``<mode>_AP_<class>``, ``time_s``; beside it ``scores.npz``
(:mod:`core.image_scores`): the test scores behind ``mAP`` and each ``<mode>_mAP``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core import image_scores, run_folder, tb
from core.atomic_io import append_jsonl
from core.classifier import Classifier, multilabel_bce
from core.cli import run_cli
from core.config import parse_cli
from core.data import to_unit_range
from core.data_dependent_init import rescale_layers
from core.datasets import VOCClassification
from core.features import layer_features
from core.images import ImagesConfig
from core.machine import CPU_BF16_STAGES, precision_name, resolve_amp
from core.pretrained import Pretrained
from core.splits import open_split
from core.stage_inputs import Input
from core.voc_ap import mean_ap, voc07_classification_ap
from core.voc_splits import dataset_classes, require_split, voc_root

log = logging.getLogger("transfer.classify")

Mode = Literal["finetune", "linear_pool5", "linear_fc"]


@dataclass
class FinetuneConfig:
    epochs: int = 30
    batch_size: int = 32
    # Adam reaches a trained head + encoder in 30 epochs of the mini-VOC; SGD (the paper's, with
    # lr 0.01) stays at chance mAP for random init *and* pretrained encoders on that budget.
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    encoder_lr_mult: float = 1.0  # encoder lr = lr * this (0 freezes the encoder)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    head: Literal["mlp", "linear"] = "mlp"
    hidden: int = 512  # width of fc6 / fc7 of the mlp head (AlexNet: 4096)
    dropout: float = 0.2
    rescale: bool = False  # Krähenbühl et al. data-dependent init of the new layers
    rescale_batch: int = 128
    clip_grad: float = 10.0  # max gradient norm (0: off)
    # The training steps' precision (core.machine.resolve_amp; docs/precision.md): auto = bf16 on a
    # CPU with AMX ("classify" is in core.machine.CPU_BF16_STAGES), fp32 on other CPUs; bf16 =
    # torch's CPU autocast (weights and Adam state fp32). Evaluation and linear probes stay fp32.
    amp: Literal["auto", "off", "bf16"] = "auto"


@dataclass
class LinearConfig:
    weight_decay: float = 1e-3  # L2 on the probe's weights (features are standardised)
    max_iter: int = 100  # L-BFGS iterations, full batch


@dataclass
class Config:
    checkpoint: str = ""  # pretext checkpoint (.pt) or pretext run folder
    data: str = "data/minivoc/VOC2007"  # VOC root (the built-in mini-VOC is generated if missing)
    run_dir: str = "runs/transfer/classify/default"
    seed: int = 0
    arch: str = ""  # expected checkpoint arch ("" = any AlexNet-style arch)
    classes: tuple[str, ...] = ()  # expected class list ("" = the dataset's)
    train_split: str = "trainval"
    test_split: str = "test"
    image_size: int = 0  # 0: the checkpoint's pretext input size
    modes: tuple[Mode, ...] = ("finetune", "linear_pool5", "linear_fc")
    ap_mode: Literal["11points", "area"] = "11points"
    test_flip: bool = True  # average scores over the image and its mirror
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    log: tb.LogConfig = field(default_factory=tb.LogConfig)  # TensorBoard beside metrics.jsonl
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads (0: torch's default)
    progress: bool = True
    images: ImagesConfig = field(default_factory=ImagesConfig)  # the intake rule (core.images)
    force: bool = False  # recompute a finished run folder / reuse one started differently


# Keys that may change between a run and a re-run of its folder (core.run_folder.open_run).
FREE_KEYS = {"force", "num_workers", "threads", "progress", "log.tensorboard"}


def parse_config(argv: list[str] | None = None) -> Config:
    flags = {"checkpoint": "pretext checkpoint (.pt or run folder)",
             "data": "VOC root, e.g. VOCdevkit/VOC2007"}  # fmt: skip
    return parse_cli(Config, argv, __doc__, "finetune.epochs=5", flags)


# ---- data --------------------------------------------------------------------------------------


class DecodedViews(Dataset):
    """A VOCClassification whose images are decoded once and kept in memory (small datasets).

    Item: (uint8 [3, S, S] view, labels [C], difficult_only [C]); views are drawn per access.
    """

    def __init__(self, base: VOCClassification):
        self.base = base
        self.images = [base.load(i)[1] for i in range(len(base))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.base.view(self.images[i]), self.base.labels[i], self.base.difficult_only[i]


# ---- models ------------------------------------------------------------------------------------


def read_checkpoint(cfg: Config) -> tuple[Pretrained, nn.Module]:
    """(the checkpoint, its whole network); the encoder must be AlexNet-style."""
    pre = Pretrained.load(cfg.checkpoint, cfg.arch)
    return pre, pre.alexnet_network("classification transfer")


def new_classifier(pre: Pretrained, num_classes: int, fc: FinetuneConfig) -> Classifier:
    """A fresh copy of the checkpoint's encoder (the probes' copy stays untouched) + a new head."""
    return Classifier(pre.encoder(), num_classes, fc.head, fc.hidden, fc.dropout)


# ---- evaluation --------------------------------------------------------------------------------


@torch.no_grad()
def predict(
    fn: nn.Module, data: Dataset, batch_size: int, flip: bool, desc: str, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fn: images [N, 3, S, S] in [-1, 1] -> [N, D]. Returns (outputs [M, D], labels, difficult)."""
    fn.eval()
    outs, labels, diffs = [], [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    for images, lab, diff in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = to_unit_range(images)
        y = fn(x)
        if flip:
            y = (y + fn(x.flip(-1))) / 2
        outs.append(y.flatten(1))
        labels.append(lab)
        diffs.append(diff)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy(), torch.cat(diffs).numpy()


def ap_metrics(
    prefix: str, scores: np.ndarray, labels: np.ndarray, diff: np.ndarray, classes, mode: str
) -> dict[str, float]:
    per_class = voc07_classification_ap(scores, labels, diff, mode)
    out = {f"{prefix}_mAP": mean_ap(per_class)}
    out.update({f"{prefix}_AP_{c}": float(ap) for c, ap in zip(classes, per_class)})
    return out


# ---- fine-tuning -------------------------------------------------------------------------------


def lr_factor(epoch_pos: float, cfg: FinetuneConfig) -> float:
    """Linear warm-up over ``warmup_epochs`` then cosine decay to 0 (epoch_pos: fractional epoch)."""
    if epoch_pos < cfg.warmup_epochs:
        return (epoch_pos + 1e-3) / cfg.warmup_epochs
    t = (epoch_pos - cfg.warmup_epochs) / max(1e-9, cfg.epochs - cfg.warmup_epochs)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def rescale_new_layers(model: Classifier, train: Dataset, n: int) -> None:
    """Krähenbühl et al.'s data-dependent init of the head on the first ``n`` training views."""
    batch = torch.stack([train[i][0] for i in range(min(n, len(train)))])
    x = to_unit_range(batch)
    model.eval()
    stats = rescale_layers(model.new_layers, lambda: model(x))
    log.info("data-dependent init: per-layer (mean, std) after rescaling %s", stats)


def make_optimizer(model: Classifier, fc: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam or SGD over the head (lr) and the encoder (lr * encoder_lr_mult; 0: frozen)."""
    groups = [
        {"params": list(model.head.parameters()), "lr": fc.lr},
        {"params": list(model.encoder.parameters()), "lr": fc.lr * fc.encoder_lr_mult},
    ]
    if fc.encoder_lr_mult == 0:
        groups = groups[:1]
        model.encoder.requires_grad_(False)
    if fc.optimizer == "adam":
        return torch.optim.Adam(groups, lr=fc.lr, weight_decay=fc.weight_decay)
    return torch.optim.SGD(groups, lr=fc.lr, momentum=fc.momentum, weight_decay=fc.weight_decay)


STAGE = "classify"  # this stage's name in core.machine.CPU_BF16_STAGES


def precision(fc: FinetuneConfig) -> tuple[torch.dtype | None, str]:
    """(autocast dtype of the fine-tuning steps or None for fp32, why): ``fc.amp`` on the CPU."""
    return resolve_amp(fc.amp, torch.device("cpu"), STAGE in CPU_BF16_STAGES)


def train_step(
    model: Classifier,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    opt: torch.optim.Optimizer,
    fc: FinetuneConfig,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """One optimiser step on (uint8 images, labels, difficult_only), the forward pass under
    autocast to ``dtype`` (None: fp32); returns the loss."""
    images, labels, diff = batch
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        logits = model(to_unit_range(images))
    loss = multilabel_bce(logits.float(), labels, diff)  # difficult-only left out (VOC07)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if fc.clip_grad > 0:
        nn.utils.clip_grad_norm_(model.parameters(), fc.clip_grad)
    opt.step()
    return loss


def train_epoch(
    model: Classifier,
    loader: DataLoader,
    opt: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    fc: FinetuneConfig,
    bar: tqdm,
    where: str,
    dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """One pass over ``loader`` (:func:`train_step`). Returns (mean loss per image, the head's lr
    of the last step); a non-finite loss raises FloatingPointError naming ``where``."""
    model.train()
    if fc.encoder_lr_mult == 0:
        model.encoder.eval()
    total, count = 0.0, 0
    for images, labels, diff in loader:
        loss = train_step(model, (images, labels, diff), opt, fc, dtype)
        lr = opt.param_groups[0]["lr"]  # the head's lr of this step (logged: the epoch's last)
        schedule.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{where}; lower finetune.lr")
        total, count = total + loss.item() * len(images), count + len(images)
        bar.update(1)
    return total / count, lr


def finetune(
    model: Classifier,
    train: Dataset,
    cfg: Config,
    run_dir: Path,
    generator: torch.Generator,
    events: tb.EventLog | None = None,
) -> None:
    """Train ``model`` end to end for ``finetune.epochs``; one metrics.jsonl line (and event) an
    epoch."""
    fc = cfg.finetune
    if fc.rescale:
        rescale_new_layers(model, train, fc.rescale_batch)
    opt = make_optimizer(model, fc)
    loader = DataLoader(
        train,
        batch_size=fc.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.num_workers,
        generator=generator,
    )
    steps, per_epoch = fc.epochs * len(loader), len(loader)
    # torch's LambdaLR on the closed-form factor of step k (epoch k // per_epoch, fraction
    # (k % per_epoch) / per_epoch): each group's lr = its base lr * factor, as before the change
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: lr_factor(k // per_epoch + (k % per_epoch) / per_epoch, fc)
    )
    bar = tqdm(
        total=steps, desc=f"finetune {run_dir.name}", disable=not cfg.progress, file=sys.stderr
    )
    dtype = precision(fc)[0]
    for epoch in range(fc.epochs):
        where = f"{run_dir}: non-finite fine-tuning loss at epoch {epoch}"
        loss, lr = train_epoch(model, loader, opt, schedule, fc, bar, where, dtype)
        bar.set_postfix(loss=f"{loss:.4f}")
        record = {"loss": loss, "lr": lr}
        append_jsonl(run_dir / "metrics.jsonl", {"mode": "finetune", "epoch": epoch + 1, **record})
        if events is not None:
            events.scalars(epoch + 1, record, "finetune/")
            events.flush()  # an epoch is the unit of a fine-tuning curve: on disk as it ends
    bar.close()


# ---- linear probe ------------------------------------------------------------------------------


def fit_linear_probe(
    feats: np.ndarray, labels: np.ndarray, diff: np.ndarray, cfg: LinearConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic regression on standardised features, full-batch L-BFGS.

    feats: [N, D]; labels, diff: [N, C]. Returns (mean [D], std [D], W [D, C], b [C]).
    """
    x = torch.from_numpy(feats).double()
    y, difficult = torch.from_numpy(labels).double(), torch.from_numpy(diff).double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=cfg.max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ weight + bias
        loss = multilabel_bce(logits, y, difficult)
        loss = loss + 0.5 * cfg.weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return mean, std, weight.detach(), bias.detach()


def linear_probe(
    name: str,
    model: nn.Module,
    layer: str,
    train: DecodedViews,
    test: DecodedViews,
    cfg: Config,
    classes: tuple[str, ...],
    test_scores: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """Fit on ``layer``'s frozen features of ``train`` (eval views, no augmentation), report AP on
    ``test`` (its scores [M, C] into ``test_scores[<name>_mAP]`` when given)."""
    tr = layer_features(model, train, (layer,), batch_size=128)[layer]
    te = layer_features(model, test, (layer,), batch_size=128)[layer]
    tr_lab, tr_diff = train.base.labels.numpy(), train.base.difficult_only.numpy()
    te_lab, te_diff = test.base.labels.numpy(), test.base.difficult_only.numpy()
    mean, std, weight, bias = fit_linear_probe(tr, tr_lab, tr_diff, cfg.linear)
    scores = ((torch.from_numpy(te).double() - mean) / std @ weight + bias).numpy()
    if test_scores is not None:
        test_scores[f"{name}_mAP"] = scores
    return ap_metrics(name, scores, te_lab, te_diff, classes, cfg.ap_mode)


# ---- main --------------------------------------------------------------------------------------


def check_data(cfg: Config) -> tuple[Path, tuple[str, ...]]:
    """(VOC root, its classes): the root, its class list (``cfg.classes`` when given) and the
    train / test split files, checked before anything is read."""
    root = voc_root(cfg.data)
    classes = dataset_classes(root, cfg.classes)
    for split in (cfg.train_split, cfg.test_split):
        require_split(root, split)
    return root, classes


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (orchestrate.preflight)."""
    return [
        Input("checkpoint", cfg.checkpoint, lambda: read_checkpoint(cfg)),
        Input("data", cfg.data, lambda: check_data(cfg)),
    ]


@dataclass
class Views:
    """A run's images, decoded once: training views with augmentation (fine-tuning), training
    and test eval views (probes, testing)."""

    train_aug: DecodedViews
    train_eval: DecodedViews
    test: DecodedViews


def read_views(cfg: Config, root: Path, size: int, classes: tuple[str, ...]) -> Views:
    """The images, read through the intake rule (core.images) before anything is written."""

    def views(split: str, train: bool) -> DecodedViews:
        return DecodedViews(open_split(root, split, size, train, True, "voc", classes, cfg.images))

    return Views(views(cfg.train_split, True), views(cfg.train_split, False),
                 views(cfg.test_split, False))  # fmt: skip


# mode -> the frozen layer its linear probe reads: the encoder output / the channel-wise FC's
PROBES = {"linear_pool5": "pool5", "linear_fc": "bottleneck"}


def finetune_and_test(
    cfg: Config,
    pre: Pretrained,
    classes: tuple[str, ...],
    views: Views,
    run_dir: Path,
    generator: torch.Generator,
    events: tb.EventLog,
    test_scores: dict[str, np.ndarray],
) -> dict[str, float]:
    """Fine-tune a fresh copy of the encoder with a new head; its AP metrics on the test views
    (its scores into ``test_scores["finetune_mAP"]``)."""
    net = new_classifier(pre, len(classes), cfg.finetune)
    finetune(net, views.train_aug, cfg, run_dir, generator, events)
    scores, labels, diff = predict(
        net, views.test, 128, cfg.test_flip, "finetune test", cfg.progress
    )
    test_scores["finetune_mAP"] = scores
    return ap_metrics("finetune", scores, labels, diff, classes, cfg.ap_mode)


def save_scores(run_dir: Path, cfg: Config, test: DecodedViews, test_scores: dict) -> None:
    """scores.npz (core.image_scores): the test scores behind ``mAP`` and each ``<mode>_mAP``."""
    test_scores["mAP"] = test_scores[f"{cfg.modes[0]}_mAP"]
    labels, diff = test.base.labels.numpy(), test.base.difficult_only.numpy()
    image_scores.save(run_dir, test.base.ids, labels, diff, cfg.ap_mode, test_scores)


def main(cfg: Config) -> dict[str, float]:
    """Run (or return the recorded result of) the classification transfer in ``cfg.run_dir``."""
    if not cfg.modes:
        raise ValueError("modes is empty; choose among finetune, linear_pool5, linear_fc")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    pre, model = read_checkpoint(cfg)
    source = pre.source
    done = run_folder.open_run(run_dir, cfg, FREE_KEYS, {"checkpoint": source})
    if done is not None:
        return done
    root, classes = check_data(cfg)
    size = cfg.image_size or model.input_size
    meta = {"task": "classify", "source": source, "seed": cfg.seed, "data": str(root),
            "classes": list(classes), "image_size": size}  # fmt: skip
    if "finetune" in cfg.modes:  # what finetune.amp resolves to here (docs/precision.md)
        dtype, why = precision(cfg.finetune)
        meta |= {"finetune_precision": precision_name(dtype), "finetune_precision_reason": why}
        log.info("fine-tuning precision: %s (%s)", precision_name(dtype), why)
    t0 = time.perf_counter()
    views = read_views(cfg, root, size, classes)
    run_folder.start(run_dir, cfg, meta, {"checkpoint": source})
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a restarted run logs afresh
    events = tb.EventLog(run_dir, cfg.log.tensorboard)  # and so do its event files

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    log.info("%d train / %d test images, %d classes", len(views.train_aug), len(views.test),
             len(classes))  # fmt: skip
    result: dict[str, float] = {}
    test_scores: dict[str, np.ndarray] = {}  # metric -> test scores (core.image_scores)
    for mode in cfg.modes:
        t_mode = time.perf_counter()
        if mode == "finetune":
            metrics = finetune_and_test(
                cfg, pre, classes, views, run_dir, generator, events, test_scores
            )
            result.update(metrics)
        else:
            train, test = views.train_eval, views.test
            metrics = linear_probe(
                mode, model, PROBES[mode], train, test, cfg, classes, test_scores
            )
            result.update(metrics)
        result[f"{mode}_time_s"] = time.perf_counter() - t_mode
        log.info("%s: mAP %.4f", mode, result[f"{mode}_mAP"])
        append_jsonl(run_dir / "metrics.jsonl", {"mode": mode, "mAP": result[f"{mode}_mAP"]})
        step = cfg.finetune.epochs if mode == "finetune" else 0
        events.scalars(step, {f"{mode}_mAP": result[f"{mode}_mAP"]}, "test/")
    events.close()
    result = {"mAP": result[f"{cfg.modes[0]}_mAP"], **result}
    result.update(views.train_eval.base.intake("train") | views.test.base.intake("test"))
    result["time_s"] = time.perf_counter() - t0
    save_scores(run_dir, cfg, views.test, test_scores)
    return run_folder.finish(run_dir, result, {**meta, "elapsed_s": result["time_s"]})


def cli(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return main(parse_config(argv))


if __name__ == "__main__":
    run_cli(cli)
