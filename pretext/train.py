"""Train a pretext method (``method=``: the keys of ``pretext.methods.METHODS``):
``python -m pretext.train``.

    python -m pretext.train --config pretext/configs/builtin.yaml run_dir=runs/ce mask.kind=central
    python -m pretext.train --config pretext/configs/rotation.yaml run_dir=runs/rot

A run folder holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per logged step) and
TensorBoard event files beside it (``log.tensorboard``; core.tb),
``checkpoints/last.pt`` (atomic) and when finished ``result.json`` (the method's evaluation: e.g.
``inpainting.json`` and ``inpainting_grid.png`` for the context encoder). Started again on the same
folder, a run resumes from its last checkpoint and produces the same weights as an uninterrupted
run. The phases of :func:`main`: :func:`start_run`, :func:`build`, :func:`resume_or_start`,
:func:`place`, the loop (``pretext.engine.train_steps``), :func:`finish`; what differs between
methods is in the method's module (``pretext/methods/<name>.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from core import run_folder, tb
from core.checkpoint import load_checkpoint, remove_stale_temp_files, save_checkpoint
from core.cli import run_cli
from core.config import ConfigError, parse_cli
from core.data import dataset_mean, ensure_builtin
from core.images import ImagesConfig
from core.machine import pick_device, precision_name
from core.models import ARCHS, build_model
from core.stage_inputs import Input
from pretext import distributed, probe
from pretext.engine import (
    Run,
    Training,
    checkpoint_state,
    load_state,
    rng_state,
    train_steps,
    truncate_metrics,
)
from pretext.methods import METHODS
from pretext.methods.base import (
    Placement,
    TrainStep,
    build_images,
    open_store,
    resolve_precision,
    step_settings,
)
from pretext.methods.kmeans_init import KMeansConfig
from pretext.methods.relative_location import RelativeLocationConfig
from pretext.methods.rotation import RotationConfig
from pretext.methods.supervised import HeadConfig
from pretext.probe import Probe, ProbeConfig

log = logging.getLogger("pretext.train")


@dataclass
class DataConfig:
    format: Literal["voc", "folder"] = "voc"
    root: str = "data/minivoc_pretrain/VOC2007"  # built-in pretraining set, generated if missing
    split: str = "train"
    val_split: str = "val"
    num_workers: int = 2
    # A decoded image store of data.root / data.split (python -m core.image_store build): the
    # training batches are then cut from it by batched crops, flips and holes on the device
    # (core.batched_source) instead of decoded per image. "": the per-image loader.
    store: str = ""


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
class LogConfig(tb.LogConfig):
    # TensorBoard (core.tb): the losses and lr of every metrics.jsonl line, and every
    # images_every steps the method's snapshot (an inpainting grid; 0: none)
    images_every: int = 100


@dataclass
class OptimConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    cosine: bool = True


MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]


@dataclass
class Config:
    method: MethodName = "context_encoder"
    run_dir: str = "runs/pretext/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)  # the intake rule (core.images)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    head: HeadConfig = field(default_factory=HeadConfig)  # method=supervised
    rotation: RotationConfig = field(default_factory=RotationConfig)
    relloc: RelativeLocationConfig = field(default_factory=RelativeLocationConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)  # method=kmeans_init
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # online kNN (pretext/probe.py)
    checkpoint_every: int = 100
    log_every: int = 10
    log: LogConfig = field(default_factory=LogConfig)
    eval_images: int = 256
    device: str = "auto"  # auto | cpu | cuda
    # auto: bf16 on a GPU and on a CPU with AMX matrix units, fp32 on other CPUs
    # (core.machine.resolve_amp, docs/precision.md). Resolved per machine, recorded in meta.json.
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on GPU only
    compile: bool = False
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    force: bool = False  # resume a run folder whose saved config differs
    fail_at_step: int = -1  # testing aid: inject a NaN loss at this step


# What a run folder written before a key existed was trained with: before mask.overlap_loss every
# mask kind had the 10x context band in its loss (not Eq. 1), so such a run is not an Eq. 1 run.
LEGACY_VALUES = {"mask.overlap_loss": "on"}
# Keys that moved: a run folder saved with the old name compares under the new one.
RENAMED_KEYS = {"data.skip_bad": "images.skip_bad"}

# Keys that may differ between a run and its resumption without changing its results. Not the
# probe's: they leave the weights alone but write metrics.jsonl, and a run resumed with another
# probe would hold lines no one config produces (force=true to do it anyway).
RESUME_FREE_KEYS = {"force", "data.num_workers", "device", "log_every", "fail_at_step", "threads",
                    "log.tensorboard", "log.images_every"}  # fmt: skip


def resolve(cfg: Config) -> Config:
    """Derived settings and cross-field checks (unknown keys and types are checked on load): the
    method's own (``resolve_config``, e.g. no masks but for the context encoder), then the mask's."""
    if cfg.model.arch not in ARCHS:
        raise ConfigError(
            f"model.arch: unknown arch {cfg.model.arch!r}; choose one of {sorted(ARCHS)}"
        )
    if cfg.log.images_every < 0:
        raise ConfigError(f"log.images_every: {cfg.log.images_every} < 0 (0: no images)")
    probe.check_config(cfg.probe)
    if cfg.method not in METHODS:
        raise ConfigError(f"method: unknown method {cfg.method!r}; choose one of {list(METHODS)}")
    cfg = METHODS[cfg.method].resolve_config(cfg)
    if cfg.data.store and not METHODS[cfg.method].batches_from_store:
        able = ", ".join(name for name, m in METHODS.items() if m.batches_from_store)
        raise ConfigError(
            f"data.store: method={cfg.method} takes no batches from an image store (its batch "
            f"transform needs single images, or it trains none); the store serves {able}"
        )
    mask = cfg.mask
    if mask.overlap_loss == "auto":
        mask = dataclasses.replace(mask, overlap_loss="on" if mask.kind == "central" else "off")
    output = cfg.model.output
    if output == "auto":
        output = "center" if mask.kind == "central" and cfg.model.arch == "inpaint128" else "full"
    if output == "center" and mask.kind != "central":
        raise ConfigError(
            "model.output=center predicts only the central square: use mask.kind=central"
        )
    model = dataclasses.replace(cfg.model, output=output)
    return dataclasses.replace(cfg, mask=mask, model=model)


def parse_config(argv: list[str] | None = None) -> Config:
    return resolve(parse_cli(Config, argv, __doc__, "mask.kind=central optim.steps=100"))


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs, each with the check the run makes of it (orchestrate.preflight runs them before
    a pipeline starts): the method's (``Method.input_checks``), and the probe's labelled set."""
    return [*METHODS[cfg.method].input_checks(cfg), *probe.input_checks(cfg.probe)]


# ---- the phases of main ------------------------------------------------------------------------


def open_run_folder(
    run_dir: Path, cfg: Config, sources: dict[str, Any] | None = None, precision: str = ""
) -> dict[str, Any] | None:
    """:func:`core.run_folder.open_run` with pretext's rules: refuse (RunFolderError) a run folder
    started with another config (keys outside RESUME_FREE_KEYS; LEGACY_VALUES for keys added since)
    or from other ``sources`` (the image store: its sha256), or an unfinished one that recorded
    another ``precision`` (fp32 | bf16 | fp16: what ``amp`` resolves to on this machine), unless
    ``force=true``; the recorded result of a finished folder, else None."""
    return run_folder.open_run(
        run_dir, cfg, RESUME_FREE_KEYS, sources, defaults=resolve(Config()), legacy=LEGACY_VALUES,
        renamed=RENAMED_KEYS, facts={"precision": precision} if precision else None,
    )  # fmt: skip


def store_source(cfg: Config) -> dict[str, Any]:
    """``data.store``'s provenance {path, sha256, images} (``{}`` without a store), after checking
    the store against the config (StoreError: one ``error:`` line, before anything is written)."""
    if not cfg.data.store:
        return {}
    store = open_store(cfg)
    return {"data_store": {"path": str(store.path.resolve()), "sha256": store.fingerprint,
                           "images": len(store)}}  # fmt: skip


def start_run(cfg: Config) -> tuple[Run, dict[str, Any] | None]:
    """Process group, device and threads; the run folder opened (nothing written yet: see
    :func:`write_start`). Returns (run, the recorded result of a finished folder or None)."""
    env = distributed.read_env()
    distributed.init(env)
    device = pick_device(cfg.device)
    if device.type == "cuda" and env.world_size > 1:
        device = torch.device("cuda", env.local_rank)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg, env, device, Path(cfg.run_dir))
    sources = store_source(cfg)
    dtype, why = resolve_precision(cfg, device)
    done = open_run_folder(run.run_dir, cfg, sources, precision_name(dtype))
    if done is not None and run.ckpt_path.exists():
        return run, done
    run.meta = {
        "task": "pretext",
        "method": cfg.method,
        "precision": precision_name(dtype),  # compared on resume (open_run_folder)
        "precision_reason": why,
        **({"sources": sources} if sources else {}),
    }
    if run.ckpt_path.exists():  # provenance of the checkpoint this run resumes from
        run.meta["resumed_from"] = run_folder.provenance(run.ckpt_path)
    if env.is_main and env.world_size > 1:  # by rank 0 alone, before the others read them
        ensure_builtin(cfg.data.root)
        if cfg.probe.every > 0:
            ensure_builtin(cfg.probe.data)
    distributed.barrier()
    return run, None


def check_batches(t: Training, run: Run) -> None:
    """A run that trains needs one batch of images (after the intake's skips) and a batch the
    ranks divide; checked once the data are listed, before anything is written."""
    cfg, n = run.cfg, len(t.method.train_images)
    if not t.method.trains:
        return
    if n < cfg.optim.batch_size:
        where = f"{cfg.data.root} (split {cfg.data.split!r})"
        raise ConfigError(
            f"optim.batch_size: {where} has {n} usable images, fewer than one batch of "
            f"{cfg.optim.batch_size}; lower optim.batch_size or add images"
        )
    if cfg.optim.batch_size % run.env.world_size:
        raise ConfigError(
            f"optim.batch_size: {cfg.optim.batch_size} is not divisible by the "
            f"{run.env.world_size} processes"
        )


def make_probe(t: Training, run: Run) -> Probe | None:
    """The online kNN probe of a run that trains with ``probe.every`` > 0 (rank 0; its data
    checked on every rank first, before anything is written, so that all ranks fail alike)."""
    cfg = run.cfg
    if cfg.probe.every == 0 or not t.method.trains:
        return None
    probe.check_data(cfg.probe)
    return Probe(cfg.probe, t.model, cfg.images) if run.env.is_main else None


def write_start(run: Run) -> None:
    """The run folder's config.yaml and meta.json (rank 0), stale checkpoint temp files removed."""
    if run.env.is_main:
        # logged once the run really starts: a config refused later never prints it
        log.info("precision %s: %s", run.meta["precision"], run.meta["precision_reason"])
        run_folder.start(run.run_dir, run.cfg, run.meta)
        for tmp in remove_stale_temp_files(run.ckpt_path):  # left by a kill mid-write
            log.info("removed %s, left by an interrupted checkpoint write", tmp)
    distributed.barrier()


def build(cfg: Config, env: distributed.DistEnv) -> Training:
    """From the seed: the network, then the method's modules (its data, head, discriminator), then
    the optimisers (Adam: ``gen`` over the method's ``net``, ``disc`` over its discriminator)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg.model.arch, cfg.model.dropout, cfg.model.output)
    method = METHODS[cfg.method](cfg, model)
    o = cfg.optim
    opt_g = torch.optim.Adam(
        method.net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay
    )
    opt_d = None
    if method.disc is not None:
        lr_d = o.lr * method.disc_lr_scale
        opt_d = torch.optim.Adam(method.disc.parameters(), lr=lr_d, betas=o.betas)
    if env.world_size > 1:  # one torch RNG stream (dropout) per rank; DDP makes weights rank 0's
        torch.manual_seed(cfg.seed + 1_000_003 * env.rank)
    return Training(model, method, opt_g, opt_d, mean=[])


def resume_or_start(t: Training, run: Run) -> None:
    """Resume ``t`` from the run's checkpoint; or start it: the data mean, the method's encoder
    init, and a loadable step-0 checkpoint (after every rank has resumed or started)."""
    cfg, env = run.cfg, run.env
    if run.ckpt_path.exists():
        load_state(t, load_checkpoint(run.ckpt_path), env)
        truncate_metrics(run.run_dir / "metrics.jsonl", t.step)
        log.info("resuming %s from step %d", run.run_dir, t.step)
    else:
        size = t.model.input_size
        t.mean = dataset_mean(build_images(cfg, cfg.data.split, False, size))
        t.method.init_encoder(t.model.encoder, t.method.train_images)
    steps_rngs = distributed.all_gather_object((t.step, rng_state()))
    if len({s for s, _ in steps_rngs}) > 1:
        raise RuntimeError(f"{run.ckpt_path}: ranks resumed from different steps {steps_rngs}")
    if t.step == 0 and env.is_main and not run.ckpt_path.exists():
        save_checkpoint(run.ckpt_path, checkpoint_state(t, cfg, [r for _, r in steps_rngs]))


def place(t: Training, run: Run) -> TrainStep:
    """Modules and optimiser state onto the device; DDP (global-batch BatchNorm) and torch.compile;
    the method's step over the placed ``net``."""
    cfg, device, env = run.cfg, run.device, run.env
    memory_format, autocast_dtype, compile_model = step_settings(cfg, device)
    t.model.to(device, memory_format=memory_format)
    t.method.to(device, memory_format)
    _move_optimizer(t.opt_g, device)
    if t.opt_d is not None:
        _move_optimizer(t.opt_d, device)
    net = t.method.net
    if env.world_size > 1:
        # BatchNorm over the global batch, so that the statistics are one process's
        net = distributed.sync_batchnorm(net, device)
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=ids)
        if t.method.disc is not None:  # not DDP-wrapped (see average_gradients): same start
            t.method.disc = distributed.sync_batchnorm(t.method.disc, device)
            distributed.broadcast_module(t.method.disc)
    if compile_model:
        net = torch.compile(net)
    mean = torch.tensor(t.mean, device=device)
    placement = Placement(device, autocast_dtype, memory_format)
    return t.method.make_step(net, t.opt_g, t.opt_d, mean, placement)


def finish(t: Training, run: Run) -> dict[str, Any]:
    """The method's evaluation; meta.json (with the provenance of the checkpoint written: path,
    sha256), then result.json."""
    progress = {
        "steps": float(t.step),
        "train_time_s": t.elapsed,
        "images_per_s": t.step * run.cfg.optim.batch_size / t.elapsed if t.elapsed > 0 else 0.0,
    }
    result = t.method.evaluate(run.run_dir, run.device, t.mean, progress)
    intake = getattr(t.method.train_images, "intake", None)  # what core.images did to the data
    if intake is not None:
        result.update(intake("train"))
    meta = {**run.meta, "checkpoint": run_folder.provenance(run.ckpt_path)}
    return run_folder.finish(run.run_dir, result, meta)


def main(cfg: Config) -> dict[str, float]:
    """Train (or resume) the run in ``cfg.run_dir``; returns the final metrics (also in result.json)."""
    cfg = resolve(cfg)
    run, done = start_run(cfg)
    if done is not None:
        return done
    t = build(cfg, run.env)
    t.data_store = run.meta.get("sources", {}).get("data_store")  # recorded in the checkpoint
    check_batches(t, run)
    knn_probe = make_probe(t, run)
    write_start(run)
    resume_or_start(t, run)
    train_step = place(t, run)
    total = cfg.optim.steps if t.method.trains else 0
    if t.step < total:
        train_steps(t, train_step, run, total, knn_probe)
    if not run.env.is_main:
        return {}
    return finish(t, run)


def _move_optimizer(opt: torch.optim.Optimizer, device: torch.device) -> None:
    for state in opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                state[k] = v.to(device)


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
