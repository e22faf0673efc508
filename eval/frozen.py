"""Frozen-feature evaluation of one pretext checkpoint, as the field runs it: ``python -m eval.frozen``.

    python -m eval.frozen checkpoint=runs/builtin/pretext/context_encoder/seed0 \
        data=data/minivoc/VOC2007 run_dir=runs/builtin/eval/frozen/context_encoder/seed0

1. **VOC07 linear SVMs per layer** (Goyal et al., *Scaling and Benchmarking Self-Supervised Visual
   Representation Learning*, ICCV 2019; VISSL ``vissl/utils/svm_utils/svm_trainer.py`` and
   ``configs/config/benchmark/linear_image_classification/voc07/eval_alexnet_8gpu_transfer_voc07_svm.yaml``):
   conv1 ... conv5 (after ReLU) average-pooled to about 9k dimensions (:func:`pool_spec`), and the
   bottleneck (channel-wise FC / 4000-d FC) flattened; features L2-normalised; per class
   ``LinearSVC``'s problem (L2 penalty, squared hinge, ``class_weight={+1: 2, -1: 1}``; solved
   exactly from the Gram matrix by :func:`fit_l2svm`, or by ``LinearSVC`` with
   ``svm.solver=liblinear``) for every cost of
   ``svm.costs`` (VISSL's AlexNet list), the cost with the best 3-fold cross-validated AP on
   ``train_split`` refitted on all of it, AP on ``test_split`` by the VOC07 rules
   (``core.voc_ap``: difficult-only entries left out, 11-point AP). As in VISSL, difficult-only
   entries are negatives when training. Classes run in parallel (joblib, ``num_workers``).
   **Low-shot** (Goyal et al. 2019 §6.2, VISSL's ``svm_low_shot_trainer.py``): on the layer chosen
   by cross-validation, SVMs trained on k positives and (C - 1) k negatives per class
   (``lowshot.k``, ``lowshot.samples`` independent samples, the same for every checkpoint), test
   mAP mean and std over the samples (:func:`lowshot_layer`; the cost is chosen on the sample, not
   on test as in VISSL).
2. **kNN** (dinov2 ``eval/knn.py``, mmselfsup's kNN: cosine similarity, k = 20, votes weighted by
   exp(sim / T), T = 0.07) through a FAISS inner-product index. VOC is multi-label, so a query's
   score for class c is the weighted vote of its neighbours that have c, and the result is VOC07 AP
   over those scores (``knn_mAP``), not top-1 accuracy.

No choice is made on test data: the SVM's best layer (``svm_best_*``) is the one with the best mean
cross-validated AP on ``train_split``; kNN's layer (``knn_*``) the one with the best leave-one-out
kNN mAP on ``train_split``. Test numbers of every layer are recorded too (the Zhang et al. 2017
layer plot). Features are extracted once per (checkpoint sha256, data, split, image size, layer,
pooling) and cached (:func:`eval.features.cached`); finished layers are kept in
``<run_dir>/layers/<layer>.json``, so a killed run resumes at the next layer.

Result keys (``result.json``, written atomically and last): ``svm_<layer>_mAP``,
``svm_<layer>_cv_mAP``, ``svm_<layer>_AP_<class>``, ``svm_best_mAP``, ``svm_best_layer`` (1-based
index into conv1..conv5, bottleneck), ``knn_<layer>_mAP``, ``knn_<layer>_loo_mAP``, ``knn_mAP``,
``knn_layer``, ``dim_<layer>``, ``n_train``, ``n_test``, ``extract_s``, ``svm_s``, ``knn_s``,
``time_s``; with ``lowshot.k``: ``lowshot_k<k>_mAP`` / ``lowshot_k<k>_std`` (mean / sample std of the
test mAP over ``lowshot.samples`` samples, on the SVM's layer; a k that cannot be drawn is not
recorded) and ``lowshot_s``. Beside it, ``scores.npz`` (:mod:`core.image_scores`): the test scores
behind every ``svm_*_mAP`` / ``knn_*_mAP`` (not low-shot), for the tables' test-image bootstrap.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC
from torch import nn
from torch.utils.data import DataLoader

from core import image_scores, run_folder
from core.atomic_io import atomic_save, atomic_write_json
from core.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from core.cli import run_cli
from core.config import ConfigError, parse_cli
from core.data import to_unit_range
from core.datasets import VOCClassification
from core.models import AlexNetEncoder, ContextEncoder, DCGANEncoder
from core.stage_inputs import Input
from core.voc_ap import mean_ap, voc07_classification_ap
from core.voc_splits import dataset_classes, require_split, voc_root
from eval.features import (
    DEFAULT_CACHE_DIR,
    cached,
    dataset_identity,
    identity_key,
    l2_normalize,
    pick_device,
)
from eval.retrieval import build_index, search

log = logging.getLogger("eval.frozen")

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "bottleneck")
# VISSL's cost list for the AlexNet VOC07 SVM benchmark (eval_alexnet_8gpu_transfer_voc07_svm.yaml).
VISSL_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
TARGET_DIM = 9216  # VISSL's AlexNet pooling gives 9600 / 9216 / 9600 / 9600 / 9216 at 227 px


@dataclass
class SVMConfig:
    costs: tuple[float, ...] = VISSL_COSTS
    folds: int = 3  # cross-validation folds on train_split (VISSL: cross_val_folds 3)
    positive_weight: float = 2.0  # class_weight {+1: 2, -1: 1}
    solver: Literal["newton", "liblinear"] = "newton"  # same objective; see fit_l2svm
    max_iter: int = 2000  # liblinear only
    tol: float = 1e-4  # liblinear only


@dataclass
class KNNConfig:
    k: int = 20
    temperature: float = 0.07


@dataclass
class LowShotConfig:
    # positives per class (Goyal et al. 2019 / VISSL: 1, 2, 4, 8, 16, 32, 64, 96; the mini-VOC's
    # trainval has ~80-115 positives per class and too few negatives for 64 x 7); () = off
    k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    samples: int = 5  # independent samples per k (VISSL: 5)


@dataclass
class Config:
    checkpoint: str = ""  # pretext checkpoint (.pt) or pretext run folder
    data: str = "data/minivoc/VOC2007"  # VOC root
    run_dir: str = "runs/eval/frozen/default"
    seed: int = 0  # unused (deterministic); accepted for sweep launchers
    train_split: str = "trainval"
    test_split: str = "test"
    layers: tuple[str, ...] = LAYERS
    target_dim: int = TARGET_DIM  # pooled dimensions aimed at per conv layer (pool_spec)
    svm: SVMConfig = field(default_factory=SVMConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    lowshot: LowShotConfig = field(default_factory=LowShotConfig)
    ap_mode: Literal["11points", "area"] = "11points"
    cache_dir: str = DEFAULT_CACHE_DIR
    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 2  # joblib workers of the SVM sweep (classes in parallel)
    force: bool = False  # recompute a finished run folder / reuse one started differently


# Keys that may change between a run and a re-run of its folder (core.run_folder.open_run).
FREE_KEYS = {"force", "num_workers", "device", "cache_dir"}


def check_config(cfg: Config) -> Config:
    bad = [layer for layer in cfg.layers if layer not in LAYERS]
    if bad or not cfg.layers:
        raise ConfigError(
            f"layers: unknown or empty {bad or list(cfg.layers)}; choose from {LAYERS}"
        )
    if not cfg.svm.costs or min(cfg.svm.costs) <= 0:
        raise ConfigError(f"svm.costs must be positive numbers, got {cfg.svm.costs}")
    if cfg.svm.folds < 2:
        raise ConfigError(f"svm.folds must be >= 2, got {cfg.svm.folds}")
    if cfg.knn.k < 1 or cfg.knn.temperature <= 0:
        raise ConfigError(f"knn.k must be >= 1 and knn.temperature > 0, got {cfg.knn}")
    if any(k < 1 for k in cfg.lowshot.k) or cfg.lowshot.samples < 1:
        raise ConfigError(f"lowshot.k must be >= 1 and lowshot.samples >= 1, got {cfg.lowshot}")
    if cfg.target_dim < 1:
        raise ConfigError(f"target_dim must be >= 1, got {cfg.target_dim}")
    return cfg


def parse_config(argv: list[str] | None = None) -> Config:
    flags = {"checkpoint": "pretext checkpoint (.pt or run folder)",
             "data": "VOC root, e.g. VOCdevkit/VOC2007"}  # fmt: skip
    return check_config(parse_cli(Config, argv, __doc__, "svm.costs=[0.1,1,10]", flags))


# ---- features -----------------------------------------------------------------------------------


def pool_spec(size: int, channels: int, target_dim: int = TARGET_DIM) -> tuple[int, int]:
    """(kernel, stride) of the average pooling that brings a [channels, size, size] map to about
    ``target_dim`` values.

    Output side g = round(sqrt(target_dim / channels)), at most ``size``; stride s =
    round(size / (g + 4)) (at least 1), kernel = size - s (g - 1), so each window is about five
    strides wide. This reproduces VISSL's AlexNet pooling at 227 px exactly: conv1 55x55x96 -> k19 s4
    (10x10, 9600 d), conv2 27x27x256 -> k12 s3 (6x6, 9216), conv3/conv4 13x13x384 -> k9 s1 (5x5,
    9600), conv5 13x13x256 -> k8 s1 (6x6, 9216).
    """
    side = min(size, max(1, round(math.sqrt(target_dim / channels))))
    stride = max(1, round(size / (side + 4)))
    kernel = size - stride * (side - 1)
    assert kernel >= 1 and (size - kernel) // stride + 1 == side, (size, channels, side, stride)
    return kernel, stride


def conv_maps(model: ContextEncoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """x: [N, 3, S, S] in [-1, 1] -> {'conv1'..'conv5': [N, Ci, hi, hi], 'bottleneck': [N, ...]}.

    AlexNet-style encoders: conv1..conv5 after their ReLU (VISSL's AlexNet eval features); the
    128-px DCGAN encoder: the output of each of its five k4 s2 blocks (after LeakyReLU).
    """
    encoder = model.encoder
    if isinstance(encoder, AlexNetEncoder):
        maps = encoder.forward_features(x)
        out = maps.pop("pool5")
    elif isinstance(encoder, DCGANEncoder):
        maps, out, i = {}, x, 0
        for layer in encoder.layers:
            out = layer(out)
            if isinstance(layer, nn.LeakyReLU):
                i += 1
                maps[f"conv{i}"] = out.clone()  # the next block's LeakyReLU is in place
    else:
        raise CheckpointError(f"no conv1..conv5 features for encoder {type(encoder).__name__}")
    maps["bottleneck"] = model.forward_bottleneck(out)
    return maps


@torch.no_grad()
def layer_shapes(model: ContextEncoder) -> dict[str, tuple[int, ...]]:
    """Shape of each layer's map for one image of the model's input size."""
    model.eval()
    size = model.input_size
    return {
        k: tuple(v.shape[1:]) for k, v in conv_maps(model, torch.zeros(1, 3, size, size)).items()
    }


def pooling_for(model: ContextEncoder, target_dim: int) -> dict[str, tuple[int, int] | None]:
    """layer -> (kernel, stride) of its average pooling, None for the (flattened) bottleneck."""
    out: dict[str, tuple[int, int] | None] = {}
    for name, shape in layer_shapes(model).items():
        out[name] = None if name == "bottleneck" else pool_spec(shape[-1], shape[0], target_dim)
    return out


def pool_and_flatten(fmap: torch.Tensor, spec: tuple[int, int] | None) -> torch.Tensor:
    """[N, C, h, h] -> [N, D]: average-pooled with (kernel, stride) = ``spec``, flattened."""
    if spec is not None:
        fmap = F.avg_pool2d(fmap, spec[0], spec[1])
    return fmap.flatten(1)


@torch.no_grad()
def encode_layers(
    model: ContextEncoder,
    images: VOCClassification,
    pooling: dict[str, tuple[int, int] | None],
    layers: tuple[str, ...],
    batch_size: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """One pass over ``images``: {layer: float32 [N, D]} of pooled, flattened features (raw)."""
    model.eval().to(device)
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for batch, _, _ in DataLoader(images, batch_size=batch_size):
        maps = conv_maps(model, to_unit_range(batch).to(device))
        for layer in layers:
            out[layer].append(pool_and_flatten(maps[layer], pooling[layer]).float().cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def _as_list(spec: tuple[int, int] | None) -> list[int] | None:
    """JSON form of a pooling spec (cache identities are compared after a JSON round trip)."""
    return None if spec is None else [int(v) for v in spec]


def split_features(
    model: ContextEncoder,
    sha256: str,
    images: VOCClassification,
    root: Path,
    split: str,
    cfg: Config,
) -> dict[str, np.ndarray]:
    """{layer: float32 [N, D]} for ``split``, from the cache or one encoding pass for all layers."""
    pooling = pooling_for(model, cfg.target_dim)
    data = dataset_identity(images, root, split)
    computed: dict[str, np.ndarray] = {}

    def compute(layer: str):
        if not computed:  # first miss: encode every layer at once
            log.info("encoding %d images of %s/%s", len(images), root, split)
            device = pick_device(cfg.device)
            computed.update(
                encode_layers(model, images, pooling, cfg.layers, cfg.batch_size, device)
            )
        return computed[layer], list(images.ids)

    feats = {}
    for layer in cfg.layers:
        identity = {"checkpoint_sha256": sha256, "data": data, "layer": layer,
                    "pooling": _as_list(pooling[layer]), "protocol": "frozen"}  # fmt: skip
        fs = cached(cfg.cache_dir, f"frozen-{layer}-{split}", identity, partial(compute, layer))
        if fs.ids != list(images.ids):
            raise ValueError(
                f"{cfg.cache_dir}: cached ids of {layer}/{split} do not match the split"
            )
        feats[layer] = fs.features
    return feats


# ---- VOC07 linear SVM ---------------------------------------------------------------------------


def svm_targets(labels: np.ndarray) -> np.ndarray:
    """labels [N] (1 = present) -> SVM targets {+1, -1}; difficult-only entries are negatives
    when training, as in VISSL's svm_trainer (label 0 -> -1)."""
    return np.where(np.asarray(labels) > 0.5, 1, -1).astype(np.int32)


def make_svm(cost: float, cfg: SVMConfig) -> LinearSVC:
    """VISSL's SVM (svm_trainer.py): L2 penalty, squared hinge, dual, class weights {+1: 2, -1: 1}."""
    return LinearSVC(
        C=cost,
        class_weight={1: cfg.positive_weight, -1: 1.0},
        penalty="l2",
        loss="squared_hinge",
        dual=True,
        tol=cfg.tol,
        max_iter=cfg.max_iter,
        intercept_scaling=1.0,
        random_state=0,
    )


def l2svm_objective(gram: np.ndarray, y: np.ndarray, c: np.ndarray, beta: np.ndarray):
    """(objective, f = gram @ beta) of the kernelised L2-regularised squared-hinge SVM."""
    f = gram @ beta
    margin = np.maximum(0.0, 1.0 - y * f)
    return 0.5 * float(beta @ f) + float(np.sum(c * margin * margin)), f


def fit_l2svm(
    gram: np.ndarray,
    y: np.ndarray,
    cost: float,
    positive_weight: float = 2.0,
    beta: np.ndarray | None = None,
    max_iter: int = 200,
) -> np.ndarray:
    """Exact solution of LinearSVC's problem, from the Gram matrix: coefficients beta [N].

    liblinear's L2-regularised squared-hinge SVC with the bias as a feature of value
    ``intercept_scaling`` = 1 minimises 0.5 |w~|^2 + sum_i C_i max(0, 1 - y_i w~.x~_i)^2 over
    w~ = [w, b], with C_i = C * class_weight[y_i]. Its optimum is w~ = sum_i beta_i x~_i, and with
    ``gram`` = X X^T + 1 (= X~ X~^T) the decision values are gram @ beta. Solved by Chapelle's
    primal Newton method (*Training a support vector machine in the primal*, Neural Computation
    2007, §4 with the squared hinge): on the current support set S = {i: y_i f_i < 1},
    (gram_SS + diag(1 / (2 C_S))) beta_S = y_S, beta elsewhere 0, a backtracking line search on the
    objective, until S no longer changes (then the KKT conditions hold exactly). On our problems
    (N <= a few thousand, D ~ 9k, N << D) this is an N x N solve per step instead of liblinear's
    D-dimensional coordinate descent, which needs thousands of passes at large C.
    """
    y = np.asarray(y, np.float64)
    c = cost * np.where(y > 0, positive_weight, 1.0)
    beta = np.zeros(len(y)) if beta is None else beta.astype(np.float64, copy=True)
    obj, f = l2svm_objective(gram, y, c, beta)
    support = y * f < 1
    for _ in range(max_iter):
        idx = np.flatnonzero(support)
        target = np.zeros(len(y))
        if len(idx):
            system = gram[np.ix_(idx, idx)]  # a copy: the diagonal is added in place
            system[np.diag_indices_from(system)] += 0.5 / c[idx]
            # symmetric positive definite (a Gram matrix + a positive diagonal): Cholesky, about
            # half the work of np.linalg.solve's LU
            target[idx] = scipy.linalg.cho_solve(scipy.linalg.cho_factor(system), y[idx])
        step = 1.0
        while True:
            cand = beta + step * (target - beta)
            cand_obj, cand_f = l2svm_objective(gram, y, c, cand)
            if cand_obj <= obj + 1e-12 * abs(obj) or step < 1e-10:
                break
            step *= 0.5
        beta, obj, f = cand, cand_obj, cand_f
        new_support = y * f < 1
        if step == 1.0 and np.array_equal(new_support, support):
            break
        support = new_support
    return beta


def svm_one_class(
    x_train: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    cfg: SVMConfig,
    gram: np.ndarray | None = None,
    gram_test: np.ndarray | None = None,
) -> tuple[np.ndarray, float, np.ndarray]:
    """One class: (cross-validated AP per cost [len(costs)], chosen cost, test scores [M]).

    x_*: L2-normalised features; y: {+1, -1} [N]. ``svm.solver``: ``newton`` (:func:`fit_l2svm` on
    ``gram`` = x_train x_train^T + 1 and ``gram_test`` = x_test x_train^T + 1) or ``liblinear``
    (sklearn's LinearSVC on the features, VISSL's code path; same objective). AP of a fold:
    sklearn's ``average_precision`` (VISSL's ``cross_val_score(..., scoring="average_precision")``);
    folds: stratified, unshuffled. The chosen cost maximises the mean fold AP (the first one on
    ties). With fewer than two positives (or negatives) there is no cross-validation: CV AP is NaN
    and C = 1 is used; with no positive at all, the test scores are NaN.
    """
    n_pos, n_neg = int((y == 1).sum()), int((y == -1).sum())
    cv_ap = np.full(len(cfg.costs), np.nan)
    if n_pos == 0 or n_neg == 0:
        return cv_ap, float("nan"), np.full(len(x_test), np.nan)
    if cfg.solver == "newton":
        if gram is None:
            gram = x_train @ x_train.T + 1.0
        if gram_test is None:
            gram_test = x_test @ x_train.T + 1.0
    warm: dict[int, np.ndarray] = {}
    fold_gram: dict[int, np.ndarray] = {}  # each fold's training block, cut once for all costs

    def fit_predict(rows: np.ndarray, cost: float, fold: int, pred: str | np.ndarray):
        """Scores of ``pred`` (rows of x_train, or 'test') by an SVM fitted on rows ``rows``."""
        if cfg.solver == "newton":
            if fold not in fold_gram:
                fold_gram[fold] = gram[np.ix_(rows, rows)]
            beta = fit_l2svm(fold_gram[fold], y[rows], cost, cfg.positive_weight, warm.get(fold))
            warm[fold] = beta  # costs ascend: the last solution is a good start
            cross = gram_test[:, rows] if isinstance(pred, str) else gram[np.ix_(pred, rows)]
            return cross @ beta
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = make_svm(cost, cfg).fit(x_train[rows], y[rows])
        return clf.decision_function(x_test if isinstance(pred, str) else x_train[pred])

    folds = min(cfg.folds, n_pos, n_neg)
    order = np.argsort(cfg.costs, kind="stable")
    if folds >= 2:
        splits = list(StratifiedKFold(folds).split(x_train, y))
        for j in order:
            aps = [
                average_precision_score(y[va] == 1, fit_predict(tr, cfg.costs[j], f, va))
                for f, (tr, va) in enumerate(splits)
            ]
            cv_ap[j] = float(np.mean(aps))
        cost = float(cfg.costs[int(np.argmax(cv_ap))])
    else:
        cost = 1.0
    return cv_ap, cost, fit_predict(np.arange(len(y)), cost, -1, "test")


def svm_inputs(
    x_train: np.ndarray, x_test: np.ndarray, solver: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(train, test) features L2-normalised in float64 (VISSL's ``normalize: True``) and, for the
    ``newton`` solver, gram = train train^T + 1 and gram_test = test train^T + 1 (else None)."""
    xtr = l2_normalize(x_train).astype(np.float64)
    xte = l2_normalize(x_test).astype(np.float64)
    if solver != "newton":
        return xtr, xte, None, None
    return xtr, xte, xtr @ xtr.T + 1.0, xte @ xtr.T + 1.0


def svm_layer(
    x_train: np.ndarray,
    labels_train: np.ndarray,
    x_test: np.ndarray,
    cfg: SVMConfig,
    n_jobs: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All classes of one layer: (test scores [M, C], CV AP [C, costs], chosen cost [C]).

    Features are L2-normalised here (VISSL's ``normalize: True``); classes run in ``n_jobs``
    threads (LAPACK and liblinear release the GIL, so the features are shared, not copied).
    """
    xtr, xte, gram, gram_test = svm_inputs(x_train, x_test, cfg.solver)
    jobs = (
        delayed(svm_one_class)(xtr, svm_targets(labels_train[:, c]), xte, cfg, gram, gram_test)
        for c in range(labels_train.shape[1])
    )
    out = Parallel(n_jobs=n_jobs, backend="threading")(jobs)
    scores = np.stack([o[2] for o in out], axis=1)
    return scores, np.stack([o[0] for o in out]), np.array([o[1] for o in out])


# ---- low-shot SVM -------------------------------------------------------------------------------


def lowshot_rows(
    labels: np.ndarray, difficult_only: np.ndarray, k: int, sample: int
) -> list[np.ndarray] | None:
    """Per class, the train rows of low-shot sample ``sample`` with ``k`` shots, or None when a
    class has fewer than k positives or (C - 1) k negatives.

    As VISSL's ``extra_scripts/create_voc07_low_shot_samples.py`` (Goyal et al. 2019, §6.2): for
    each class, k positives and (C - 1) k negatives drawn without replacement, a draw of its own per
    class; the other images are left out for that class. Negatives are images without the class
    (difficult-only ones are left out). The draw depends on (k, sample) only, not on the features:
    every method and seed is scored on the same subsets.
    """
    rng = np.random.default_rng([k, sample])
    num_classes = labels.shape[1]
    rows = []
    for c in range(num_classes):
        pos = np.flatnonzero(labels[:, c] > 0.5)
        neg = np.flatnonzero((labels[:, c] < 0.5) & ~(difficult_only[:, c] > 0.5))
        n_neg = (num_classes - 1) * k
        if len(pos) < k or len(neg) < n_neg:
            return None
        picked = np.concatenate(
            [rng.choice(pos, k, replace=False), rng.choice(neg, n_neg, replace=False)]
        )
        rows.append(np.sort(picked))
    return rows


def lowshot_layer(
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    cfg: Config,
) -> dict[str, list[float]]:
    """Low-shot VOC07 SVM of one layer: {str(k): test mAP of each sample} (NaN when the sample
    cannot be drawn, :func:`lowshot_rows`).

    Each class's SVM is :func:`svm_one_class` on its sample: features L2-normalised, the cost chosen
    by cross-validated AP on the sample itself (min(folds, k) folds; with k = 1 no
    cross-validation, C = 1). VISSL instead reports, per k, the cost whose mean *test* mAP is best;
    that is a choice made on the test split, which this benchmark does not make.
    """
    (xtr, ytr, dtr), (xte, yte, dte) = train, test
    xtr, xte, gram, gram_test = svm_inputs(xtr, xte, cfg.svm.solver)
    out: dict[str, list[float]] = {}
    for k in cfg.lowshot.k:
        maps = []
        for sample in range(cfg.lowshot.samples):
            rows = lowshot_rows(ytr, dtr, k, sample)
            if rows is None:
                maps.append(float("nan"))
                continue
            jobs = (
                delayed(svm_one_class)(
                    xtr[r],
                    svm_targets(ytr[r, c]),
                    xte,
                    cfg.svm,
                    None if gram is None else gram[np.ix_(r, r)],
                    None if gram_test is None else gram_test[:, r],
                )
                for c, r in enumerate(rows)
            )
            scores = np.stack(
                [o[2] for o in Parallel(n_jobs=cfg.num_workers, backend="threading")(jobs)], axis=1
            )
            maps.append(mean_ap(voc07_classification_ap(scores, yte, dte, cfg.ap_mode)))
        out[str(k)] = maps
    return out


# ---- kNN ----------------------------------------------------------------------------------------


def knn_scores(
    db: np.ndarray,
    db_labels: np.ndarray,
    queries: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
) -> np.ndarray:
    """Weighted kNN votes [Q, C] (dinov2 / mmselfsup kNN, multi-label).

    Cosine similarity (L2-normalised features, FAISS inner-product index); the k nearest database
    rows vote for their classes with weight softmax(sim / temperature) over the k neighbours
    (dinov2 ``eval/knn.py``). The softmax matters here: VOC AP ranks scores *across* queries, and
    unnormalised exp(sim / T) would rank by how close a query's neighbours are, not by whether
    they have the class. ``exclude_self``: queries are the database rows themselves
    (leave-one-out); each query's own row is dropped.
    """
    db_n, q_n = l2_normalize(db), l2_normalize(queries)
    index = build_index(db_n, "flat", "ip")
    extra = 1 if exclude_self else 0
    sims, ids = search(index, q_n, min(k + extra, len(db_n)))
    if exclude_self:
        keep = ids != np.arange(len(q_n))[:, None]
        keep[keep.sum(1) > k, -1] = False  # own row not found: drop the last instead
        sims = sims[keep].reshape(len(q_n), -1)
        ids = ids[keep].reshape(len(q_n), -1)
    logits = sims.astype(np.float64) / temperature
    weights = np.exp(logits - logits.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)  # [Q, k], softmax over the neighbours
    votes = np.asarray(db_labels, np.float64)[ids]  # [Q, k, C]
    return np.einsum("qk,qkc->qc", weights, votes)


# ---- the stage ----------------------------------------------------------------------------------


def evaluate_layer(
    layer: str,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    classes: tuple[str, ...],
    cfg: Config,
    test_scores: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """SVM and kNN numbers of one layer, and the SVM's chosen cost / CV APs per class.

    train / test: (features [N, D], labels [N, C], difficult_only [N, C]). ``test_scores``, when
    given, receives the test scores [M, C] behind ``svm_<layer>_mAP`` and ``knn_<layer>_mAP``.
    """
    (xtr, ytr, dtr), (xte, yte, dte) = train, test
    out: dict[str, float] = {f"dim_{layer}": float(xtr.shape[1])}
    t0 = time.perf_counter()
    scores, cv_ap, costs = svm_layer(xtr, ytr, xte, cfg.svm, cfg.num_workers)
    test_ap = voc07_classification_ap(scores, yte, dte, cfg.ap_mode)
    test_ap[np.isnan(scores).all(0)] = np.nan  # no training positive: no SVM, no AP
    out[f"svm_{layer}_mAP"] = mean_ap(test_ap)
    best_cv = np.array([np.nanmax(row) if np.isfinite(row).any() else np.nan for row in cv_ap])
    out[f"svm_{layer}_cv_mAP"] = mean_ap(best_cv)
    out.update({f"svm_{layer}_AP_{c}": float(ap) for c, ap in zip(classes, test_ap)})
    out["svm_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    k, temp = cfg.knn.k, cfg.knn.temperature
    loo = knn_scores(xtr, ytr * (1 - dtr), xtr, k, temp, exclude_self=True)
    out[f"knn_{layer}_loo_mAP"] = mean_ap(voc07_classification_ap(loo, ytr, dtr, cfg.ap_mode))
    test_knn = knn_scores(xtr, ytr * (1 - dtr), xte, k, temp)
    out[f"knn_{layer}_mAP"] = mean_ap(voc07_classification_ap(test_knn, yte, dte, cfg.ap_mode))
    out["knn_s"] = time.perf_counter() - t0
    if test_scores is not None:
        test_scores.update({f"svm_{layer}_mAP": scores, f"knn_{layer}_mAP": test_knn})
    chosen = {c: {"C": float(cost), "cv_ap": [float(a) for a in row]}
              for c, cost, row in zip(classes, costs, cv_ap)}  # fmt: skip
    return out, {"costs": list(cfg.svm.costs), "classes": chosen}


def best_layer(result: dict[str, float], layers: tuple[str, ...], key: str) -> str:
    """The layer with the highest ``result[key.format(layer)]`` (NaN last, earliest on ties)."""
    values = [result[key.format(layer)] for layer in layers]
    values = [v if math.isfinite(v) else -math.inf for v in values]
    return layers[int(np.argmax(values))]


def check_data(cfg: Config) -> tuple[Path, tuple[str, ...]]:
    """(VOC root, its classes): the root, its class list and its train / test split files."""
    root = voc_root(cfg.data)
    classes = dataset_classes(root, ())
    for split in (cfg.train_split, cfg.test_split):
        require_split(root, split)
    return root, classes


def input_checks(cfg: Config) -> list[Input]:
    """The run's inputs with the checks main makes of them (core.preflight)."""
    return [
        Input("checkpoint", cfg.checkpoint, lambda: run_folder.source_meta(cfg.checkpoint)),
        Input("data", cfg.data, lambda: check_data(cfg)),
    ]


def main(cfg: Config) -> dict[str, float]:
    """Run (or return the recorded result of) the frozen-feature evaluation in ``cfg.run_dir``."""
    cfg = check_config(cfg)
    run_dir = Path(cfg.run_dir)
    source = run_folder.source_meta(cfg.checkpoint)
    done = run_folder.open_run(run_dir, cfg, FREE_KEYS, {"checkpoint": source})
    if done is not None:
        return done
    state = load_checkpoint(cfg.checkpoint)
    model = model_from_checkpoint(state, cfg.checkpoint).eval()
    root, classes = check_data(cfg)
    size = model.input_size
    pooling = pooling_for(model, cfg.target_dim)
    meta = {"task": "frozen", "source": source, "seed": cfg.seed, "data": str(root),
            "classes": list(classes), "image_size": size, "layers": list(cfg.layers),
            "pooling": {k: v for k, v in pooling.items() if k in cfg.layers}}  # fmt: skip
    run_folder.start(run_dir, cfg, meta, {"checkpoint": source})
    t0 = time.perf_counter()
    data, ids = {}, {}
    for split in (cfg.train_split, cfg.test_split):
        images = VOCClassification(root, split, size, False, classes)
        with torch.no_grad():  # not set_grad_enabled(False): main() is called in-process too
            feats = split_features(model, source["sha256"], images, root, split, cfg)
        data[split] = (feats, images.labels.numpy(), images.difficult_only.numpy())
        ids[split] = list(images.ids)
    extract_s = time.perf_counter() - t0
    log.info("features of %s ready in %.1f s", cfg.checkpoint, extract_s)

    result: dict[str, float] = {"extract_s": extract_s, "svm_s": 0.0, "knn_s": 0.0}
    protocol = {"svm": asdict(cfg.svm), "knn": asdict(cfg.knn), "ap_mode": cfg.ap_mode,
                "sha256": source["sha256"], "data": str(root), "target_dim": cfg.target_dim,
                "splits": [cfg.train_split, cfg.test_split]}  # fmt: skip
    test_scores: dict[str, np.ndarray] = {}  # metric -> test scores (core.image_scores)
    for layer in cfg.layers:
        part_path = run_dir / "layers" / f"{layer}.json"
        scores_path = run_dir / "layers" / f"{layer}.scores.npz"
        key = identity_key({**protocol, "layer": layer, "pooling": _as_list(pooling[layer])})
        part = json.loads(part_path.read_text()) if part_path.exists() else {}
        if part.get("key") != key:
            train = tuple(
                [data[cfg.train_split][0][layer], *data[cfg.train_split][1:]]
            )  # fmt: skip
            test = tuple([data[cfg.test_split][0][layer], *data[cfg.test_split][1:]])
            scores: dict[str, np.ndarray] = {}
            numbers, svm = evaluate_layer(layer, train, test, classes, cfg, scores)
            part = {"key": key, "result": numbers, "svm": svm}
            atomic_save(scores_path, lambda fh, s=scores: np.savez(fh, **s))  # before its part
            atomic_write_json(part_path, part)
        if scores_path.exists():  # a part finished before scores were recorded has none
            with np.load(scores_path) as saved:
                test_scores.update({k: saved[k] for k in saved.files})
        layer_result = dict(part["result"])
        result["svm_s"] += layer_result.pop("svm_s")
        result["knn_s"] += layer_result.pop("knn_s")
        result.update(layer_result)
        log.info(
            "%s (%d d): SVM test mAP %.4f (cv %.4f), kNN test mAP %.4f (loo %.4f)",
            layer, layer_result[f"dim_{layer}"], layer_result[f"svm_{layer}_mAP"],
            layer_result[f"svm_{layer}_cv_mAP"], layer_result[f"knn_{layer}_mAP"],
            layer_result[f"knn_{layer}_loo_mAP"],
        )  # fmt: skip

    svm_best = best_layer(result, cfg.layers, "svm_{}_cv_mAP")
    knn_best = best_layer(result, cfg.layers, "knn_{}_loo_mAP")
    if cfg.lowshot.k:  # on the SVM's layer (chosen by cross-validation on train_split)
        part_path = run_dir / "layers" / "lowshot.json"
        key = identity_key({**protocol, "layer": svm_best, "lowshot": asdict(cfg.lowshot),
                            "pooling": _as_list(pooling[svm_best])})  # fmt: skip
        part = json.loads(part_path.read_text()) if part_path.exists() else {}
        if part.get("key") != key:
            t1 = time.perf_counter()
            split = {name: (data[name][0][svm_best], *data[name][1:]) for name in data}
            maps = lowshot_layer(split[cfg.train_split], split[cfg.test_split], cfg)
            part = {"key": key, "test_mAP": maps, "lowshot_s": time.perf_counter() - t1}
            atomic_write_json(part_path, part)
        result["lowshot_s"] = part["lowshot_s"]
        for k, maps in part["test_mAP"].items():
            values = np.array(maps, np.float64)
            if not np.isfinite(values).all():  # too few positives / negatives for this k
                log.warning("low-shot SVM, k=%s: no sample can be drawn from %s; not recorded",
                            k, cfg.train_split)  # fmt: skip
                continue
            result[f"lowshot_k{k}_mAP"] = float(values.mean())
            result[f"lowshot_k{k}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            log.info("low-shot SVM (%s), k=%s: test mAP %.4f ± %.4f over %d samples",
                     svm_best, k, result[f"lowshot_k{k}_mAP"], result[f"lowshot_k{k}_std"],
                     len(values))  # fmt: skip
    headline = {
        "svm_best_mAP": result[f"svm_{svm_best}_mAP"],
        "svm_best_layer": float(LAYERS.index(svm_best) + 1),
        "knn_mAP": result[f"knn_{knn_best}_mAP"],
        "knn_layer": float(LAYERS.index(knn_best) + 1),
        "n_train": float(len(data[cfg.train_split][1])),
        "n_test": float(len(data[cfg.test_split][1])),
    }
    result = {**headline, **result, "time_s": time.perf_counter() - t0}
    aliases = {"svm_best_mAP": f"svm_{svm_best}_mAP", "knn_mAP": f"knn_{knn_best}_mAP"}
    test_scores.update({a: test_scores[k] for a, k in aliases.items() if k in test_scores})
    if test_scores:
        _, labels, difficult = data[cfg.test_split]
        image_scores.save(run_dir, ids[cfg.test_split], labels, difficult, cfg.ap_mode, test_scores)
    log.info("best SVM layer (cv) %s: test mAP %.4f; kNN layer (loo) %s: test mAP %.4f",
             svm_best, headline["svm_best_mAP"], knn_best, headline["knn_mAP"])  # fmt: skip
    meta = {
        **meta,
        "svm_best_layer": svm_best,
        "knn_layer": knn_best,
        "elapsed_s": result["time_s"],
    }
    return run_folder.finish(run_dir, result, meta)


def cli(argv: list[str] | None = None) -> dict[str, float]:
    """User mistakes: one 'error:' line, exit 2 (core.cli.run_cli)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_cli(lambda: main(parse_config(argv)))


if __name__ == "__main__":
    cli()
