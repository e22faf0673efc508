"""Benchmark 4: today's per-image loader vs the image store + batched augmentation, one process.

    python -m bench.data_path --arch alexnet227 --batch 32 --batches 8 --out data_path.json

Loader: :func:`bench.pipeline.measure_pipeline` (JPEG decode, crop, flip, mask in ``workers``
DataLoader processes). Batched: :func:`core.batched_source.make_batched_source` over a store of
the same split built first (its build time is reported: a one-off cost), crops and masks made by
batched ops, on the CPU in ``workers`` processes of one torch thread each (whole batches). The two alternate ``rounds`` times
(loader, batched, loader, ...) so load from other processes hits both alike; images/s is the
median over rounds. With ``--steps``, both also feed the trainer's step (``bench.step.build_ours``)
end to end, alternating, so the cost of sharing the cores with the step is in the figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.machine import PeakRSS
from bench.pipeline import _workers_rss_mb, measure_pipeline
from bench.step import bench_config, build_ours
from core import minivoc
from core.atomic_io import atomic_write_json
from core.batched_source import make_batched_source
from core.data import MaskedImages, StepBatchSampler, make_loader
from core.datasets import VOCImages
from core.image_store import ImageStore, StoreSettings, build
from core.masks import MaskGenerator
from core.voc import object_shapes

SIZES = {"inpaint128": 128, "alexnet227": 227, "small64": 64}


def bench_voc(data_root: str | Path, size: int) -> Path:
    """The generated mini-VOC that bench.pipeline times at ``size`` (the same folders)."""
    if size <= 128:
        return minivoc.generate(Path(data_root))
    return minivoc.generate(Path(f"{data_root}_{size}px"), n_images=320, size_range=(size, 340))


def measure_batched(cfg, voc: Path, store: Path, size: int, batches: int, threads: int) -> dict:
    """Images/s of the batched source over ``batches`` batches after the first."""
    torch.set_num_threads(threads)
    shapes = object_shapes(voc) if cfg.mask.kind == "random_region" else ()
    with PeakRSS() as mem:
        source = make_batched_source(cfg, size, "cpu", 0, batches + 1, shapes, store=store)
        it = iter(source)
        t_start = time.perf_counter()
        next(it)
        t_first = time.perf_counter()
        n, worker_rss = 0, 0.0
        for images, _hole in it:
            n += len(images)
            worker_rss = max(worker_rss, _workers_rss_mb(getattr(source, "loader_iter", None)))
        t_end = time.perf_counter()
    memory = {**mem.as_dict(), "workers_rss_mb": round(worker_rss, 1)}
    return {"images": n, "first_batch_s": t_first - t_start,
            "images_per_s": n / (t_end - t_first), "memory": memory}  # fmt: skip


def measure_end_to_end(cfg, voc: Path, store: Path, size: int, steps: int, workers: int) -> dict:
    """Images/s of data + training step for both paths (alternating steps after a warm-up)."""
    shapes = object_shapes(voc) if cfg.mask.kind == "random_region" else ()
    step = build_ours(replace(cfg, device="cpu"), torch.device("cpu"), [0.0, 0.0, 0.0])
    images = VOCImages(voc, "train", size, train=True)
    masks = MaskGenerator(cfg.mask.kind, size, cfg.mask.overlap, cfg.mask.max_coverage, shapes)
    sampler = StepBatchSampler(len(images), cfg.optim.batch_size, 0, 0, steps + 1)
    paths = {
        "loader": iter(make_loader(MaskedImages(images, masks), sampler, workers)),
        "batched": iter(make_batched_source(cfg, size, "cpu", 0, steps + 1, shapes, store=store)),
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    for it in paths.values():  # warm-up: worker start, first step
        step(*next(it))
    for _ in range(steps):
        for k, it in paths.items():
            t0 = time.perf_counter()
            step(*next(it))
            times[k].append(time.perf_counter() - t0)
    b = cfg.optim.batch_size
    return {f"{k}_images_per_s": b / statistics.median(ts) for k, ts in times.items()}


def compare(arch: str, batch: int, batches: int, rounds: int, workers: int, threads: int,
            data_root: str, steps: int = 0, overrides=()) -> dict:  # fmt: skip
    size = SIZES[arch]
    cfg = bench_config(arch, batch, [f"data.num_workers={workers}", *overrides])
    voc = bench_voc(data_root, size)
    cfg = replace(cfg, data=replace(cfg.data, root=str(voc), format="voc", split="train"))
    out: dict = {"arch": arch, "size": size, "mask": cfg.mask.kind, "batch": batch,
                 "workers": workers, "threads": threads, "rounds": rounds}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / f"store{size}"
        t0 = time.perf_counter()
        build(voc, store, StoreSettings("voc", "train", size))
        out["store"] = {"build_s": time.perf_counter() - t0, "images": len(ImageStore(store)),
                        "mib": ImageStore(store).meta["bytes"] / 2**20}  # fmt: skip
        loader, batched = [], []
        for _ in range(rounds):
            torch.set_num_threads(threads)
            loader.append(measure_pipeline(cfg, data_root, batches, workers))
            batched.append(measure_batched(cfg, voc, store, size, batches, threads))
        out["loader"] = {"images_per_s": statistics.median(r["images_per_s"] for r in loader),
                         "rounds": loader}  # fmt: skip
        out["batched"] = {"images_per_s": statistics.median(r["images_per_s"] for r in batched),
                          "rounds": batched}  # fmt: skip
        out["speedup"] = out["batched"]["images_per_s"] / out["loader"]["images_per_s"]
        out["loader_peak_rss_mb"] = max(
            r["memory"]["peak_rss_mb"] + r["memory"]["workers_rss_mb"] for r in loader
        )
        out["batched_peak_rss_mb"] = max(
            r["memory"]["peak_rss_mb"] + r["memory"]["workers_rss_mb"] for r in batched
        )
        if steps:
            torch.set_num_threads(threads)
            out["end_to_end"] = measure_end_to_end(cfg, voc, store, size, steps, workers)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(SIZES), required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="loader processes (today's path)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    parser.add_argument("--steps", type=int, default=0, help="also time data + step end to end")
    parser.add_argument("--data-root", default="data/minivoc")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="trainer config key=value overrides")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    res = compare(args.arch, args.batch, args.batches, args.rounds, args.workers, args.threads,
                  args.data_root, args.steps, args.overrides)  # fmt: skip
    atomic_write_json(args.out, res)
    return res


if __name__ == "__main__":
    main(parse_args())
