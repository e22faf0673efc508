# Faster R-CNN (RPN + RoI head, no FPN) on the pretext encoder's conv5, PASCAL VOC07 detection.
# A normal mmdet 3.3 config. transfer.detect fills in at run time: the backbone checkpoint and arch,
# data_root / ann files, metainfo classes (the dataset's; MiniVOC has 8), the schedule and work_dir.
# Sizes are small for a CPU and the built-in mini-VOC (images 96-160 px, small64 encoder, stride 8).
default_scope = "mmdet"
custom_imports = dict(imports=["transfer.mm_backbone"], allow_failed_imports=False)

backbone_channels = 96  # conv5 of small64 (alexnet227: 256)
backbone_stride = 8  # conv5 of small64 (alexnet227: 16)
num_classes = 8
image_scale = (160, 128)  # (long, short) side bound, keep_ratio
max_iters = 300
val_interval = 300
lr = 0.02

model = dict(
    type="FasterRCNN",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[127.5, 127.5, 127.5],  # -> [-1, 1] as in pretext training
        std=[127.5, 127.5, 127.5],
        bgr_to_rgb=True,
        pad_size_divisor=backbone_stride,
    ),
    backbone=dict(
        type="PretextAlexNet",
        checkpoint=None,
        arch="small64",
        out_features=("conv5",),
        frozen_stages=0,
    ),
    rpn_head=dict(
        type="RPNHead",
        in_channels=backbone_channels,
        feat_channels=128,
        anchor_generator=dict(
            type="AnchorGenerator",
            scales=[2, 4, 8],
            ratios=[0.5, 1.0, 2.0],
            strides=[backbone_stride],
        ),
        bbox_coder=dict(
            type="DeltaXYWHBBoxCoder",
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0],
        ),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
    ),
    roi_head=dict(
        type="StandardRoIHead",
        bbox_roi_extractor=dict(
            type="SingleRoIExtractor",
            roi_layer=dict(type="RoIAlign", output_size=4, sampling_ratio=0),
            out_channels=backbone_channels,
            featmap_strides=[backbone_stride],
        ),
        bbox_head=dict(
            type="Shared2FCBBoxHead",
            in_channels=backbone_channels,
            fc_out_channels=256,
            roi_feat_size=4,
            num_classes=num_classes,
            bbox_coder=dict(
                type="DeltaXYWHBBoxCoder",
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2],
            ),
            reg_class_agnostic=False,
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        ),
    ),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type="MaxIoUAssigner",
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1,
            ),
            sampler=dict(
                type="RandomSampler",
                num=128,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False,
            ),
            allowed_border=-1,
            pos_weight=-1,
            debug=False,
        ),
        rpn_proposal=dict(
            nms_pre=1000, max_per_img=300, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0
        ),
        rcnn=dict(
            assigner=dict(
                type="MaxIoUAssigner",
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=False,
                ignore_iof_thr=-1,
            ),
            sampler=dict(
                type="RandomSampler",
                num=128,
                pos_fraction=0.25,
                neg_pos_ub=-1,
                add_gt_as_proposals=True,
            ),
            pos_weight=-1,
            debug=False,
        ),
    ),
    test_cfg=dict(
        rpn=dict(
            nms_pre=600, max_per_img=100, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0
        ),
        rcnn=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.5), max_per_img=50),
    ),
)

dataset_type = "VOCDataset"
data_root = "data/minivoc/"  # the folder holding VOC2007/
metainfo = dict(classes=("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat"))
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=image_scale, keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file="VOC2007/ImageSets/Main/trainval.txt",
        data_prefix=dict(sub_data_root="VOC2007/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=8, bbox_min_size=4),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        ann_file="VOC2007/ImageSets/Main/test.txt",
        data_prefix=dict(sub_data_root="VOC2007/"),
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
# VOC2007 protocol: 11-point interpolated AP at IoU 0.5, difficult objects ignored.
# DatasetClassVOCMetric (transfer/mm_backbone.py) = VOCMetric naming the dataset's classes + AP_<class>.
val_evaluator = dict(type="DatasetClassVOCMetric", metric="mAP", eval_mode="11points")
test_evaluator = val_evaluator

train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=lr, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=10, norm_type=2),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=50, end=max_iters, eta_min=lr * 0.01),
]

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=25),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=100, max_keep_ckpts=1),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),
)
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=25, by_epoch=False)
log_level = "INFO"
load_from = None
resume = False
