"""Checkpoint format shared by the pretext, transfer and eval stages.

One ``.pt`` file (a dict) per checkpoint, written atomically:

- ``format``: :data:`FORMAT`; ``method``: one of :data:`METHODS` (``pretext.methods.METHODS``, and
  ``imported`` for ``core.export import``)
- ``arch``, ``output``, ``dropout``: enough to rebuild the network with :func:`build_model`
- ``model``: full state dict; ``discriminator`` (or None); ``optimizers``; ``step``; ``rng``
  (a DDP run also saves ``rng_ranks``, the torch RNG state of every rank)
- ``data_mean``: per-channel fill value in [-1, 1] (masked pixels get the dataset mean, §3.3)
- ``config``: the resolved training config as a dict; ``elapsed_s``: training time so far
- methods with a head (supervised, rotation, relative_location): ``head`` (its state dict,
  ``pretext/methods/<method>.py``), and for supervised ``class_names``; their ``model`` is the whole
  network with the trained encoder (the bottleneck and decoder untrained), so loaders that read
  ``model`` need nothing else
- ``method=imported`` (``core.export import``): an encoder trained elsewhere; ``source``
  {path, sha256, layout}; its bottleneck and decoder are untrained, as for ``supervised``
- ``trained``: the parts of :data:`PARTS` whose weights the method set (by training, or for
  kmeans_init by its data-dependent init); a checkpoint saved before it was recorded is read as
  its method's :data:`METHOD_TRAINED` (:func:`trained_parts`)

A checkpoint is data, never code: it is read with torch's restricted unpickler
(``weights_only=True``), which builds tensors, numbers, strings, None and dicts / lists / tuples of
them and refuses any other Python object, so a crafted file cannot run code when a stage opens it.
No allow-list is needed: every value the suite saves is of those types (the RNG states are torch
uint8 tensors), and :func:`save_checkpoint` refuses to write anything else.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch

from core.atomic_io import atomic_save
from core.cli import UserError
from core.models import ARCHS, ContextEncoder, build_model

FORMAT = "context-encoder-suite/checkpoint-v1"
METHODS = (
    "context_encoder",
    "autoencoder",
    "random_init",
    "kmeans_init",
    "supervised",
    "rotation",
    "relative_location",
    "imported",
)
PARTS = ("encoder", "bottleneck", "decoder", "head")
# What each method sets (pretext/methods/<method>.py: ``Method.trained_parts``), for checkpoints
# saved before ``trained`` was recorded: the context encoder and the autoencoder train the whole
# network; the head methods (and an imported encoder) only the encoder (+ their head); random
# init nothing; k-means init its encoder from data.
METHOD_TRAINED: dict[str, tuple[str, ...]] = {
    "context_encoder": ("encoder", "bottleneck", "decoder"),
    "autoencoder": ("encoder", "bottleneck", "decoder"),
    "random_init": (),
    "kmeans_init": ("encoder",),
    "supervised": ("encoder", "head"),
    "rotation": ("encoder", "head"),
    "relative_location": ("encoder", "head"),
    "imported": ("encoder",),
}
# what torch's restricted unpickler builds (torch/_weights_only_unpickler.py); nothing else is saved
PLAIN_VALUES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, or of the wrong kind / architecture."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) atomically: a kill leaves the previous file intact."""
    save_tensor_file(path, {"format": FORMAT, **state}, "checkpoint")


def save_tensor_file(path: str | Path, state: Any, where: str = "checkpoint") -> None:
    """``torch.save`` of plain data (:func:`require_plain_data`, else TypeError naming ``where``),
    atomically: what :func:`read_tensor_file` reads back; a kill leaves the previous file intact."""
    require_plain_data(state, where)

    def write(fh) -> None:
        try:
            torch.save(state, fh)
        except RuntimeError as err:
            # torch's zip writer hides a failed write (a full disk) behind "unexpected pos ..."
            failed = err.__context__
            if isinstance(failed, OSError):
                raise OSError(
                    failed.errno, f"{path}: cannot write checkpoint ({failed.strerror})"
                ) from failed
            raise

    atomic_save(path, write)


def require_plain_data(value: Any, where: str) -> None:
    """Raise TypeError if ``value`` holds anything but tensors, plain values and dicts / lists /
    tuples / sets of them: the loader (``weights_only``) would refuse the file (store such state as
    tensors or plain values instead). Types are matched exactly: a NumPy float is not a float."""
    kind = type(value)
    if isinstance(value, torch.Tensor) or kind in PLAIN_VALUES:
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            if type(key) not in PLAIN_VALUES:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not plain")
            require_plain_data(item, f"{where}[{key!r}]")
    elif kind in (list, tuple, set, frozenset, torch.Size):
        for i, item in enumerate(value):
            require_plain_data(item, f"{where}[{i}]")
    else:
        raise TypeError(
            f"{where}: a {kind.__module__}.{kind.__qualname__} is not a tensor or a plain value; "
            "the checkpoint loader (torch weights_only) would refuse it"
        )


def read_tensor_file(
    path: str | Path, map_location: str | torch.device = "cpu", data: BinaryIO | None = None
) -> Any:
    """``torch.load`` with the restricted unpickler: tensors and plain values only, never code.

    ``data``: the file's bytes already read (core.pretrained reads a file once), else ``path``.
    Raises :class:`CheckpointError` (one line naming ``path``) for a file that would import or call
    any other Python object (nothing of it is run) and for a damaged or foreign file."""
    try:
        return torch.load(
            path if data is None else data, map_location=map_location, weights_only=True
        )
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            raise CheckpointError(
                f"{path}: refused: unpickling it would call {found.group(1)}; a checkpoint may hold "
                "only tensors, numbers, strings and dicts / lists of them (it is read as data, "
                "never run as code)"
            ) from None
        marker = "WeightsUnpickler error:"
        detail = text.rsplit(marker, 1)[-1].strip().split("\n")[0] if marker in text else "?"
        raise CheckpointError(
            f"{path}: cannot read checkpoint (not a torch file, or damaged: {detail})"
        ) from None
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(err).__name__}: {err})"
        ) from err


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files that killed writes of ``path`` left (``.<name>.*.tmp``, as large as a
    checkpoint each). Call it only where no other process writes ``path``: at the start of a run."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", data: BinaryIO | None = None
) -> dict[str, Any]:
    """The checkpoint dict of a .pt file or a run folder (its checkpoints/last.pt), checked for
    :data:`FORMAT` and a known arch (CheckpointError otherwise); ``data``: its bytes, read."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: a folder without checkpoints/last.pt")
        path = candidate
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    state = read_tensor_file(path, map_location, data)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: not a context-encoder-suite checkpoint (format {found!r}, expected {FORMAT!r});"
            " a plain state dict becomes one with: python -m core.export import"
        )
    if state.get("arch") not in ARCHS:
        raise CheckpointError(f"{path}: unknown arch {state.get('arch')!r}; known: {sorted(ARCHS)}")
    return state


def model_from_checkpoint(
    state: dict[str, Any], path: str | Path = "<checkpoint>"
) -> ContextEncoder:
    model = build_model(state["arch"], dropout=state.get("dropout", 0.0), output=state["output"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not match arch {state['arch']!r} ({str(err).splitlines()[0]})"
        ) from err
    return model


def resolve_checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_parts(state: dict[str, Any]) -> tuple[str, ...]:
    """The parts of :data:`PARTS` a checkpoint's method set: its ``trained`` record, else (older
    checkpoints) its method's :data:`METHOD_TRAINED`."""
    if "trained" in state:
        return tuple(state["trained"])
    return METHOD_TRAINED.get(state.get("method", ""), ())


def require_trained(state: dict[str, Any], part: str, path: str | Path, use: str) -> None:
    """CheckpointError unless ``part`` of the checkpoint was trained (``use``: what needs it)."""
    parts = trained_parts(state)
    if part not in parts:
        raise CheckpointError(
            f"{path}: a {state.get('method')} checkpoint, whose {part} was not trained (trained: "
            f"{', '.join(parts) or 'nothing'}); {use} needs a context encoder's checkpoint"
        )
