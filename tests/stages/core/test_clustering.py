"""stages.core.clustering: faiss k-means (real faiss, CPU) with per-epoch seeds, empty clusters, PIC."""
from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import homogeneity_score, normalized_mutual_info_score

from stages.core.assignments import nmi
from stages.core.clustering import (Clustering, absorb_singletons, bisect, cluster_means, knn_graph, refill_small,
                                    load_clustering, number_of_clusters, run_kmeans, run_pic, save_clustering)
from stages.core.errors import StageError
from stages.core.params import apply_overrides


def blobs(n: int, centers: int, seed: int = 1, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n_samples=n, centers=centers, n_features=dim, cluster_std=0.5, center_box=(-20, 20),
                      random_state=seed)
    return x.astype(np.float32), y


def test_two_well_separated_clusters_are_recovered_from_any_seed():
    x, y = blobs(600, 2)
    for seed in range(5):
        c = run_kmeans(x, 2, seed=seed, device="cpu")
        assert normalized_mutual_info_score(y, c.labels) == pytest.approx(1.0, abs=1e-9)


def test_five_well_separated_clusters_are_recovered_by_the_best_seed():
    # A single Lloyd run from random centroids (as faiss and the paper do) can fall into a local
    # minimum (two centroids in one blob); ~40% of seeds reach the optimum here, so the lowest
    # objective over 20 seeds is the optimum unless k-means itself is broken (p ~ 0.6**20).
    x, y = blobs(600, 5)
    runs = [run_kmeans(x, 5, seed=seed, device="cpu") for seed in range(20)]
    best = min(runs, key=lambda c: c.objective[-1])
    assert normalized_mutual_info_score(y, best.labels) > 0.999


def test_over_segmentation_keeps_every_cluster_inside_one_blob():
    x, y = blobs(600, 3)
    c = run_kmeans(x, 9, seed=0, device="cpu")
    assert homogeneity_score(y, c.labels) > 0.999


def test_labels_and_distances_are_a_search_of_every_point_against_the_final_centroids():
    x = np.random.default_rng(0).normal(size=(500, 6)).astype(np.float32)
    c = run_kmeans(x, 12, seed=3, device="cpu")
    d2 = ((x[:, None, :].astype(np.float64) - c.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(c.labels, d2.argmin(1))
    np.testing.assert_allclose(c.distances, d2.min(1), rtol=1e-4, atol=1e-5)
    assert c.labels.dtype == np.int64 and c.labels.shape == (500,)
    assert len(c.objective) == 20  # niter defaults to the paper's 20 iterations


def test_no_subsampling_centroids_are_means_of_all_their_members():
    # faiss keeps only 256 points per centroid by default; then centroids would be means of a sample
    # (0.07 off here), not of all 3000 points.
    x, _ = make_blobs(n_samples=3000, centers=2, n_features=4, cluster_std=1.0, random_state=0)
    x = x.astype(np.float32)
    c = run_kmeans(x, 2, seed=0, device="cpu")
    means = np.stack([x[c.labels == j].mean(0) for j in range(2)])
    np.testing.assert_allclose(c.centroids, means, atol=1e-4)


def test_same_seed_reproduces_and_different_seeds_initialise_differently():
    x = np.random.default_rng(0).normal(size=(400, 4)).astype(np.float32)  # no structure: init decides
    a, b = run_kmeans(x, 10, seed=11, device="cpu"), run_kmeans(x, 10, seed=11, device="cpu")
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = run_kmeans(x, 10, seed=12, device="cpu")
    assert not np.allclose(np.sort(a.centroids, axis=0), np.sort(c.centroids, axis=0))
    assert a.objective[0] != c.objective[0]  # already the first iteration differs: the initial centroids did


def test_empty_clusters_are_counted():
    # 12 points on only 3 distinct positions cannot fill 6 clusters: faiss must leave 3 empty.
    x = np.repeat(np.eye(3, dtype=np.float32) * 10, 4, axis=0)
    c = run_kmeans(x, 6, seed=0, device="cpu")
    assert c.k == 6
    assert c.n_empty() == 3
    assert sorted(c.sizes().tolist()) == [0, 0, 0, 4, 4, 4]


def test_clustering_sizes_on_constructed_labels():
    c = Clustering(labels=np.array([0, 0, 2, 2, 2, 4]), distances=np.zeros(6, np.float32),
                   centroids=np.zeros((6, 2), np.float32), objective=np.zeros(1), seed=0)
    assert c.sizes().tolist() == [2, 0, 3, 0, 1, 0]
    assert c.n_empty() == 3


@pytest.mark.parametrize("k", [1, 0, -3])
def test_k_below_two_is_refused(k):
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(StageError, match=rf"cluster.k={k}: k-means needs at least 2 clusters"):
        run_kmeans(x, k, device="cpu")


def test_k_above_the_number_of_points_is_refused():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(StageError, match=r"cluster.k=51 is larger than the number of images \(50\)"):
        run_kmeans(x, 51, device="cpu")
    assert run_kmeans(x, 50, device="cpu").k == 50  # k = N is allowed


def test_non_finite_features_are_refused():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    x[7, 2] = np.nan
    with pytest.raises(StageError, match="NaN or infinite"):
        run_kmeans(x, 5, device="cpu")


def test_save_load_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    c = run_kmeans(x, 4, seed=5, device="cpu")
    save_clustering(tmp_path / "clusters.npz", c)
    back = load_clustering(tmp_path / "clusters.npz")
    for field in ("labels", "distances", "centroids", "objective"):
        np.testing.assert_array_equal(getattr(back, field), getattr(c, field))
    assert back.seed == 5
    with pytest.raises(StageError, match="not found"):
        load_clustering(tmp_path / "nope.npz")


def test_k_auto_is_one_cluster_per_images_per_cluster_images(small_params):
    section = apply_overrides(small_params, {"cluster.k": "auto", "cluster.images_per_cluster": 64}).cluster
    assert number_of_clusters(section, 20000) == 312
    assert number_of_clusters(section, 4000) == 62
    assert number_of_clusters(section, 50) == 2  # never fewer than two clusters
    assert number_of_clusters(apply_overrides(small_params, {"cluster.k": 100}).cluster, 20000) == 100


# ---------------------------------------------------------------- Power Iteration Clustering
def _reference_pic(x: np.ndarray, neighbours: int, sigma: float, alpha: float, iterations: int) -> np.ndarray:
    """PIC written as the paper's appendix describes it, one node at a time, on a dense matrix."""
    n = len(x)
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    a = np.zeros((n, n))
    for i in range(n):
        order = [j for j in np.argsort(d2[i], kind="stable") if j != i][:neighbours]
        for j in order:
            a[i, j] = np.exp(-d2[i, j] / sigma**2)
    w = a + a.T
    v = np.full(n, 1.0 / n)
    for _ in range(iterations):
        v = alpha * (w @ v) + (1 - alpha) / n
        v = v / v.sum()
    pointer = list(range(n))
    for i in range(n):
        best = 0.0
        for j in range(n):
            if w[i, j] > 0 and w[i, j] * (v[j] - v[i]) > best:
                best, pointer[i] = w[i, j] * (v[j] - v[i]), j
    root = []
    for i in range(n):
        r = i
        while pointer[r] != r:
            r = pointer[r]
        root.append(r)
    labels = list(root)
    knn = [[j for j in np.argsort(d2[i], kind="stable") if j != i][:neighbours] for i in range(n)]
    while True:  # singletons join their nearest non-singleton neighbour's cluster, until none can
        sizes = {c: labels.count(c) for c in set(labels)}
        moves = {}
        for i in range(n):
            if sizes[labels[i]] == 1:
                for j in knn[i]:
                    if sizes[labels[j]] > 1:
                        moves[i] = labels[j]
                        break
        if not moves:
            break
        for i, c in moves.items():
            labels[i] = c
    return np.array(labels)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_pic_gives_exactly_the_clusters_of_a_node_by_node_implementation(seed):
    x = np.random.default_rng(seed).normal(size=(150, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    expected = _reference_pic(x, neighbours=5, sigma=0.2, alpha=1e-3, iterations=200)
    got = run_pic(x, neighbours=5, sigma=0.2, alpha=1e-3, iterations=200, device="cpu")
    assert len(np.unique(expected)) > 3  # a partition worth comparing, not one cluster
    assert _same_partition(got.labels, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pic_recovers_well_separated_blobs_without_being_told_their_number(seed):
    from sklearn.datasets import make_blobs

    x, y = make_blobs(600, 8, centers=6, cluster_std=0.5, random_state=seed)
    c = run_pic((x / 10).astype(np.float32), neighbours=20, device="cpu")
    assert c.k == 6
    assert nmi(y, c.labels) > 0.999


def _on_sphere(x: np.ndarray) -> np.ndarray:
    """Centred and L2-normalised, as the pca stage hands features to the clustering."""
    x = x - x.mean(axis=0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_pic_with_the_papers_settings_over_segments_into_a_data_driven_number_of_clusters(digits):
    x, y = _on_sphere(digits[0]), digits[1]
    c = run_pic(x, device="cpu")  # neighbours 5, sigma 0.2, alpha 1e-3, 200 iterations
    sizes = c.sizes()
    assert 10 < c.k < len(x) // 5  # more clusters than classes, far fewer than images
    assert sizes.min() >= 2  # no singleton survives
    assert nmi(y, c.labels) > 0.5
    # centroids and distances describe the clusters found: each point's distance is to its cluster's mean
    np.testing.assert_allclose(c.centroids[3], x[c.labels == 3].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(c.distances, ((x - c.centroids[c.labels]) ** 2).sum(axis=1), rtol=1e-4, atol=1e-6)


def test_singletons_join_their_nearest_non_singleton_neighbours_cluster():
    labels = np.array([0, 0, 1, 2, 2, 3, 4])
    idx = np.array([[1, 2], [0, 2], [5, 0], [4, 1], [3, 0], [2, 3], [5, 2]])  # nearest first
    # 2's nearest is 5 (a singleton), then 0 (cluster 0); 5 -> 2 (singleton), then 3 (cluster 2);
    # 6 -> 5 (singleton), then 2 (singleton): no neighbour outside a singleton in the first pass, but 2 and 5
    # have moved by the second, so 6 follows 5 into cluster 2's
    out = absorb_singletons(labels, idx)
    assert _same_partition(out, np.array([0, 0, 0, 1, 1, 1, 1]))
    assert out.max() == 1  # renumbered 0..C-1


def test_knn_graph_drops_each_point_itself_even_among_exact_duplicates():
    x = np.array([[0, 0], [0, 0], [1, 0], [3, 0], [3.5, 0]], dtype=np.float32)
    idx, dist = knn_graph(x, 2, device="cpu")
    assert all(i not in row for i, row in enumerate(idx))
    assert set(idx[0]) == {1, 2} and set(idx[1]) == {0, 2}
    assert dist[0].min() == 0  # the duplicate is a neighbour at distance 0


# sigma, alpha, iterations and graph out of range never reach run_pic: the schema refuses them (test_schema.py)
@pytest.mark.parametrize("change, message", [
    ({"neighbours": 40}, "cluster.pic.neighbours=40 needs 1 <= neighbours < the number of images (40)"),
    ({"neighbours": 0}, "cluster.pic.neighbours=0"),
])
def test_pic_parameters_out_of_range_stop_with_the_key_and_the_fix(change, message):
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    settings = {"neighbours": 5, "sigma": 0.2, "alpha": 1e-3, "iterations": 200, **change}
    with pytest.raises(StageError, match=re.escape(message)):
        run_pic(x, device="cpu", **settings)


def test_the_approximate_graph_finds_nearly_the_exact_neighbours():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 16)).astype(np.float32)
    x = centres[rng.integers(0, 50, 4000)] + 0.3 * rng.standard_normal((4000, 16)).astype(np.float32)
    exact, _ = knn_graph(x, 5, device="cpu", graph="exact")
    approx, dist = knn_graph(x, 5, device="cpu", graph="ivf")
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, approx)])
    assert recall > 0.9
    assert all(i not in row for i, row in enumerate(approx)) and (np.diff(dist, axis=1) >= 0).all()


def test_cluster_means_in_chunks_equal_the_means_of_the_members():
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((1000, 6)).astype(np.float32), rng.integers(0, 7, 1000)
    means, distances = cluster_means(x, labels, 7, chunk=128)  # 8 chunks, the last one partial
    expected = np.stack([x[labels == c].mean(axis=0) for c in range(7)])
    np.testing.assert_allclose(means, expected, atol=1e-6)
    np.testing.assert_allclose(distances, ((x - expected[labels]) ** 2).sum(axis=1), rtol=1e-5)


# ---------------------------------------------------------------- refilling small clusters
def _gauss(rng, centre, n, std=0.3) -> np.ndarray:
    return (np.asarray(centre, dtype=np.float32) + std * rng.normal(size=(n, 2))).astype(np.float32)


def test_bisect_splits_two_blobs_into_their_two_halves():
    rng = np.random.default_rng(0)
    x = np.concatenate([_gauss(rng, (0, 0), 60), _gauss(rng, (0, 6), 40)])
    centroids, side = bisect(x)
    truth = np.r_[np.zeros(60), np.ones(40)].astype(bool)
    assert (side.astype(bool) == truth).all() or (side.astype(bool) == ~truth).all()
    for half in (0, 1):
        np.testing.assert_allclose(centroids[half], x[side == half].mean(0), atol=1e-5)
    same, side_same = bisect(np.ones((5, 2), dtype=np.float32))  # nothing to split: both halves hold points
    assert (same == 1).all() and 0 < side_same.sum() < 5


def _three_clusters(rng):
    """A = two sub-blobs (200 points, label 0), B (100, label 1), and C: 5 points beside B (label 2)."""
    x = np.concatenate([_gauss(rng, (0, 0), 100), _gauss(rng, (0, 6), 100), _gauss(rng, (10, 0), 100),
                        _gauss(rng, (10, 2.5), 5, std=0.1)])
    labels = np.r_[np.zeros(200), np.ones(100), np.full(5, 2)].astype(np.int64)
    centroids = np.stack([x[labels == j].mean(0) for j in range(3)])
    return x, Clustering(labels, ((x - centroids[labels]) ** 2).sum(1), centroids, np.array([7.0, 5.0]), seed=11)


def test_a_small_cluster_bisects_the_largest_and_its_images_join_their_next_nearest():
    x, c = _three_clusters(np.random.default_rng(0))
    new, refilled = refill_small(x, c, below=0.25)  # mean size 101.7: C's 5 images are small, B's 100 are not
    assert refilled == 1 and new.k == 3
    assert (new.labels[300:] == 1).all()  # C's images joined B, the nearest remaining centroid
    assert (new.labels[200:300] == 1).all()
    a = new.labels[:200]  # A is split along its sub-blobs into its old label and C's
    assert {int(a[:100].min()), int(a[:100].max())} in ({0}, {2}) and set(a[100:]) == {0, 2} - set(a[:100])
    assert np.bincount(new.labels, minlength=3).min() >= 0.25 * len(x) / 3
    np.testing.assert_allclose(new.distances, ((x - new.centroids[new.labels]) ** 2).sum(1), rtol=1e-4, atol=1e-4)
    assert new.seed == 11 and list(new.objective) == [7.0, 5.0]


def test_refilling_is_off_at_zero_and_leaves_clusterings_without_small_ones_as_they_are():
    x, c = _three_clusters(np.random.default_rng(1))
    assert refill_small(x, c, below=0.0) == (c, 0)
    assert refill_small(x, c, below=0.04) == (c, 0)  # 5 images are not under 4 % of 101.7


def test_empty_clusters_are_refilled_too():
    x, c = _three_clusters(np.random.default_rng(2))
    empty = Clustering(np.where(c.labels == 2, 1, c.labels), c.distances, c.centroids, c.objective, c.seed)
    new, refilled = refill_small(x, empty, below=0.01)
    assert refilled == 1 and (np.bincount(new.labels, minlength=3) >= 90).all()
