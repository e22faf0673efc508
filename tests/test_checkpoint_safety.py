"""A checkpoint is data, never code (core.checkpoint): a crafted file whose unpickling would run code
is refused by every loader before anything of it runs, and every checkpoint the trainer writes holds
only tensors and plain values, so it still loads (torch's restricted unpickler) and resumes exactly."""

import builtins
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    require_plain_data,
    save_checkpoint,
)
from core.export import export_encoder, import_encoder
from core.models import build_model
from core.pretrained import Pretrained
from pretext.train import main, parse_config

REPO = Path(__file__).resolve().parents[1]


class TouchBySystem:
    """Unpickling calls os.system("touch <target>")."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class TouchByPath:
    """Unpickling calls pathlib.Path.touch(<target>)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


class TouchByOpen:
    """Unpickling calls open(<target>, "w"), which creates the file."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (builtins.open, (str(self.target), "w"))


PAYLOADS = (TouchBySystem, TouchByPath, TouchByOpen)


def crafted_checkpoint(path: Path, payload: type, target: Path) -> Path:
    """A file that looks like a suite checkpoint, with a code-running object in its config."""
    state = {
        "format": FORMAT, "method": "context_encoder", "arch": "small64", "output": "full",
        "dropout": 0.0, "model": build_model("small64").state_dict(), "discriminator": None,
        "optimizers": {}, "step": 0, "rng": {}, "data_mean": [0.0] * 3,
        "config": {"note": payload(target)}, "elapsed_s": 0.0,
    }  # fmt: skip
    torch.save(state, path)
    return path


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: p.__name__)
def test_crafted_checkpoint_is_refused_and_runs_nothing(payload, tmp_path):
    target = tmp_path / "created_by_unpickling"
    evil = crafted_checkpoint(tmp_path / "evil.pt", payload, target)
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(evil),
        "Pretrained.load": lambda: Pretrained.load(evil),
        "Pretrained.load of a run folder": lambda: Pretrained.load(
            _as_run_folder(evil, tmp_path / "run2")
        ),
        "run folder": lambda: load_checkpoint(_as_run_folder(evil, tmp_path / "run")),
        "export": lambda: export_encoder(evil, tmp_path / "out.pth"),
        "import": lambda: import_encoder(evil, tmp_path / "imported.pt", "small64"),
    }
    for name, load in loaders.items():
        with pytest.raises(
            CheckpointError, match=r"(evil|last).pt: refused: unpickling it would call"
        ):
            load()
        assert not target.exists(), f"{name} ran the payload"
    assert not (tmp_path / "out.pth").exists() and not (tmp_path / "imported.pt").exists()
    # the control: the same payload does run under the unrestricted unpickler (the test is live)
    control = crafted_checkpoint(tmp_path / "control.pt", payload, tmp_path / "control_target")
    torch.load(control, weights_only=False)
    assert (tmp_path / "control_target").exists()


def _as_run_folder(ckpt: Path, run: Path) -> Path:
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(ckpt.read_bytes())
    return run


def test_stage_cli_refuses_with_one_error_line(tiny_voc, tmp_path):
    target = tmp_path / "created_by_unpickling"
    evil = crafted_checkpoint(tmp_path / "evil.pt", TouchBySystem, target)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "eval.frozen", f"checkpoint={evil}", f"data={tiny_voc}",
         f"run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, check=False, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {evil}: refused: "), proc.stderr
    assert "posix.system" in lines[0] and "weights_only" not in lines[0]
    assert not target.exists()


@pytest.mark.parametrize(
    "value,kind",
    [
        (np.float64(0.5), "numpy.float64"),
        (pathlib.Path("x"), "PosixPath"),
        (np.random.get_state(), "numpy.ndarray"),
    ],  # fmt: skip
)
def test_save_refuses_what_the_loader_would_refuse(value, kind, tmp_path):
    """A checkpoint the safe loader could not read is never written (the writer's own bug)."""
    state = {"method": "context_encoder", "arch": "small64", "model": {}, "config": {"x": value}}
    with pytest.raises(TypeError, match=rf"checkpoint\['config'\]\['x'\].*{kind}"):
        save_checkpoint(tmp_path / "c.pt", state)
    assert not (tmp_path / "c.pt").exists()
    plain = {"t": torch.zeros(2), "s": torch.Size([1, 2]), "n": None, "d": torch.float32,
             "nested": [(1, 2.0, "a", b"b", True)]}  # fmt: skip
    require_plain_data(plain, "plain")  # what the restricted unpickler builds passes


def test_damaged_and_foreign_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"junk.pt: cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"plain.pth: not a context-encoder-suite .*import"):
        load_checkpoint(tmp_path / "plain.pth")


def _train(args):
    return main(parse_config(args))


@pytest.mark.parametrize(
    "method,extra",
    [("context_encoder", ["loss.adversarial=true"]), ("autoencoder", [])],
    ids=["adversarial", "autoencoder"],
)
def test_trainer_checkpoints_load_safely_and_resume_exactly(
    method, extra, tiny_train_args, tmp_path
):
    """Every part of the checkpoint (generator, discriminator, both optimisers, RNG) survives the
    restricted loader: an interrupted run resumed from it ends bit-equal to a straight run."""
    args = [*tiny_train_args, f"method={method}", "optim.steps=8", *extra]
    straight = [a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in args]
    _train(straight)
    with pytest.raises(FloatingPointError):
        _train([*args, "fail_at_step=6"])  # checkpoint at step 4, steps 5-6 lost
    assert load_checkpoint(tmp_path / "run")["step"] == 4
    _train(args)
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "run")
    assert a["step"] == b["step"] == 8 and a["method"] == b["method"] == method
    parts = ["model", "discriminator"] if extra else ["model"]
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    if extra:
        assert b["optimizers"]["disc"] is not None and b["discriminator"] is not None
    require_plain_data(b, "trainer checkpoint")
