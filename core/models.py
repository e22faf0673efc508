"""Context-encoder networks (Pathak et al. 2016, §3.1 and §4).

- :class:`AlexNetEncoder`: conv1..conv5 + pool5 (227 input -> pool5 6x6x256), or its pool-free
  variant where each max-pool is replaced by a strided convolution.
- :class:`ChannelWiseFC`: m maps n x n -> m maps n x n with m*n^4 weights (no cross-channel
  mixing), then a 1x1 convolution across channels (§3.1, "channel-wise fully-connected layer").
- :class:`UpConvDecoder`: up-convolutions with ReLU back to image resolution.
- :class:`ContextEncoder`: encoder -> bottleneck -> decoder.
- :class:`Discriminator`: the adversarial discriminator (64x64 in the paper, §3.2.2).

Size variants are factory functions collected in :data:`ARCHS` (a plain dict).
Images live in [-1, 1]; the decoder ends in tanh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AlexNetSpec:
    """Layer sizes of an AlexNet-style encoder.

    ``conv1`` is (kernel, stride, padding); conv2 uses ``conv2_kernel`` with "same" padding and
    conv3..conv5 are 3x3 "same"; the three poolings are 3x3 stride 2 with ``pool_padding``.
    ``input_norm``: (mean, std) per channel of [0, 1] pixels that the weights expect (torchvision's
    ImageNet normalisation); the encoder maps its [-1, 1] input to that first. None: [-1, 1] as is.
    """

    input_size: int = 227
    channels: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256)
    conv1: tuple[int, int, int] = (11, 4, 0)
    conv2_kernel: int = 5
    pool_padding: int = 0
    pool_free: bool = False
    input_norm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class Geometry:
    """Where the cells of a feature map sit in the input image (one axis; the nets are square).

    Cell i is centred on input pixel ``first_center + stride * i`` (0-based pixel index; a
    half-integer for even kernels) and sees ``rf`` x ``rf`` input pixels (clipped by the border).
    """

    stride: int
    first_center: float
    rf: int


def feature_geometry(encoder: nn.Module, upto: str | None = None) -> Geometry:
    """Stride, first-cell centre and receptive field of ``encoder``'s feature map after the module
    named ``upto`` (None = the last layer), from the kernel / stride / padding / dilation of its
    nn.Conv2d, nn.MaxPool2d and nn.AvgPool2d modules, walked in registration order (= forward order
    for the encoders here). Standard recurrence: rf += (k_eff - 1) * jump; centre += ((k_eff - 1) / 2
    - padding) * jump; jump *= stride.
    """
    jump, center, rf = 1, 0.0, 1
    reached = upto is None
    for name, m in encoder.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k, s, p = (_first(getattr(m, a)) for a in ("kernel_size", "stride", "padding"))
            d = _first(getattr(m, "dilation", 1))
            k_eff = d * (k - 1) + 1
            rf += (k_eff - 1) * jump
            center += ((k_eff - 1) / 2 - p) * jump
            jump *= s
        if upto is not None and name == upto:
            reached = True
            break
    if not reached:
        raise ValueError(f"{type(encoder).__name__} has no module named {upto!r}")
    return Geometry(jump, center, rf)


def _first(v: int | tuple[int, ...]) -> int:
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise ValueError(f"non-square layer parameter {v}")
        return v[0]
    return v


class AlexNetEncoder(nn.Module):
    """AlexNet conv1-conv5 (+pool5).

    forward(x: [N, 3, S, S]) -> pool5 [N, C5, n, n]; for the paper's spec S=227 gives [N, 256, 6, 6].
    The pool-free variant (§3.1) replaces every max-pool by a 3x3 stride-2 convolution + ReLU with the
    same number of channels, so the output size is the same.
    """

    def __init__(self, spec: AlexNetSpec = AlexNetSpec()):
        super().__init__()
        self.spec = spec
        c1, c2, c3, c4, c5 = spec.channels
        k1, s1, p1 = spec.conv1
        k2 = spec.conv2_kernel
        self.conv1 = nn.Conv2d(3, c1, k1, s1, p1)
        self.pool1 = self._pool(c1)
        self.conv2 = nn.Conv2d(c1, c2, k2, 1, k2 // 2)
        self.pool2 = self._pool(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, 1, 1)
        self.conv4 = nn.Conv2d(c3, c4, 3, 1, 1)
        self.conv5 = nn.Conv2d(c4, c5, 3, 1, 1)
        self.pool5 = self._pool(c5)
        size = _conv_out(spec.input_size, k1, s1, p1)
        size = _conv_out(size, 3, 2, spec.pool_padding)
        size = _conv_out(size, 3, 2, spec.pool_padding)
        self.conv5_size = size
        self.out_size = _conv_out(size, 3, 2, spec.pool_padding)
        self.out_channels = c5
        if spec.input_norm is not None:
            # x in [-1, 1] -> ((x + 1) / 2 - mean) / std = x * 0.5 / std + (0.5 - mean) / std;
            # not saved in the state dict (a constant of the arch), so the keys stay conv1..conv5
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in spec.input_norm)
            self.register_buffer("input_scale", 0.5 / std, persistent=False)
            self.register_buffer("input_shift", (0.5 - mean) / std, persistent=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _pool(self, channels: int) -> nn.Module:
        pad = self.spec.pool_padding
        if self.spec.pool_free:
            return nn.Sequential(nn.Conv2d(channels, channels, 3, 2, pad), nn.ReLU(inplace=True))
        return nn.MaxPool2d(3, 2, pad)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, S, S] in [-1, 1] -> the input the weights expect (``spec.input_norm``)."""
        if self.spec.input_norm is None:
            return x
        return x * self.input_scale + self.input_shift

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [N, 3, S, S] -> {'conv1'..'conv5': [N, Ci, hi, wi], 'pool5': [N, C5, n, n]}."""
        feats = {}
        x = F.relu(self.conv1(self.normalize_input(x)), inplace=True)
        feats["conv1"] = x
        x = F.relu(self.conv2(self.pool1(x)), inplace=True)
        feats["conv2"] = x
        x = F.relu(self.conv3(self.pool2(x)), inplace=True)
        feats["conv3"] = x
        x = F.relu(self.conv4(x), inplace=True)
        feats["conv4"] = x
        x = F.relu(self.conv5(x), inplace=True)
        feats["conv5"] = x
        feats["pool5"] = self.pool5(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, S, S] -> pool5 [N, C5, n, n]."""
        x = F.relu(self.conv1(self.normalize_input(x)), inplace=True)
        x = F.relu(self.conv2(self.pool1(x)), inplace=True)
        x = F.relu(self.conv3(self.pool2(x)), inplace=True)
        x = F.relu(self.conv4(x), inplace=True)
        x = F.relu(self.conv5(x), inplace=True)
        return self.pool5(x)


class ChannelWiseFC(nn.Module):
    """Channel-wise fully connected layer (§3.1).

    x: [N, m, n, n] -> [N, m, n, n]. Each of the m feature maps is fully connected to itself only
    (m * n^4 weights, no bias), then a stride-1 1x1 convolution propagates information across
    channels (m*m weights + m biases); optional dropout before it.
    """

    def __init__(self, channels: int, size: int, dropout: float = 0.0):
        super().__init__()
        self.channels, self.size = channels, size
        area = size * size
        self.weight = nn.Parameter(torch.empty(channels, area, area))
        nn.init.normal_(self.weight, std=(1.0 / area) ** 0.5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, m, h, w = x.shape
        # [m, N, n^2] @ [m, n^2, n^2] -> [m, N, n^2]: one batched matmul, one FC per channel.
        y = torch.bmm(x.reshape(n, m, h * w).transpose(0, 1), self.weight)
        y = F.relu(y.transpose(0, 1).reshape(n, m, h, w))
        return self.mix(self.dropout(y))


def _full_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution whose kernel covers its whole (unpadded) input, [N, C, k, k] -> [N, O, 1, 1],
    computed as the fully connected layer it is: one matmul instead of oneDNN's much slower
    convolution kernels for this shape (same sum, same parameters)."""
    if x.shape[-2:] != conv.kernel_size or conv.padding != (0, 0) or conv.groups != 1:
        return conv(x)
    y = F.linear(x.flatten(1), conv.weight.flatten(1), conv.bias)
    return y[:, :, None, None]


def _dense_upconv(up: nn.ConvTranspose2d, z: torch.Tensor) -> torch.Tensor:
    """ConvTranspose2d (stride 1, no padding) of a 1x1 input: [N, I, 1, 1] -> [N, O, k, k], one matmul
    with the [I, O*k*k] weight."""
    k1, k2 = up.kernel_size
    y = (z.flatten(1) @ up.weight.flatten(1)).view(z.shape[0], up.out_channels, k1, k2)
    return y if up.bias is None else y + up.bias.view(1, -1, 1, 1)


class ConvBottleneck(nn.Module):
    """Fully connected bottleneck as a convolution (the 128-px inpainting net, §4: 4000 units).

    x: [N, C, k, k] -> [N, units, 1, 1] (a k x k convolution, BN, LeakyReLU).
    """

    def __init__(self, in_channels: int, kernel: int, units: int = 4000):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, units, kernel)
        self.norm = nn.BatchNorm2d(units)
        self.out_channels = units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(_full_conv(self.conv, x)), 0.2, inplace=True)


class UpConvDecoder(nn.Module):
    """Up-convolutional decoder: ``len(channels)`` transposed convolutions, each x2 (k4 s2 p1).

    x: [N, in_channels, n, n] -> [N, 3, n * 2^L, n * 2^L] (tanh), resized to ``out_size`` if given
    (the AlexNet-227 model: 6 * 2^5 = 192 -> 227). Hidden layers: BN + ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        out_size: int | None = None,
        first_kernel: int | None = None,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        widths = (*channels[:-1], 3) if channels[-1] == 3 else (*channels, 3)
        for i, width in enumerate(widths):
            if i == 0 and first_kernel is not None:
                # 1x1 bottleneck -> k x k maps (DCGAN-style first up-convolution).
                layers.append(nn.ConvTranspose2d(prev, width, first_kernel, 1, 0))
            else:
                layers.append(nn.ConvTranspose2d(prev, width, 4, 2, 1))
            if i < len(widths) - 1:
                layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            prev = width
        self.layers = nn.Sequential(*layers)
        self.out_size = out_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        first = self.layers[0]
        dense = z.shape[-2:] == (1, 1) and first.stride == (1, 1) and first.padding == (0, 0)
        if dense and first.groups == 1 and first.dilation == (1, 1):
            # 1x1 -> k x k up-convolution = one matmul (oneDNN's conv path is far slower here)
            x = _dense_upconv(first, z)
            for layer in list(self.layers)[1:]:
                x = layer(x)
        else:
            x = self.layers(z)
        if self.out_size is not None and x.shape[-1] != self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear")
        return torch.tanh(x)


def dcgan_downsampling(channels: tuple[int, ...]) -> nn.Sequential:
    """k4 s2 convolutions 3 -> channels[0] -> ... (BatchNorm after all but the first), LeakyReLU
    0.2: each halves the side. The body of the 128-px encoder and of the discriminator."""
    layers: list[nn.Module] = []
    prev = 3
    for i, width in enumerate(channels):
        layers.append(nn.Conv2d(prev, width, 4, 2, 1))
        if i > 0:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        prev = width
    return nn.Sequential(*layers)


class DCGANEncoder(nn.Module):
    """Encoder of the 128-px inpainting network (§4): k4 s2 convolutions, BN, LeakyReLU.

    x: [N, 3, 128, 128] -> [N, 512, 4, 4].
    """

    def __init__(self, input_size: int = 128, channels: tuple[int, ...] = (64, 64, 128, 256, 512)):
        super().__init__()
        self.layers = dcgan_downsampling(channels)
        self.out_channels = channels[-1]
        self.out_size = input_size // 2 ** len(channels)
        self.spec = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ContextEncoder(nn.Module):
    """Encoder -> bottleneck -> decoder (§3.1, Fig. 2).

    forward(x_masked: [N, 3, S, S]) -> prediction [N, 3, P, P] where P = S for ``output='full'``
    (random-block / random-region masks, the autoencoder) and P = S/2 for ``output='center'``
    (the central-region model predicts only the central square, §4).
    """

    def __init__(
        self,
        encoder: nn.Module,
        bottleneck: nn.Module,
        decoder: UpConvDecoder,
        input_size: int,
        output: str = "full",
    ):
        super().__init__()
        if output not in ("full", "center"):
            raise ValueError(f"output must be 'full' or 'center', got {output!r}")
        self.encoder, self.bottleneck, self.decoder = encoder, bottleneck, decoder
        self.input_size, self.output = input_size, output

    @property
    def output_size(self) -> int:
        """Side of the prediction: the input's (``full``) or its central half (``center``)."""
        return self.input_size if self.output == "full" else self.input_size // 2

    def forward_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_bottleneck(self, feats: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(feats)

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_decoder(self.forward_bottleneck(self.forward_encoder(x)))


class Discriminator(nn.Module):
    """Adversarial discriminator (§3.2.2): k4 s2 convolutions, BN, LeakyReLU, one logit per image.

    x: [N, 3, P, P] -> [N] logits. For P = 64: 64 -> 32 -> 16 -> 8 -> 4 -> k4 conv -> 1x1.
    Other sizes are average-pooled to 4x4 before the last layer.
    """

    def __init__(self, channels: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.features = dcgan_downsampling(channels)
        self.head = nn.Conv2d(channels[-1], 1, 4)

    @classmethod
    def for_input(cls, size: int) -> Discriminator:
        """The DCGAN discriminator for ``size``-px predictions: one k4 s2 layer per halving down to
        4x4, at most four (64 px: 64-128-256-512, the netD of the released train.lua for its 64x64
        centre; 32 px, the built-in small64's centre: 64-128-256). Larger or odd sizes keep four
        layers and are average-pooled to 4x4."""
        layers = min(4, max(1, round(math.log2(size / 4))))
        return cls((64, 128, 256, 512)[:layers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if h.shape[-1] != 4:
            h = F.adaptive_avg_pool2d(h, 4)
        return _full_conv(self.head, h).flatten()


# ---- size variants -------------------------------------------------------------------------


def _alexnet_context_encoder(
    spec: AlexNetSpec, decoder_channels: tuple[int, ...], dropout: float, output: str
) -> ContextEncoder:
    encoder = AlexNetEncoder(spec)
    bottleneck = ChannelWiseFC(encoder.out_channels, encoder.out_size, dropout)
    out = spec.input_size if output == "full" else spec.input_size // 2
    decoder = UpConvDecoder(encoder.out_channels, decoder_channels, out_size=out)
    return ContextEncoder(encoder, bottleneck, decoder, spec.input_size, output)


def alexnet227(dropout: float = 0.5, output: str = "full") -> ContextEncoder:
    """The paper's feature-learning model: AlexNet-227 (pool5 6x6x256), channel-wise FC, 5 up-convs."""
    return _alexnet_context_encoder(AlexNetSpec(), (128, 64, 64, 32, 3), dropout, output)


def alexnet227_poolfree(dropout: float = 0.5, output: str = "full") -> ContextEncoder:
    """Pool-free AlexNet encoder (max-pools replaced by strided convolutions)."""
    spec = AlexNetSpec(pool_free=True)
    return _alexnet_context_encoder(spec, (128, 64, 64, 32, 3), dropout, output)


SMALL64 = AlexNetSpec(
    input_size=64, channels=(48, 96, 128, 128, 96), conv1=(5, 2, 2), conv2_kernel=5, pool_padding=1
)


def small64(dropout: float = 0.0, output: str = "full") -> ContextEncoder:
    """A scaled-down AlexNet context encoder for 64-px images (pool5 4x4x96): trains on a 2-core CPU
    in minutes. Same layer structure as :func:`alexnet227`; 4 up-convs 4 -> 64 (2 for 'center')."""
    dec = (96, 64, 48, 3) if output == "full" else (96, 64, 3)
    return _alexnet_context_encoder(SMALL64, dec, dropout, output)


def small64_poolfree(dropout: float = 0.0, output: str = "full") -> ContextEncoder:
    spec = AlexNetSpec(**{**SMALL64.__dict__, "pool_free": True})
    dec = (96, 64, 48, 3) if output == "full" else (96, 64, 3)
    return _alexnet_context_encoder(spec, dec, dropout, output)


# torchvision/models/alexnet.py (the "one weird trick" AlexNet, Krizhevsky 2014): features =
# conv 11/4/2 (64) -> pool -> conv 5/1/2 (192) -> pool -> 3x3 convs 384, 256, 256 -> pool, 3x3 s2
# max-pools without padding; 224 input -> pool5 6x6x256; ImageNet-normalised input (transforms).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_ALEXNET = AlexNetSpec(
    input_size=224,
    channels=(64, 192, 384, 256, 256),
    conv1=(11, 4, 2),
    conv2_kernel=5,
    pool_padding=0,
    input_norm=(IMAGENET_MEAN, IMAGENET_STD),
)


def alexnet224_torchvision(dropout: float = 0.5, output: str = "full") -> ContextEncoder:
    """torchvision's AlexNet layout as the encoder (``features.0/3/6/8/10`` = conv1..conv5; a
    torchvision state dict imports with ``core.export import``), with :func:`alexnet227`'s
    channel-wise FC and decoder (6x6 -> 192 -> resized to 224)."""
    return _alexnet_context_encoder(TORCHVISION_ALEXNET, (128, 64, 64, 32, 3), dropout, output)


def inpaint128(dropout: float = 0.0, output: str = "center") -> ContextEncoder:
    """The paper's 128-px inpainting network (§4): DCGAN-style encoder to 4x4x512, a 4000-d
    bottleneck, 5 up-convolutions to the 64x64 centre (``output='center'``) or 4 more x2 for 'full'."""
    del dropout  # the 4000-d bottleneck has no dropout in the paper
    encoder = DCGANEncoder(128)
    bottleneck = ConvBottleneck(encoder.out_channels, encoder.out_size, 4000)
    channels = (512, 256, 128, 64, 3) if output == "center" else (512, 256, 128, 64, 32, 3)
    decoder = UpConvDecoder(4000, channels, first_kernel=4)
    return ContextEncoder(encoder, bottleneck, decoder, 128, output)


ARCHS: dict[str, Callable[..., ContextEncoder]] = {
    "small64": small64,
    "small64_poolfree": small64_poolfree,
    "alexnet227": alexnet227,
    "alexnet227_poolfree": alexnet227_poolfree,
    "alexnet224_torchvision": alexnet224_torchvision,
    "inpaint128": inpaint128,
}


def detection_geometry(arch: str) -> tuple[int, int, Geometry]:
    """(input size, feature size, geometry) of the map a detector / segmenter reads: conv5 of an
    AlexNet-style encoder, the last layer of the others."""
    model = ARCHS[arch]()
    encoder = model.encoder
    layer = "conv5" if isinstance(encoder, AlexNetEncoder) else None
    size = encoder.conv5_size if layer else encoder.out_size
    return model.input_size, size, feature_geometry(encoder, layer)


def build_model(arch: str, dropout: float = 0.0, output: str = "full") -> ContextEncoder:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch](dropout=dropout, output=output)
