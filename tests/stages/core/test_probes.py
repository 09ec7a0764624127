"""stages.core.probes: linear probes, weighted kNN, clustering scores and the layer-feature pass, on real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from stages.core.clustering import run_kmeans
from stages.core.data import load_split, normalize
from stages.core.errors import StageError
from stages.core.models import build_model
from stages.core.params import apply_overrides
from stages.core.probes import (clustering_scores, conv_layer_names, extract_layer_features, fit_logistic,
                                hungarian_accuracy, kmeans_quality, knn_accuracy, knn_leave_one_out_accuracy,
                                linear_probe, pixel_features, pool_grid, principal_basis)
from stages.prepare import prepare

FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def digits_split():
    """sklearn's 8x8 digits: 1797 real labelled images, split 1200 / 597."""
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    tr, te = order[:1200], order[1200:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory, small_params):
    if not Path(FASHION).exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("fashion") / "dataset"
    section = apply_overrides(small_params, {"prepare.max_train_images": 300, "prepare.max_test_images": 100}).prepare
    prepare("fashion-mnist", FASHION, out, section, seed=0)
    return load_split(out, "train"), load_split(out, "test")


# ---------------------------------------------------------------- linear probe
def test_linear_probe_on_digits_learns_and_reports_its_choice(digits_split):
    r = linear_probe(*digits_split, seed=0)
    assert r["accuracy"] > 0.9  # 8x8 digits_split are almost linearly separable
    assert r["train_accuracy"] >= r["accuracy"] - 0.02 and r["val_accuracy"] > 0.9
    assert r["weight_decay"] in (1e-4, 1e-3, 1e-2) and r["dim"] == 64


def test_linear_probe_is_deterministic(digits_split):
    assert linear_probe(*digits_split, seed=3) == linear_probe(*digits_split, seed=3)


def test_linear_probe_beats_chance_by_far_only_with_signal(digits_split):
    xtr, ytr, xte, yte = digits_split
    noise = np.random.default_rng(0)
    r = linear_probe(noise.normal(size=xtr.shape).astype(np.float32), ytr,
                     noise.normal(size=xte.shape).astype(np.float32), yte, seed=0)
    assert r["accuracy"] < 0.25  # 10 classes: chance is 0.1


def test_preconditioning_leaves_the_logistic_optimum_unchanged_and_reaches_it_fast(digits_split):
    """fit_logistic's rescaling in the principal axes is a change of variables, not of the problem.

    The digits_split are mixed into strongly correlated features (singular values 1 .. 1e-3) and 40% of
    the labels are redrawn so no linear classifier separates them: the situation of a trained fc
    layer's probe, where plain L-BFGS crawls.
    """
    xtr, ytr = digits_split[0], digits_split[1].copy()
    rng = np.random.default_rng(0)
    flip = rng.random(len(ytr)) < 0.4
    ytr[flip] = rng.integers(0, 10, flip.sum())
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    mixed = (xtr - xtr.mean(0)) @ (q * np.logspace(0, -3, 64)) @ q.T
    xr = torch.from_numpy(((mixed - mixed.mean(0)) / (mixed.std(0) + 1e-6)).astype(np.float32))
    basis = principal_basis(xr)
    y = torch.from_numpy(ytr)
    wd = 1e-4

    def objective(w, b):
        return float(torch.nn.functional.cross_entropy(xr @ w.T + b, y) + 0.5 * wd * w.pow(2).sum())

    pre = objective(*fit_logistic(xr, y, 10, wd, 20, basis=basis))
    plain_long = objective(*fit_logistic(xr, y, 10, wd, 1000))
    plain_short = objective(*fit_logistic(xr, y, 10, wd, 20))
    assert pre == pytest.approx(plain_long, abs=1e-4)  # the same optimum, in 20 iterations instead of ~1000
    assert plain_short > pre + 1e-2  # which plain L-BFGS is far from after 20


def test_probe_refuses_unlabelled_or_mismatched_input(digits_split):
    xtr, ytr, xte, yte = digits_split
    with pytest.raises(StageError, match="no label"):
        linear_probe(xtr, np.full_like(ytr, -1), xte, yte)
    with pytest.raises(StageError, match="dims"):
        linear_probe(xtr, ytr, xte[:, :10], yte)
    with pytest.raises(StageError, match="NaN"):
        bad = xtr.copy()
        bad[0, 0] = np.nan
        linear_probe(bad, ytr, xte, yte)


# ---------------------------------------------------------------- kNN
def test_weighted_knn_on_digits(digits_split):
    acc = knn_accuracy(*digits_split, k=20, temperature=0.07)
    assert 0.9 < acc <= 1.0


def test_knn_with_k_larger_than_the_bank_is_refused(digits_split):
    xtr, ytr, xte, yte = digits_split
    with pytest.raises(StageError, match="knn_k"):
        knn_accuracy(xtr[:5], ytr[:5], xte, yte, k=10)


def brute_force_leave_one_out(x, y, k, temperature, n_classes):
    """The same weighted kNN written out: full cosine matrix, self masked, top k by sorting."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    correct = 0
    for i in range(len(x)):
        top = np.argsort(-sims[i], kind="stable")[:k]
        votes = np.zeros(n_classes)
        np.add.at(votes, y[top], np.exp(sims[i, top] / temperature))
        correct += votes.argmax() == y[i]
    return correct / len(x)


def test_leave_one_out_knn_on_digits_matches_the_written_out_vote(digits_split):
    x, y = digits_split[0][:400], digits_split[1][:400]
    acc = knn_leave_one_out_accuracy(x, y, k=10, temperature=0.07, n_classes=10)
    assert acc == pytest.approx(brute_force_leave_one_out(x, y, 10, 0.07, 10), abs=1 / 400)
    assert 0.9 < acc < 1.0


def test_leave_one_out_knn_never_lets_an_image_vote_for_itself():
    # random labels on random points: with itself among its neighbours (cosine 1, the heaviest vote) every
    # image would be right; left out, its neighbours know nothing of its label
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 16)).astype(np.float32), rng.integers(0, 3, 600)
    assert knn_leave_one_out_accuracy(x, y, k=5, n_classes=3) < 0.45
    assert knn_accuracy(x, y, x, y, k=5, n_classes=3) == 1.0  # the search itself does find each image


def test_leave_one_out_knn_with_exact_duplicates_keeps_k_neighbours():
    # five copies of each of 3 class prototypes: ties at cosine 1 may push an image out of its own k + 1
    # neighbours; each image still gets k neighbours, all copies of its class
    proto = np.eye(3, 8, dtype=np.float32)
    x, y = np.repeat(proto, 5, axis=0), np.repeat(np.arange(3), 5)
    assert knn_leave_one_out_accuracy(x, y, k=3, n_classes=3) == 1.0


def test_leave_one_out_knn_needs_more_images_than_k(digits_split):
    xtr, ytr = digits_split[0][:10], digits_split[1][:10]
    with pytest.raises(StageError, match="knn_k"):
        knn_leave_one_out_accuracy(xtr, ytr, k=10)


# ---------------------------------------------------------------- clustering scores
def test_hungarian_accuracy_is_one_for_a_permuted_labelling():
    labels = np.random.default_rng(0).integers(0, 10, size=500)
    permutation = np.random.default_rng(1).permutation(10) + 100  # other ids, same partition
    assert hungarian_accuracy(labels, permutation[labels]) == 1.0
    scores = clustering_scores(labels, permutation[labels])
    assert scores == pytest.approx({"nmi": 1.0, "ari": 1.0, "acc": 1.0})


def test_hungarian_accuracy_counts_the_best_one_to_one_match():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    clusters = np.array([5, 5, 7, 7, 7, 7, 9, 9, 9, 5])  # best match 5->0, 7->1, 9->2: 2 + 3 + 3 right
    assert hungarian_accuracy(labels, clusters) == pytest.approx(0.8)
    # more clusters than classes: the unmatched cluster's images count as errors
    assert hungarian_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])) == pytest.approx(0.5)


def test_hungarian_accuracy_refuses_mismatched_lengths():
    with pytest.raises(StageError):
        hungarian_accuracy(np.zeros(3), np.zeros(4))


def test_kmeans_quality_on_digits_pixels_and_whitened(digits_split):
    for pca_dim in (None, 32):
        q = kmeans_quality(digits_split[2], digits_split[3], k=10, niter=20, seed=0, runs=3, pca_dim=pca_dim)
        assert set(q) == {"nmi", "ari", "acc", "nmi_std", "acc_std"}
        assert q["nmi"] > 0.3 and q["ari"] > 0.1 and q["acc"] > 0.3 and q["nmi_std"] > 0.0  # 3 seeds differ
    one = kmeans_quality(digits_split[2], digits_split[3], k=10, niter=20, seed=0)
    assert one["nmi_std"] == 0.0 and one["nmi"] == pytest.approx(clustering_scores(digits_split[3], run_kmeans(
        np.ascontiguousarray(digits_split[2]), 10, 20, 0).labels)["nmi"])
    with pytest.raises(StageError, match="kmeans_runs"):
        kmeans_quality(digits_split[2], digits_split[3], k=10, niter=20, seed=0, runs=0)


# ---------------------------------------------------------------- features
def test_pool_grid_keeps_dims_under_the_limit():
    for channels, size in ((64, 28), (128, 14), (192, 7), (256, 13), (3, 224), (4096, 6)):
        s = pool_grid(channels, size, 2048)
        assert 1 <= s <= size
        assert channels * s * s <= 2048 or s == 1
        assert channels * (s + 1) ** 2 > 2048 or s == size  # and as large as allowed


def test_layer_features_match_the_networks_own_outputs(tiny_fashion):
    train, _ = tiny_fashion
    torch.manual_seed(0)
    model = build_model({"arch": "small_alexnet", "sobel": True, "width": 4, "fc_dim": 16}, 1, 28).eval()
    rows = np.arange(50)
    names = conv_layer_names(model)
    assert names == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    f = extract_layer_features(model, train, rows, names + ["fc"], crop_size=28, batch_size=16,
                               device=torch.device("cpu"), max_dim=64, channel_max_layers=("conv3",))
    x = normalize(torch.from_numpy(np.array(train.pixels[:50])).permute(0, 3, 1, 2), train.meta["mean"], train.meta["std"])
    with torch.no_grad():
        acts = model.conv_activations(x)
        fc = model.fc_features(x)
    for i, name in enumerate(names):
        pooled = torch.nn.functional.adaptive_avg_pool2d(acts[i], pool_grid(acts[i].shape[1], acts[i].shape[-1], 64))
        np.testing.assert_allclose(f.pooled[name], pooled.flatten(1).numpy(), rtol=1e-4, atol=1e-5)
        assert f.pooled[name].shape[1] <= 64
    np.testing.assert_allclose(f.pooled["fc"], fc.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f.channel_max["conv3"], acts[2].amax(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_layer_features_refuse_an_unknown_layer(tiny_fashion):
    model = build_model({"arch": "small_alexnet", "sobel": False, "width": 4, "fc_dim": 16}, 1, 28)
    with pytest.raises(StageError, match="conv9"):
        extract_layer_features(model, tiny_fashion[0], np.arange(4), ["conv9"], crop_size=28, batch_size=4,
                               device=torch.device("cpu"), max_dim=64)


def test_trained_vs_random_probes_tell_a_trained_network_from_its_random_init(tiny_fashion):
    """The comparison `evaluate final` makes. Here the trained network is the random one after a few hundred
    supervised steps: its fc probe and kNN must come out clearly ahead, or the measures cannot see learning."""
    import copy

    train, test = tiny_fashion
    torch.manual_seed(0)
    random_net = build_model({"arch": "small_alexnet", "sobel": True, "width": 4, "fc_dim": 16}, 1, 28)
    trained = copy.deepcopy(random_net)
    trained.reset_top_layer(10)
    x = normalize(torch.from_numpy(np.array(train.pixels)).permute(0, 3, 1, 2), train.meta["mean"], train.meta["std"])
    y = torch.from_numpy(train.labels)
    opt = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    trained.train()
    for _ in range(400):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(trained(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    kw = dict(crop_size=28, batch_size=128, device=torch.device("cpu"), max_dim=256)
    scores = {}
    for name, model in (("random", random_net), ("trained", trained)):
        ftr = extract_layer_features(model, train, np.arange(len(train)), ["fc"], **kw).pooled["fc"]
        fte = extract_layer_features(model, test, np.arange(len(test)), ["fc"], **kw).pooled["fc"]
        scores[name] = (linear_probe(ftr, train.labels, fte, test.labels, n_classes=10)["accuracy"],
                        knn_accuracy(ftr, train.labels, fte, test.labels, k=10, n_classes=10))
    assert scores["trained"][0] > scores["random"][0] + 0.1, scores
    assert scores["trained"][1] > scores["random"][1] + 0.1, scores


def test_raw_pixel_features_are_the_normalised_crop(tiny_fashion):
    train, test = tiny_fashion
    px = pixel_features(train, np.arange(len(train)), crop_size=28, max_dim=2048)
    assert px.shape == (300, 784)
    x = normalize(torch.from_numpy(np.array(train.pixels)).permute(0, 3, 1, 2), train.meta["mean"], train.meta["std"])
    np.testing.assert_allclose(px, x.flatten(1).numpy(), rtol=1e-5, atol=1e-5)
    pooled = pixel_features(train, np.arange(len(train)), crop_size=28, max_dim=200)
    assert pooled.shape == (300, 196)  # 14 x 14 average-pooled
    acc = linear_probe(px, train.labels, pixel_features(test, np.arange(len(test)), crop_size=28, max_dim=2048),
                       test.labels, n_classes=10)["accuracy"]
    assert acc > 0.5  # raw pixels of Fashion-MNIST are linearly separable to a good degree
