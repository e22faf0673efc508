"""Data-dependent k-means initialisation of a whole encoder (Krähenbühl, Doersch, Donahue & Darrell,
"Data-dependent Initializations of Convolutional Neural Networks", ICLR 2016; reference code
``philkr/magic_init``, ``magic_init.py``, run as ``magic_init.py ... -t kmeans -cs``).

Every convolution, in network order, on the activations its already-initialised predecessors give
for a batch of real images:

1. patches of the layer's input (one per output position, with the layer's zero padding) are
   sampled at random (``gatherInputData``);
2. they are PCA-whitened, keeping the top ``out_channels`` components, and each whitened patch is
   scaled to unit length (``initializeWeight``);
3. k-means with ``out_channels`` clusters on them; the centres, mapped back through the whitening,
   are the filters (§3.3 "k-means"; ``initializeWeight(type='kmeans')``);
4. within-layer normalisation (§3.1, Algorithm 1; the end of ``initializeLayer``): on the batch every
   output unit gets mean ``bias`` and unit variance (:func:`core.data_dependent_init.rescale_layers`,
   the same step the transfer stage uses for its new layers, then ``bias`` is added).

Then the between-layer scale adjustment (§3.2, Algorithm 2; ``calibrateGradientRatio``): each layer k
is scaled by alpha_k so that the ratio of its weight-gradient to weight magnitude, under random
Gaussian gradients at the output, is the same for every layer.

Pure and deterministic: the same (encoder architecture, images, seed, config) gives the same weights
bit for bit on the same machine and thread count. Nothing is downloaded; faiss / sklearn are not used
(a full-batch torch k-means in float64 is small, exact and seeded).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from core.data_dependent_init import rescale_layers


@dataclass(frozen=True)
class KMeansInitConfig:
    """Options of :func:`kmeans_init_`; defaults follow ``magic_init.py`` unless noted."""

    # k-means: §3.3's k-means filters; gaussian: N(0, 1) filters (the reference's default type
    # ``elwise``, the paper's "Random Gaussian" rows), then the same §3.1 / §3.2 scaling
    filters: Literal["kmeans", "gaussian"] = "kmeans"
    max_patches: int = 10_000  # patches sampled per layer (reference: a 500 MB buffer, ~10^5)
    kmeans_iters: int = 100  # Lloyd iterations at most (sklearn MiniBatchKMeans max_iter=100)
    kmeans_tol: float = 1e-4  # stop when the centres move less than this (sklearn KMeans tol)
    bias: float = 0.1  # output mean of every unit after §3.1 (magic_init.py ``-b``, default 0.1)
    between_layer: bool = True  # §3.2 scale adjustment (magic_init.py ``-cs``)
    calibration_images: int = 16  # images of the §3.2 batch (reference: one batch, ``-bs 16``)
    calibration_draws: int = 8  # Gaussian output gradients averaged per round (reference: 1)
    calibration_iters: int = 10  # rescaling rounds at most (calibrateGradientRatio: 10)
    calibration_tol: float = 0.01  # stop once every layer's ratio is within 1% of the target


class _Reached(Exception):
    """Raised by a forward pre-hook to stop the forward pass at the layer whose input we want."""

    def __init__(self, x: torch.Tensor):
        self.x = x


@torch.no_grad()
def layer_input(encoder: nn.Module, layer: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives when ``encoder`` runs on ``images`` (the forward stops there)."""

    def stop(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        raise _Reached(args[0].detach().clone())

    handle = layer.register_forward_pre_hook(stop)
    try:
        encoder(images)
    except _Reached as reached:
        return reached.x
    finally:
        handle.remove()
    raise RuntimeError(f"{layer} was not called by the encoder's forward")


def sample_patches(
    x: torch.Tensor, conv: nn.Conv2d, max_patches: int, generator: torch.Generator
) -> torch.Tensor:
    """Input patches of ``conv`` at (up to) ``max_patches`` output positions drawn without
    replacement (all of them if there are fewer; ``gatherInputData`` subsamples rows the same way).

    x: [N, C, H, W] -> [P, C * kh * kw] float64, flattened like ``conv.weight[o]``, so that
    ``patches @ conv.weight.flatten(1).T + bias`` is the layer's output at those positions.
    """
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError(f"{conv}: only ungrouped, undilated, zero-padded convolutions")
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    windows = F.pad(x, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [N,C,Ho,Wo,kh,kw]
    n, _, ho, wo = windows.shape[:4]
    total = n * ho * wo
    if total <= max_patches:
        idx = torch.arange(total)
    else:
        idx = torch.randperm(total, generator=generator)[:max_patches]
    i, rest = idx // (ho * wo), idx % (ho * wo)
    patches = windows[i, :, rest // wo, rest % wo]  # [P, C, kh, kw]
    return patches.reshape(len(idx), -1).double().cpu()


@dataclass(frozen=True)
class Whitening:
    """PCA whitening of patches: ``white(p) = (p - mean) @ projection``, [P, D] -> [P, K]."""

    mean: torch.Tensor  # [D]
    projection: torch.Tensor  # [D, K]: eigenvectors / sqrt(eigenvalue), largest K eigenvalues

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        return (patches - self.mean) @ self.projection


def fit_whitening(patches: torch.Tensor, components: int) -> Whitening:
    """PCA whitening on the top ``components`` eigenvectors of the patch covariance
    (``initializeWeight``: eigh of D^T D, s = 1 / sqrt(s + 1e-3), s = 0 where s < 1e-6).

    The reference works with the scatter matrix D^T D; here it is the covariance D^T D / P, so the
    whitened patches have identity covariance, and the reference's constants are divided by P (the
    same whitening up to a factor sqrt(P), which the unit-length step of :func:`kmeans_init_`
    removes). patches: [P, D] float64.
    """
    p = patches.shape[0]
    mean = patches.mean(0)
    centred = patches - mean
    eigval, eigvec = torch.linalg.eigh(centred.T @ centred / p)  # ascending
    keep = min(components, eigval.numel())
    eigval, eigvec = eigval[-keep:], eigvec[:, -keep:]
    scale = torch.where(
        eigval >= 1e-6 / p, (eigval.clamp_min(0) + 1e-3 / p).rsqrt(), torch.zeros_like(eigval)
    )
    return Whitening(mean, eigvec * scale)


@dataclass(frozen=True)
class KMeansResult:
    centres: torch.Tensor  # [k, D]
    assignment: torch.Tensor  # [P] cluster of each point
    iterations: int  # Lloyd iterations run
    converged: bool  # assignments stopped changing within the budget
    inertia: float  # sum of squared distances to the assigned centres
    reseeded: int  # empty clusters restarted at the worst-fitted point


def kmeans(
    points: torch.Tensor, k: int, iters: int, generator: torch.Generator, tol: float = 1e-4
) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), full batch.

    The reference runs sklearn's ``MiniBatchKMeans(n_clusters=k, batch_size=10 k)``; full batch is
    exact at our sizes and deterministic given ``generator``. Stops when no assignment changes or
    the squared centre shift, summed, is at most ``tol`` x the mean per-dimension variance of the
    points (sklearn ``KMeans``' criterion). An empty cluster restarts at the point farthest from
    its centre (as sklearn's reassignment of empty clusters). points: [P, D].
    """
    x = points.double()
    p = x.shape[0]
    if p < k:
        raise ValueError(f"k-means needs at least k={k} points, got {p}")
    sq = (x * x).sum(1)
    shift_tol = tol * float(x.var(0, unbiased=False).mean())

    def sq_dist(c: torch.Tensor) -> torch.Tensor:  # [P, len(c)]
        return (sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]).clamp_min_(0)

    chosen = [int(torch.randint(p, (1,), generator=generator))]
    closest = sq_dist(x[chosen])[:, 0]
    for _ in range(1, k):
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        closest = torch.minimum(closest, sq_dist(x[nxt : nxt + 1])[:, 0])
    centres = x[chosen].clone()
    assignment = torch.full((p,), -1, dtype=torch.long)
    reseeded, converged, iterations = 0, False, 0
    for iterations in range(1, iters + 1):  # noqa: B007 (the count is returned)
        d = sq_dist(centres)
        new = d.argmin(1)
        if torch.equal(new, assignment):
            converged = True
            break
        assignment = new
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        fitted = d.gather(1, assignment[:, None])[:, 0]
        for empty in torch.nonzero(counts == 0).flatten().tolist():
            movable = counts[assignment] > 1  # never empty the donor cluster
            worst = int(torch.where(movable, fitted, torch.full_like(fitted, -1.0)).argmax())
            old = int(assignment[worst])
            sums[old] -= x[worst]
            counts[old] -= 1
            sums[empty], counts[empty], assignment[worst] = x[worst], 1, empty
            fitted[worst] = -1.0
            reseeded += 1
        moved = sums / counts[:, None].double()
        shift, centres = float((moved - centres).pow(2).sum()), moved
        if shift <= shift_tol:
            converged = True
            break
    inertia = float(sq_dist(centres).gather(1, assignment[:, None]).sum())
    return KMeansResult(centres, assignment, iterations, converged, inertia, reseeded)


def conv_layers(encoder: nn.Module) -> dict[str, nn.Conv2d]:
    """The encoder's convolutions by name, in registration order (= forward order for the
    AlexNet-style encoders of core.models, the pool-free variant's strided convolutions included)."""
    return {n: m for n, m in encoder.named_modules() if isinstance(m, nn.Conv2d)}


def kmeans_filters(
    x: torch.Tensor, conv: nn.Conv2d, cfg: KMeansInitConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, Any]]:
    """§3.3 k-means filters of ``conv`` from its input ``x`` (Gaussian ones for ``cfg.filters =
    'gaussian'``): [out, in, kh, kw] float64, and a record of what was done."""
    out = conv.out_channels
    if cfg.filters == "gaussian":
        return torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64), {}
    patches = sample_patches(x, conv, cfg.max_patches, generator)
    record: dict[str, Any] = {"patches": patches.shape[0], "patch_dim": patches.shape[1]}
    if patches.shape[0] < out:  # initializeWeight: "Not enough data", Gaussian filters instead
        record["fallback"] = "gaussian"
        w = torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64)
        return w, record
    whitening = fit_whitening(patches, out)
    white = whitening(patches)
    white = white / white.norm(dim=1, keepdim=True).clamp_min(1e-12)  # wD /= norm(wD, axis=1)
    result = kmeans(white, out, cfg.kmeans_iters, generator, cfg.kmeans_tol)
    # a centre c scores a patch by c . white(p) = (whitening.projection @ c) . (p - mean): the filter
    filters = result.centres @ whitening.projection.T  # [out, D]; the bias is set by §3.1 below
    record.update(
        components=whitening.projection.shape[1],
        kmeans_iters=result.iterations,
        kmeans_converged=result.converged,
        kmeans_inertia=result.inertia,
        empty_clusters_reseeded=result.reseeded,
    )
    return filters.reshape(conv.weight.shape), record


@torch.no_grad()
def unit_stats(encoder: nn.Module, layers: dict[str, nn.Conv2d], images: torch.Tensor) -> dict:
    """Per-unit (channel) mean / std of every layer's output (before its ReLU) on ``images``:
    {name: {"mean": [C], "std": [C]}} as float64 tensors."""
    box: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, n=n: box.__setitem__(n, o.detach().double()))
        for n, m in layers.items()
    ]
    try:
        encoder(images)
    finally:
        for h in handles:
            h.remove()
    return {n: {"mean": o.mean((0, 2, 3)), "std": o.std((0, 2, 3))} for n, o in box.items()}


def gradient_ratios(
    encoder: nn.Module,
    layers: dict[str, nn.Conv2d],
    images: torch.Tensor,
    top_grads: list[torch.Tensor],
) -> tuple[dict[str, float], float]:
    """({layer: sqrt(mean(dL/dW^2) / mean(W^2))}, mean per-channel std of the output) with
    L = <g, encoder(images)> for Gaussian g (``calibrateGradientRatio``'s random top diffs), the
    squared gradient averaged over the draws ``top_grads`` (Algorithm 2's expectation)."""
    weights = [m.weight for m in layers.values()]
    sums = [0.0] * len(weights)
    with torch.enable_grad():
        out = encoder(images)
        for i, g in enumerate(top_grads):
            last = i == len(top_grads) - 1
            grads = torch.autograd.grad(out, weights, g.to(out), retain_graph=not last)
            sums = [s + float(d.double().pow(2).mean()) for s, d in zip(sums, grads)]
    ratios = {
        n: math.sqrt(s / len(top_grads) / float(w.detach().double().pow(2).mean()))
        for n, w, s in zip(layers, weights, sums)
    }
    out_std = float(out.detach().double().transpose(0, 1).flatten(1).std(1).mean())
    return ratios, out_std


@torch.no_grad()
def between_layer_scale_(
    encoder: nn.Module,
    layers: dict[str, nn.Conv2d],
    images: torch.Tensor,
    cfg: KMeansInitConfig,
    generator: torch.Generator,
) -> dict[str, Any]:
    """§3.2 (Algorithm 2; ``calibrateGradientRatio``): scale every layer so that all have the same
    ratio r_k = ||dL/dW_k|| / ||W_k|| under random Gaussian output gradients.

    target = geometric mean of r_k times output_std^(1/K); W_k, b_k *= alpha_k = sqrt(r_k / target)
    and b_k also *= the product of the earlier layers' alphas (the reference measures that input
    scale change; for these positively homogeneous conv/ReLU/max-pool stacks it is exactly the
    product). Rounds repeat until every r_k is within ``calibration_tol`` of the target or
    ``calibration_iters`` rounds have run. The reference draws one new gradient per round; here
    ``calibration_draws`` draws, fixed for all rounds, are averaged: one draw's r_k varies by
    10-20% (more images do not help: the weight gradient is low-rank), so fresh single draws turn
    the rounds into a random walk of the scales, while fixed draws make them a fixed-point
    iteration (for a homogeneous net the ratios are equal after one round, the output std then
    converges to 1 geometrically).
    """
    shape = encoder(images).shape
    draws = [torch.randn(shape, generator=generator) for _ in range(cfg.calibration_draws)]
    scales = dict.fromkeys(layers, 1.0)
    history = []
    converged = False
    for round_ in range(cfg.calibration_iters + 1):
        ratios, out_std = gradient_ratios(encoder, layers, images, draws)
        logs = [math.log(r) for r in ratios.values()]
        target = math.exp(sum(logs) / len(logs)) * out_std ** (1 / len(logs))
        history.append({"ratios": ratios, "target": target, "output_std": out_std})
        # the reference's test is |log r / log target - 1| < 0.01; this is the relative error it means
        if all(abs(r / target - 1) < cfg.calibration_tol for r in ratios.values()):
            converged = True
            break
        if round_ == cfg.calibration_iters:
            break
        before = 1.0  # product of the alphas of the layers before this one (its input's scale)
        for name, m in layers.items():
            alpha = math.sqrt(ratios[name] / target)
            m.weight.mul_(alpha)
            if m.bias is not None:
                m.bias.mul_(alpha * before)
            before *= alpha
            scales[name] *= alpha
    last = history[-1]
    return {
        "rounds": len(history) - 1,
        "converged": converged,
        "scales": scales,
        "ratios": last["ratios"],
        "target_ratio": last["target"],
        "output_std": last["output_std"],
        "ratio_spread": max(last["ratios"].values()) / min(last["ratios"].values()),
    }


def kmeans_init_(
    encoder: nn.Module,
    images: torch.Tensor,
    seed: int,
    cfg: KMeansInitConfig = KMeansInitConfig(),
) -> dict[str, Any]:
    """Initialise every convolution of ``encoder`` in place from ``images`` (Krähenbühl et al. 2016,
    k-means variant with within- and between-layer scaling); returns what was done.

    images: [N, 3, S, S] float, normalised as the encoder sees them (to_unit_range: [-1, 1]), on the
    encoder's device. Returns {"config", "seed", "images", "layers": {name: {patches, patch_dim,
    components, kmeans_iters, kmeans_converged, kmeans_inertia, empty_clusters_reseeded,
    within_mean, within_std, final_mean, final_std}}, "between_layer": {...} or None, "time_s"}.
    within_* / final_*: the per-unit output mean / std (before the ReLU) on ``images``, averaged over
    units, after §3.1 and after §3.2.
    """
    t0 = time.perf_counter()
    if cfg.filters not in ("kmeans", "gaussian"):
        raise ValueError(f"filters must be 'kmeans' or 'gaussian', got {cfg.filters!r}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float [N, 3, S, S] tensor, got {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    layers = conv_layers(encoder)
    if not layers:
        raise ValueError(f"{type(encoder).__name__} has no convolutions to initialise")
    was_training = encoder.training
    encoder.eval()
    records: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for name, conv in layers.items():
            x = layer_input(encoder, conv, images)
            filters, record = kmeans_filters(x, conv, cfg, generator)
            conv.weight.copy_(filters)
            if conv.bias is not None:
                conv.bias.zero_()
            rescale_layers([conv], lambda conv=conv, x=x: conv(x))  # §3.1: mean 0, std 1 per unit
            conv.bias.add_(cfg.bias)  # rescale_layers gave every layer a bias
            records[name] = record
    for name, st in unit_stats(encoder, layers, images).items():
        records[name].update(
            within_mean=float(st["mean"].mean()), within_std=float(st["std"].mean())
        )
    between = None
    if cfg.between_layer:
        batch = images[: cfg.calibration_images]
        between = between_layer_scale_(encoder, layers, batch, cfg, generator)
    for name, st in unit_stats(encoder, layers, images).items():
        records[name].update(final_mean=float(st["mean"].mean()), final_std=float(st["std"].mean()))
    encoder.train(was_training)
    return {
        "config": asdict(cfg),
        "seed": seed,
        "images": images.shape[0],
        "image_size": images.shape[-1],
        "layers": records,
        "between_layer": between,
        "time_s": time.perf_counter() - t0,
    }


def summary_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of a :func:`kmeans_init_` report, flat (``init_<layer>_<key>``), for result.json."""
    flat: dict[str, float] = {"init_time_s": float(report["time_s"])}
    flat["init_images"] = float(report["images"])
    for layer, rec in report["layers"].items():
        for key, value in rec.items():
            if isinstance(value, (int, float)):  # bools too (as 0 / 1)
                flat[f"init_{layer}_{key}"] = float(value)
    between = report["between_layer"]
    if between is not None:
        flat["init_between_rounds"] = float(between["rounds"])
        flat["init_between_converged"] = float(between["converged"])
        flat["init_between_ratio_spread"] = float(between["ratio_spread"])
        for layer, scale in between["scales"].items():
            flat[f"init_{layer}_between_scale"] = float(scale)
    return flat
