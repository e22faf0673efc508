"""The pretext batches from an image store, augmented in batches on the device.

``make_batched_source(cfg, ...)`` is the drop-in for the trainer's DataLoader of the context
encoder (``data.store=PATH``, wired in ``pretext.engine.step_loader``): an iterable of (images uint8 [N, 3, S, S],
hole bool [N, 1, S, S]) on ``device``, one per step from ``start_step`` to ``total_steps``, the
batches of :class:`core.data.StepBatchSampler` (same epochs, same DDP slices). Sample ``slot`` of
step ``t`` is drawn from ``numpy.random.default_rng(sample_seed(seed, t, slot))``: its crop, flip
and hole are a function of (seed, step, slot), so a resumed run sees the batches an uninterrupted
run would. On a GPU the host part of a batch (parameters, copying the stored bytes into one
padded array) is prepared ``prefetch`` steps ahead in a thread and the pixels are made on the
device (:mod:`core.batch_augment`). On the CPU, whole batches are made per sample from the same
draws (PIL's resize of each box, :class:`core.masks.MaskGenerator`'s hole: 3x cheaper there than
the batched ops at 227 px) by ``workers`` loader processes with one torch thread each, as today's
loader does, or with ``workers=0`` ``prefetch`` steps ahead in a thread (docs/decisions.md).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from core.batch_augment import BatchedMasks, draw_crop, pad_batch, pil_resized_crop, resized_crops
from core.data import StepBatchSampler
from core.image_store import ImageStore, StoreError
from core.masks import MaskGenerator


class BatchedSource:
    """Iterable of (images uint8 [N, 3, S, S], hole bool [N, 1, S, S]) on the masks' device."""

    def __init__(
        self,
        store: ImageStore,
        size: int,
        masks: BatchedMasks,
        sampler: StepBatchSampler,
        prefetch: int = 2,
        workers: int = 0,
        batched_ops: bool | None = None,
    ):
        self.store, self.size, self.masks, self.sampler = store, size, masks, sampler
        self.device, self.prefetch, self.workers = masks.device, prefetch, workers
        # None: batched tensor ops on a GPU; on the CPU per sample (PIL resize, numpy holes: 3x
        # cheaper there at 227 px; docs/decisions.md), from the same per-sample draws of the crop
        self.batched_ops = self.device.type != "cpu" if batched_ops is None else batched_ops
        if not self.batched_ops:
            m = masks
            self.per_sample_masks = MaskGenerator(m.kind, m.size, m.overlap, m.max_coverage,
                                                  m.shapes)  # fmt: skip

    def __len__(self) -> int:
        return len(self.sampler)

    def host_part(self, keys: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """Everything drawn and copied on the host for the samples ``keys`` (index, sample seed)."""
        rngs = [np.random.default_rng(seed) for _, seed in keys]
        crops = [draw_crop(rng, *self.store.shapes[i][:2]) for (i, _), rng in zip(keys, rngs)]
        host = {"rngs": rngs, "boxes": np.array([c[:4] for c in crops]),
                "flips": np.array([c[4] for c in crops])}  # fmt: skip
        if not self.batched_ops:  # the whole batch, here: in the prefetch thread or a worker
            return {
                "batch": self.per_sample({**host, "images": [self.store.image(i) for i, _ in keys]})
            }
        padded = torch.from_numpy(pad_batch([self.store.image(i) for i, _ in keys]))
        if self.device.type == "cuda":
            padded = padded.pin_memory()
        return {**host, "padded": padded}

    def per_sample(self, host: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch made sample by sample: PIL's resized crop, core.masks' hole (the hole drawn
        from the generator after the crop's draws, as the batched path does)."""
        images = np.stack([pil_resized_crop(im, box, flip, self.size)
                           for im, box, flip in zip(host["images"], host["boxes"], host["flips"])])  # fmt: skip
        holes = np.stack([self.per_sample_masks(rng) for rng in host["rngs"]])[:, None]
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # numpy: no torch threads
        return torch.from_numpy(images).to(self.device), torch.from_numpy(holes).to(self.device)

    def device_part(self, host: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "batch" in host:  # made on the host already (per sample)
            return host["batch"]
        padded = host["padded"].to(self.device, non_blocking=True)
        images = resized_crops(padded, host["boxes"], host["flips"], self.size)
        return images, self.masks.draw(host["rngs"])  # mask draws follow each crop's

    def batch(self, keys: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.device_part(self.host_part(keys))

    def __getitem__(self, keys: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(keys)  # a map-style dataset of whole batches, for loader workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.device.type == "cpu" and self.workers > 0:
            # its own generator: the workers' base seed (unused: every draw is seeded per
            # sample) is not drawn from the global torch RNG, which dropout continues on resume
            loader = DataLoader(self, sampler=self.sampler, batch_size=None,
                                num_workers=self.workers, prefetch_factor=self.prefetch or 2,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
            self.loader_iter = iter(loader)  # its worker processes, for whoever monitors them
            yield from self.loader_iter
            return
        if self.prefetch <= 0:
            for keys in self.sampler:
                yield self.batch(keys)
            return
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for keys in self.sampler:
                    if stop.is_set():
                        return
                    ready.put(self.host_part(keys))
                ready.put(None)
            except BaseException as err:  # re-raised in the consumer
                ready.put(err)

        thread = threading.Thread(target=produce, daemon=True, name="batched-source")
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield self.device_part(item)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def make_batched_source(
    cfg: Any,
    size: int,
    device: str | torch.device,
    start_step: int,
    total_steps: int,
    shapes: Sequence[np.ndarray] = (),
    rank: int = 0,
    world_size: int = 1,
    store: str | Path | None = None,
    verify_sources: bool = True,
    prefetch: int = 2,
    workers: int | None = None,
    batched_ops: bool | None = None,
) -> BatchedSource:
    """The batched source of a pretext config ``cfg`` (reads cfg.data.{store, root, format,
    split}, cfg.mask.{kind, overlap, max_coverage}, cfg.optim.batch_size, cfg.seed; ``store``
    overrides cfg.data.store). ``shapes``: the random-region silhouettes (pretext's
    region_shapes). ``workers`` (default cfg.data.num_workers) is used on the CPU only. A store built
    from other data, split or short side than ``size`` is refused."""
    path = store if store is not None else getattr(cfg.data, "store", "")
    if not path:
        raise StoreError(
            "data.store: the batched path needs an image store (python -m core.image_store build)"
        )
    images = ImageStore(path)
    rule = getattr(cfg, "images", None)  # the intake rule (core.images) the store was built under
    images.check(cfg.data.root, cfg.data.format, cfg.data.split, size, verify_sources,
                 getattr(rule, "strict", None), getattr(rule, "skip_bad", None))  # fmt: skip
    m = cfg.mask
    masks = BatchedMasks(m.kind, size, m.overlap, m.max_coverage, shapes, device)
    sampler = StepBatchSampler(
        len(images), cfg.optim.batch_size, cfg.seed, start_step, total_steps, rank, world_size
    )
    workers = cfg.data.num_workers if workers is None else workers
    return BatchedSource(images, size, masks, sampler, prefetch, workers, batched_ops)
