"""Config mistakes at the command line: one line naming the problem, exit code 2, no traceback.

In-process checks of the same (and of YAML files) are in tests/test_config.py and tests/test_train.py.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.checkpoint import CheckpointError, save_checkpoint
from core.models import build_model
from core.pretrained import Pretrained
from transfer import classify

REPO = Path(__file__).resolve().parents[2]


def error_line(text: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def test_unknown_key_real_interpreter(tmp_path):
    """The one test that pays for a real ``python -m pretext.train`` start."""
    proc = subprocess.run(
        [sys.executable, "-m", "pretext.train", f"run_dir={tmp_path / 'r'}", "optim.stepz=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert "unknown key(s) ['optim.stepz']" in line and "optim.steps" in line
    assert not (tmp_path / "r").exists()  # nothing written for a refused config


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.steps=ten", "optim.steps: expected an integer, got str 'ten'"),
        ("optim.lr=true", "optim.lr: expected a number"),
        ("mask.kind=circle", "mask.kind: 'circle' is not one of"),
        ("model.arch=vgg", "unknown arch 'vgg'"),
        ("frobnicate=1", "valid keys: method, run_dir"),
        ("optim=3", "optim: expected a mapping"),
    ],
)
def test_wrong_values(fork_server, tmp_path, override, words):
    pid, log = fork_server.start("pretext.train", [f"run_dir={tmp_path / 'r'}", override])
    assert fork_server.wait(pid) == 2
    assert words in error_line(log.read_text())


def test_resuming_with_another_config_is_refused_unless_forced(fork_server, pretext_args, tmp_path):
    run_dir = tmp_path / "r"
    pid, log = fork_server.start("pretext.train", pretext_args(run_dir, 4, "fail_at_step=3"))
    assert fork_server.wait(pid) == 1 and "non-finite loss nan at step 3" in log.read_text()
    changed = pretext_args(run_dir, 4, "optim.lr=0.01")
    pid, log = fork_server.start("pretext.train", changed)
    assert fork_server.wait(pid) == 2
    line = error_line(log.read_text())
    assert "different config" in line and "optim.lr: 0.001 -> 0.01" in line and "force=true" in line
    pid, log = fork_server.start("pretext.train", [*changed, "force=true"])
    assert fork_server.wait(pid) == 0
    assert "resuming" in log.read_text()


def inpaint_checkpoint(path):
    torch.manual_seed(0)
    save_checkpoint(path, {
        "method": "context_encoder", "arch": "inpaint128", "output": "center", "dropout": 0.0,
        "model": build_model("inpaint128", output="center").state_dict(), "discriminator": None,
        "optimizers": {}, "step": 0, "rng": {}, "data_mean": [0.0] * 3, "config": {},
        "elapsed_s": 0.0,
    })  # fmt: skip
    return path


def test_checkpoint_of_another_architecture(tiny_voc, tmp_path):
    ckpt = inpaint_checkpoint(tmp_path / "inpaint.pt")
    with pytest.raises(
        CheckpointError, match=r"inpaint.pt: checkpoint arch is 'inpaint128', but 'small64'"
    ):
        Pretrained.load(ckpt, "small64")
    # the transfer entry: asked for an arch, or given an encoder it cannot fine-tune
    for extra, words in ((["arch=small64"], "'small64' was asked for"), ([], "AlexNet-style")):
        cfg = classify.parse_config([f"--checkpoint={ckpt}", f"--data={tiny_voc}",
                                     f"run_dir={tmp_path / 'cls'}", *extra])  # fmt: skip
        with pytest.raises(CheckpointError, match=words) as err:
            classify.main(cfg)
        assert str(ckpt) in str(err.value)
    # weights that do not fit the arch the file claims
    state = torch.load(ckpt, weights_only=True)
    state["arch"] = "small64"
    torch.save(state, tmp_path / "lying.pt")
    with pytest.raises(CheckpointError, match="lying.pt: weights do not match arch 'small64'"):
        Pretrained.load(tmp_path / "lying.pt").encoder()
