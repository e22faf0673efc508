"""A pretext checkpoint as every stage reads it: :class:`Pretrained`, read once.

    pre = Pretrained.load("runs/builtin/pretext/context_encoder/seed0")   # a .pt or a run folder
    pre.source        # {path, sha256, method, arch, step}: what meta.json records as the source
    model = pre.network().eval()   # a fresh ContextEncoder with the checkpoint's weights
    encoder = pre.encoder()        # a fresh copy of its encoder (fine-tuning leaves the rest alone)

The file is read once (its bytes hashed and unpickled from memory, with the restricted unpickler
of :func:`core.checkpoint.read_tensor_file`: data, never code); every network is built from that
one state, each a new copy, so a probe's frozen copy and a fine-tuned copy never share weights.
A network is built from the architecture's default init and then loaded, as a stage did before:
the build draws from torch's RNG at the same points, which keeps seeded runs identical.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    require_trained,
    resolve_checkpoint_path,
    trained_parts,
)
from core.models import AlexNetEncoder, ContextEncoder

# what a fresh network needs of the state (the optimisers, RNG and discriminator are not kept)
NETWORK_KEYS = ("arch", "dropout", "output", "model", "method", "trained")


# The last file read, by (path, inode, size, mtime): a stage that names its checkpoint twice in one
# process (an mm transfer's run record, then the mm backbone its config builds) reads it once. One
# entry, so a process that walks many checkpoints (retrieval) holds one state, not all of them.
_last: tuple[tuple, Pretrained] | None = None


def _file_key(path: Path) -> tuple | None:
    """What identifies the bytes of ``path`` for the memo; None for a missing file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Pretrained:
    """One pretext checkpoint: where it is, what it is, and its state (read once)."""

    given: str  # the checkpoint as named by the user (a .pt file or a run folder; for messages)
    path: Path  # the file read (a run folder's checkpoints/last.pt)
    sha256: str
    method: str
    arch: str
    step: int
    data_mean: list[float]  # per-channel fill value in [-1, 1] (§3.3)
    trained: tuple[str, ...]  # the parts of core.checkpoint.PARTS the method set
    config: dict[str, Any] = field(repr=False)  # the resolved pretext config it was trained with
    state: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def load(cls, checkpoint: str | Path, arch: str | None = None) -> Pretrained:
        """Read ``checkpoint`` (a .pt or a pretext run folder) once. CheckpointError (one line
        naming the file) for a missing, foreign or damaged file, or an arch other than ``arch``
        (None / "": any)."""
        if not str(checkpoint):
            raise CheckpointError(
                "no checkpoint given: pass --checkpoint <pretext .pt or run folder>"
            )
        global _last
        path = resolve_checkpoint_path(checkpoint)
        key = _file_key(path)
        if key is not None and _last is not None and _last[0] == key:
            pre = replace(_last[1], given=str(checkpoint), path=path)
        else:
            pre = cls._from_file(checkpoint, path)  # a missing file: its one-line error
            _last = (key, pre)
        if arch and pre.arch != arch:
            raise CheckpointError(
                f"{checkpoint}: checkpoint arch is {pre.arch!r}, but {arch!r} was asked for"
            )
        return pre

    @classmethod
    def _from_file(cls, checkpoint: str | Path, path: Path) -> Pretrained:
        raw = path.read_bytes() if path.is_file() else None  # missing: load_checkpoint says so
        state = load_checkpoint(checkpoint, data=None if raw is None else io.BytesIO(raw))
        return cls(
            given=str(checkpoint),
            path=path,
            sha256=hashlib.sha256(raw).hexdigest(),
            method=state["method"],
            arch=state["arch"],
            step=int(state["step"]),
            data_mean=list(state["data_mean"]),
            trained=trained_parts(state),
            config=state.get("config", {}),
            state={k: state[k] for k in NETWORK_KEYS if k in state},
        )

    @property
    def source(self) -> dict[str, Any]:
        """Provenance as a run's meta.json records it: {path, sha256, method, arch, step}."""
        return {"path": str(self.path), "sha256": self.sha256, "method": self.method,
                "arch": self.arch, "step": self.step}  # fmt: skip

    def network(self) -> ContextEncoder:
        """A fresh network with the checkpoint's weights (train mode, as built); CheckpointError
        when the weights do not fit the arch."""
        return model_from_checkpoint(self.state, self.given)

    def encoder(self) -> nn.Module:
        """A fresh copy of the checkpoint's encoder."""
        return self.network().encoder

    def alexnet_network(self, use: str) -> ContextEncoder:
        """:meth:`network`, refused (CheckpointError naming ``use``) unless its encoder is
        AlexNet-style (conv1..conv5: small64*, alexnet227*, alexnet224_torchvision)."""
        model = self.network()
        if not isinstance(model.encoder, AlexNetEncoder):
            raise CheckpointError(
                f"{self.given}: arch {self.arch!r} has no AlexNet-style encoder; {use} supports "
                "small64*, alexnet227*"
            )
        return model

    def require_trained(self, part: str, use: str) -> None:
        """CheckpointError unless ``part`` was trained (``use``: what needs it, e.g. Table 1)."""
        require_trained(self.state, part, self.given, use)
