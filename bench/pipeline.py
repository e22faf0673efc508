"""Benchmark 2: the pretext data pipeline alone (JPEG decode, random resized crop + flip, mask, batch).

``core.data.MaskedImages`` over ``VOCImages`` of the generated mini-VOC, batched by
``StepBatchSampler`` through the trainer's DataLoader (``make_loader``), at the network's input size
and with its config's mask kind and worker count. Images/s over ``batches`` batches after the first
(which includes starting the workers); peak RSS of this process and of the loader workers.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from bench.machine import PeakRSS
from core import minivoc
from core.data import MaskedImages, StepBatchSampler, make_loader
from core.datasets import VOCImages
from core.masks import MaskGenerator
from pretext.methods.context_encoder import region_shapes
from pretext.train import Config


def measure_pipeline(
    cfg: Config, data_root: str | Path, batches: int, workers: int | None = None
) -> dict:
    """Images/s of the loader for ``cfg`` (input size, mask kind, batch size) on mini-VOC's train split."""
    size = {"inpaint128": 128, "alexnet227": 227, "alexnet227_poolfree": 227}.get(
        cfg.model.arch, 64
    )
    if size <= 128:
        voc = minivoc.generate(Path(data_root))
    else:  # the default mini-VOC's 96-160 px photos are too small for 227 px crops
        voc = minivoc.generate(Path(f"{data_root}_{size}px"), n_images=320, size_range=(size, 340))
    workers = cfg.data.num_workers if workers is None else workers
    workers = min(
        workers, len(os.sched_getaffinity(0))
    )  # the paper configs ask for 8; use the cores there are
    images = VOCImages(voc, "train", size, train=True)
    # silhouettes from the generated mini-VOC, standing in for the paper configs' VOC2012 shapes_root
    shapes_cfg = Config(
        data=cfg.data.__class__(root=str(voc)), mask=replace(cfg.mask, shapes_root=str(voc))
    )
    masks = MaskGenerator(
        cfg.mask.kind, size, cfg.mask.overlap, cfg.mask.max_coverage, region_shapes(shapes_cfg)[0]
    )
    sampler = StepBatchSampler(
        len(images), cfg.optim.batch_size, seed=0, start_step=0, total_steps=batches + 1
    )
    with PeakRSS() as mem:
        loader = iter(make_loader(MaskedImages(images, masks), sampler, workers))
        t_start = time.perf_counter()
        next(loader)
        t_first = time.perf_counter()
        n = 0
        worker_rss = 0.0
        for batch, _hole in loader:
            n += len(batch)
            worker_rss = max(worker_rss, _workers_rss_mb(loader))
        t_end = time.perf_counter()
    return {
        "size": size, "mask": cfg.mask.kind, "batch": cfg.optim.batch_size, "workers": workers,
        "images": n, "first_batch_s": t_first - t_start, "images_per_s": n / (t_end - t_first),
        "memory": {**mem.as_dict(), "workers_rss_mb": round(worker_rss, 1)},
    }  # fmt: skip


def _workers_rss_mb(loader) -> float:
    """Current RSS (MiB) summed over the DataLoader iterator's worker processes (0 without workers)."""
    total = 0
    for worker in getattr(loader, "_workers", []):
        try:
            status = Path(f"/proc/{worker.pid}/status").read_text()
        except OSError:
            continue
        total += next(
            (int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")), 0
        )
    return total / 1024
