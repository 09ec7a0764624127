"""Per-epoch cluster assignments (assignments.parquet: image_id, cluster, distance) and the measures
between clusterings: NMI, cluster matching, size statistics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.optimize import linear_sum_assignment

from stages.core.errors import DamagedArtifact, StageError, first_line
from stages.core.io import atomic_path

MAX_DENSE_PAIRS = 25_000_000  # 5,000 x 5,000 clusters: a 200 MB table, Hungarian in seconds


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """NMI = I(A;B) / sqrt(H(A) H(B)), the paper's normalisation; scikit-learn's
    normalized_mutual_info_score(a, b, average_method="geometric") to 1e-12, limit cases included (tested
    against it), computed here from the sparse contingency table so that the epoch's stages need only
    numpy, scipy, pandas and pyarrow besides torch (the GPU check's machine has no scikit-learn)."""
    a, b = np.asarray(a), np.asarray(b)
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    if len(ua) == len(ub) <= 1:  # neither labelling splits the data: a perfect match
        return 1.0
    pairs, counts = np.unique(ia.astype(np.int64).ravel() * len(ub) + ib.ravel(), return_counts=True)
    n = float(len(ia))
    pa_, pb_ = np.bincount(ia.ravel()) / n, np.bincount(ib.ravel()) / n
    pij = counts / n
    mi = max(float(np.sum(pij * (np.log(pij) - np.log(pa_[pairs // len(ub)]) - np.log(pb_[pairs % len(ub)])))), 0.0)
    if mi == 0.0:
        return 0.0
    ha, hb = -float(np.sum(pa_ * np.log(pa_))), -float(np.sum(pb_ * np.log(pb_)))
    return float(mi / max(np.sqrt(ha * hb), np.finfo(np.float64).eps))


def cluster_size_stats(labels: np.ndarray, k: int) -> dict:
    sizes = np.bincount(labels, minlength=k)
    nonempty = sizes[sizes > 0]
    return {"k": k, "n_clusters": int(len(nonempty)), "empty_clusters": int(k - len(nonempty)),
            "singleton_clusters": int((nonempty == 1).sum()),
            "size_min": int(nonempty.min()), "size_median": float(np.median(nonempty)), "size_max": int(nonempty.max()),
            # coefficient of variation: 0 = perfectly balanced clusters
            "size_cv": float(nonempty.std() / nonempty.mean()), "sizes": sizes.tolist()}


def size_histogram(sizes: np.ndarray) -> pd.DataFrame:
    """Cluster sizes in powers-of-two bins: how many clusters, holding how many images (bins with no
    cluster are left out, except the empty clusters' row)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    rows = [{"size": "0 (empty)", "clusters": int((sizes == 0).sum()), "images": 0}]
    lo, top = 1, int(sizes.max()) if len(sizes) else 0
    while lo <= top:
        hi = lo * 2 - 1
        sel = (sizes >= lo) & (sizes <= hi)
        if sel.any():
            rows.append({"size": str(lo) if lo == hi else f"{lo}-{hi}", "clusters": int(sel.sum()),
                         "images": int(sizes[sel].sum())})
        lo *= 2
    return pd.DataFrame(rows)


def match_clusters(a: np.ndarray, b: np.ndarray) -> tuple[int, str]:
    """Pair the groups of labelling a one-to-one with those of b so that most items land in paired
    groups; returns that number of items and the method.

    The Hungarian algorithm on the contingency table; above MAX_DENSE_PAIRS group pairs (e.g. two
    k = 10,000 clusterings) a greedy pairing, largest overlaps first, which can only undercount.
    Clustering accuracy (clusters vs classes) and "images that changed cluster" (epoch vs epoch) are
    both this count.
    """
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b) or len(a) == 0:
        raise StageError(f"match_clusters: {len(a)} and {len(b)} labels; need two equally long, non-empty labellings")
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    if len(ua) * len(ub) <= MAX_DENSE_PAIRS:
        table = np.zeros((len(ua), len(ub)), dtype=np.int64)
        np.add.at(table, (ia, ib), 1)
        rows, cols = linear_sum_assignment(table, maximize=True)
        return int(table[rows, cols].sum()), "hungarian"
    pairs, counts = np.unique(ia.astype(np.int64) * len(ub) + ib, return_counts=True)
    used_a, used_b, matched = set(), set(), 0
    for idx in np.argsort(-counts, kind="stable"):
        ca, cb = divmod(int(pairs[idx]), len(ub))
        if ca not in used_a and cb not in used_b:
            used_a.add(ca)
            used_b.add(cb)
            matched += int(counts[idx])
    return matched, "greedy"


def write_assignments(path: str | Path, image_ids: np.ndarray, clusters: np.ndarray, distances: np.ndarray) -> None:
    table = pa.table({"image_id": pa.array(image_ids.astype(str), pa.string()),
                      "cluster": pa.array(clusters.astype(np.int64)),
                      "distance": pa.array(distances.astype(np.float32))})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_assignments(path: str | Path, fix: str | None = None) -> pd.DataFrame:
    if not Path(path).exists():
        raise StageError(f"{path} not found: run the labels stage for that epoch first")
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DamagedArtifact(path, f"not a readable parquet file ({first_line(e)})", fix) from e


def nmi_between(current: pd.DataFrame, previous: pd.DataFrame) -> float:
    """NMI of two epochs' assignments, matched by image_id (so reordering or subsets can't fool it)."""
    if len(current) == len(previous) and np.array_equal(current["image_id"].to_numpy(), previous["image_id"].to_numpy()):
        # Both in the dataset's row order (what the labels stage writes): no join over N string ids.
        return nmi(current["cluster"].to_numpy(), previous["cluster"].to_numpy())
    joined = current.merge(previous, on="image_id", suffixes=("", "_prev"))
    if len(joined) == 0:
        raise StageError("the two epochs share no image_id: were they run on different datasets?")
    return nmi(joined["cluster"].to_numpy(), joined["cluster_prev"].to_numpy())
