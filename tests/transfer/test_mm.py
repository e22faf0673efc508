"""mmdet / mmseg stages: the backbone adapter, mIoU oracle, a few iterations of each."""

import json
import math

import numpy as np
import pytest
import torch

from core.checkpoint import CheckpointError, load_checkpoint
from transfer.mm_backbone import PretextAlexNet


def test_backbone_loads_the_checkpoint_weights(ckpt):
    backbone = PretextAlexNet(checkpoint=str(ckpt), arch="small64")
    state = load_checkpoint(ckpt)["model"]
    for key, value in backbone.encoder.state_dict().items():
        assert torch.equal(value, state[f"encoder.{key}"]), key
    backbone.init_weights()  # the runner's call must not overwrite them
    assert torch.equal(backbone.encoder.conv1.weight, state["encoder.conv1.weight"])


def test_backbone_feature_shapes_and_frozen_stages(ckpt):
    backbone = PretextAlexNet(str(ckpt), "small64", out_features=("conv3", "conv5", "pool5"),
                              frozen_stages=2)  # fmt: skip
    feats = backbone(torch.randn(2, 3, 128, 96))
    # small64: conv1 stride 2, two 3x3/2 pools -> conv3..conv5 stride 8, pool5 stride 16
    assert [tuple(f.shape) for f in feats] == [(2, 128, 16, 12), (2, 96, 16, 12), (2, 96, 8, 6)]
    assert backbone.out_channels == [128, 96, 96]
    assert not backbone.encoder.conv2.weight.requires_grad
    assert backbone.encoder.conv3.weight.requires_grad


def test_backbone_is_in_both_registries_and_checks_arch(ckpt):
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    assert (
        DET.get("PretextAlexNet") is PretextAlexNet and SEG.get("PretextAlexNet") is PretextAlexNet
    )
    with pytest.raises(CheckpointError, match="alexnet227"):
        PretextAlexNet(str(ckpt), arch="alexnet227")


def test_miou_oracle_through_mmseg_iou_metric():
    from mmengine.structures import PixelData
    from mmseg.evaluation import IoUMetric

    # 3 classes; prediction and ground truth over 8 pixels (255 = void, ignored)
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
    # class 0: inter 1 (px0), union {px0, px1, px5}=3 -> 1/3 ... void px 6, 7 ignored:
    # valid px: 0..5. class0: pred {0,5} gt {0,1} -> inter 1, union 3 -> 1/3
    # class1: pred {1,2,3} gt {2,3} -> inter 2, union 3 -> 2/3; class2: pred {4} gt {4,5} -> 1/2
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=("a", "b", "c"))
    sample = dict(pred_sem_seg=dict(data=torch.from_numpy(pred)[None]),
                  gt_sem_seg=dict(data=torch.from_numpy(gt)[None]))  # fmt: skip
    metric.process([], [sample])
    out = metric.compute_metrics(metric.results)
    assert out["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3, abs=0.01)
    del PixelData


def _mm_args(voc_root, ckpt, run_dir):
    return [f"--checkpoint={ckpt}", f"--data={voc_root}", f"run_dir={run_dir}", "max_iters=3",
            "batch_size=2", "warmup_iters=1", "threads=1", "progress=false"]  # fmt: skip


def test_detect_few_iterations(voc_root, ckpt, tmp_path):
    from transfer import detect

    result = detect.main(detect.parse_config(_mm_args(voc_root, ckpt, tmp_path / "det")))
    classes = json.loads((tmp_path / "det" / "meta.json").read_text())["classes"]
    keys = {"mAP", "AP50", "time_s", "unknown_class_objects_skipped"}
    assert set(result) == keys | {f"AP_{c}" for c in classes}
    assert result["unknown_class_objects_skipped"] == 0  # every object's class is listed
    # AP_<class> is NaN for a class without objects in the tiny test split
    assert all(math.isfinite(v) for k, v in result.items() if not k.startswith("AP_"))
    assert 0 <= result["mAP"] <= 1
    meta = json.loads((tmp_path / "det" / "meta.json").read_text())
    assert meta["task"] == "detect" and meta["classes"][0] == "aeroplane"
    assert (tmp_path / "det" / "metrics.jsonl").exists()


def test_segment_few_iterations(voc_root, ckpt, tmp_path):
    from transfer import segment

    result = segment.main(segment.parse_config(_mm_args(voc_root, ckpt, tmp_path / "seg")))
    classes = json.loads((tmp_path / "seg" / "meta.json").read_text())["classes"]
    per_class = {f"IoU_{c}" for c in ("background", *classes)}
    assert set(result) == {"mIoU", "mAcc", "aAcc", "time_s", *per_class}
    assert all(math.isfinite(v) for v in result.values()) and 0 <= result["mIoU"] <= 1


def test_segment_reads_its_checkpoint_once(voc_root, ckpt, tmp_path, monkeypatch):
    """The run record and the mm backbone its config builds share one read of the file."""
    from core import pretrained
    from transfer import segment

    monkeypatch.setattr(pretrained, "_last", None)  # earlier tests in this process read ckpt
    loads, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(f) or real(f, *a, **k))
    result = segment.main(segment.parse_config(_mm_args(voc_root, ckpt, tmp_path / "seg")))
    assert 0 <= result["mIoU"] <= 1 and len(loads) == 1


def test_segment_missing_split_is_a_clear_error(voc_root, ckpt, tmp_path):
    from core.run_folder import TransferError
    from transfer import segment

    args = [*_mm_args(voc_root, ckpt, tmp_path / "seg"), "test_split=test"]
    with pytest.raises(TransferError, match="Segmentation/test.txt: split file not found"):
        segment.main(segment.parse_config(args))


@pytest.mark.parametrize(
    "arch", ["small64", "alexnet227", "alexnet227_poolfree", "alexnet224_torchvision"]
)
def test_detect_config_uses_the_conv5_geometry(arch, tmp_path):
    """Anchors and RoIAlign use the stride from the layer arithmetic (alexnet227: 16, not
    round(227 / 13) = 17), and anchor i is centred where conv5 cell i looks."""
    from mmdet.models.task_modules import AnchorGenerator
    from mmengine.config import Config as MMEngineConfig

    from core.models import detection_geometry
    from transfer import detect, mm_run

    channels, geo = mm_run.encoder_geometry(arch)
    mm = MMEngineConfig.fromfile(detect.CONFIG)
    detect.configure(mm, detect.Config(), tmp_path / "VOC2007", ("tree",), channels, geo)
    stride = {"small64": 8, "alexnet227": 16, "alexnet227_poolfree": 16,
              "alexnet224_torchvision": 16}[arch]  # fmt: skip
    assert mm.model.rpn_head.anchor_generator.strides == [stride]
    assert mm.model.roi_head.bbox_roi_extractor.featmap_strides == [stride]
    assert mm.model.data_preprocessor.pad_size_divisor == stride
    generator = AnchorGenerator(**{k: v for k, v in mm.model.rpn_head.anchor_generator.items()
                                   if k != "type"})  # fmt: skip
    _, n, _ = detection_geometry(arch)
    anchors = generator.grid_priors([(n, n)], device="cpu")[0]  # [n * n * A, 4], row-major
    centres_x = ((anchors[:, 0] + anchors[:, 2]) / 2).view(n, n, -1)[0, :, 0]
    expected = geo.first_center + 0.5 + stride * torch.arange(n)  # pixel index -> continuous
    assert torch.allclose(centres_x, expected.float())
