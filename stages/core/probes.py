"""How good are frozen features: layer-wise linear probes, weighted kNN, clustering quality.

Pure functions on arrays (plus one feature-extraction pass over a network), so `evaluate final`
only wires them together and every measure can be tested on a tiny labelled set.

- Linear probes follow Zhang et al. / the paper's Table 1: a linear classifier on each frozen
  conv block's activations, average-pooled to a bounded number of dimensions (the paper: ~9k for
  AlexNet; here `evaluate.probe_dim`), and on the fc features.
- Weighted kNN follows Wu et al. 2018 (also DINO): cosine similarity, the k nearest training
  images vote with weight exp(similarity / T).
- Clustering quality: k-means with k = number of classes, NMI, ARI and the accuracy after the best
  one-to-one matching of clusters to classes (Hungarian), the protocol later papers use for
  DeepCluster.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from stages.core.assignments import match_clusters, nmi
from stages.core.clustering import run_kmeans
from stages.core.data import ImageSet, extract_batches
from stages.core.errors import StageError
from stages.core.models import DeepClusterNet
from stages.core.runtime import autocast
from stages.core.whitening import fit_pca_whitening


# ---------------------------------------------------------------- features
def conv_layer_names(model: DeepClusterNet) -> list[str]:
    """conv1..convN, one per conv block (each block ends with the ReLU that conv_activations returns)."""
    n = sum(isinstance(m, torch.nn.ReLU) for m in model.features)
    return [f"conv{i + 1}" for i in range(n)]


def pool_grid(channels: int, size: int, max_dim: int) -> int:
    """Side of the square average-pooling grid that keeps channels x side^2 <= max_dim."""
    return max(1, min(size, math.isqrt(max(max_dim // channels, 1))))


@dataclass
class LayerFeatures:
    """What one pass of a network over some images gives the evaluation."""

    pooled: dict[str, np.ndarray]  # layer name -> N x D pooled activations (conv) or fc features
    channel_max: dict[str, np.ndarray]  # layer name -> N x C spatial maximum of each filter


@torch.no_grad()
def extract_layer_features(model: DeepClusterNet, images: ImageSet, rows: np.ndarray, layers: list[str], *,
                           crop_size: int, batch_size: int, device: torch.device, max_dim: int,
                           channel_max_layers: tuple[str, ...] = (), amp: bool | str = "auto") -> LayerFeatures:
    """Pooled activations of `layers` ("conv1".., "fc") for the images at `rows`, in one forward pass each batch.

    Same input as `extract` (extract_batches: the centre view), eval() mode. Conv outputs are captured by
    hooks on the conv blocks' ReLUs while fc_features runs, so one forward gives every layer.
    """
    known = conv_layer_names(model) + ["fc"]
    unknown = [name for name in list(layers) + list(channel_max_layers) if name not in known]
    if unknown:
        raise StageError(f"unknown layer(s) {unknown} for this network: choose from {known}")
    model.eval()
    relus = [m for m in model.features if isinstance(m, torch.nn.ReLU)]
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in relus]
    pooled: dict[str, np.ndarray] = {}
    channel_max: dict[str, np.ndarray] = {}
    start = 0
    try:
        for x in extract_batches(images, rows, crop_size, batch_size, device):
            captured.clear()
            with autocast(device, amp):
                fc = model.fc_features(x.contiguous(memory_format=torch.channels_last))
            outs = {f"conv{i + 1}": a for i, a in enumerate(captured)}
            outs["fc"] = fc
            for name in layers:
                a = outs[name].float()
                if a.dim() == 4:
                    a = F.adaptive_avg_pool2d(a, pool_grid(a.shape[1], a.shape[-1], max_dim))
                a = a.flatten(1).cpu().numpy()
                if name not in pooled:
                    pooled[name] = np.empty((len(rows), a.shape[1]), dtype=np.float32)
                pooled[name][start : start + len(a)] = a
            for name in channel_max_layers:
                a = outs[name].float()
                m = a.amax(dim=(2, 3)) if a.dim() == 4 else a
                if name not in channel_max:
                    channel_max[name] = np.empty((len(rows), m.shape[1]), dtype=np.float32)
                channel_max[name][start : start + len(m)] = m.cpu().numpy()
            start += len(x)
    finally:
        for h in hooks:
            h.remove()
    return LayerFeatures(pooled, channel_max)


def pixel_features(images: ImageSet, rows: np.ndarray, *, crop_size: int, max_dim: int,
                   batch_size: int = 1024) -> np.ndarray:
    """Raw-pixel baseline: the normalised centre crop, average-pooled to at most max_dim values."""
    out, start = None, 0
    for x in extract_batches(images, rows, crop_size, batch_size, torch.device("cpu")):
        x = F.adaptive_avg_pool2d(x, pool_grid(x.shape[1], x.shape[-1], max_dim)).flatten(1).numpy()
        if out is None:
            out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
        out[start : start + len(x)] = x
        start += len(x)
    return out


# ---------------------------------------------------------------- linear probe
# Scale of the cross-entropy's curvature per unit feature variance near the start (softmax over ~10
# classes at uniform probabilities: p(1 - p) ~ 0.1); only the preconditioner's quality depends on it.
CURVATURE = 0.1
# Rows used to estimate the preconditioner's principal axes: any orthonormal basis keeps the problem
# exact, so an estimate from a sample is enough, at a fraction of the d^2 x N covariance cost.
BASIS_ROWS = 4096


def principal_basis(x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal principal axes (d x d, columns) of the rows of x and the variance along each."""
    if len(x) > BASIS_ROWS:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:BASIS_ROWS]]
    x = x - x.mean(dim=0)
    variances, axes = torch.linalg.eigh(x.T @ x / len(x))
    return axes, variances.clamp(min=0)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int, *,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: argmin mean CE(x W^T + b, y) + wd/2 ||W||^2.

    Deterministic (full batch, zero or given start). With `basis` (principal axes and variances of
    x) the weights are optimised as W^T = axes diag(s) U with s = 1 / sqrt(CURVATURE * variance + wd)
    and the penalty written in U: the optimum is the same, but the problem is about equally curved
    in every direction, so L-BFGS gets there in tens of iterations even on strongly correlated
    features, where it otherwise crawls for hundreds (trained fc layers). x itself is never rotated.
    Returns (W, b), W n_classes x d.
    """
    d = x.shape[1]
    if basis is None:
        axes, scale = None, torch.ones(d)
    else:
        axes, scale = basis[0], torch.rsqrt(CURVATURE * basis[1] + weight_decay)

    def weights(u: torch.Tensor) -> torch.Tensor:  # d x C, in x's coordinates
        w = u * scale[:, None]
        return w if axes is None else axes @ w

    u, b = torch.zeros(d, n_classes), torch.zeros(n_classes)
    if init is not None:
        w0 = init[0].T if axes is None else axes.T @ init[0].T
        u, b = w0 / scale[:, None], init[1].clone()
    u.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([u, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        # ||W||^2 = ||diag(s) U||^2: axes is orthonormal
        loss = F.cross_entropy(x @ weights(u) + b, y) + 0.5 * weight_decay * (u * scale[:, None]).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return weights(u).T.contiguous(), b.detach().clone()


def _accuracy(w: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ w[0].T + w[1]).argmax(1) == y).float().mean())


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                 weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2), max_iter: int = 20,
                 val_fraction: float = 0.2, seed: int = 0, n_classes: int | None = None) -> dict:
    """Logistic regression on standardised features, its L2 strength chosen on held-out training images.

    The paper chooses the probes' hyper-parameters by cross-validation on the training set; the
    best weight decay differs by layer (conv layers over-fit 2k pooled dims without it, fc layers
    need little). The grid is walked from the strongest decay down, each fit starting from the
    previous one; the chosen decay is then refitted on all training images.
    """
    _check_xy(x_train, y_train, "probe train")
    _check_xy(x_test, y_test, "probe test")
    if x_train.shape[1] != x_test.shape[1]:
        raise StageError(f"probe: train features have {x_train.shape[1]} dims, test features {x_test.shape[1]}")
    n_classes = int(n_classes or max(y_train.max(), y_test.max()) + 1)
    mean = x_train.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = x_train.std(axis=0, dtype=np.float64).astype(np.float32) + 1e-6
    xtr = torch.from_numpy((x_train - mean) / std)
    xte = torch.from_numpy((x_test - mean) / std)
    ytr = torch.from_numpy(np.asarray(y_train, dtype=np.int64))
    yte = torch.from_numpy(np.asarray(y_test, dtype=np.int64))
    basis = principal_basis(xtr, seed)
    decays = sorted(set(weight_decays), reverse=True)
    chosen, init, val_acc = decays[0], None, None
    n_val = int(len(xtr) * val_fraction)
    if len(decays) > 1 and n_val > 0:
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))
        x_fit, y_fit, x_val, y_val = xtr[perm[n_val:]], ytr[perm[n_val:]], xtr[perm[:n_val]], ytr[perm[:n_val]]
        fits = {}
        for wd in decays:
            init = fits[wd] = fit_logistic(x_fit, y_fit, n_classes, wd, max_iter, basis=basis, init=init)
            acc = _accuracy(init, x_val, y_val)
            if val_acc is None or acc > val_acc:  # ties keep the stronger decay
                chosen, val_acc = wd, acc
        init = fits[chosen]
    w = fit_logistic(xtr, ytr, n_classes, chosen, max_iter, basis=basis, init=init)
    return {"accuracy": _accuracy(w, xte, yte), "train_accuracy": _accuracy(w, xtr, ytr),
            "val_accuracy": val_acc, "weight_decay": chosen, "dim": int(xtr.shape[1])}


def _check_xy(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim != 2 or len(x) != len(y):
        raise StageError(f"{what}: need an N x D feature matrix and N labels, got {x.shape} and {np.shape(y)}")
    if len(x) == 0:
        raise StageError(f"{what}: no images")
    if (np.asarray(y) < 0).any():
        raise StageError(f"{what}: some images have no label (-1); probes need a fully labelled split")
    if not np.isfinite(x).all():
        raise StageError(f"{what}: features hold NaN or infinite values; the network diverged")


# ---------------------------------------------------------------- kNN
def l2_normalise(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)


def cosine_neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine search (faiss inner product on L2-normalised rows): similarities and indices, Q x k."""
    if k > len(bank):
        raise StageError(f"kNN: k={k} is larger than the {len(bank)} training images; lower evaluate.knn_k")
    bank, queries = l2_normalise(bank), l2_normalise(queries)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)
    return index.search(queries, k)


def knn_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                 k: int = 20, temperature: float = 0.07, n_classes: int | None = None) -> float:
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar training images vote with exp(sim / T)."""
    _check_xy(x_train, y_train, "kNN train")
    _check_xy(x_test, y_test, "kNN test")
    n_classes = int(n_classes or max(y_train.max(), y_test.max()) + 1)
    sims, idx = cosine_neighbours(x_train, x_test, k)
    return _weighted_vote_accuracy(sims, np.asarray(y_train)[idx], np.asarray(y_test), temperature, n_classes)


def knn_leave_one_out_accuracy(x: np.ndarray, y: np.ndarray, *, k: int = 20, temperature: float = 0.07,
                               n_classes: int | None = None) -> float:
    """Weighted kNN of every image against all the others: each image is classified by its k nearest
    neighbours among the rest of x, itself left out. Every image is a query, so on n images the accuracy has
    the sampling error of n held-out images, not of a held-out share of them."""
    _check_xy(x, y, "kNN leave-one-out")
    if k >= len(x):
        raise StageError(f"kNN: k={k} needs more than {k} images to leave one out, got {len(x)}; lower evaluate.knn_k")
    y = np.asarray(y)
    n_classes = int(n_classes or y.max() + 1)
    sims, idx = cosine_neighbours(x, x, k + 1)
    own = idx == np.arange(len(x))[:, None]
    # each image finds itself (cosine 1); where exact duplicates tie with it and push it out of the k + 1, the
    # farthest neighbour goes instead, so every image keeps k neighbours that are not itself
    drop = np.where(own.any(1), own.argmax(1), k)
    keep = np.ones(idx.shape, dtype=bool)
    keep[np.arange(len(x)), drop] = False
    sims, idx = sims[keep].reshape(len(x), k), idx[keep].reshape(len(x), k)
    return _weighted_vote_accuracy(sims, y[idx], y, temperature, n_classes)


def _weighted_vote_accuracy(sims: np.ndarray, neighbour_labels: np.ndarray, y: np.ndarray, temperature: float,
                            n_classes: int) -> float:
    votes = np.zeros((len(y), n_classes), dtype=np.float64)
    np.add.at(votes, (np.arange(len(y))[:, None], neighbour_labels), np.exp(sims / temperature))
    return float((votes.argmax(1) == y).mean())


# ---------------------------------------------------------------- clustering quality
def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy after mapping clusters one-to-one onto classes so that the matched counts are maximal.

    With more clusters than classes, the clusters left unmatched count as errors.
    """
    matched, _ = match_clusters(labels, clusters)
    return matched / len(labels)


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict:
    return {"nmi": nmi(labels, clusters), "ari": float(adjusted_rand_score(labels, clusters)),
            "acc": hungarian_accuracy(labels, clusters)}


def kmeans_quality(x: np.ndarray, labels: np.ndarray, *, k: int, niter: int, seed: int, runs: int = 1,
                   pca_dim: int | None = None, eps: float = 1e-5) -> dict:
    """k-means (k clusters) on x, scored against labels: mean NMI, ARI, ACC over `runs` seeds, and the
    spread (standard deviation over the seeds) of NMI and ACC.

    With k = 10 a single k-means run's NMI moves by a few hundredths with its seed alone (docs/results.md,
    "Figures of the default run"): one run cannot tell two close feature sets apart.
    pca_dim: preprocess as DeepCluster does (PCA-whitening then L2 normalisation) before clustering;
    None clusters x as it is (the usual raw-pixel baseline).
    """
    if runs < 1:  # screen's --kmeans-runs reaches here without the schema
        raise StageError(f"evaluate.kmeans_runs={runs}: need at least one k-means run")
    if pca_dim is not None:
        x = fit_pca_whitening(x, min(pca_dim, x.shape[1]), eps).transform(x)
    scores = [clustering_scores(labels, run_kmeans(x, k, niter, seed + i).labels) for i in range(runs)]
    out = {key: float(np.mean([s[key] for s in scores])) for key in ("nmi", "ari", "acc")}
    return out | {f"{key}_std": float(np.std([s[key] for s in scores])) for key in ("nmi", "acc")}
