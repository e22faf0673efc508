"""Feature-map geometry from the layer arithmetic vs. the receptive field measured by backprop."""

import copy

import pytest
import torch
from torch import nn

from core.models import ARCHS, AlexNetEncoder, Geometry, detection_geometry, feature_geometry


def _positive_copy(encoder: nn.Module) -> nn.Module:
    """The encoder with every weight / bias positive (each ReLU passes, each path adds gradient)
    and max-pools as average pools of the same window (a max-pool's gradient goes to the argmax
    only, a data-dependent part of its window; its receptive field is the whole window)."""
    enc = copy.deepcopy(encoder).eval()
    for m in list(enc.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.MaxPool2d):
                k, s, p = child.kernel_size, child.stride, child.padding
                setattr(m, child_name, nn.AvgPool2d(k, s, p))
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(0.01)
    return enc


def _features(enc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(enc, AlexNetEncoder):
        return enc.forward_features(x)["conv5"]
    return enc(x)


def _support(enc: nn.Module, size: int, i: int, j: int) -> tuple[int, int, int, int]:
    """(row min, row max, col min, col max) of the input pixels whose gradient from feature cell
    (i, j) (summed over channels) is non-zero."""
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    _features(enc, x)[0, :, i, j].sum().backward()
    rows, cols = torch.nonzero(x.grad[0].abs().sum(0) > 0, as_tuple=True)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_geometry_matches_the_measured_receptive_field(arch):
    _, _, geo = detection_geometry(arch)
    enc = _positive_copy(ARCHS[arch]().encoder)
    # An input big enough that two neighbouring interior cells see no border.
    size = geo.rf + 8 * geo.stride
    n = _features(enc, torch.zeros(1, 3, size, size)).shape[-1]
    i = n // 2
    centres = []
    for cell in (i, i + 1):
        r0, r1, c0, c1 = _support(enc, size, i, cell)
        assert r0 > 0 and r1 < size - 1, "the test cell touches the border"
        assert r1 - r0 + 1 == geo.rf and c1 - c0 + 1 == geo.rf
        assert (r0 + r1) / 2 == geo.first_center + geo.stride * i
        centres.append((c0 + c1) / 2)
    assert centres == [geo.first_center + geo.stride * i, geo.first_center + geo.stride * (i + 1)]
    # Cell 0: the border clips the support on the left; its far edge still places the centre.
    _, r1, _, _ = _support(enc, size, 0, 0)
    assert r1 == geo.first_center + (geo.rf - 1) / 2


def test_known_values():
    # AlexNet-227: conv1 k11 s4, two 3x3 s2 pools -> conv5 stride 16 (not 227 / 13 = 17.5),
    # cell 0 centred on pixel 17, receptive field 163 (conv5 of Krizhevsky et al. 2012).
    assert detection_geometry("alexnet227") == (227, 13, Geometry(16, 17.0, 163))
    assert detection_geometry("alexnet227_poolfree") == (227, 13, Geometry(16, 17.0, 163))
    assert detection_geometry("small64") == (64, 8, Geometry(8, 0.0, 81))
    assert detection_geometry("inpaint128") == (128, 4, Geometry(32, 15.5, 94))


def test_dilation_and_unknown_layer():
    net = nn.Sequential(nn.Conv2d(3, 3, 3, 1, 2, dilation=2), nn.Conv2d(3, 3, 3, 2, 0))
    assert feature_geometry(net) == Geometry(2, 1.0, 7)
    assert feature_geometry(net, "0") == Geometry(1, 0.0, 5)
    with pytest.raises(ValueError, match="no module named"):
        feature_geometry(net, "conv9")
