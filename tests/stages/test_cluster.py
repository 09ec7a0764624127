"""stages.cluster: faiss k-means (real faiss, CPU) with per-epoch seeds and empty-cluster counting."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from sklearn.datasets import make_blobs
from sklearn.metrics import homogeneity_score, normalized_mutual_info_score

from stages.cluster import Clustering, load_clustering, number_of_clusters, run_cluster, run_kmeans, save_clustering
from stages.common import StageError, read_json, seed_for


def blobs(n: int, centers: int, seed: int = 1, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_blobs(n_samples=n, centers=centers, n_features=dim, cluster_std=0.5, center_box=(-20, 20),
                      random_state=seed)
    return x.astype(np.float32), y


def test_two_well_separated_clusters_are_recovered_from_any_seed():
    x, y = blobs(600, 2)
    for seed in range(5):
        c = run_kmeans(x, 2, seed=seed, use_gpu=False)
        assert normalized_mutual_info_score(y, c.labels) == pytest.approx(1.0, abs=1e-9)


def test_five_well_separated_clusters_are_recovered_by_the_best_seed():
    # A single Lloyd run from random centroids (as faiss and the paper do) can fall into a local
    # minimum (two centroids in one blob); ~40% of seeds reach the optimum here, so the lowest
    # objective over 20 seeds is the optimum unless k-means itself is broken (p ~ 0.6**20).
    x, y = blobs(600, 5)
    runs = [run_kmeans(x, 5, seed=seed, use_gpu=False) for seed in range(20)]
    best = min(runs, key=lambda c: c.objective[-1])
    assert normalized_mutual_info_score(y, best.labels) > 0.999


def test_over_segmentation_keeps_every_cluster_inside_one_blob():
    x, y = blobs(600, 3)
    c = run_kmeans(x, 9, seed=0, use_gpu=False)
    assert homogeneity_score(y, c.labels) > 0.999


def test_labels_and_distances_are_a_search_of_every_point_against_the_final_centroids():
    x = np.random.default_rng(0).normal(size=(500, 6)).astype(np.float32)
    c = run_kmeans(x, 12, seed=3, use_gpu=False)
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
    c = run_kmeans(x, 2, seed=0, use_gpu=False)
    means = np.stack([x[c.labels == j].mean(0) for j in range(2)])
    np.testing.assert_allclose(c.centroids, means, atol=1e-4)


def test_same_seed_reproduces_and_different_seeds_initialise_differently():
    x = np.random.default_rng(0).normal(size=(400, 4)).astype(np.float32)  # no structure: init decides
    a, b = run_kmeans(x, 10, seed=11, use_gpu=False), run_kmeans(x, 10, seed=11, use_gpu=False)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = run_kmeans(x, 10, seed=12, use_gpu=False)
    assert not np.allclose(np.sort(a.centroids, axis=0), np.sort(c.centroids, axis=0))
    assert a.objective[0] != c.objective[0]  # already the first iteration differs: the initial centroids did


def test_run_cluster_seeds_kmeans_from_run_seed_and_epoch(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    np.save(tmp_path / "pca_features.npy", x)
    s1 = run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path / "e1", epoch=1)
    run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path / "e1_again", epoch=1)
    s2 = run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path / "e2", epoch=2)
    assert s1["seed"] == seed_for(small_params["run"]["seed"], 1, "cluster")
    assert s2["seed"] == seed_for(small_params["run"]["seed"], 2, "cluster") != s1["seed"]
    c1, c1_again, c2 = (load_clustering(tmp_path / d / "kmeans.npz") for d in ("e1", "e1_again", "e2"))
    np.testing.assert_array_equal(c1.labels, c1_again.labels)  # a rerun of an epoch is reproducible
    assert normalized_mutual_info_score(c1.labels, c2.labels) < 0.999  # the next epoch starts elsewhere
    assert s1["k"] == small_params["cluster"]["k"] and read_json(tmp_path / "e1" / "cluster.json") == s1


def test_empty_clusters_are_counted():
    # 12 points on only 3 distinct positions cannot fill 6 clusters: faiss must leave 3 empty.
    x = np.repeat(np.eye(3, dtype=np.float32) * 10, 4, axis=0)
    c = run_kmeans(x, 6, seed=0, use_gpu=False)
    assert c.k == 6
    assert c.n_empty() == 3
    assert sorted(c.sizes().tolist()) == [0, 0, 0, 4, 4, 4]


def test_run_cluster_reports_empty_clusters(tmp_path, small_params):
    x = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)  # 20 points, 4 positions, k = 10
    np.save(tmp_path / "pca_features.npy", x)
    stats = run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path, epoch=1)
    assert stats["k"] == 10 and stats["empty_clusters"] == 6


def test_clustering_sizes_on_constructed_labels():
    c = Clustering(labels=np.array([0, 0, 2, 2, 2, 4]), distances=np.zeros(6, np.float32),
                   centroids=np.zeros((6, 2), np.float32), objective=np.zeros(1), seed=0)
    assert c.sizes().tolist() == [2, 0, 3, 0, 1, 0]
    assert c.n_empty() == 3


@pytest.mark.parametrize("k", [1, 0, -3])
def test_k_below_two_is_refused(k):
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(StageError, match=rf"cluster.k={k}: k-means needs at least 2 clusters"):
        run_kmeans(x, k, use_gpu=False)


def test_k_above_the_number_of_points_is_refused():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    with pytest.raises(StageError, match=r"cluster.k=51 is larger than the number of images \(50\)"):
        run_kmeans(x, 51, use_gpu=False)
    assert run_kmeans(x, 50, use_gpu=False).k == 50  # k = N is allowed


def test_non_finite_features_are_refused():
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    x[7, 2] = np.nan
    with pytest.raises(StageError, match="NaN or infinite"):
        run_kmeans(x, 5, use_gpu=False)


def test_run_cluster_bad_k_and_method_stop_before_writing(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    np.save(tmp_path / "pca_features.npy", x)
    for k, message in ((1, "at least 2 clusters"), (31, "larger than the number of images")):
        params = {**small_params, "cluster": {**small_params["cluster"], "k": k}}
        with pytest.raises(StageError, match=message):
            run_cluster(params, tmp_path / "pca_features.npy", tmp_path / "out", epoch=1)
    params = {**small_params, "cluster": {**small_params["cluster"], "method": "pic"}}
    with pytest.raises(StageError, match="cluster.method='pic'"):
        run_cluster(params, tmp_path / "pca_features.npy", tmp_path / "out", epoch=1)
    with pytest.raises(StageError, match=str(tmp_path / "missing.npy")):
        run_cluster(small_params, tmp_path / "missing.npy", tmp_path / "out", epoch=1)
    assert not (tmp_path / "out" / "cluster.json").exists()


def test_save_load_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    c = run_kmeans(x, 4, seed=5, use_gpu=False)
    save_clustering(tmp_path / "kmeans.npz", c)
    back = load_clustering(tmp_path / "kmeans.npz")
    for field in ("labels", "distances", "centroids", "objective"):
        np.testing.assert_array_equal(getattr(back, field), getattr(c, field))
    assert back.seed == 5
    with pytest.raises(StageError, match="not found"):
        load_clustering(tmp_path / "nope.npz")


@pytest.mark.parametrize("k, message", [(1, "cluster.k must be int ≥ 2, or auto"),  # the schema's check
                                        (41, "cluster.k=41 is larger than the number of images (40)")])
def test_cli_bad_k_exits_non_zero_with_the_message(tmp_path, small_params, run_cli, k, message):
    np.save(tmp_path / "pca_features.npy", np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({**small_params, "cluster": {**small_params["cluster"], "k": k}}))
    result = run_cli("cluster", "--params", params_file, "--features", tmp_path / "pca_features.npy",
                       "--out", tmp_path / "out", "--epoch", 1, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("cluster: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_k_auto_is_one_cluster_per_images_per_cluster_images():
    section = {"k": "auto", "images_per_cluster": 64}
    assert number_of_clusters(section, 20000) == 312
    assert number_of_clusters(section, 4000) == 62
    assert number_of_clusters(section, 50) == 2  # never fewer than two clusters
    assert number_of_clusters({"k": 100, "images_per_cluster": 64}, 20000) == 100
    for bad in (10.5, "many", True):
        with pytest.raises(StageError, match="whole number of clusters, or auto"):
            number_of_clusters({"k": bad, "images_per_cluster": 64}, 1000)


def test_run_cluster_with_k_auto_reports_the_k_it_used(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(240, 8)).astype(np.float32)
    np.save(tmp_path / "pca_features.npy", x)
    params = {**small_params, "cluster": {**small_params["cluster"], "k": "auto", "images_per_cluster": 24}}
    stats = run_cluster(params, tmp_path / "pca_features.npy", tmp_path / "e1", epoch=1)
    assert stats["k"] == 10 and len(load_clustering(tmp_path / "e1" / "kmeans.npz").centroids) == 10
