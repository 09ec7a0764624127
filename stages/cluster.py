"""Stage `cluster`: cluster the PCA-whitened features -> clusters.npz (labels, distances, centroids).

`cluster.method: kmeans` (the paper's main method): faiss k-means as the official implementation:
20 iterations, a different seed every epoch (derived from the run seed), no subsampling (faiss
silently keeps only 256 points per centroid unless told otherwise), final labels from a search of
every point against the final centroids.

`cluster.method: pic`: Power Iteration Clustering as in the paper's appendix. A 5-NN graph of the
features with weights exp(-d^2 / sigma^2), symmetrised; 200 damped power iterations give every image a
score v; each image points to the neighbour j maximising w_ij (v_j - v_i) when that is positive, and the
clusters are the trees of that forest, so their number is data-driven (the head follows it each
epoch). Singletons join the cluster of their nearest non-singleton neighbour. Unlike the official
code, the graph is a sparse matrix of N x neighbours entries (never N x N), the forest is resolved by
vectorised pointer jumping (no loop over nodes), and `cluster.k` is refused rather than ignored.

Where it runs (`cluster.device`, `clustering_plan`): with `auto`, a faiss GPU build that sees GPUs
clusters on all of them (the index sharded over them), else, where faiss has no GPU but torch sees
CUDA, k-means and the exact k-NN graph run in plain torch on one GPU (`torch_kmeans`, `torch_knn`:
the faiss GPU wheels are CUDA 12 builds, torch 2.11+ is CUDA 13; docs/gpus.md "Clustering on GPUs"), else
faiss on the CPU. `cpu` forces faiss on the CPU (bit-for-bit what the stage did before it had a
choice); `gpu` refuses to run without a GPU. faiss itself is imported only when a plan uses it, so the
stage also runs where only torch is installed.

`distances` are squared distances to the cluster's centroid (the mean of its members for PIC).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.core.artifacts import train_rows, check_npy
from stages.core.clustering import ClusteringPlan, cluster_features, plan_for, save_clustering
from stages.core.errors import cli_errors
from stages.core.io import write_json
from stages.core.layout import CLUSTERING, report
from stages.core.params import load_params, stage_parser
from stages.core.runtime import Timer, peak_rss_mb, seed_for
from stages.core.schema import Params


def run_cluster(params: Params, features: str | Path, out: str | Path, epoch: int,
                dataset: str | Path | None = None) -> dict:
    """dataset: the run's dataset; `features` must have a row per training image (None: not checked)."""
    section = params.cluster
    check_npy(features, rows=train_rows(dataset) if dataset else None, fix="run pca for this epoch (again)")
    out_dir = Path(out)
    with Timer() as t:
        plan = plan_for(section.device)
        c, refilled = cluster_features(section, np.load(features), seed_for(params.run.seed, epoch, "cluster"), plan)
        save_clustering(out_dir / CLUSTERING, c)
    stats = {"method": section.method, "k": c.k, "empty_clusters": c.n_empty(), "refilled_clusters": refilled,
             "singleton_clusters": int((c.sizes() == 1).sum()),
             "objective": float(c.objective[-1]) if len(c.objective) else None, "seed": c.seed,
             "gpu": plan.gpus > 0, "backend": plan.backend, "gpus": plan.gpus, "seconds": t.seconds, "peak_rss_mb": peak_rss_mb()}
    write_json(out_dir / report("cluster"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "params file; this stage reads its `cluster` section")
    parser.add_argument("--features", required=True, help="pca_features.npy written by pca")
    parser.add_argument("--out", required=True, help="epoch directory for clusters.npz")
    parser.add_argument("--epoch", type=int, required=True, help="epoch number: k-means is seeded from run.seed and it (PIC is deterministic)")
    parser.add_argument("--dataset", help="the run's dataset: the features must have a row per training image")
    args = parser.parse_args(argv)
    with cli_errors("cluster"):
        stats = run_cluster(load_params(args.params), args.features, args.out, args.epoch, args.dataset)
    loss = "" if stats["objective"] is None else f", loss {stats['objective']:.4g}"
    refilled = f", {stats['refilled_clusters']} small refilled" if stats["refilled_clusters"] else ""
    plan = ClusteringPlan(stats["backend"], stats["gpus"]).describe()
    print(f"cluster ({stats['method']}, {plan}): {stats['k']} clusters, {stats['empty_clusters']} empty, "
          f"{stats['singleton_clusters']} singletons{refilled}{loss}, {stats['seconds']:.1f}s")


if __name__ == "__main__":
    main()
