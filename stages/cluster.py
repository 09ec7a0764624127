"""Stage `cluster`: faiss k-means on the PCA-whitened features -> kmeans.npz (labels, distances, centroids).

As the official implementation: 20 iterations, a different seed every epoch (derived from the run
seed), no subsampling (faiss silently keeps only 256 points per centroid unless told otherwise),
final labels from a search of every point against the final centroids. Uses a GPU index when faiss
sees a GPU.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from stages.common import StageError, Timer, atomic_path, cli_errors, load_params, peak_rss_mb, seed_for, write_json
from stages.layout import CLUSTERING, report


@dataclass
class Clustering:
    labels: np.ndarray  # N int64, cluster index of each point
    distances: np.ndarray  # N float32, squared L2 distance to its centroid
    centroids: np.ndarray  # k x d
    objective: np.ndarray  # k-means loss after each iteration
    seed: int

    @property
    def k(self) -> int:
        return len(self.centroids)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)

    def n_empty(self) -> int:
        return int((self.sizes() == 0).sum())


def run_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, use_gpu: bool | None = None,
               verbose: bool = False) -> Clustering:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 2:
        raise StageError(f"cluster.k={k}: k-means needs at least 2 clusters")
    if k > n:
        raise StageError(f"cluster.k={k} is larger than the number of images ({n}): lower cluster.k")
    if not np.isfinite(x).all():
        raise StageError("features to cluster hold NaN or infinite values: rerun pca for this epoch")
    if use_gpu is None:
        use_gpu = faiss.get_num_gpus() > 0
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, gpu=bool(use_gpu), verbose=verbose,
                      max_points_per_centroid=n + 1,  # no subsampling
                      min_points_per_centroid=1)  # small data sets: don't warn, we count empties ourselves
    km.train(x)
    distances, labels = km.index.search(x, 1)
    objective = np.array([km.iteration_stats[i]["obj"] for i in range(len(km.iteration_stats))], dtype=np.float64)
    return Clustering(labels.ravel().astype(np.int64), distances.ravel(), km.centroids.copy(), objective, seed)


def number_of_clusters(section: dict, n: int) -> int:
    """cluster.k, or with `k: auto` one cluster per `images_per_cluster` images (at least 2).

    DeepCluster over-segments (paper Fig. 2c): k well above the number of classes. What carries over
    between data sets of different sizes is how many images a cluster holds, not k itself: the paper's
    ImageNet k = 10,000 is 128 images per cluster; on small grey images fewer, larger-k clusters
    learnt better (README, "The recipe").
    """
    k = section["k"]
    if k == "auto":
        return max(2, round(n / section["images_per_cluster"]))
    if isinstance(k, bool) or not isinstance(k, int):
        raise StageError(f"cluster.k={k!r}: use a whole number of clusters, or auto (one per "
                         "cluster.images_per_cluster images)")
    return k


def save_clustering(path: str | Path, c: Clustering) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, labels=c.labels, distances=c.distances, centroids=c.centroids, objective=c.objective, seed=c.seed)


def load_clustering(path: str | Path) -> Clustering:
    if not Path(path).exists():
        raise StageError(f"{path} not found: run the cluster stage for this epoch first")
    with np.load(path) as z:
        return Clustering(z["labels"], z["distances"], z["centroids"], z["objective"], int(z["seed"]))


def run_cluster(params: dict, features: str | Path, out_dir: str | Path, epoch: int) -> dict:
    section = params["cluster"]
    if section.get("method", "kmeans") != "kmeans":
        raise StageError(f"cluster.method={section['method']!r} is not available: use kmeans")
    if not Path(features).exists():
        raise StageError(f"{features} not found: run pca for this epoch first")
    out_dir = Path(out_dir)
    with Timer() as t:
        x = np.load(features)
        k = number_of_clusters(section, len(x))
        c = run_kmeans(x, k, section["niter"], seed_for(params["run"]["seed"], epoch, "cluster"))
        save_clustering(out_dir / CLUSTERING, c)
    stats = {"k": c.k, "empty_clusters": c.n_empty(), "objective": float(c.objective[-1]), "seed": c.seed,
             "gpu": faiss.get_num_gpus() > 0, "seconds": t.seconds, "peak_rss_mb": peak_rss_mb()}
    write_json(out_dir / report("cluster"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file; this stage reads its `cluster` section")
    parser.add_argument("--features", required=True, help="pca_features.npy written by pca")
    parser.add_argument("--out", required=True, help="epoch directory for kmeans.npz")
    parser.add_argument("--epoch", type=int, required=True, help="epoch number: k-means is seeded from run.seed and it")
    args = parser.parse_args(argv)
    with cli_errors("cluster"):
        stats = run_cluster(load_params(args.params), args.features, args.out, args.epoch)
    print(f"cluster: k={stats['k']}, {stats['empty_clusters']} empty, loss {stats['objective']:.4g}, {stats['seconds']:.1f}s")


if __name__ == "__main__":
    main()
