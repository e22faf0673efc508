"""Encoder weights out of and into the suite's checkpoint format: ``python -m core.export``.

    python -m core.export RUN_OR_CHECKPOINT OUT --format state_dict|torchvision|mm
    python -m core.export import STATE_DICT OUT --arch ARCH [--data-mean R G B]

**Export** writes the encoder of a checkpoint (or of a run folder's last.pt) as a plain state dict
of tensors (atomically), and ``OUT.json`` beside it: arch, layer spec, the input the encoder
expects, ``data_mean`` and the source checkpoint's sha256. Layouts (``--format``):

- ``state_dict``: the encoder's own keys (``conv1.weight`` ... ``conv5.bias`` for the AlexNet
  archs), for ``core.models.build_model(arch).encoder.load_state_dict``;
- ``torchvision``: ``features.{0,3,6,8,10}.{weight,bias}``, the layout of
  ``torchvision.models.alexnet`` (torchvision/models/alexnet.py) and of mmpretrain's AlexNet
  backbone; its shapes are torchvision's only for ``alexnet224_torchvision`` (the max-pool archs
  only: a pool-free encoder has convolutions torchvision's layout has no place for);
- ``mm``: ``{"state_dict": {"backbone.encoder.conv1.weight": ...}}``, an mmdet / mmseg detector
  checkpoint whose backbone is ``transfer.mm_backbone.PretextAlexNet``: take its backbone with
  ``init_cfg=dict(type="Pretrained", checkpoint=OUT, prefix="backbone.")``.

**Import** turns a plain state dict of any of those layouts (a torchvision AlexNet ``.pth``
included: its ImageNet ``classifier.*`` head is left out and recorded) into a suite checkpoint of
``--arch`` that every transfer and frozen protocol reads: ``method="imported"``, ``step=0``, the
source file's sha256 and layout in ``source``. Keys and shapes are checked strictly against the
arch's encoder; any missing / unexpected key or wrong shape is one ``error:`` line naming them. The
bottleneck and decoder (not in the file) are the arch's initialisation with seed 0, untrained as in
a ``supervised`` checkpoint. ``data_mean`` (the fill value of masked pixels, §3.3: the mean of the
data the encoder was trained on): ``--data-mean`` in [0, 1] pixel units, else the one in the
``.json`` that the export wrote beside the file, else ImageNet's (torchvision's
``transforms.Normalize`` mean), since weights from elsewhere are almost always ImageNet-trained.

Both read files with torch's restricted unpickler (``core.checkpoint.read_tensor_file``): a state
dict from elsewhere is data, never code.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from core.atomic_io import atomic_save, atomic_write_json
from core.checkpoint import (
    FORMAT,
    CheckpointError,
    file_sha256,
    read_tensor_file,
    resolve_checkpoint_path,
    save_checkpoint,
)
from core.cli import ArgumentParser, UserError, run_cli
from core.models import ARCHS, IMAGENET_MEAN, AlexNetEncoder, build_model
from core.pretrained import Pretrained

log = logging.getLogger("core.export")

FORMATS = ("state_dict", "torchvision", "mm")
# index of conv1..conv5 in torchvision's AlexNet ``features`` (conv, ReLU, pool, conv, ReLU, pool,
# conv, ReLU, conv, ReLU, conv, ReLU, pool)
TORCHVISION_INDEX = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
MM_PREFIX = "backbone.encoder."  # PretextAlexNet keeps the encoder as ``self.encoder``
SIDECAR_FORMAT = "context-encoder-suite/export-v1"


# ---- key layouts ------------------------------------------------------------------------------


def _require_torchvision_layout(encoder: torch.nn.Module, what: str) -> None:
    if not isinstance(encoder, AlexNetEncoder) or encoder.spec.pool_free:
        raise UserError(
            f"{what}: the torchvision layout (features.N) holds a max-pool AlexNet encoder only "
            "(small64, alexnet227, alexnet224_torchvision); use the state_dict layout"
        )


def to_layout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Encoder keys (``conv1.weight``) -> the keys of ``layout`` (flat; mm's wrapper is added when
    writing). The inverse is :func:`from_layout`."""
    if layout == "state_dict":
        return dict(state)
    if layout == "mm":
        return {MM_PREFIX + k: v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        layer, param = key.split(".", 1)
        out[f"features.{TORCHVISION_INDEX[layer]}.{param}"] = value
    return out


def from_layout(
    state: dict[str, Any], layout: str
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Keys of ``layout`` -> encoder keys. Returns (encoder state, encoder key -> the file's key,
    keys left out: a torchvision model's ``classifier.*`` head, an mm detector's neck / heads).
    Keys that map to no encoder key are kept under their own name (and fail the strict check)."""
    index_layer = {str(i): name for name, i in TORCHVISION_INDEX.items()}
    out, names, ignored = {}, {}, []
    for key, value in state.items():
        mapped = key
        if layout == "torchvision":
            if key.startswith("classifier."):
                ignored.append(key)
                continue
            parts = key.split(".", 2)
            if len(parts) == 3 and parts[0] == "features" and parts[1] in index_layer:
                mapped = f"{index_layer[parts[1]]}.{parts[2]}"
        elif layout == "mm":
            if not key.startswith(MM_PREFIX):
                ignored.append(key)
                continue
            mapped = key[len(MM_PREFIX) :]
        out[mapped], names[mapped] = value, key
    return out, names, ignored


def detect_layout(state: dict[str, Any]) -> str:
    keys = [str(k) for k in state]
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    if any(k.startswith(MM_PREFIX) for k in keys):
        return "mm"
    return "state_dict"


def check_fit(
    path: str | Path,
    arch: str,
    layout: str,
    state: dict[str, Any],
    names: dict[str, str],
    expected: dict[str, torch.Tensor],
) -> None:
    """Strict key and shape check of ``state`` (encoder keys) against the arch's ``expected``
    state; one CheckpointError naming every missing / unexpected key and wrong shape, in the
    file's own key names."""
    file_name = {k: to_layout({k: v}, layout).popitem()[0] for k, v in expected.items()}
    missing = [file_name[k] for k in expected if k not in state]
    unexpected = [names.get(k, k) for k in state if k not in expected]
    not_tensor = [names.get(k, k) for k in state if not isinstance(state[k], torch.Tensor)]
    shapes = [
        f"{names[k]}: file {list(state[k].shape)}, arch {list(v.shape)}"
        for k, v in expected.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    problems = [
        f"{what} {_listed(items)}"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("not tensors", not_tensor),
            ("shape mismatch", shapes),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{path}: does not fit arch {arch!r} ({layout} layout): " + "; ".join(problems)
        )


def _listed(items: list[str], most: int = 8) -> str:
    shown = ", ".join(items[:most])
    return f"[{shown}{f', ... ({len(items) - most} more)' if len(items) > most else ''}]"


# ---- export -----------------------------------------------------------------------------------


def _input_convention(encoder: torch.nn.Module) -> str:
    spec = getattr(encoder, "spec", None)
    if spec is not None and spec.input_norm is not None:
        mean, std = spec.input_norm
        return f"RGB in [0, 1], then (x - mean) / std with mean {list(mean)}, std {list(std)}"
    return "RGB in [-1, 1] (pixel / 127.5 - 1)"


def _refuse_overwrite(out: Path, force: bool, source: Path | None = None) -> None:
    if source is not None and out.resolve() == source.resolve():
        raise UserError(f"{out}: is the input file; write elsewhere")
    if out.exists() and not force:
        raise UserError(f"{out}: exists; pass --force to replace it")


def export_encoder(
    checkpoint: str | Path, out: str | Path, layout: str = "state_dict", force: bool = False
) -> dict[str, Any]:
    """Write the encoder of ``checkpoint`` to ``out`` in ``layout`` (and ``out``.json); returns
    the sidecar's record."""
    if layout not in FORMATS:
        raise UserError(f"--format {layout!r}: choose one of {list(FORMATS)}")
    out = Path(out)
    _refuse_overwrite(out, force, resolve_checkpoint_path(checkpoint))
    pre = Pretrained.load(checkpoint)
    network = pre.network()
    encoder = network.encoder
    if layout == "torchvision":
        _require_torchvision_layout(encoder, str(checkpoint))
    if layout == "mm" and not isinstance(encoder, AlexNetEncoder):
        raise UserError(
            f"{checkpoint}: arch {pre.arch!r} has no AlexNet encoder, which the mm backbone "
            "(transfer.mm_backbone.PretextAlexNet) needs; use the state_dict layout"
        )
    state = to_layout(encoder.state_dict(), layout)
    payload = {"state_dict": state} if layout == "mm" else state
    atomic_save(out, lambda fh: torch.save(payload, fh))
    spec = getattr(encoder, "spec", None)
    record = {
        "format": SIDECAR_FORMAT,
        "layout": layout,
        "arch": pre.arch,
        "spec": asdict(spec) if spec is not None else None,
        "input_size": network.input_size,
        "input": _input_convention(encoder),
        "data_mean": pre.data_mean,
        "file_sha256": file_sha256(out),
        "source": {
            "path": str(resolve_checkpoint_path(checkpoint).resolve()),
            **{k: pre.source[k] for k in ("sha256", "method", "arch", "step")},
        },
    }
    record = json.loads(json.dumps(record))  # what the file holds (tuples -> lists)
    atomic_write_json(sidecar(out), record)  # after the weights: it names their sha256
    return record


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


# ---- import -----------------------------------------------------------------------------------


def _data_mean(path: Path, data_mean: list[float] | None) -> tuple[list[float], str]:
    """(data_mean in [-1, 1], where it came from); see the module docstring."""
    if data_mean is not None:
        if len(data_mean) != 3 or not all(0.0 <= v <= 1.0 for v in data_mean):
            raise UserError(f"--data-mean {data_mean}: three values in [0, 1] (pixel units)")
        return [2.0 * v - 1.0 for v in data_mean], "--data-mean"
    side = sidecar(path)
    if side.is_file():
        try:
            record = json.loads(side.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{side}: not JSON ({err})") from None
        if record.get("format") == SIDECAR_FORMAT and record.get("file_sha256") == file_sha256(
            path
        ):
            return [float(v) for v in record["data_mean"]], str(side)
    return [2.0 * v - 1.0 for v in IMAGENET_MEAN], "ImageNet's (torchvision's Normalize mean)"


def import_encoder(
    state_dict: str | Path,
    out: str | Path,
    arch: str,
    data_mean: list[float] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """A suite checkpoint (``method="imported"``) of ``arch`` from the plain state dict in
    ``state_dict``; returns {arch, layout, sha256, data_mean, data_mean_from, ignored}."""
    path, out = Path(state_dict), Path(out)
    if arch not in ARCHS:
        raise UserError(f"--arch {arch!r}: choose one of {sorted(ARCHS)}")
    if not path.is_file():
        raise CheckpointError(f"{path}: state dict not found")
    _refuse_overwrite(out, force, path)
    raw = read_tensor_file(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        raise CheckpointError(f"{path}: already a suite checkpoint; the stages read it as it is")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]  # mmengine / Lightning wrapper
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise CheckpointError(f"{path}: not a state dict (a {type(raw).__name__})")
    torch.manual_seed(0)  # the bottleneck and decoder the file does not hold
    model = build_model(arch, dropout=0.0, output="full")
    layout = detect_layout(raw)
    if layout == "torchvision":
        _require_torchvision_layout(model.encoder, f"{path}: --arch {arch}")
    state, names, ignored = from_layout(raw, layout)
    check_fit(path, arch, layout, state, names, model.encoder.state_dict())
    model.encoder.load_state_dict(state, strict=True)
    mean, mean_from = _data_mean(path, data_mean)
    sha = file_sha256(path)
    source = {"path": str(path.resolve()), "sha256": sha, "layout": layout, "ignored": ignored}
    save_checkpoint(out, {
        "method": "imported", "arch": arch, "output": "full", "dropout": 0.0,
        "model": model.state_dict(), "discriminator": None, "optimizers": {}, "step": 0,
        "rng": {}, "data_mean": mean, "config": {}, "elapsed_s": 0.0, "source": source,
        "trained": ["encoder"],
    })  # fmt: skip
    return {"arch": arch, "layout": layout, "sha256": sha, "data_mean": mean,
            "data_mean_from": mean_from, "ignored": ignored}  # fmt: skip


# ---- command line -----------------------------------------------------------------------------


def export_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m core.export",
        description="Write a checkpoint's encoder as a plain state dict "
        "(python -m core.export import --help: the other way).",
    )
    p.add_argument("checkpoint", help="a suite checkpoint (.pt) or a pretext run folder")
    p.add_argument("out", help="the state dict file to write (and OUT.json beside it)")
    p.add_argument("--format", choices=FORMATS, default="state_dict", dest="layout")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def import_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m core.export import",
        description="Turn a plain encoder state dict into a suite checkpoint.",
    )
    p.add_argument("state_dict", help="a .pth / .pt state dict (state_dict, torchvision or mm)")
    p.add_argument("out", help="the suite checkpoint (.pt) to write")
    p.add_argument("--arch", required=True, help=f"one of {sorted(ARCHS)}")
    p.add_argument(
        "--data-mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="mean pixel of the encoder's training data, in [0, 1] (default: ImageNet's)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str]) -> dict[str, Any]:
    if argv[:1] == ["import"]:
        a = import_parser().parse_args(argv[1:])
        result = import_encoder(a.state_dict, a.out, a.arch, a.data_mean, a.force)
        print(
            f"wrote {a.out}: arch {a.arch}, method imported, {a.state_dict} ({result['layout']} "
            f"layout, sha256 {result['sha256'][:12]}), data_mean from {result['data_mean_from']}"
            + (f", left out {len(result['ignored'])} head keys" if result["ignored"] else "")
        )
        return result
    a = export_parser().parse_args(argv)
    record = export_encoder(a.checkpoint, a.out, a.layout, a.force)
    print(f"wrote {a.out} ({a.layout} layout, arch {record['arch']}) and {sidecar(a.out)}")
    return record


def cli(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli(main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    cli()
