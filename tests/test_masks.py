"""Mask coverage statistics over many seeds, for each strategy (§3.3)."""

import numpy as np
import pytest

from core.masks import (
    MaskGenerator,
    builtin_shapes,
    central_mask,
    random_block_mask,
    random_region_mask,
)


def test_central_mask_is_the_centre_square_minus_overlap():
    hole = central_mask(128, overlap=4)
    assert hole.sum() == 56 * 56
    assert hole[36:92, 36:92].all() and not hole[35, 64] and not hole[64, 92]


@pytest.mark.parametrize("kind", ["random_block", "random_region"])
def test_random_masks_cover_at_most_a_quarter(kind):
    shapes = builtin_shapes()
    coverages, centroids = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        if kind == "random_block":
            hole = random_block_mask(64, rng, 0.25)
        else:
            hole = random_region_mask(64, rng, shapes, 0.25)
        coverages.append(hole.mean())
        ys, xs = np.nonzero(hole)
        centroids.append((ys.mean(), xs.mean()))
    coverages = np.array(coverages)
    assert coverages.max() <= 0.25
    assert coverages.min() > 0.0
    assert 0.10 < coverages.mean() < 0.25
    # holes land all over the image, not always in the centre
    centroids = np.array(centroids)
    assert centroids.std(axis=0).min() > 5


def test_masks_are_pure_functions_of_the_seed():
    gen = MaskGenerator("random_region", 64)
    a = gen(np.random.default_rng(7))
    b = gen(np.random.default_rng(7))
    c = gen(np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_random_region_uses_the_given_shapes():
    square = np.ones((10, 10), dtype=bool)
    hole = random_region_mask(64, np.random.default_rng(0), [square], 0.25)
    assert 0 < hole.mean() <= 0.25


def test_mask_generator_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown mask kind"):
        MaskGenerator("circle", 64)


def test_none_mask_is_empty():
    assert not MaskGenerator("none", 32)(np.random.default_rng(0)).any()
