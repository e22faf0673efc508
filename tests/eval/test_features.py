"""Feature extraction and its on-disk cache."""

import numpy as np
import torch

from core.features import layer_features
from core.masks import central_mask
from core.pretrained import Pretrained
from core.splits import open_split
from eval import features
from eval.features import extract_features


def network(checkpoint):
    return Pretrained.load(checkpoint).network().eval()


def eval_views(root, split, size):
    return open_split(root, split, size, False)


def encode_images(model, images, data_mean, layer, hole=None):
    return layer_features(model, images, (layer,), None, hole, data_mean)[layer]


def test_cache_reloads_identical_features_without_recomputing(
    tiny_voc, tiny_ckpt, ckpt_mean, tmp_path, monkeypatch
):
    first = extract_features(tiny_ckpt, tiny_voc, "val", "pool5", cache_dir=tmp_path)
    assert first.features.dtype == np.float32 and first.features.shape[1] == 96 * 4 * 4
    assert first.ids == eval_views(tiny_voc, "val", 64).ids

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(features, "layer_features", boom)
    again = extract_features(tiny_ckpt, tiny_voc, "val", "pool5", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.features, first.features)
    assert again.ids == first.ids
    # what was cached is what the network computes
    model = network(tiny_ckpt)
    direct = encode_images(model, eval_views(tiny_voc, "val", 64), ckpt_mean, "pool5")
    np.testing.assert_allclose(first.features, direct, rtol=1e-5, atol=1e-6)


def test_new_checkpoint_hash_invalidates_the_cache(tiny_voc, make_checkpoint, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck.pt", seed=1)
    cache = tmp_path / "cache"
    a = extract_features(ckpt, tiny_voc, "val", "pool5", cache_dir=cache)
    make_checkpoint(ckpt, seed=2)  # retrained in place: same path, new bytes
    b = extract_features(ckpt, tiny_voc, "val", "pool5", cache_dir=cache)
    assert a.identity["checkpoint_sha256"] != b.identity["checkpoint_sha256"]
    assert not np.allclose(a.features, b.features)
    assert len(list(cache.glob("*.npy"))) == 2


def test_bottleneck_from_cached_pool5_equals_direct_forward(
    tiny_voc, tiny_ckpt, ckpt_mean, tmp_path
):
    got = extract_features(tiny_ckpt, tiny_voc, "val", "bottleneck", cache_dir=tmp_path)
    model = network(tiny_ckpt)
    direct = encode_images(model, eval_views(tiny_voc, "val", 64), ckpt_mean, "bottleneck")
    np.testing.assert_allclose(got.features, direct, rtol=1e-4, atol=1e-5)


def test_hole_pixels_do_not_reach_the_encoder(tiny_ckpt, ckpt_mean):
    """With a hole only the context is encoded: changing the hole changes nothing, the context does."""
    model = network(tiny_ckpt)
    hole = central_mask(64, 2)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=gen)
    other_hole = images.clone()
    other_hole[:, :, torch.from_numpy(hole)] = 0
    other_context = images.clone()
    other_context[:, :, 0:4, 0:4] = 255 - other_context[:, :, 0:4, 0:4]
    f = encode_images(model, images, ckpt_mean, "pool5", hole)
    np.testing.assert_array_equal(f, encode_images(model, other_hole, ckpt_mean, "pool5", hole))
    assert not np.allclose(f, encode_images(model, other_context, ckpt_mean, "pool5", hole))


def image_folder(root, n=4, size=72):
    """A flat folder of ``n`` random RGB JPEGs."""
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i}.jpg")
    return root


def test_cache_keys_from_the_whole_identity_with_flat_names(make_checkpoint, tmp_path, monkeypatch):
    """Split '.', a dotted split file and an absolute split path: flat names, one entry per
    identity; two checkpoints on split '.' keep two entries, and a second run recomputes nothing."""
    data = image_folder(tmp_path / "photos")
    (data / "list.v1.txt").write_text("img0.jpg\nimg2.jpg\n")
    cks = [make_checkpoint(tmp_path / f"ck{seed}.pt", seed=seed) for seed in (1, 2)]
    cache = tmp_path / "cache"
    splits = (".", "list.v1.txt", str(data / "list.v1.txt"))
    first = {
        (c, s): extract_features(c, data, s, "pool5", cache_dir=cache) for c in cks for s in splits
    }
    files = sorted(p.name for p in cache.rglob("*"))
    assert all(p.parent == cache for p in cache.rglob("*"))  # flat: no folders inside the cache
    assert len(files) == 2 * 2 * len(splits)  # one .npy + .json per (checkpoint, split)
    assert not np.allclose(first[cks[0], "."].features, first[cks[1], "."].features)
    assert len(first[cks[0], "."].ids) == 4 and len(first[cks[0], "list.v1.txt"].ids) == 2

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(features, "layer_features", boom)
    for (c, s), fs in first.items():
        np.testing.assert_array_equal(
            extract_features(c, data, s, "pool5", cache_dir=cache).features, fs.features
        )
    assert sorted(p.name for p in cache.rglob("*")) == files
