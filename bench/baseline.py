"""The reference for the step benchmark: the same networks and losses as :mod:`pretext`, written the
straightforward way (eager fp32, NCHW, out-of-place activations, per-parameter Adam, no fusion).

Parameter names and shapes match :mod:`core.models`, so ``load_state_dict`` of one into the other
gives the same function; ``tests/test_bench.py`` checks that both steps compute the same losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _dcgan_stack(channels: tuple[int, ...]) -> nn.Sequential:
    """k4 s2 convolutions, BN after all but the first, LeakyReLU(0.2): [N, 3, S, S] -> [N, C, S/2^L, S/2^L]."""
    layers: list[nn.Module] = []
    prev = 3
    for i, width in enumerate(channels):
        layers.append(nn.Conv2d(prev, width, 4, 2, 1))
        if i > 0:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.LeakyReLU(0.2))
        prev = width
    return nn.Sequential(*layers)


def _upconv_stack(
    in_channels: int, widths: tuple[int, ...], first_kernel: int | None
) -> nn.Sequential:
    """Transposed convolutions (BN + ReLU between them): the up-convolutional decoder."""
    layers: list[nn.Module] = []
    prev = in_channels
    for i, width in enumerate(widths):
        if i == 0 and first_kernel is not None:
            layers.append(nn.ConvTranspose2d(prev, width, first_kernel, 1, 0))
        else:
            layers.append(nn.ConvTranspose2d(prev, width, 4, 2, 1))
        if i < len(widths) - 1:
            layers += [nn.BatchNorm2d(width), nn.ReLU()]
        prev = width
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        self.layers = _dcgan_stack(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _Bottleneck(nn.Module):
    def __init__(self, in_channels: int, kernel: int, units: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, units, kernel)
        self.norm = nn.BatchNorm2d(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class _Decoder(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, ...], first_kernel=None, out_size=None):
        super().__init__()
        self.layers = _upconv_stack(in_channels, widths, first_kernel)
        self.out_size = out_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.layers(z)
        if self.out_size is not None and x.shape[-1] != self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear")
        return torch.tanh(x)


class Inpaint128(nn.Module):
    """[N, 3, 128, 128] -> 4x4x512 -> 4000-d -> [N, 3, 64, 64] centre (``output='center'``)."""

    def __init__(self, output: str = "center"):
        super().__init__()
        self.encoder = _Encoder((64, 64, 128, 256, 512))
        self.bottleneck = _Bottleneck(512, 4, 4000)
        widths = (512, 256, 128, 64, 3) if output == "center" else (512, 256, 128, 64, 32, 3)
        self.decoder = _Decoder(4000, widths, first_kernel=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(x)))


class _AlexNet(nn.Module):
    """AlexNet conv1..conv5 + max-pools (no pool-free variant)."""

    def __init__(self, channels, conv1, conv2_kernel, pool_padding):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        k1, s1, p1 = conv1
        self.conv1 = nn.Conv2d(3, c1, k1, s1, p1)
        self.conv2 = nn.Conv2d(c1, c2, conv2_kernel, 1, conv2_kernel // 2)
        self.conv3 = nn.Conv2d(c2, c3, 3, 1, 1)
        self.conv4 = nn.Conv2d(c3, c4, 3, 1, 1)
        self.conv5 = nn.Conv2d(c4, c5, 3, 1, 1)
        self.pool_padding = pool_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pool_padding
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2, p)
        x = F.max_pool2d(F.relu(self.conv2(x)), 3, 2, p)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        return F.max_pool2d(F.relu(self.conv5(x)), 3, 2, p)


class _ChannelWiseFC(nn.Module):
    """Per-channel fully connected layer (one [n^2, n^2] matrix per channel), ReLU, dropout, 1x1 mix."""

    def __init__(self, channels: int, size: int, dropout: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, size * size, size * size))
        nn.init.normal_(self.weight, std=(1.0 / (size * size)) ** 0.5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, m, h, w = x.shape
        y = torch.einsum("nmi,mij->nmj", x.reshape(n, m, h * w), self.weight)
        return self.mix(self.dropout(F.relu(y.reshape(n, m, h, w))))


class AlexNetContextEncoder(nn.Module):
    """AlexNet encoder -> channel-wise FC -> up-convolutions (+ bilinear resize to the input size)."""

    def __init__(
        self, input_size, channels, conv1, conv2_kernel, pool_padding, pool_size, dec, dropout
    ):
        super().__init__()
        self.encoder = _AlexNet(channels, conv1, conv2_kernel, pool_padding)
        self.bottleneck = _ChannelWiseFC(channels[-1], pool_size, dropout)
        self.decoder = _Decoder(channels[-1], dec, out_size=input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(x)))


def alexnet227(dropout: float = 0.5) -> AlexNetContextEncoder:
    return AlexNetContextEncoder(
        227, (96, 256, 384, 384, 256), (11, 4, 0), 5, 0, 6, (128, 64, 64, 32, 3), dropout
    )


def small64(dropout: float = 0.0) -> AlexNetContextEncoder:
    return AlexNetContextEncoder(
        64, (48, 96, 128, 128, 96), (5, 2, 2), 5, 1, 4, (96, 64, 48, 3), dropout
    )


class Discriminator(nn.Module):
    """64x64 -> 4x4x512 -> one logit per image."""

    def __init__(self):
        super().__init__()
        self.features = _dcgan_stack((64, 128, 256, 512))
        self.head = nn.Conv2d(512, 1, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if h.shape[-1] != 4:
            h = F.adaptive_avg_pool2d(h, 4)
        return self.head(h).flatten()


BASELINES = {"inpaint128": Inpaint128, "alexnet227": alexnet227, "small64": small64}


class BaselineStep:
    """One optimisation step: masked L2 (Eq. 1) [+ adversarial (Eq. 2-3)], plain Adam.

    images: uint8 [N, 3, S, S]; hole: bool [N, 1, S, S]; ``center``: the model predicts the central
    S/2 square. Returns the losses as floats.
    """

    def __init__(self, model, disc, mean, center: bool, lr=1e-3, betas=(0.5, 0.999), disc_lr_ratio=0.1,
                 overlap=4, overlap_weight=10.0, lambda_rec=0.999, lambda_adv=0.001):  # fmt: skip
        self.model, self.disc, self.center = model, disc, center
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.overlap, self.overlap_weight = overlap, overlap_weight
        self.lambda_rec, self.lambda_adv = lambda_rec, lambda_adv
        self.opt_g = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, foreach=False)
        self.opt_d = (
            torch.optim.Adam(disc.parameters(), lr=lr * disc_lr_ratio, betas=betas, foreach=False)
            if disc is not None
            else None
        )

    def __call__(self, images: torch.Tensor, hole: torch.Tensor) -> dict[str, float]:
        # the batch comes from the host, as ours does (uint8 / bool, sent to the model's device)
        x = images.to(self.mean.device).float() / 127.5 - 1.0
        m = hole.to(self.mean.device).float()
        context = x * (1 - m) + self.mean.view(1, 3, 1, 1) * m
        grown = F.max_pool2d(m, 2 * self.overlap + 1, stride=1, padding=self.overlap)
        weights = m + self.overlap_weight * (grown - m)
        empty = m.flatten(1).sum(1) == 0
        weights[empty] = 1.0
        per_image = m.flatten(1).sum(1)
        count = torch.where(per_image > 0, per_image, float(m[0].numel())).sum()
        target = x
        if self.center:
            s = x.shape[-1]
            lo, hi = s // 4, s // 4 + s // 2
            target, weights = x[..., lo:hi, lo:hi], weights[..., lo:hi, lo:hi]
        pred = self.model(context)
        rec = ((pred - target) ** 2 * weights).sum() / (count.clamp_min(1) * 3)
        out = {"loss_rec": rec}
        loss = rec
        if self.disc is not None:
            fake = self.disc(pred)
            adv = F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
            loss = self.lambda_rec * rec + self.lambda_adv * adv
            out["loss_adv"] = adv
        out["loss"] = loss
        self.opt_g.zero_grad()
        loss.backward()
        self.opt_g.step()
        if self.disc is not None:
            real, fake = self.disc(target), self.disc(pred.detach())
            d_loss = F.binary_cross_entropy_with_logits(
                real, torch.ones_like(real)
            ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
            self.opt_d.zero_grad()
            d_loss.backward()
            self.opt_d.step()
            out["loss_disc"] = d_loss
        return {k: float(v.detach()) for k, v in out.items()}
