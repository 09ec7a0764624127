"""stages.cluster: faiss k-means (real faiss, CPU) with per-epoch seeds and empty-cluster counting."""
from __future__ import annotations


import numpy as np
import pytest
import yaml
from sklearn.metrics import normalized_mutual_info_score

from stages.cluster import run_cluster
from stages.core.clustering import (load_clustering)
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.params import apply_overrides
from stages.core.runtime import seed_for


def test_run_cluster_seeds_kmeans_from_run_seed_and_epoch(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    np.save(tmp_path / "pca_features.npy", x)
    s1 = run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path / "e1", epoch=1)
    run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path / "e1_again", epoch=1)
    s2 = run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path / "e2", epoch=2)
    assert s1["seed"] == seed_for(small_params.run.seed, 1, "cluster")
    assert s2["seed"] == seed_for(small_params.run.seed, 2, "cluster") != s1["seed"]
    c1, c1_again, c2 = (load_clustering(tmp_path / d / "clusters.npz") for d in ("e1", "e1_again", "e2"))
    np.testing.assert_array_equal(c1.labels, c1_again.labels)  # a rerun of an epoch is reproducible
    assert normalized_mutual_info_score(c1.labels, c2.labels) < 0.999  # the next epoch starts elsewhere
    assert s1["k"] == small_params.cluster.k and read_json(tmp_path / "e1" / "cluster.json") == s1


def test_run_cluster_reports_empty_clusters(tmp_path, small_params):
    x = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)  # 20 points, 4 positions, k = 10
    np.save(tmp_path / "pca_features.npy", x)
    stats = run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path, epoch=1)
    assert stats["k"] == 10 and stats["empty_clusters"] == 6


def test_run_cluster_bad_k_and_method_stop_before_writing(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    np.save(tmp_path / "pca_features.npy", x)
    # k = 1, and PIC with a fixed k, are refused by the schema: no Params holds them
    for overrides, message in (({"cluster.k": 1}, "cluster.k must be int ≥ 2"),
                               ({"cluster.k": 31}, "larger than the number of images"),
                               ({"cluster.method": "pic"}, "cluster.k: 10 in params.yaml with cluster.method: pic")):
        with pytest.raises(StageError, match=message):
            run_cluster(apply_overrides(small_params, overrides), tmp_path / "pca_features.npy", tmp_path / "out",
                        epoch=1)
    with pytest.raises(StageError, match=str(tmp_path / "missing.npy")):
        run_cluster(small_params, tmp_path / "missing.npy", tmp_path / "out", epoch=1)
    assert not (tmp_path / "out" / "cluster.json").exists()


@pytest.mark.parametrize("k, message", [(1, "cluster.k must be int ≥ 2, or auto"),  # the schema's check
                                        (41, "cluster.k=41 is larger than the number of images (40)")])
def test_cli_bad_k_exits_non_zero_with_the_message(tmp_path, small_params, run_cli, k, message):
    np.save(tmp_path / "pca_features.npy", np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32))
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({**small_params.model_dump(), "cluster": {**small_params.cluster.model_dump(),
                                                                                   "k": k}}))
    result = run_cli("cluster", "--params", params_file, "--features", tmp_path / "pca_features.npy",
                       "--out", tmp_path / "out", "--epoch", 1, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("cluster: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_run_cluster_with_k_auto_reports_the_k_it_used(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(240, 8)).astype(np.float32)
    np.save(tmp_path / "pca_features.npy", x)
    params = apply_overrides(small_params, {"cluster.k": "auto", "cluster.images_per_cluster": 24})
    stats = run_cluster(params, tmp_path / "pca_features.npy", tmp_path / "e1", epoch=1)
    assert stats["k"] == 10 and len(load_clustering(tmp_path / "e1" / "clusters.npz").centroids) == 10


def _on_sphere(x: np.ndarray) -> np.ndarray:
    """Centred and L2-normalised, as the pca stage hands features to the clustering."""
    x = x - x.mean(axis=0)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_run_cluster_with_pic_reports_clusters_and_singletons(tmp_path, small_params, digits):
    np.save(tmp_path / "pca_features.npy", _on_sphere(digits[0]))
    params = apply_overrides(small_params, {"cluster.method": "pic", "cluster.k": "auto"})
    stats = run_cluster(params, tmp_path / "pca_features.npy", tmp_path / "e1", epoch=1)
    c = load_clustering(tmp_path / "e1" / "clusters.npz")
    assert stats["method"] == "pic" and stats["k"] == c.k == len(np.unique(c.labels))
    assert stats["singleton_clusters"] == 0 and stats["empty_clusters"] == 0 and stats["objective"] is None




def test_run_cluster_refills_the_clusters_under_its_share_of_the_mean_size(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    np.save(tmp_path / "pca_features.npy", x)
    plain = run_cluster(small_params, tmp_path / "pca_features.npy", tmp_path / "plain", epoch=1)
    sizes = load_clustering(tmp_path / "plain" / "clusters.npz").sizes()
    below = float(np.sort(sizes)[2] + 0.5) / (len(x) / len(sizes))  # the 3 smallest clusters are under it
    refilled = run_cluster(apply_overrides(small_params, {"cluster.refill_below": below}),
                           tmp_path / "pca_features.npy", tmp_path / "refilled", epoch=1)
    assert plain["refilled_clusters"] == 0 and refilled["refilled_clusters"] == 3
    new = load_clustering(tmp_path / "refilled" / "clusters.npz")
    assert new.k == len(sizes) and normalized_mutual_info_score(new.labels, load_clustering(
        tmp_path / "plain" / "clusters.npz").labels) < 0.999
