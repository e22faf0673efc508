"""The batched device path against today's per-image path: the same crop-box and coverage
distributions (two-sample KS tests at fixed seeds, so deterministic), exact invariants (boxes in
the image, coverage <= max_coverage, the central mask, pixels of a known box as PIL resizes them,
pieces as core.masks._deform warps them), and samples that are a function of (seed, step, slot)."""

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from core import masks as per_image
from core.batch_augment import BatchedMasks, draw_crop, pad_batch, resized_crops
from core.batched_source import make_batched_source
from core.data import sample_seed
from core.datasets import CROP_RATIO, CROP_SCALE
from core.image_store import ImageStore, StoreError, StoreSettings, build
from core.masks import MaskGenerator, builtin_shapes, central_mask

P_MIN = 0.01  # fixed seeds: a p-value is a fixed number; this one is a real departure


def _box_stats(boxes, height, width):
    b = np.asarray(boxes, dtype=np.float64)
    top, left, h, w = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return {"scale": h * w / (height * width), "log_ratio": np.log(w / h),
            "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}  # fmt: skip


@pytest.mark.parametrize(("height", "width"), [(227, 300), (64, 64), (64, 200)])
def test_crop_boxes_follow_torchvisions_distribution(height, width):
    n = 3000
    torch.manual_seed(0)
    ref = [RandomResizedCrop.get_params(torch.empty(3, height, width), list(CROP_SCALE), list(CROP_RATIO))
           for _ in range(n)]  # fmt: skip
    ours = [draw_crop(np.random.default_rng(sample_seed(0, 0, i)), height, width) for i in range(n)]
    for top, left, h, w, _ in ours:  # exact invariants: inside the image, never empty
        assert 0 < h <= height and 0 < w <= width
        assert 0 <= top <= height - h and 0 <= left <= width - w
    a, b = _box_stats(ref, height, width), _box_stats([o[:4] for o in ours], height, width)
    for key in a:
        assert ks_2samp(a[key], b[key]).pvalue > P_MIN, key
    flips = sum(o[4] for o in ours)
    assert abs(flips - n / 2) < 4 * math.sqrt(n / 4)


def test_resized_crop_matches_pil_and_flip_mirrors_it():
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (3, 12, 16)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None], (60, 80), mode="bicubic"
    )
    image = smooth[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy().copy()
    other = np.zeros((70, 50, 3), np.uint8)  # a bigger padded batch must not change image 0
    padded = torch.from_numpy(pad_batch([image, other]))
    boxes = np.array([[5, 7, 40, 50], [0, 0, 70, 50]])
    out = resized_crops(padded, boxes, np.array([False, False]), 64)
    top, left, h, w = boxes[0]
    pil = Image.fromarray(image).resize(
        (64, 64), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    diff = np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - np.asarray(pil).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 2  # PIL rounds in fixed point
    flipped = resized_crops(padded, boxes, np.array([True, False]), 64)
    assert torch.equal(flipped[0], out[0].flip(-1))
    # the whole image at its own size is the image itself (pixel centres map to pixel centres)
    whole = resized_crops(torch.from_numpy(image[None, :60, :60].copy()), np.array([[0, 0, 60, 60]]),
                          np.array([False]), 60)  # fmt: skip
    assert torch.equal(whole[0].permute(1, 2, 0), torch.from_numpy(image[:60, :60]))


def _coverages(kind, size, n, shapes=()):
    ref_gen = MaskGenerator(kind, size, 2, 0.25, shapes)
    ref = np.array([ref_gen(np.random.default_rng(sample_seed(1, 0, i))).mean() for i in range(n)])
    batched = BatchedMasks(kind, size, 2, 0.25, shapes)
    holes = torch.cat([batched.draw([np.random.default_rng(sample_seed(2, s, i)) for i in range(100)])
                       for s in range(n // 100)])  # fmt: skip
    return ref, holes.float().mean(dim=(1, 2, 3)).numpy(), holes


@pytest.mark.parametrize("kind", ["random_region", "random_block"])
def test_coverage_distribution_matches_the_per_image_masks(kind):
    ref, ours, holes = _coverages(kind, 64, 800)
    assert holes.dtype == torch.bool and holes.shape == (800, 1, 64, 64)
    assert ours.max() <= 0.25 and ref.max() <= 0.25  # at most max_coverage, every sample
    assert ks_2samp(ref, ours).pvalue > P_MIN
    assert abs(ref.mean() - ours.mean()) < 0.01


def test_central_and_none_masks_are_exact():
    rngs = [np.random.default_rng(i) for i in range(3)]
    central = BatchedMasks("central", 64, 4).draw(rngs)
    assert torch.equal(central, torch.from_numpy(central_mask(64, 4)).expand(3, 1, 64, 64))
    assert not BatchedMasks("none", 64).draw(rngs).any()


class _FixedDraws:
    """Stands in for the generator _deform draws its angle and flip from."""

    def __init__(self, theta, flip):
        self.theta, self.flip = theta, flip

    def uniform(self, lo, hi):
        return self.theta

    def random(self):
        return 0.2 if self.flip else 0.8


@pytest.mark.parametrize(
    ("theta", "flip", "h", "w"), [(0.3, True, 30, 22), (-0.7, False, 17, 41), (0.0, False, 48, 48)]
)
def test_a_piece_is_the_per_image_warp_of_its_silhouette(theta, flip, h, w):
    shapes = builtin_shapes(4)
    bm = BatchedMasks("random_region", 64, shapes=shapes)
    shape = per_image.shrink_shape(shapes[2])
    want = np.zeros((64, 64), bool)
    want[5 : 5 + h, 9 : 9 + w] = per_image._deform(shape, _FixedDraws(theta, flip), h, w)
    p = {"h": np.array([[h]]), "w": np.array([[w]]), "y": np.array([[5]]), "x": np.array([[9]]),
         "shape": np.array([[2]]), "theta": np.array([[theta]]), "flip": np.array([[-1.0 if flip else 1.0]])}  # fmt: skip
    canvas, _ = bm._pieces(p, np.array([0]), np.array([0]), 64 * 64)
    got = np.zeros(64 * 64 + 1, bool)
    got[canvas.numpy()] = True
    got = got[:-1].reshape(64, 64)
    # float32 vs float64 coordinates may floor differently on a boundary: at most a few pixels
    assert (got != want).sum() <= max(2, want.sum() // 200) and want.sum() > 50


@pytest.fixture(scope="module")
def store_and_cfg(tiny_voc, tmp_path_factory):
    from pretext.train import Config, DataConfig

    path = build(tiny_voc, tmp_path_factory.mktemp("st") / "s64", StoreSettings("voc", "train", 64))
    cfg = Config(data=DataConfig(root=str(tiny_voc)))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, batch_size=8), seed=3)
    return path, cfg


@pytest.mark.parametrize("batched_ops", [False, True])  # the CPU's per-sample ops, the GPU's
def test_batches_are_a_function_of_seed_step_and_slot(store_and_cfg, batched_ops):
    path, cfg = store_and_cfg
    shapes = builtin_shapes()
    source = functools.partial(make_batched_source, batched_ops=batched_ops)
    full = list(source(cfg, 64, "cpu", 0, 6, shapes, store=path))
    assert len(full) == 6
    for images, hole in full:
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 64, 64)
        assert hole.dtype == torch.bool and hole.shape == (8, 1, 64, 64)
        assert hole.float().mean(dim=(1, 2, 3)).max() <= 0.25
    resumed = list(source(cfg, 64, "cpu", 4, 6, shapes, store=path, prefetch=0))
    for (a, b), (c, d) in zip(full[4:], resumed):  # resume from step 4: the same batches
        assert torch.equal(a, c) and torch.equal(b, d)
    # DDP: rank 1 of 2 gets slots 4..7 of the global batch, pixel for pixel
    rank1 = list(source(cfg, 64, "cpu", 0, 6, shapes, rank=1, world_size=2, store=path))
    for (a, b), (c, d) in zip(full, rank1):
        assert torch.equal(b[4:], d)
        if batched_ops:  # another padded size: float rounding only
            assert (a[4:].int() - c.int()).abs().max() <= 1
        else:  # per sample: pixel for pixel
            assert torch.equal(a[4:], c)
    assert not torch.equal(full[0][0], full[1][0])


def test_source_refuses_a_store_of_other_data(store_and_cfg, tiny_voc):
    path, cfg = store_and_cfg
    with pytest.raises(StoreError, match="short_side: store 64, config 128"):
        make_batched_source(cfg, 128, "cpu", 0, 1, store=path)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split="val"))
    with pytest.raises(StoreError, match="split: store 'train', config 'val'"):
        make_batched_source(other, 64, "cpu", 0, 1, store=path)
    assert len(ImageStore(path)) >= cfg.optim.batch_size
