"""Krähenbühl et al. 2016 k-means init (core/kmeans_init.py): each step against a hand-computed or
independently computed oracle, on a tiny AlexNet-style encoder (seconds)."""

import math

import pytest
import torch
import torch.nn.functional as F

from core import kmeans_init as K
from core.models import AlexNetEncoder, AlexNetSpec, build_model

TINY = AlexNetSpec(
    input_size=32, channels=(8, 12, 16, 16, 8), conv1=(5, 2, 2), conv2_kernel=3, pool_padding=1
)
FAST = K.KMeansInitConfig(max_patches=1500, kmeans_iters=30, calibration_images=8)


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]: upsampled low-resolution noise plus fine noise (image-like
    spatial correlation, so that whitening has something to undo)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def tiny_encoder(torch_seed: int = 0) -> AlexNetEncoder:
    torch.manual_seed(torch_seed)
    return AlexNetEncoder(TINY)


def unit_outputs(encoder, images):
    box = {}
    layers = K.conv_layers(encoder)
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, n=n: box.__setitem__(n, o.detach().double()))
        for n, m in layers.items()
    ]
    with torch.no_grad():
        encoder(images)
    for h in hooks:
        h.remove()
    return box


# ---- (a) patches and whitening ------------------------------------------------------------------


def test_patches_are_the_convolution_inputs_with_its_zero_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    conv = torch.nn.Conv2d(1, 2, 3, stride=1, padding=1).double()
    patches = K.sample_patches(x, conv, max_patches=100, generator=torch.Generator())
    assert patches.shape == (16, 9)
    # output position (0, 0): the top-left 3x3 window of the zero-padded input, by hand
    assert patches[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]
    assert patches[5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]  # position (1, 1): no padding
    # every patch dotted with a filter is the convolution's output there
    out = conv(x.double()).detach().flatten(2)[0].T  # [16 positions, 2]
    w = conv.weight.detach().flatten(1)
    assert torch.allclose(patches @ w.T + conv.bias.detach(), out, atol=1e-10)


def test_patches_are_subsampled_without_replacement():
    x = torch.randn(3, 2, 6, 6)
    conv = torch.nn.Conv2d(2, 4, 3, stride=2, padding=1)  # 3 x 3 x 3 = 27 positions
    patches = K.sample_patches(x, conv, max_patches=10, generator=torch.Generator().manual_seed(0))
    every = K.sample_patches(x, conv, max_patches=1000, generator=torch.Generator())
    assert patches.shape == (10, 18) and every.shape == (27, 18)
    rows = {tuple(r.tolist()) for r in every}
    assert (
        all(tuple(r.tolist()) in rows for r in patches)
        and len({tuple(r.tolist()) for r in patches}) == 10
    )


def test_whitened_patches_have_zero_mean_and_identity_covariance():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    spread = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    z = torch.randn(50_000, 6, generator=g, dtype=torch.float64)
    patches = (z * spread) @ q.T + torch.tensor([1.0, -2.0, 0.5, 0, 3, 0], dtype=torch.float64)
    white = K.fit_whitening(patches, components=6)(patches)
    assert white.mean(0).abs().max() < 1e-10
    cov = white.T @ white / len(white)
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-6)
    # keeping 3 components: the 3 largest-variance directions of the known mixing, still white
    top = K.fit_whitening(patches, components=3)
    basis = top.projection / top.projection.norm(dim=0)
    overlap = (q[:, :3].T @ basis).abs()  # |cos| between true and found directions
    assert torch.allclose(overlap.max(0).values, torch.ones(3, dtype=torch.float64), atol=1e-2)
    white3 = top(patches)
    assert torch.allclose(
        white3.T @ white3 / len(white3), torch.eye(3, dtype=torch.float64), atol=1e-6
    )


def test_whitening_gives_null_directions_zero_weight_instead_of_blowing_them_up():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    patches = torch.cat([a, a[:, :1]], dim=1)  # column 4 = column 1: one zero eigenvalue
    w = K.fit_whitening(patches, components=4)
    assert w.projection[:, 0].abs().max() == 0  # smallest eigenvalue (~0) first: scaled by 0
    white = w(patches)
    cov = white.T @ white / len(white)
    assert torch.allclose(
        cov, torch.diag(torch.tensor([0.0, 1, 1, 1], dtype=torch.float64)), atol=1e-6
    )


# ---- (b) k-means -------------------------------------------------------------------------------


def test_kmeans_recovers_known_centres_up_to_permutation():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor(
        [[4.0, 0, 0], [0, 4, 0], [0, 0, 4], [-4, -4, -4], [3, 3, -3]], dtype=torch.float64
    )
    labels = torch.arange(5).repeat_interleave(80)
    points = centres[labels] + 0.2 * torch.randn(400, 3, generator=g, dtype=torch.float64)
    order = torch.randperm(400, generator=g)
    points, labels = points[order], labels[order]
    result = K.kmeans(points, 5, 100, torch.Generator().manual_seed(3))
    assert result.converged and result.reseeded == 0
    match = torch.cdist(result.centres, centres).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2, 3, 4]  # a permutation
    assert torch.allclose(result.centres, centres[match], atol=0.06)  # 0.2 / sqrt(80) ~ 0.02
    # each point assigned to the cluster of the centre it was drawn around
    assert torch.equal(match[result.assignment], labels)
    inertia = (points - result.centres[result.assignment]).pow(2).sum()
    assert result.inertia == pytest.approx(float(inertia))


def test_kmeans_with_more_clusters_than_distinct_points_leaves_none_empty_or_nan():
    points = torch.tensor([[0.0, 0], [1, 0], [0, 1]], dtype=torch.float64).repeat(4, 1)
    result = K.kmeans(points, 4, 50, torch.Generator().manual_seed(0))
    assert torch.isfinite(result.centres).all()
    assert torch.bincount(result.assignment, minlength=4).min() >= 1
    assert result.inertia == pytest.approx(0.0, abs=1e-12)


# ---- (c) within-layer and between-layer scaling --------------------------------------------------


def test_every_unit_has_mean_bias_and_unit_variance_after_within_layer_init():
    images = smooth_images(24, 32, seed=0)
    enc = tiny_encoder()
    cfg = K.KMeansInitConfig(**{**FAST.__dict__, "between_layer": False, "bias": 0.1})
    report = K.kmeans_init_(enc, images, seed=0, cfg=cfg)
    outs = unit_outputs(enc, images)
    assert list(outs) == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    for name, o in outs.items():
        mean, std = o.mean((0, 2, 3)), o.std((0, 2, 3))
        assert torch.allclose(mean, torch.full_like(mean, 0.1), atol=1e-5), name
        assert torch.allclose(std, torch.ones_like(std), atol=1e-5), name
        assert report["layers"][name]["within_mean"] == pytest.approx(0.1, abs=1e-5)
        assert report["layers"][name]["final_std"] == pytest.approx(1.0, abs=1e-5)
    assert report["between_layer"] is None


def test_between_layer_scaling_equalises_the_gradient_weight_ratio_and_only_rescales_layers():
    images = smooth_images(24, 32, seed=1)
    enc = tiny_encoder()
    cfg = K.KMeansInitConfig(**{**FAST.__dict__, "between_layer": False})
    K.kmeans_init_(enc, images, seed=0, cfg=cfg)
    before = unit_outputs(enc, images)
    layers = K.conv_layers(enc)
    batch = images[: FAST.calibration_images]
    info = K.between_layer_scale_(enc, layers, batch, FAST, torch.Generator().manual_seed(7))
    assert info["converged"] and info["rounds"] >= 1
    # oracle 1: the same Gaussian output gradients (the generator's first draws), our own backward
    g = torch.Generator().manual_seed(7)
    shape = enc(batch).shape
    draws = [torch.randn(shape, generator=g) for _ in range(FAST.calibration_draws)]
    sq = {n: 0.0 for n in layers}
    for d in draws:
        enc.zero_grad()
        (enc(batch) * d).sum().backward()
        for n, m in layers.items():
            sq[n] += float(m.weight.grad.double().pow(2).mean()) / len(draws)
    ratios = [
        math.sqrt(sq[n] / float(m.weight.detach().double().pow(2).mean()))
        for n, m in layers.items()
    ]
    assert max(ratios) / min(ratios) < 1 + 2 * FAST.calibration_tol
    # oracle 2: the net is positively homogeneous, so each layer's output is only scaled, by the
    # product of its own and the earlier layers' alphas (biases scaled along)
    after = unit_outputs(enc, images)
    product = 1.0
    for n in layers:
        product *= info["scales"][n]
        assert torch.allclose(after[n], before[n] * product, rtol=1e-4, atol=1e-6), n


# ---- (d) features, (e) determinism, report -------------------------------------------------------


def test_initialised_features_are_finite_and_differ_from_random_init():
    images = smooth_images(24, 32, seed=2)
    enc = tiny_encoder()
    random_feats = enc.forward_features(images)
    report = K.kmeans_init_(enc, images, seed=0, cfg=FAST)
    feats = enc.forward_features(images)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5"):
        assert torch.isfinite(feats[name]).all(), name
        assert feats[name].shape == random_feats[name].shape
        a, b = feats[name].flatten(), random_feats[name].flatten()
        assert F.cosine_similarity(a, b, dim=0) < 0.95, name
        assert (feats[name] > 0).float().mean() > 0.05, name  # not dead after the ReLU
    # output positions: conv1 16x16, conv2 8x8, conv3..5 4x4, times 24 images; at most 1500
    expected = {"conv1": 1500, "conv2": 1500, "conv3": 384, "conv4": 384, "conv5": 384}
    assert {n: rec["patches"] for n, rec in report["layers"].items()} == expected
    assert all(rec["kmeans_iters"] >= 1 for rec in report["layers"].values())


def test_same_seed_and_images_give_bit_identical_weights_whatever_the_starting_weights():
    images = smooth_images(16, 32, seed=3)
    a, b, c = tiny_encoder(0), tiny_encoder(1), tiny_encoder(0)
    global_rng = torch.get_rng_state()
    K.kmeans_init_(a, images, seed=5, cfg=FAST)
    assert torch.equal(torch.get_rng_state(), global_rng)  # its own generator only
    K.kmeans_init_(b, images, seed=5, cfg=FAST)
    K.kmeans_init_(c, images, seed=6, cfg=FAST)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])


def test_layer_input_is_what_the_forward_pass_feeds_the_layer():
    enc = tiny_encoder()
    x = smooth_images(4, 32, seed=4)
    with torch.no_grad():
        by_hand = enc.pool2(F.relu(enc.conv2(enc.pool1(F.relu(enc.conv1(x))))))
    assert torch.equal(K.layer_input(enc, enc.conv3, x), by_hand)


def test_pool_free_encoder_initialises_its_strided_convolutions_in_network_order():
    enc = build_model("small64_poolfree").encoder
    names = list(K.conv_layers(enc))
    assert names == ["conv1", "pool1.0", "conv2", "pool2.0", "conv3", "conv4", "conv5", "pool5.0"]
    images = smooth_images(3, 64, seed=5)
    cfg = K.KMeansInitConfig(max_patches=400, kmeans_iters=5, between_layer=False)
    report = K.kmeans_init_(enc, images, seed=0, cfg=cfg)
    assert list(report["layers"]) == names
    outs = unit_outputs(enc, images)
    for n in names:
        assert outs[n].std((0, 2, 3)).sub(1).abs().max() < 1e-4, n


def test_too_few_patches_fall_back_to_gaussian_filters_as_the_reference_does():
    enc = tiny_encoder()
    images = smooth_images(2, 32, seed=6)
    cfg = K.KMeansInitConfig(max_patches=10, kmeans_iters=5, between_layer=False)
    report = K.kmeans_init_(enc, images, seed=0, cfg=cfg)
    for name, conv in K.conv_layers(enc).items():  # 10 patches: k-means for <= 10 units only
        assert (report["layers"][name].get("fallback") == "gaussian") == (conv.out_channels > 10)
    assert all(torch.isfinite(p).all() for p in enc.parameters())


def test_summary_metrics_are_flat_numbers():
    images = smooth_images(16, 32, seed=7)
    report = K.kmeans_init_(tiny_encoder(), images, seed=0, cfg=FAST)
    flat = K.summary_metrics(report)
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["init_images"] == 16.0 and flat["init_conv1_patches"] == FAST.max_patches
    assert flat["init_between_converged"] == 1.0 and "init_conv5_between_scale" in flat


def test_gaussian_filters_get_the_same_within_layer_scaling_and_use_no_patches():
    images = smooth_images(16, 32, seed=8)
    enc = tiny_encoder()
    cfg = K.KMeansInitConfig(**{**FAST.__dict__, "filters": "gaussian", "between_layer": False})
    report = K.kmeans_init_(enc, images, seed=0, cfg=cfg)
    assert all("patches" not in rec for rec in report["layers"].values())
    for o in unit_outputs(enc, images).values():
        assert torch.allclose(
            o.mean((0, 2, 3)), torch.full((o.shape[1],), 0.1, dtype=o.dtype), atol=1e-5
        )
        assert torch.allclose(o.std((0, 2, 3)), torch.ones(o.shape[1], dtype=o.dtype), atol=1e-5)
    kmeans_enc = tiny_encoder()
    K.kmeans_init_(
        kmeans_enc, images, seed=0, cfg=K.KMeansInitConfig(**{**cfg.__dict__, "filters": "kmeans"})
    )
    assert not torch.equal(enc.conv1.weight, kmeans_enc.conv1.weight)
