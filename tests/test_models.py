"""Every architecture: forward + backward on random input, shapes as in the paper, no NaN."""

import pytest
import torch

from core.models import (
    ARCHS,
    AlexNetEncoder,
    AlexNetSpec,
    ChannelWiseFC,
    Discriminator,
    build_model,
)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("output", ["full", "center"])
def test_forward_backward_shapes(arch, output):
    torch.manual_seed(0)
    model = build_model(arch, output=output)
    s = model.input_size
    x = torch.randn(2, 3, s, s, requires_grad=True)
    y = model(x)
    expected = s if output == "full" else {64: 32, 128: 64, 224: 112, 227: 113}[s]
    assert y.shape == (2, 3, expected, expected)
    assert torch.isfinite(y).all() and y.abs().max() <= 1.0  # tanh output in [-1, 1]
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_alexnet227_pool5_is_6x6x256_for_both_variants():
    for pool_free in (False, True):
        enc = AlexNetEncoder(AlexNetSpec(pool_free=pool_free))
        x = torch.randn(1, 3, 227, 227)
        feats = enc.forward_features(x)
        assert torch.equal(enc(x), feats["pool5"])
        assert feats["conv1"].shape == (1, 96, 55, 55)
        assert feats["conv5"].shape == (1, 256, 13, 13)
        assert feats["pool5"].shape == (1, 256, 6, 6)
    pool_free = AlexNetEncoder(AlexNetSpec(pool_free=True))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in pool_free.modules())


def test_channelwise_fc_shapes_and_parameter_count():
    m, n = 256, 6
    layer = ChannelWiseFC(m, n, dropout=0.5)
    assert layer.weight.numel() == m * n**4  # 331,776 for AlexNet's pool5
    conv = m * m + m  # the stride-1 1x1 convolution across channels (+ bias)
    assert sum(p.numel() for p in layer.parameters()) == m * n**4 + conv
    assert layer(torch.randn(3, m, n, n)).shape == (3, m, n, n)


def test_channelwise_fc_has_no_cross_channel_mixing_before_the_1x1_conv():
    torch.manual_seed(0)
    layer = ChannelWiseFC(4, 3).eval()
    x = torch.randn(1, 4, 3, 3)
    x2 = x.clone()
    x2[:, 1] += 1.0  # perturb channel 1 only

    def per_channel(z):
        n, c, h, w = z.shape
        return torch.bmm(z.reshape(n, c, h * w).transpose(0, 1), layer.weight)

    diff = (per_channel(x) - per_channel(x2)).abs().sum(dim=(1, 2))
    assert diff[1] > 0 and diff[0] == 0 and diff[2] == 0 and diff[3] == 0


def test_inpaint128_has_a_4000d_bottleneck():
    model = build_model("inpaint128", output="center")
    z = model.forward_bottleneck(model.forward_encoder(torch.randn(2, 3, 128, 128)))
    assert z.shape == (2, 4000, 1, 1)


def test_discriminator_gives_one_logit_per_image():
    d = Discriminator()
    assert d(torch.randn(5, 3, 64, 64)).shape == (5,)
    assert d(torch.randn(2, 3, 32, 32)).shape == (2,)


@pytest.mark.parametrize(("size", "layers"), [(64, 4), (32, 3), (128, 4), (227, 4), (16, 2)])
def test_discriminator_for_input_halves_down_to_4x4(size, layers):
    d = Discriminator.for_input(size)
    strided = [m for m in d.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(strided) == layers
    assert [m.out_channels for m in strided] == [64, 128, 256, 512][:layers]
    x = torch.randn(2, 3, size, size)
    if size in (
        16,
        32,
        64,
        128,
    ):  # powers of two reach the k4 head at exactly 4x4 (128: pooled from 8)
        assert d.features(x).shape[-1] == (4 if size <= 64 else 8)
    assert d(x).shape == (2,)


def test_center_output_size_is_half_the_input():
    assert build_model("small64", output="center").output_size == 32
    assert build_model("small64").output_size == 64
    assert build_model("inpaint128", output="center").output_size == 64
