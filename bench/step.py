"""Benchmark 1 (+2): the pretext training step against the plain eager baseline, in one process.

    python -m bench.step --arch inpaint128 --batch 64 --iters 3 --out step_inpaint128.json

Both steps start from the same weights and take the same batch; their timed iterations alternate
(baseline, ours, baseline, ...) so that load from other processes hits both alike. FLOPs of one step
are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, forward and
backward) and divided by the step time and by the fp32 matmul rate measured in the same process.
On a CPU with bf16 matrix units (``amx_bf16`` / ``avx512_bf16``) our step is also timed in the other
precision (bf16 beside fp32) in the same alternation, against a bf16 matmul rate measured here too.
The data pipeline that feeds this network (decode, crop, mask, batch) is timed in the same process
too (:mod:`bench.pipeline`), so its rate is compared with the step's on the same cores and load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import baseline
from bench.machine import PeakRSS, matmul_gflops
from core.atomic_io import atomic_write_json
from core.config import load_config
from core.machine import cpu_bf16, precision_name
from core.masks import MaskGenerator, builtin_shapes
from core.models import Discriminator, build_model
from pretext.methods.base import step_settings
from pretext.methods.context_encoder import InpaintingStep
from pretext.train import Config, parse_config

# The paper's configs (pretext/configs/) for the two paper networks; small64 is the built-in profile.
CONFIGS = {
    "inpaint128": "pretext/configs/paper_inpaint128.yaml",
    "alexnet227": "pretext/configs/paper_alexnet.yaml",
    "small64": "pretext/configs/builtin.yaml",
}


def bench_config(arch: str, batch: int, overrides: list[str] = ()) -> Config:
    """The paper's (or built-in) config of ``arch`` at ``batch``, with ``key=value`` overrides."""
    load_config(Config, CONFIGS[arch])  # fail early, naming the file, if it is broken
    return parse_config(["--config", CONFIGS[arch], f"optim.batch_size={batch}", *overrides])


def make_batch(cfg: Config, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch in the trainer's input format: uint8 images [n, 3, S, S] (smooth random
    fields, not noise) and the config's masks, bool [n, 1, S, S]."""
    size = build_model(cfg.model.arch).input_size if cfg.model.arch != "inpaint128" else 128
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 8, size // 8, generator=gen)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    images = (images * 255).round().to(torch.uint8)
    shapes = builtin_shapes() if cfg.mask.kind == "random_region" else ()
    masks = MaskGenerator(cfg.mask.kind, size, cfg.mask.overlap, cfg.mask.max_coverage, shapes)
    hole = np.stack([masks(np.random.default_rng([seed, i])) for i in range(n)])
    return images, torch.from_numpy(hole)[:, None]


def build_ours(cfg: Config, device: torch.device, mean: list[float]) -> InpaintingStep:
    """The trainer's step, set up as :func:`pretext.train.main` sets it up (single process)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, cfg.model.dropout, cfg.model.output)
    disc = Discriminator.for_input(model.output_size) if cfg.loss.adversarial else None
    memory_format, autocast_dtype, compile_model = step_settings(cfg, device)
    betas = cfg.optim.betas
    opt_g = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=betas)
    opt_d = (
        torch.optim.Adam(disc.parameters(), lr=cfg.optim.lr * cfg.loss.disc_lr_ratio, betas=betas)
        if disc
        else None
    )
    model.to(device, memory_format=memory_format)
    if disc is not None:
        disc.to(device, memory_format=memory_format)
    train_model = torch.compile(model) if compile_model else model
    mean_t = torch.tensor(mean, device=device)
    return InpaintingStep(
        train_model, disc, opt_g, opt_d, cfg, mean_t, device, autocast_dtype, memory_format
    )


def build_baseline(cfg: Config, ours: InpaintingStep, mean: list[float]) -> baseline.BaselineStep:
    """The plain eager fp32 NCHW step with ``ours``'s current weights."""
    model = baseline.BASELINES[cfg.model.arch](
        **({} if cfg.model.arch == "inpaint128" else {"dropout": cfg.model.dropout})
    )
    src = getattr(ours.model, "_orig_mod", ours.model)
    model.load_state_dict(src.state_dict())
    disc = None
    if ours.disc is not None:
        disc = baseline.Discriminator()
        disc.load_state_dict(ours.disc.state_dict())
    model.to(ours.device)
    if disc is not None:
        disc.to(ours.device)
    return baseline.BaselineStep(
        model, disc, torch.tensor(mean, device=ours.device), center=cfg.model.output == "center",
        lr=cfg.optim.lr, betas=cfg.optim.betas, disc_lr_ratio=cfg.loss.disc_lr_ratio,
        overlap=cfg.mask.overlap if cfg.mask.overlap_loss == "on" else 0,
        overlap_weight=cfg.mask.overlap_weight,
        lambda_rec=cfg.loss.lambda_rec, lambda_adv=cfg.loss.lambda_adv,
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def other_precision(ours: InpaintingStep) -> str | None:
    """The precision timed beside ours on a CPU with bf16 matrix units (core.machine.cpu_bf16):
    bf16 beside an fp32 step, fp32 beside a bf16 one; None elsewhere (a GPU, no bf16 units, fp16)."""
    if ours.device.type != "cpu" or not cpu_bf16()[0]:
        return None
    return {"fp32": "bf16", "bf16": "fp32"}.get(precision_name(ours.autocast_dtype))


def measure_step(arch: str, batch: int, iters: int, device: str = "cpu", overrides=()) -> dict:
    """Images/s of the baseline and our step (alternating), FLOPs, matmul rate, peak RSS; on a CPU
    with bf16 units also our step in the other precision (``ours_bf16`` / ``ours_fp32``, in the
    same alternation) against the bf16 matmul rate."""
    cfg = bench_config(arch, batch, [f"device={device}", *overrides])
    dev = torch.device(device)
    mean = [0.0, 0.0, 0.0]
    images, hole = make_batch(cfg, batch)
    ours = build_ours(cfg, dev, mean)
    base = build_baseline(cfg, ours, mean)
    out: dict = {"arch": arch, "batch": batch, "iters": iters, "device": device,
                 "mask": cfg.mask.kind, "adversarial": cfg.loss.adversarial,
                 "output": cfg.model.output, "settings": _settings(cfg, dev)}  # fmt: skip
    steps = {"baseline": base, "ours": ours}
    other = other_precision(ours)
    if dev.type == "cpu":
        out["cpu_bf16"] = cpu_bf16()[1]
    if other is not None:  # same weights (build_ours seeds them), same batch
        amp = {"bf16": "bf16", "fp32": "off"}[other]
        other_cfg = bench_config(arch, batch, [f"device={device}", *overrides, f"amp={amp}"])
        steps[f"ours_{other}"] = build_ours(other_cfg, dev, mean)
    torch.manual_seed(1)  # same dropout masks for both first steps
    with FlopCounterMode(display=False) as counter:  # warm-up of the baseline, counting its FLOPs
        out["first_loss_baseline"] = base(images, hole)
    flops = float(
        counter.get_total_flops()
    )  # same math as ours (convolutions + matmuls, fwd + bwd)
    torch.manual_seed(1)
    t0 = time.perf_counter()
    out["first_loss_ours"] = ours(images, hole)  # warm-up (and compilation, when on)
    out["ours_first_step_s"] = time.perf_counter() - t0
    if other is not None:
        torch.manual_seed(1)
        out[f"first_loss_ours_{other}"] = steps[f"ours_{other}"](images, hole)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    peak: dict[str, dict] = {}
    for _ in range(iters):
        for name, step in steps.items():
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                step(images, hole)
                _sync(dev)
                times[name].append(time.perf_counter() - t0)
            if name not in peak or mem.peak_mb > peak[name]["peak_rss_mb"]:
                peak[name] = mem.as_dict()
            if dev.type == "cuda":
                gpu_mb = torch.cuda.max_memory_allocated(dev) / 2**20
                peak[name]["cuda_max_allocated_mb"] = max(
                    gpu_mb, peak[name].get("cuda_max_allocated_mb", 0)
                )
    for name, ts in times.items():
        out[f"{name}_images_per_s"] = batch / statistics.median(ts)
        out[f"{name}_step_s"] = ts
        out[f"{name}_memory"] = peak[name]
    out["speedup"] = out["ours_images_per_s"] / out["baseline_images_per_s"]
    out["gflop_per_image"] = flops / batch / 1e9
    out["matmul_gflops"] = matmul_gflops() if dev.type == "cpu" else None
    for name in steps:
        rate = out[f"{name}_images_per_s"] * out["gflop_per_image"]
        out[f"{name}_gflops"] = rate
        if out["matmul_gflops"]:
            out[f"{name}_fraction_of_matmul"] = rate / out["matmul_gflops"]
    if other is not None:
        bf16 = "ours_bf16" if other == "bf16" else "ours"
        fp32 = "ours_fp32" if other == "fp32" else "ours"
        out["bf16_matmul_gflops"] = matmul_gflops(dtype=torch.bfloat16)
        out["fp32_images_per_s"] = out[f"{fp32}_images_per_s"]
        out["bf16_images_per_s"] = out[f"{bf16}_images_per_s"]
        out["bf16_speedup"] = out["bf16_images_per_s"] / out["fp32_images_per_s"]
        out["bf16_fraction_of_bf16_matmul"] = out[f"{bf16}_gflops"] / out["bf16_matmul_gflops"]
    return out


def _settings(cfg: Config, device: torch.device) -> dict:
    memory_format, autocast_dtype, compile_model = step_settings(cfg, device)
    return {"channels_last": memory_format == torch.channels_last,
            "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else None,
            "compile": compile_model, "threads": torch.get_num_threads()}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--pipeline-batches", type=int, default=0, help="also time the data pipeline"
    )
    parser.add_argument("--data-root", default="data/minivoc")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="trainer config key=value overrides")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    result = {"step": measure_step(args.arch, args.batch, args.iters, args.device, args.overrides)}
    if args.pipeline_batches:
        from bench.pipeline import measure_pipeline

        cfg = bench_config(args.arch, args.batch, args.overrides)
        pipe = measure_pipeline(cfg, args.data_root, args.pipeline_batches)
        pipe["pipeline_over_step"] = pipe["images_per_s"] / result["step"]["ours_images_per_s"]
        result["pipeline"] = pipe
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(parse_args())
