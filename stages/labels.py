"""Stage `labels`: the epoch's pseudo-label file and how it relates to the last epoch and true labels.

Writes data/epochs/<epoch>/assignments.parquet (image_id, cluster, distance) and labels.json:
cluster-size statistics, NMI with the previous epoch's assignments (paper Fig. 2b) and NMI with
the true labels where known (Fig. 2a; for monitoring only, never used for model selection).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import normalized_mutual_info_score

from stages.cluster import load_clustering
from stages.common import StageError, Timer, atomic_path, load_params, write_json
from stages.data import load_split

ASSIGNMENTS = "assignments.parquet"


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """NMI = I(A;B) / sqrt(H(A) H(B)), the paper's normalisation."""
    return float(normalized_mutual_info_score(a, b, average_method="geometric"))


def cluster_size_stats(labels: np.ndarray, k: int) -> dict:
    sizes = np.bincount(labels, minlength=k)
    nonempty = sizes[sizes > 0]
    return {"k": k, "n_clusters": int(len(nonempty)), "empty_clusters": int(k - len(nonempty)),
            "size_min": int(nonempty.min()), "size_median": float(np.median(nonempty)), "size_max": int(nonempty.max()),
            # coefficient of variation: 0 = perfectly balanced clusters
            "size_cv": float(nonempty.std() / nonempty.mean()), "sizes": sizes.tolist()}


def write_assignments(path: str | Path, image_ids: np.ndarray, clusters: np.ndarray, distances: np.ndarray) -> None:
    table = pa.table({"image_id": pa.array(image_ids.astype(str), pa.string()),
                      "cluster": pa.array(clusters.astype(np.int64)),
                      "distance": pa.array(distances.astype(np.float32))})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_assignments(path: str | Path) -> pd.DataFrame:
    if not Path(path).exists():
        raise StageError(f"{path} not found: run the labels stage for that epoch first")
    return pd.read_parquet(path)


def nmi_between(current: pd.DataFrame, previous: pd.DataFrame) -> float:
    """NMI of two epochs' assignments, matched by image_id (so reordering or subsets can't fool it)."""
    joined = current.merge(previous, on="image_id", suffixes=("", "_prev"))
    if len(joined) == 0:
        raise StageError("the two epochs share no image_id: were they run on different datasets?")
    return nmi(joined["cluster"].to_numpy(), joined["cluster_prev"].to_numpy())


def run_labels(params: dict, epoch_dir: str | Path, dataset: str | Path, previous: str | Path | None = None) -> dict:
    epoch_dir = Path(epoch_dir)
    with Timer() as t:
        c = load_clustering(epoch_dir / "kmeans.npz")
        image_ids = np.load(epoch_dir / "image_ids.npy")
        if len(image_ids) != len(c.labels):
            raise StageError(f"{epoch_dir}: {len(image_ids)} image ids but {len(c.labels)} cluster labels; rerun extract")
        write_assignments(epoch_dir / ASSIGNMENTS, image_ids, c.labels, c.distances)
        stats = cluster_size_stats(c.labels, c.k)
        stats["nmi_previous"] = None
        prev_file = Path(previous) / ASSIGNMENTS if previous else None
        if prev_file is not None and prev_file.exists():
            current = pd.DataFrame({"image_id": image_ids, "cluster": c.labels})
            stats["nmi_previous"] = nmi_between(current, read_assignments(prev_file))
        images = load_split(dataset, "train")
        stats["nmi_labels"] = None
        if images.has_labels:
            truth = pd.Series(images.labels, index=images.ids).reindex(image_ids).to_numpy()
            stats["nmi_labels"] = nmi(truth, c.labels)
    stats["seconds"] = t.seconds
    write_json(epoch_dir / "labels.json", stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (this stage has no section of its own)")
    parser.add_argument("--epoch-dir", required=True, help="epoch directory holding kmeans.npz and image_ids.npy")
    parser.add_argument("--dataset", default="data/dataset", help="canonical dataset (true labels, if any)")
    parser.add_argument("--previous", help="previous epoch directory, for NMI between consecutive epochs")
    args = parser.parse_args(argv)
    try:
        s = run_labels(load_params(args.params), args.epoch_dir, args.dataset, args.previous)
    except StageError as e:
        sys.exit(f"labels: {e}")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    print(f"labels: {s['n_clusters']} clusters ({s['empty_clusters']} empty), sizes {s['size_min']}/"
          f"{s['size_median']:.0f}/{s['size_max']}, NMI prev {fmt(s['nmi_previous'])}, NMI labels {fmt(s['nmi_labels'])}")


if __name__ == "__main__":
    main()
