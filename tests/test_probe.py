"""The online kNN probe of a pretext run (pretext/probe.py): it changes no weight, logs at step 0,
every ``probe.every`` steps and the last step, survives a resume line for line, and a bad
``probe.data`` is one line before anything is written."""

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.atomic_io import read_jsonl
from core.checkpoint import load_checkpoint
from core.config import ConfigError
from core.features import CONV_LAYERS
from core.models import build_model
from pretext.probe import untouched
from pretext.train import input_checks, main, parse_config

# dropout draws from the global torch RNG at every step: a probe that consumed it would change
# the weights (checked: without pretext.probe.untouched this test fails)
DROPOUT = "model.dropout=0.5"


def run(args):
    return main(parse_config(args))


def probe_args(voc):
    return ["probe.every=4", f"probe.data={voc}", "probe.max_images=16", "probe.batch_size=8"]


def with_dir(args, old, new):
    return [a.replace(str(old), str(new)) for a in args]


def probe_lines(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "images_seen" in r]


def test_untouched_restores_every_rng_and_mode():
    model = build_model("small64")
    model.train()
    model.encoder.eval()  # a mixed state comes back as it was
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    ref = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    with untouched(model):
        torch.rand(5), np.random.rand(5), random.random()
        model.eval()
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(ref[0], got[0]) and np.array_equal(ref[1], got[1]) and ref[2] == got[2]
    assert model.training and not model.encoder.training and model.decoder.training


def test_probe_changes_no_weight_and_logs_at_its_steps(tiny_train_args, tiny_voc, tmp_path):
    off = with_dir([*tiny_train_args, DROPOUT], tmp_path / "run", tmp_path / "off")
    run(off)
    on = [*tiny_train_args, DROPOUT, *probe_args(tiny_voc), "optim.steps=10"]
    on = [a for a in on if a != "optim.steps=12"]
    run(with_dir(on, tmp_path / "run", tmp_path / "ten"))  # 10 steps: the last one is probed too
    run([*tiny_train_args, DROPOUT, *probe_args(tiny_voc)])
    a, b = load_checkpoint(tmp_path / "off"), load_checkpoint(tmp_path / "run")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["optimizers"]["gen"]["state"].keys() == b["optimizers"]["gen"]["state"].keys()
    # the loss lines are the same steps and losses; the probe's lines are extra
    loss = [(r["step"], r["loss_rec"]) for r in read_jsonl(tmp_path / "off" / "metrics.jsonl")]
    got = [(r["step"], r["loss_rec"]) for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
           if "loss_rec" in r]  # fmt: skip
    assert got == loss
    assert "loss_rec" in read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]  # the last line
    for run_dir, steps in ((tmp_path / "run", [0, 4, 8, 12]), (tmp_path / "ten", [0, 4, 8, 10])):
        lines = probe_lines(run_dir)
        assert [r["step"] for r in lines] == steps
        assert [r["images_seen"] for r in lines] == [8 * s for s in steps]  # batch 8
        for r in lines:
            values = [r[f"probe/knn_{layer}_mAP"] for layer in CONV_LAYERS]
            assert all(math.isfinite(v) and 0 < v <= 1 for v in values), r


def test_resumed_run_logs_the_probe_lines_of_an_uninterrupted_one(
    tiny_train_args, tiny_voc, tmp_path
):
    args = [*tiny_train_args, *probe_args(tiny_voc), "probe.every=2"]
    run(with_dir(args, tmp_path / "run", tmp_path / "straight"))
    # killed at step 0 (after the step-0 checkpoint and probe), then at step 7 (after the probe
    # of step 6, checkpoint at 4): each restart drops the lines after its checkpoint
    for fail in ("fail_at_step=0", "fail_at_step=7"):
        with pytest.raises(FloatingPointError):
            run([*args, fail])
    assert load_checkpoint(tmp_path / "run")["step"] == 4
    assert [r["step"] for r in probe_lines(tmp_path / "run")] == [0, 2, 4, 6]
    run(args)
    ref = probe_lines(tmp_path / "straight")
    assert [r["step"] for r in ref] == [0, 2, 4, 6, 8, 10, 12]
    assert probe_lines(tmp_path / "run") == ref  # every value, bit for bit


def test_probe_settings_are_checked(tiny_train_args, tiny_voc):
    with pytest.raises(ConfigError, match="probe.query_split: the probe never reads the test"):
        parse_config([*tiny_train_args, *probe_args(tiny_voc), "probe.query_split=test"])
    with pytest.raises(ConfigError, match="probe.layers"):
        parse_config([*tiny_train_args, *probe_args(tiny_voc), "probe.layers=[conv9]"])
    cfg = parse_config([*tiny_train_args, *probe_args(tiny_voc)])
    assert [i.key for i in input_checks(cfg)][-1] == "probe.data"
    assert "probe.data" not in [i.key for i in input_checks(parse_config(tiny_train_args))]


def test_bad_probe_data_is_one_line_and_writes_nothing(tiny_train_args, tmp_path):
    missing = tmp_path / "nowhere" / "VOC2007"
    args = [*tiny_train_args, "probe.every=2", f"probe.data={missing}"]
    proc = subprocess.run(
        [sys.executable, "-m", "pretext.train", *args], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(missing) in last and "Traceback" not in proc.stderr
    assert "give probe.data=<" in last  # the key that names it, not transfer's --data
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match=str(missing)):  # the pre-flight's check, the same one
        input_checks(parse_config(args))[-1].check()


def test_probe_result_line_is_json_of_numbers(tiny_train_args, tiny_voc, tmp_path):
    run([*tiny_train_args, *probe_args(tiny_voc), "optim.steps=4", "probe.layers=[conv5]"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    probes = [json.loads(x) for x in lines if "images_seen" in x]
    assert [sorted(p) for p in probes] == [["images_seen", "probe/knn_conv5_mAP", "step"]] * 2


def test_a_run_folder_is_not_resumed_with_another_probe(tiny_train_args, tiny_voc):
    """Probe settings are not resume-free: the folder's metrics.jsonl would mix two probes."""
    from core.run_folder import RunFolderError

    with pytest.raises(FloatingPointError):
        run([*tiny_train_args, "fail_at_step=2"])
    with pytest.raises(RunFolderError, match="probe.every"):
        run([*tiny_train_args, *probe_args(tiny_voc)])
