"""The pretext trainer end to end on a tiny mini-VOC: learning, resume, faults."""

import json

import pytest
import torch

from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint
from core.config import ConfigError
from core.pretrained import Pretrained
from pretext.train import main, parse_config


def run(args):
    return main(parse_config(args))


def test_loss_goes_down_and_outputs_are_written(tiny_train_args, tmp_path):
    args = [*tiny_train_args, "optim.steps=30", "optim.lr=0.002"]
    result = run(args)
    run_dir = tmp_path / "run"
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(2, 31, 2))
    first, last = records[0]["loss_rec"], records[-1]["loss_rec"]
    assert last < 0.7 * first, (first, last)
    for name in ("config.yaml", "inpainting.json", "inpainting_grid.png", "result.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "result.json").read_text()) == pytest.approx(result)
    assert {"inpaint_psnr", "inpaint_mean_fill_psnr", "train_time_s"} <= set(result)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 30 and state["method"] == "context_encoder"


@pytest.mark.parametrize(
    "amp", ["off", "bf16"]
)  # bf16: native with AMX / AVX512-BF16, else emulated
def test_resume_after_interruption_gives_the_same_weights(tiny_train_args, tmp_path, amp):
    tiny_train_args = [*tiny_train_args, f"amp={amp}"]
    straight = [
        a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in tiny_train_args
    ]
    run(straight)
    # Interrupted run: stop after 6 steps (checkpoint at 4 + 2 steps lost), then restart.
    with pytest.raises(FloatingPointError):
        run([*tiny_train_args, "fail_at_step=6"])
    assert load_checkpoint(tmp_path / "run")["step"] == 4
    run(tiny_train_args)
    a = load_checkpoint(tmp_path / "straight")["model"]
    b = load_checkpoint(tmp_path / "run")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == sorted(set(steps)), "no step logged twice after resume"


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tiny_train_args, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 9.*step 8"):
        run([*tiny_train_args, "fail_at_step=9"])
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resuming_with_another_config_is_refused_unless_forced(tiny_train_args):
    with pytest.raises(FloatingPointError):
        run([*tiny_train_args, "fail_at_step=5"])
    with pytest.raises(
        ConfigError, match=r"different config.*mask.kind: 'random_region' -> 'central'"
    ):
        run([*tiny_train_args, "mask.kind=central"])
    result = run([*tiny_train_args, "mask.kind=central", "force=true"])
    assert result["steps"] == 12


def test_baselines_share_the_checkpoint_format(tiny_train_args, tmp_path):
    ae = [a.replace(str(tmp_path / "run"), str(tmp_path / "ae")) for a in tiny_train_args]
    run([*ae, "method=autoencoder", "optim.steps=4"])
    rand = [a.replace(str(tmp_path / "run"), str(tmp_path / "rand")) for a in tiny_train_args]
    result = run([*rand, "method=random_init"])
    assert result["steps"] == 0
    for name, method in (("ae", "autoencoder"), ("rand", "random_init")):
        pre = Pretrained.load(tmp_path / name)
        encoder = pre.encoder()
        assert pre.method == method and pre.arch == "small64"
        assert encoder(torch.zeros(1, 3, 64, 64)).shape == (1, 96, 4, 4)


@pytest.mark.parametrize(
    "extra", [["mask.kind=central"], ["mask.kind=random_block"], ["loss.adversarial=true"]]
)
def test_variants_train(tiny_train_args, extra):
    result = run([*tiny_train_args, "optim.steps=3", *extra])
    assert torch.isfinite(torch.tensor(result["inpaint_psnr"]))
