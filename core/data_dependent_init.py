"""Data-dependent initialisation of layers (Krähenbühl et al., ICLR 2016, §3.1 "within-layer").

Each layer is rescaled, in order, so that on a batch of real data every output unit has zero mean
and unit variance (then later layers see the rescaled earlier ones). Used by the transfer stage for
the layers added on top of the pretrained encoder (the paper's §5.2, after a random Gaussian init)
and by :mod:`core.kmeans_init` after each layer's k-means filters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


@torch.no_grad()
def rescale_layers(
    layers: Sequence[nn.Linear | nn.Conv2d],
    forward: Callable[[], object],
    eps: float = 1e-8,
) -> list[tuple[float, float]]:
    """Rescale ``layers`` (in network order) so their outputs are ~N(0, 1) per unit.

    ``forward()`` runs the network on a fixed batch (in eval mode, so dropout is off). For each
    layer: W <- W / std, b <- (b - mean) / std, with the per-unit mean / std of its output.
    Returns each layer's (mean, std) of its output after rescaling (averaged over units).
    """
    stats = []
    for layer in layers:
        out = _capture(layer, forward)
        dims = [0] + list(range(2, out.dim()))  # all but the unit (channel) axis
        mean, std = out.mean(dims), out.std(dims)
        scale = 1.0 / (std + eps)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(scale.view(shape))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(mean))
        layer.bias.sub_(mean).mul_(scale)
        after = _capture(layer, forward)
        stats.append((float(after.mean()), float(after.std(dims).mean())))
    return stats


def _capture(layer: nn.Module, forward: Callable[[], object]) -> torch.Tensor:
    box: list[torch.Tensor] = []
    handle = layer.register_forward_hook(
        lambda _m, _i, out: box.append(out.detach().clone())
    )  # before in-place ReLUs
    try:
        forward()
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"{layer} was not called by forward()")
    return box[0].double()
