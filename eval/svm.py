"""VOC07 linear SVMs on frozen features, and their low-shot variant (eval/frozen.py runs them).

Goyal et al., *Scaling and Benchmarking Self-Supervised Visual Representation Learning*, ICCV 2019;
VISSL ``vissl/utils/svm_utils/svm_trainer.py`` and ``configs/config/benchmark/
linear_image_classification/voc07/eval_alexnet_8gpu_transfer_voc07_svm.yaml``: features
L2-normalised; per class ``LinearSVC``'s problem (L2 penalty, squared hinge, ``class_weight={+1: 2,
-1: 1}``; solved exactly from the Gram matrix by :func:`fit_l2svm`, or by ``LinearSVC`` with
``solver=liblinear``) for every cost of ``costs`` (VISSL's AlexNet list), the cost with the best
3-fold cross-validated AP refitted on all of the training set. As in VISSL, difficult-only entries
are negatives when training. Classes run in parallel (joblib threads).

**Low-shot** (Goyal et al. 2019 §6.2, VISSL's ``svm_low_shot_trainer.py``): SVMs trained on k
positives and (C - 1) k negatives per class (``lowshot.k``, ``lowshot.samples`` independent
samples, the same for every checkpoint), test mAP of each sample (:func:`lowshot_layer`; the cost
is chosen on the sample, not on test as in VISSL).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

from core.features import l2_normalize
from core.voc_ap import mean_ap, voc07_classification_ap

# VISSL's cost list for the AlexNet VOC07 SVM benchmark (eval_alexnet_8gpu_transfer_voc07_svm.yaml).
VISSL_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)


@dataclass
class SVMConfig:
    costs: tuple[float, ...] = VISSL_COSTS
    folds: int = 3  # cross-validation folds on train_split (VISSL: cross_val_folds 3)
    positive_weight: float = 2.0  # class_weight {+1: 2, -1: 1}
    solver: Literal["newton", "liblinear"] = "newton"  # same objective; see fit_l2svm
    max_iter: int = 2000  # liblinear only
    tol: float = 1e-4  # liblinear only


@dataclass
class LowShotConfig:
    # positives per class (Goyal et al. 2019 / VISSL: 1, 2, 4, 8, 16, 32, 64, 96; the mini-VOC's
    # trainval has ~80-115 positives per class and too few negatives for 64 x 7); () = off
    k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    samples: int = 5  # independent samples per k (VISSL: 5)


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
    svm: SVMConfig,
    lowshot: LowShotConfig,
    ap_mode: str = "11points",
    n_jobs: int = 1,
) -> dict[str, list[float]]:
    """Low-shot VOC07 SVM of one layer: {str(k): test mAP of each sample} (NaN when the sample
    cannot be drawn, :func:`lowshot_rows`).

    Each class's SVM is :func:`svm_one_class` on its sample: features L2-normalised, the cost chosen
    by cross-validated AP on the sample itself (min(folds, k) folds; with k = 1 no
    cross-validation, C = 1). VISSL instead reports, per k, the cost whose mean *test* mAP is best;
    that is a choice made on the test split, which this benchmark does not make.
    """
    (xtr, ytr, dtr), (xte, yte, dte) = train, test
    xtr, xte, gram, gram_test = svm_inputs(xtr, xte, svm.solver)
    out: dict[str, list[float]] = {}
    for k in lowshot.k:
        maps = []
        for sample in range(lowshot.samples):
            rows = lowshot_rows(ytr, dtr, k, sample)
            if rows is None:
                maps.append(float("nan"))
                continue
            jobs = (
                delayed(svm_one_class)(
                    xtr[r],
                    svm_targets(ytr[r, c]),
                    xte,
                    svm,
                    None if gram is None else gram[np.ix_(r, r)],
                    None if gram_test is None else gram_test[:, r],
                )
                for c, r in enumerate(rows)
            )
            scores = np.stack(
                [o[2] for o in Parallel(n_jobs=n_jobs, backend="threading")(jobs)], axis=1
            )
            maps.append(mean_ap(voc07_classification_ap(scores, yte, dte, ap_mode)))
        out[str(k)] = maps
    return out
