"""stages.core.clustering on CPUs and GPUs: which backend `cluster.device` picks on every kind of machine (a pure
function, so the GPU machines' choices are tested here without one), that `device: cpu` is exactly the
faiss k-means the stage ran before it had a choice, and the torch k-means / kNN fallback (run on CPU
tensors here; on a GPU it is the same code on cuda tensors)."""
from __future__ import annotations

import sys

import faiss
import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.metrics import normalized_mutual_info_score

from stages.core import clustering as cluster
from stages.core.clustering import (ClusteringPlan, clustering_plan, knn_graph, plan_for, run_kmeans, split_largest,
                                    torch_kmeans, torch_knn)
from stages.core.errors import StageError


# ---------------------------------------------------------------- the plan
@pytest.mark.parametrize("device, faiss_gpus, torch_gpus, backend, gpus, shard", [
    ("auto", 4, 4, "faiss-gpu", 4, True),  # every GPU, the index sharded over them
    ("auto", 1, 1, "faiss-gpu", 1, False),
    ("gpu", 2, 2, "faiss-gpu", 2, True),
    ("auto", 0, 8, "torch-cuda", 1, False),  # faiss-cpu next to a CUDA torch
    ("auto", None, 1, "torch-cuda", 1, False),  # no faiss at all (the GPU check machine)
    ("gpu", 0, 1, "torch-cuda", 1, False),
    ("auto", 0, 0, "faiss-cpu", 0, False),  # CI, the default machine
    ("cpu", 4, 4, "faiss-cpu", 0, False),  # the setting forces the CPU whatever there is
    ("cpu", 0, 0, "faiss-cpu", 0, False),
])
def test_the_plan_prefers_faiss_on_all_gpus_then_torch_on_one_gpu_then_the_cpu(device, faiss_gpus, torch_gpus, backend,
                                                                               gpus, shard):
    plan = clustering_plan(device, faiss_gpus, torch_gpus)
    assert (plan.backend, plan.gpus, plan.shard) == (backend, gpus, shard)
    assert plan.describe()


@pytest.mark.parametrize("device, faiss_gpus, torch_gpus, says", [
    ("gpu", 0, 0, "faiss sees no GPU"),
    ("gpu", None, 0, "faiss is not installed"),
    ("cpu", None, 2, "faiss, which is not installed"),
    ("auto", None, 0, "nothing to cluster with"),
])
def test_impossible_plans_say_why_and_what_to_set(device, faiss_gpus, torch_gpus, says):
    with pytest.raises(StageError, match=says):
        clustering_plan(device, faiss_gpus, torch_gpus)


def test_on_this_machine_auto_is_faiss_on_the_cpu_and_gpu_is_refused():
    if faiss.get_num_gpus() or __import__("torch").cuda.is_available():
        pytest.skip("a GPU machine")
    assert plan_for("auto") == ClusteringPlan("faiss-cpu")
    with pytest.raises(StageError, match="cluster.device: gpu"):
        run_kmeans(np.zeros((10, 2), np.float32), 2, device="gpu")


def test_the_stage_imports_and_plans_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert cluster.faiss_gpu_count() is None
    with pytest.raises(StageError, match="faiss, which is not installed"):
        plan_for("cpu")


# ---------------------------------------------------------------- device: cpu is today's k-means
def _faiss_kmeans_before(x: np.ndarray, k: int, niter: int, seed: int):
    """stages.core.clustering.run_kmeans as it was before cluster.device existed."""
    n, d = x.shape
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, gpu=False, max_points_per_centroid=n + 1, min_points_per_centroid=1)
    km.train(x)
    distances, labels = km.index.search(x, 1)
    obj = np.array([km.iteration_stats[i]["obj"] for i in range(len(km.iteration_stats))])
    return labels.ravel(), distances.ravel(), km.centroids, obj


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_device_cpu_gives_bit_identical_results_to_the_faiss_kmeans_of_before(device):
    if device == "auto" and plan_for("auto").backend != "faiss-cpu":
        pytest.skip("auto is a GPU here")
    x = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    for k, seed in ((50, 1), (300, 7)):
        labels, distances, centroids, obj = _faiss_kmeans_before(x, k, 20, seed)
        c = run_kmeans(x, k, 20, seed, device=device)
        np.testing.assert_array_equal(c.labels, labels)
        np.testing.assert_array_equal(c.distances, distances)
        np.testing.assert_array_equal(c.centroids, centroids)
        np.testing.assert_array_equal(c.objective, obj)


# ---------------------------------------------------------------- torch k-means and kNN
def blobs(n: int, centers: int, seed: int = 1, dim: int = 8):
    x, y = make_blobs(n_samples=n, centers=centers, n_features=dim, cluster_std=0.5, center_box=(-20, 20),
                      random_state=seed)
    return x.astype(np.float32), y


def test_torch_kmeans_recovers_well_separated_blobs():
    x, y = blobs(2000, 5)
    runs = [torch_kmeans(x, 5, 20, seed, device="cpu", chunk=256) for seed in range(10)]  # chunked distances
    best = min(runs, key=lambda c: c.objective[-1])
    assert normalized_mutual_info_score(y, best.labels) == pytest.approx(1.0, abs=1e-9)
    assert best.labels.dtype == np.int64 and best.distances.dtype == np.float32 and best.centroids.shape == (5, 8)
    assert len(best.objective) == 20 and np.all(np.diff(best.objective) <= 1e-3 * best.objective[0])  # Lloyd never rises


def test_torch_kmeans_matches_faiss_on_the_same_data():
    # Different random starts, so compare what both converge to: the same partition of well-separated
    # blobs (over-segmented: k = 2 x blobs), similar objectives.
    x, y = blobs(3000, 10, seed=3, dim=16)
    t = min((torch_kmeans(x, 20, 20, s, device="cpu") for s in range(5)), key=lambda c: c.objective[-1])
    f = min((run_kmeans(x, 20, 20, s, device="cpu") for s in range(5)), key=lambda c: c.objective[-1])
    assert normalized_mutual_info_score(y, t.labels) > 0.8 and normalized_mutual_info_score(y, f.labels) > 0.8
    assert t.objective[-1] == pytest.approx(f.objective[-1], rel=0.05)
    # labels and distances are a search against the final centroids, as faiss's
    d2 = ((x[:, None].astype(np.float64) - t.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(t.labels, d2.argmin(1))
    np.testing.assert_allclose(t.distances, d2.min(1), rtol=1e-3, atol=1e-3)


def test_torch_kmeans_is_reproducible_and_seeded():
    x, _ = blobs(500, 4)
    a, b, c = (torch_kmeans(x, 8, 10, s, device="cpu") for s in (5, 5, 6))
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.centroids, c.centroids)


def test_torch_kmeans_leaves_no_cluster_empty_when_points_are_duplicated():
    # 40 points, only 4 distinct values: most random starts put several centroids on one value, so
    # clusters empty out and must be refilled by splitting the largest (as faiss does).
    x = np.repeat(np.eye(4, dtype=np.float32) * 10, 10, axis=0)
    x += np.random.default_rng(0).normal(scale=0.01, size=x.shape).astype(np.float32)
    c = torch_kmeans(x, 8, 20, seed=0, device="cpu")
    assert c.n_empty() == 0


def test_split_largest_copies_the_largest_centroid_nudged_apart_and_halves_its_count():
    import torch

    c = torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, 4.0]])
    counts = torch.tensor([3, 0, 8])
    assert split_largest(c, counts, eps=0.5) == 1
    torch.testing.assert_close(c[1], torch.tensor([4.5, 2.0]))  # copy of cluster 2: even dims up, odd down
    torch.testing.assert_close(c[2], torch.tensor([1.5, 6.0]))  # ... and cluster 2 the other way
    assert counts.tolist() == [3, 4, 4]


def test_torch_knn_finds_the_exact_neighbours_that_faiss_finds():
    x = np.random.default_rng(2).normal(size=(700, 12)).astype(np.float32)
    idx, dist = torch_knn(x, 6, device="cpu", chunk=100)
    ref_dist, ref_idx = faiss.knn(x, x, 6)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=1e-4)


def test_knn_graph_on_the_torch_plan_runs_the_torch_search(monkeypatch):
    x = np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)
    monkeypatch.setattr(cluster, "torch_knn", lambda x, m, device, chunk=None: torch_knn(x, m, "cpu"))
    got = knn_graph(x, 5, ClusteringPlan("torch-cuda", 1))
    ref = knn_graph(x, 5, "cpu")
    np.testing.assert_array_equal(got[0], ref[0])


def test_run_kmeans_on_the_torch_plan_uses_torch_kmeans(monkeypatch):
    x, y = blobs(400, 3)
    calls = []
    monkeypatch.setattr(cluster, "torch_kmeans", lambda x, k, niter, seed, device: calls.append(device) or
                        torch_kmeans(x, k, niter, seed, "cpu"))
    c = run_kmeans(x, 3, 20, 0, ClusteringPlan("torch-cuda", 1))
    assert calls == ["cuda"] and c.k == 3
