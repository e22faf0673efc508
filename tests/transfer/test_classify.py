"""Classification transfer: data-dependent init, errors, and a few iterations end to end."""

import json
import math

import pytest
import torch
from torch import nn

from core.checkpoint import CheckpointError, load_checkpoint
from core.data_dependent_init import rescale_layers
from core.pretrained import Pretrained
from core.run_folder import TransferError
from transfer import classify


def test_rescaled_new_layers_have_zero_mean_unit_variance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(inplace=True), nn.Linear(30, 5))
    for m in (net[0], net[2]):
        nn.init.normal_(m.weight, std=3.0)
        nn.init.constant_(m.bias, 2.0)
    x = torch.randn(256, 20) * 4 + 1
    rescale_layers([net[0], net[2]], lambda: net(x))
    for layer in (net[0], net[2]):
        out = []
        h = layer.register_forward_hook(lambda _m, _i, o, out=out: out.append(o.detach().clone()))
        net(x)
        h.remove()
        assert out[0].mean(0).abs().max() < 1e-4
        assert torch.allclose(out[0].std(0), torch.ones(out[0].shape[1]), atol=1e-4)


def _args(voc_root, ckpt, run_dir, *extra):
    return [f"--checkpoint={ckpt}", f"--data={voc_root}", f"run_dir={run_dir}",
            "finetune.epochs=2", "finetune.batch_size=4", "linear.max_iter=10", "threads=1",
            "progress=false", *extra]  # fmt: skip


def test_few_iterations_end_to_end_and_rerun(voc_root, ckpt, tmp_path):
    cfg = classify.parse_config(_args(voc_root, ckpt, tmp_path / "run", "finetune.rescale=true"))
    result = classify.main(cfg)
    for mode in ("finetune", "linear_pool5", "linear_fc"):
        assert 0.0 <= result[f"{mode}_mAP"] <= 1.0
        assert f"{mode}_AP_aeroplane" in result
    assert result["mAP"] == result["finetune_mAP"]
    assert all(isinstance(v, float) for v in result.values())
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["source"]["method"] == "context_encoder" and len(meta["source"]["sha256"]) == 64
    assert meta["status"] == "done"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 3  # two fine-tuning epochs + one line per mode
    # a finished folder returns the recorded result without recomputing
    (tmp_path / "run" / "result.json").write_text(json.dumps({"mAP": 0.123}))
    assert classify.main(cfg) == {"mAP": 0.123}


def test_rerun_with_another_checkpoint_is_refused(voc_root, ckpt, tmp_path, make_checkpoint):
    cfg = classify.parse_config(_args(voc_root, ckpt, tmp_path / "run", "modes=[linear_pool5]"))
    assert math.isfinite(classify.main(cfg)["mAP"])
    other = make_checkpoint(tmp_path / "other.pt", seed=5)
    with pytest.raises(TransferError, match="another checkpoint"):
        classify.main(
            classify.parse_config(_args(voc_root, other, tmp_path / "run", "modes=[linear_pool5]"))
        )


def test_errors_wrong_kind_arch_split_classes(voc_root, ckpt, tmp_path, make_checkpoint):
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(CheckpointError, match="not a context-encoder-suite checkpoint"):
        classify.main(classify.parse_config(_args(voc_root, bad, tmp_path / "a")))
    with pytest.raises(CheckpointError, match="alexnet227"):
        classify.main(
            classify.parse_config(_args(voc_root, ckpt, tmp_path / "b", "arch=alexnet227"))
        )
    inpaint = make_checkpoint(tmp_path / "inp.pt", arch="inpaint128")
    with pytest.raises(CheckpointError, match="AlexNet"):
        classify.main(classify.parse_config(_args(voc_root, inpaint, tmp_path / "c")))
    with pytest.raises(TransferError, match="nosuch.txt: split file not found"):
        classify.main(
            classify.parse_config(_args(voc_root, ckpt, tmp_path / "d", "test_split=nosuch"))
        )
    with pytest.raises(TransferError, match="classes"):
        classify.main(
            classify.parse_config(_args(voc_root, ckpt, tmp_path / "e", "classes=[cat,dog]"))
        )


def test_finetuning_starts_from_the_checkpoint_weights(ckpt):
    encoder = classify.new_classifier(Pretrained.load(ckpt), 3, classify.FinetuneConfig()).encoder
    state = load_checkpoint(ckpt)["model"]
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, state[f"encoder.{key}"])


# ---- precision of the fine-tuning steps (finetune.amp; docs/precision.md) ----------------------


def _linear_dtypes(monkeypatch):
    """The dtypes of every Linear output of the fine-tuning steps (the hook sees the autocast)."""
    seen = []
    real = classify.train_step

    def step(model, batch, opt, fc, dtype):
        hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(o.dtype))
                 for m in model.modules() if isinstance(m, nn.Linear)]  # fmt: skip
        try:
            return real(model, batch, opt, fc, dtype)
        finally:
            for h in hooks:
                h.remove()

    monkeypatch.setattr(classify, "train_step", step)
    return seen


@pytest.mark.parametrize(
    ("amp", "validated", "expected", "reason"),
    [("bf16", False, "bf16", "amp=bf16 on the CPU"),
     ("auto", False, "fp32", "not checked yet"),
     ("auto", True, "bf16", "amp=auto on the CPU: bf16"),
     ("off", True, "fp32", "amp=off")],
)  # fmt: skip
def test_finetune_amp_sets_the_steps_precision_and_is_recorded(
    voc_root, ckpt, tmp_path, monkeypatch, amp, validated, expected, reason
):
    from core import machine

    monkeypatch.setattr(
        machine, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    )  # AMX
    monkeypatch.setattr(classify, "CPU_BF16_STAGES", frozenset({"classify"} if validated else ()))
    seen = _linear_dtypes(monkeypatch)
    run = tmp_path / "run"
    cfg = classify.parse_config(
        _args(voc_root, ckpt, run, "modes=[finetune]", "finetune.epochs=1", f"finetune.amp={amp}")
    )
    result = classify.main(cfg)
    assert math.isfinite(result["finetune_mAP"]) and seen
    assert set(seen) == {torch.bfloat16 if expected == "bf16" else torch.float32}
    meta = json.loads((run / "meta.json").read_text())
    assert meta["finetune_precision"] == expected and reason in meta["finetune_precision_reason"]


def test_bf16_steps_train_the_same_network_as_fp32_closely():
    """Same weights, same batches: a few bf16 autocast steps stay near the fp32 ones (bf16 keeps 8
    bits of mantissa; the weights and Adam state stay fp32)."""
    fc = classify.FinetuneConfig(head="linear", dropout=0.0)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    labels, diff = (torch.rand(8, 20) < 0.2).float(), torch.zeros(8, 20)
    from core.classifier import Classifier
    from core.models import build_model

    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(1)
        net = Classifier(build_model("small64").encoder, 20, fc.head, fc.hidden, fc.dropout)
        opt = classify.make_optimizer(net, fc)
        losses[name] = [classify.train_step(net, (images, labels, diff), opt, fc, dtype).item()
                        for _ in range(4)]  # fmt: skip
        assert all(p.dtype == torch.float32 for p in net.parameters())
    assert losses["fp32"] != losses["bf16"]  # bf16 did run
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.03)
    assert losses["bf16"][-1] < losses["bf16"][0]  # and it trains
