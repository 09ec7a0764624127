"""The clustering algorithms: k-means (faiss on CPUs or GPUs, torch on a GPU) and Power Iteration
Clustering (paper appendix), and the clustering file they write."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch

from stages.core.artifacts import check_npz
from stages.core.errors import StageError
from stages.core.io import atomic_path
from stages.core.runtime import seeded_subset
from stages.core.schema import Cluster


@dataclass
class Clustering:
    labels: np.ndarray  # N int64, cluster index of each point
    distances: np.ndarray  # N float32, squared L2 distance to its centroid
    centroids: np.ndarray  # k x d
    objective: np.ndarray  # k-means loss after each iteration (empty for PIC)
    seed: int

    @property
    def k(self) -> int:
        return len(self.centroids)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)

    def n_empty(self) -> int:
        return int((self.sizes() == 0).sum())


# ---------------------------------------------------------------- where clustering runs
@dataclass(frozen=True)
class ClusteringPlan:
    backend: str  # faiss-gpu, torch-cuda or faiss-cpu
    gpus: int = 0  # GPUs used: all that faiss sees, 1 for torch, 0 on the CPU

    @property
    def shard(self) -> bool:
        """faiss's index is split over the GPUs (each holds 1/gpus of the centroids or points)."""
        return self.backend == "faiss-gpu" and self.gpus > 1

    def describe(self) -> str:
        if self.backend == "faiss-gpu":
            return f"faiss on {self.gpus} GPU{'s, sharded index' if self.shard else ''}"
        if self.backend == "torch-cuda":
            return "torch on 1 GPU (faiss has no GPU here)"
        return "faiss on the CPU"


def clustering_plan(device: str, faiss_gpus: int | None, torch_gpus: int) -> ClusteringPlan:
    """Where to cluster, from `cluster.device` and what the machine offers: faiss_gpus is what
    faiss.get_num_gpus() reports (None: faiss is not installed; a faiss-cpu build reports 0), torch_gpus
    is torch.cuda.device_count(). A pure function: every machine's choice is testable on a CPU."""
    if device == "cpu":
        if faiss_gpus is None:
            raise StageError("cluster.device: cpu clusters with faiss, which is not installed: `make install` "
                             "(or pip install faiss-cpu), or set cluster.device: auto to use a CUDA GPU through torch")
        return ClusteringPlan("faiss-cpu")
    if faiss_gpus:
        return ClusteringPlan("faiss-gpu", faiss_gpus)
    if torch_gpus > 0:
        return ClusteringPlan("torch-cuda", 1)
    if device == "gpu":
        faiss_state = "is not installed" if faiss_gpus is None else "sees no GPU (a faiss-cpu build, or no GPU)"
        raise StageError(f"cluster.device: gpu, but faiss {faiss_state} and torch sees no CUDA GPU: run on a machine "
                         "with a GPU (faiss GPU build: `make install FAISS=gpu`), or set cluster.device: auto or cpu")
    if faiss_gpus is None:
        raise StageError("faiss is not installed and torch sees no CUDA GPU, so there is nothing to cluster with: "
                         "`make install` (or pip install faiss-cpu)")
    return ClusteringPlan("faiss-cpu")


def faiss_gpu_count() -> int | None:
    """The GPUs faiss sees (0 for a faiss-cpu build), or None where faiss is not installed (only torch)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def plan_for(device: str | ClusteringPlan = "auto") -> ClusteringPlan:
    """The plan for `cluster.device` on this machine (a plan passes through); torch is only asked
    when faiss has no GPU and the CPU is not forced."""
    if isinstance(device, ClusteringPlan):
        return device
    faiss_gpus = faiss_gpu_count()
    torch_gpus = torch.cuda.device_count() if device != "cpu" and not faiss_gpus and torch.cuda.is_available() else 0
    return clustering_plan(device, faiss_gpus, torch_gpus)


def faiss_index(index, plan: ClusteringPlan):
    """A CPU faiss index moved onto the plan's GPUs: one GPU, or sharded over all of them (each GPU holds
    a slice of the database; queries go to every slice and the results are merged)."""
    if plan.backend != "faiss-gpu":
        return index
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.shard = plan.shard
    # index_cpu_to_all_gpus keeps its GPU resources referenced by the index it returns
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=plan.gpus)


# ---------------------------------------------------------------- k-means
def run_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, device: str | ClusteringPlan = "auto",
               verbose: bool = False) -> Clustering:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if k < 2:
        raise StageError(f"cluster.k={k}: k-means needs at least 2 clusters")
    if k > n:
        raise StageError(f"cluster.k={k} is larger than the number of images ({n}): lower cluster.k")
    if not np.isfinite(x).all():
        raise StageError("features to cluster hold NaN or infinite values: rerun pca for this epoch")
    plan = plan_for(device)
    if plan.backend == "torch-cuda":
        return torch_kmeans(x, k, niter, seed, "cuda")
    import faiss

    cp = faiss.ClusteringParameters()
    cp.niter, cp.seed, cp.verbose = niter, seed, verbose
    cp.max_points_per_centroid = n + 1  # no subsampling
    cp.min_points_per_centroid = 1  # small data sets: don't warn, we count empties ourselves
    clus = faiss.Clustering(d, k, cp)
    index = faiss_index(faiss.IndexFlatL2(d), plan)
    clus.train(x, index)  # leaves the final centroids in `index`
    distances, labels = index.search(x, 1)
    stats = clus.iteration_stats
    objective = np.array([stats.at(i).obj for i in range(stats.size())], dtype=np.float64)
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    return Clustering(labels.ravel().astype(np.int64), distances.ravel(), centroids, objective, seed)


def _chunk_rows(n_cols: int, budget: int = 1 << 26) -> int:
    """Rows per chunk so that a chunk x n_cols distance block holds at most `budget` floats (256 MB)."""
    return max(1, budget // max(1, n_cols))


def _nearest(x, c, c_sq, chunk: int):
    """Each row of x's nearest row of c and the squared distance, chunk rows at a time (torch tensors)."""
    labels = torch.empty(len(x), dtype=torch.int64, device=x.device)
    dist = torch.empty(len(x), dtype=torch.float32, device=x.device)
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        d2 = (xb * xb).sum(1, keepdim=True) - 2.0 * (xb @ c.T) + c_sq
        best, arg = d2.min(1)
        dist[i:i + chunk], labels[i:i + chunk] = best.clamp_min_(0), arg
    return labels, dist


def split_largest(centroids, counts, eps: float = 1.0 / 1024) -> int:
    """faiss's empty-cluster rule, made deterministic: each empty centroid becomes a copy of the largest
    cluster's, both nudged apart by a relative eps in opposite directions (even dims up, odd dims down),
    and the two share that cluster's points for the next assignment. In place; returns how many were split."""
    empty = (counts == 0).nonzero().flatten().tolist()
    dims = torch.arange(centroids.shape[1], device=centroids.device, dtype=centroids.dtype)
    sign = (1 - 2 * (dims % 2)) * eps
    for ci in empty:
        cj = int(counts.argmax())
        centroids[ci] = centroids[cj] * (1 + sign)
        centroids[cj] = centroids[cj] * (1 - sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def torch_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, device: str = "cuda",
                 chunk: int | None = None) -> Clustering:
    """Lloyd's k-means in plain torch, as faiss runs it: k distinct random points as the first centroids
    (seeded), `niter` rounds of assignment + mean, empty clusters refilled by splitting the largest
    (`split_largest`), the objective (sum of squared distances) of each round's assignment, and the final
    labels a search against the final centroids. Distances are computed chunk rows at a time, so GPU memory
    is O(N x d + chunk x k); float32 sums, as faiss."""
    x_np = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x_np)
    chunk = chunk or _chunk_rows(k)
    xt = torch.from_numpy(x_np).to(device)
    generator = torch.Generator().manual_seed(seed)
    c = xt[torch.randperm(n, generator=generator)[:k].to(device)].clone()
    objective = []
    for _ in range(niter):
        labels, dist = _nearest(xt, c, (c * c).sum(1)[None], chunk)
        objective.append(float(dist.double().sum()))
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, labels, xt)
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None].to(c.dtype)
        split_largest(c, counts)
    labels, dist = _nearest(xt, c, (c * c).sum(1)[None], chunk)
    return Clustering(labels.cpu().numpy(), dist.cpu().numpy(), c.cpu().numpy(), np.array(objective), seed)


def knn_graph(x: np.ndarray, neighbours: int, device: str | ClusteringPlan = "auto", graph: str = "exact",
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Nearest neighbours of every row among the others: (indices, squared distances), N x neighbours,
    nearest first. Searches neighbours + 1 and drops the point itself (or, among exact duplicates that
    hide it, the farthest hit), so each row keeps exactly `neighbours` other points.

    graph "exact" (the paper): brute force, O(N^2 d) time; on a GPU (what the paper used) it is fine at
    ImageNet size, on a CPU it is not. "ivf": an inverted-file index with about 4 sqrt(N) lists, probing
    16 of them: approximate neighbours in roughly O(N^1.5 d) (`python -m pipeline.tools.benchmark --only pic`).
    On the torch-cuda plan (faiss without a GPU) the graph is always the exact one, in torch: ivf is a
    CPU approximation. Memory is O(N x neighbours) either way besides the features."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= neighbours < n:
        raise StageError(f"cluster.pic.neighbours={neighbours} needs 1 <= neighbours < the number of images ({n}): "
                         "lower cluster.pic.neighbours")
    plan = plan_for(device)
    if plan.backend == "torch-cuda":
        idx, dist = torch_knn(x, neighbours + 1, "cuda")
    else:
        import faiss

        if graph == "exact":
            index = faiss.IndexFlatL2(d)
        else:
            nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.nprobe = min(16, nlist)
            index.train(x[seeded_subset(n, 64 * nlist, seed)])
        index = faiss_index(index, plan)
        index.add(x)
        dist, idx = index.search(x, neighbours + 1)
        if (idx < 0).any():  # an approximate search that found fewer neighbours: fall back to the exact one
            return knn_graph(x, neighbours, plan, "exact")
    is_self = idx == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    return idx[keep].reshape(n, neighbours), dist[keep].reshape(n, neighbours)


def torch_knn(x: np.ndarray, m: int, device: str = "cuda", chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force m nearest rows of x (itself included) for every row, in torch: (indices int64, squared
    distances float32), nearest first; chunk rows at a time, so memory is O(N x d + chunk x N)."""
    n = len(x)
    chunk = chunk or _chunk_rows(n)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    sq = (xt * xt).sum(1)
    idx = np.empty((n, m), dtype=np.int64)
    dist = np.empty((n, m), dtype=np.float32)
    for i in range(0, n, chunk):
        xb = xt[i:i + chunk]
        d2 = (sq[i:i + chunk, None] - 2.0 * (xb @ xt.T) + sq[None]).clamp_min_(0)
        best, arg = torch.topk(d2, m, dim=1, largest=False, sorted=True)
        idx[i:i + chunk], dist[i:i + chunk] = arg.cpu().numpy(), best.cpu().numpy()
    return idx, dist


def pic_graph(idx: np.ndarray, dist: np.ndarray, sigma: float) -> scipy.sparse.csr_matrix:
    """W = A + A^T with a_ij = exp(-d_ij^2 / sigma^2) for j among i's neighbours (float64: with sigma = 0.2
    the weights of far neighbours are far below float32's range)."""
    n, m = idx.shape
    rows = np.repeat(np.arange(n), m)
    weights = np.exp(-dist.ravel().astype(np.float64) / sigma**2)
    a = scipy.sparse.csr_matrix((weights, (rows, idx.ravel())), shape=(n, n))
    w = (a + a.T).tocsr()
    w.sum_duplicates()
    w.sort_indices()
    return w


def power_iteration(w: scipy.sparse.csr_matrix, alpha: float, iterations: int) -> np.ndarray:
    """v <- normalise(alpha W v + (1 - alpha) / n) from v = 1/n, L1-normalised every step."""
    n = w.shape[0]
    v = np.full(n, 1.0 / n)
    for _ in range(iterations):
        v = alpha * (w @ v) + (1.0 - alpha) / n
        v /= v.sum()
    return v


def forest_roots(w: scipy.sparse.csr_matrix, v: np.ndarray) -> np.ndarray:
    """Each node points to the neighbour j maximising w_ij (v_j - v_i) if that is positive (else it is a root);
    returns every node's root. Pointers always go to a strictly larger v, so there is no cycle, and pointer
    jumping (root <- root[root]) reaches the roots in O(log depth) vectorised steps."""
    n = w.shape[0]
    rows = np.repeat(np.arange(n), np.diff(w.indptr))
    gain = w.data * (v[w.indices] - v[rows])
    # within each row (rows are contiguous in CSR), the largest gain first; ties keep the lowest column
    order = np.lexsort((-gain, rows))
    has_edges = np.diff(w.indptr) > 0
    best = order[w.indptr[:-1][has_edges]]
    parent = np.arange(n)
    points = gain[best] > 0
    parent[np.flatnonzero(has_edges)[points]] = w.indices[best[points]]
    root = parent
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt


def absorb_singletons(labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """A point alone in its cluster joins the cluster of its nearest neighbour that is not a singleton (the
    paper's rule); repeated until no singleton has such a neighbour, then a lone remaining singleton joins its
    nearest neighbour's cluster. Returns labels renumbered 0..C-1."""
    labels = labels.copy()
    while True:
        sizes = np.bincount(labels)
        single = np.flatnonzero(sizes[labels] == 1)
        if len(single) == 0:
            break
        ok = sizes[labels[idx[single]]] > 1  # singletons x neighbours, nearest first
        found = ok.any(axis=1)
        if not found.any():
            labels[single] = labels[idx[single, 0]]
            break
        first = ok.argmax(axis=1)
        labels[single[found]] = labels[idx[single[found], first[found]]]
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)


def run_pic(x: np.ndarray, neighbours: int = 5, sigma: float = 0.2, alpha: float = 1e-3, iterations: int = 200,
            device: str | ClusteringPlan = "auto", graph: str = "exact") -> Clustering:
    """Power Iteration Clustering (paper appendix); the number of clusters is found, not given."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise StageError("features to cluster hold NaN or infinite values: rerun pca for this epoch")
    idx, dist = knn_graph(x, neighbours, device, graph)
    w = pic_graph(idx, dist, sigma)
    v = power_iteration(w, alpha, iterations)
    labels = absorb_singletons(np.unique(forest_roots(w, v), return_inverse=True)[1], idx)
    k = int(labels.max()) + 1
    centroids, distances = cluster_means(x, labels, k)
    return Clustering(labels, distances, centroids, np.zeros(0), seed=0)


def cluster_means(x: np.ndarray, labels: np.ndarray, k: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's mean (k x d) and each point's squared distance to its cluster's mean, with O(chunk x d)
    temporary memory (a one-shot x - means[labels] would hold two more copies of the features)."""
    n = len(x)
    members = scipy.sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    means = (members @ x.astype(np.float64, copy=False) if n <= chunk else
             sum(members[:, i:i + chunk] @ x[i:i + chunk].astype(np.float64) for i in range(0, n, chunk)))
    means = (means / np.bincount(labels, minlength=k)[:, None]).astype(np.float32)
    distances = np.empty(n, dtype=np.float32)
    for i in range(0, n, chunk):
        distances[i:i + chunk] = ((x[i:i + chunk] - means[labels[i:i + chunk]]) ** 2).sum(axis=1)
    return means, distances


def number_of_clusters(section: Cluster, n: int) -> int:
    """cluster.k, or with `k: auto` one cluster per `images_per_cluster` images (at least 2).

    DeepCluster over-segments (paper Fig. 2c): k well above the number of classes. What carries over
    between data sets of different sizes is how many images a cluster holds, not k itself: the paper's
    ImageNet k = 10,000 is 128 images per cluster; on small grey images fewer, larger-k clusters
    learnt better (docs/results.md, "The recipe").
    """
    if section.k == "auto":
        return max(2, round(n / section.images_per_cluster))
    return section.k


def save_clustering(path: str | Path, c: Clustering) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, labels=c.labels, distances=c.distances, centroids=c.centroids, objective=c.objective, seed=c.seed)


# what save_clustering writes, for stages.core.artifacts.check_npz
CLUSTERING_ARRAYS = {"labels": ("n",), "distances": ("n",), "centroids": ("k", None), "objective": (None,), "seed": ()}


def load_clustering(path: str | Path) -> Clustering:
    check_npz(path, CLUSTERING_ARRAYS, fix="run the cluster stage for this epoch (again)")
    with np.load(path) as z:
        return Clustering(z["labels"], z["distances"], z["centroids"], z["objective"], int(z["seed"]))


def bisect(x: np.ndarray, iterations: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Two centroids for the points x (m x d, m >= 2): x split at its mean across its first principal axis,
    then `iterations` rounds of 2-means. Deterministic, so a refilled clustering depends only on its seed."""
    x = x.astype(np.float64, copy=False)
    centred = x - x.mean(0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    side = centred @ axis > 0
    if side.all() or not side.any():  # every point the same: nothing to split, two equal halves of one place
        return np.repeat(x[:1], 2, 0).astype(np.float32), np.arange(len(x)) % 2
    for _ in range(iterations):
        c = np.stack([x[~side].mean(0), x[side].mean(0)])
        new = ((x - c[1]) ** 2).sum(1) < ((x - c[0]) ** 2).sum(1)
        if (new == side).all() or new.all() or not new.any():
            break
        side = new
    return np.stack([x[~side].mean(0), x[side].mean(0)]).astype(np.float32), side.astype(np.int64)


def refill_small(x: np.ndarray, c: Clustering, below: float) -> tuple[Clustering, int]:
    """The paper's rule for an empty cluster, applied to every cluster under `below` times the mean cluster
    size (N / k): its centroid moves into the largest cluster, which is bisected (`bisect`), and every image
    is assigned again to its nearest centroid, so the small cluster's images join their next nearest ones.
    k stays; the uniform sampler would otherwise draw a few images of each small cluster as often as a whole
    large one. Returns the new clustering (the k-means objective kept) and how many clusters were refilled."""
    if below <= 0:
        return c, 0
    x = np.ascontiguousarray(x, dtype=np.float32)
    labels, centroids, sizes = c.labels.copy(), c.centroids.copy(), c.sizes()
    small = [int(i) for i in np.argsort(sizes, kind="stable") if sizes[i] < below * len(x) / c.k]
    if not small:
        return c, 0
    labels[np.isin(labels, small)] = -1  # their images are assigned again at the end, not bisected meanwhile
    sizes[small] = 0
    refilled = 0
    for ci in small:
        cj = int(sizes.argmax())
        if sizes[cj] < 2:
            break
        members = np.flatnonzero(labels == cj)
        halves, side = bisect(x[members])
        centroids[cj], centroids[ci] = halves
        labels[members[side == 1]] = ci
        sizes[cj], sizes[ci] = (side == 0).sum(), (side == 1).sum()
        refilled += 1
    xt, ct = torch.from_numpy(x), torch.from_numpy(centroids)
    labels_t, dist = _nearest(xt, ct, (ct * ct).sum(1)[None], _chunk_rows(c.k))
    return Clustering(labels_t.numpy(), dist.numpy(), centroids, c.objective, c.seed), refilled


def cluster_features(section: Cluster, x: np.ndarray, seed: int, plan: ClusteringPlan | None = None
                     ) -> tuple[Clustering, int]:
    """The `cluster` section's method on features x (N x d), where `cluster.device` says (or `plan`), and how
    many small clusters were refilled (`cluster.refill_below`, k-means only)."""
    plan = plan or plan_for(section.device)
    if section.method == "pic":  # with k: auto, which the schema requires of PIC: it finds the number itself
        pic = section.pic
        return run_pic(x, pic.neighbours, pic.sigma, pic.alpha, pic.iterations, plan, pic.graph), 0
    c = run_kmeans(x, number_of_clusters(section, len(x)), section.niter, seed, plan)
    return refill_small(x, c, section.refill_below)
