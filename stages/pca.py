"""Stage `pca`: PCA to `pca.dim` with whitening, then row L2 normalisation (paper Sec. 3.3).

The transform is fitted on at most `pca.max_fit_rows` rows (a seeded sample) and applied in chunks,
so ImageNet-sized feature files (1.28M x 4096) never need to sit in RAM. We fit with a float64
covariance and scipy's partial eigendecomposition (only the top `dim` eigenpairs) instead of
faiss.PCAMatrix, which computes all of them (`python -m pipeline.benchmark --only pca` compares).

Whitening divides each component by sqrt(eigenvalue + eps * largest eigenvalue): the epsilon is
relative to the spectrum, so the transform is the same whatever the scale of the features (a
random-init network's fc outputs are orders of magnitude smaller than a trained one's), and
directions with almost no variance are not blown up to unit variance.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from stages.artifacts import allocate_npy, check_npy, check_npz
from stages.common import (StageError, Timer, atomic_path, cli_errors, load_params, peak_rss_mb, seed_for,
                           seeded_subset, write_json)
from stages.layout import PCA, PCA_FEATURES, report


@dataclass
class PCAWhitening:
    mean: np.ndarray  # D
    components: np.ndarray  # D x d, columns = top eigenvectors
    eigenvalues: np.ndarray  # d, descending
    eps: float  # times the largest eigenvalue, added to every eigenvalue before ^-1/2

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Projection scaled to unit variance per component (before L2 normalisation)."""
        y = (np.asarray(x, dtype=np.float32) - self.mean) @ self.components
        floor = self.eps * float(self.eigenvalues.max(initial=0.0))
        # a tiny absolute floor only for all-constant features (every eigenvalue 0)
        return y / np.sqrt(self.eigenvalues + max(floor, np.finfo(np.float32).tiny)).astype(np.float32)

    def transform(self, x: np.ndarray) -> np.ndarray:
        y = self.whiten(x)
        # whitened rows have norms around sqrt(dim) whatever the input's scale: an absolute eps is enough here
        return y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-12)

    def save(self, path: str | Path) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, mean=self.mean, components=self.components, eigenvalues=self.eigenvalues, eps=self.eps)

    # what save() writes, for stages.artifacts.check_npz
    ARRAYS = {"mean": ("d_in",), "components": ("d_in", "d"), "eigenvalues": ("d",), "eps": ()}

    @classmethod
    def load(cls, path: str | Path) -> "PCAWhitening":
        check_npz(path, cls.ARRAYS, fix="rerun pca for that epoch")
        with np.load(path) as z:
            return cls(z["mean"], z["components"], z["eigenvalues"], float(z["eps"]))


def check_finite(x: np.ndarray, where: str) -> None:
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise StageError(f"{where}: {bad} rows hold NaN or infinite features; the network diverged or the "
                         "features file is corrupt. Lower train.lr or rerun extract for this epoch")


def fit_pca_whitening(x: np.ndarray, dim: int, eps: float = 1e-5) -> PCAWhitening:
    n, d_in = x.shape
    if not 1 <= dim <= d_in:
        raise StageError(f"pca.dim={dim} must be between 1 and the feature dimension {d_in}")
    if n < 2:
        raise StageError(f"PCA needs at least 2 rows, got {n}")
    x64 = np.asarray(x, dtype=np.float64)
    check_finite(x64, "pca")
    mean = x64.mean(axis=0)
    centred = x64 - mean
    cov = centred.T @ centred / (n - 1)
    vals, vecs = scipy.linalg.eigh(cov, subset_by_index=[d_in - dim, d_in - 1])
    order = np.argsort(vals)[::-1]
    vals = np.clip(vals[order], 0.0, None)
    return PCAWhitening(mean.astype(np.float32), vecs[:, order].astype(np.float32), vals.astype(np.float32), eps)


def apply_in_chunks(pca: PCAWhitening, x: np.ndarray, out: np.ndarray, chunk: int = 65536) -> None:
    for start in range(0, len(x), chunk):
        block = np.asarray(x[start : start + chunk])
        check_finite(block, f"pca (rows {start}..{start + len(block)})")
        out[start : start + len(block)] = pca.transform(block)


def run_pca(params: dict, features: str | Path, out_dir: str | Path, epoch: int = 0,
            n_images: int | None = None) -> dict:
    """n_images: the dataset's training images, the rows `features` must have (None: not checked)."""
    section = params["pca"]
    out_dir = Path(out_dir)
    check_npy(features, rows=n_images, fix="run extract for this epoch (again)")
    with Timer() as t:
        x = np.load(features, mmap_mode="r")
        rows = seeded_subset(len(x), section["max_fit_rows"], seed_for(params["run"]["seed"], epoch, "pca"))
        pca = fit_pca_whitening(x[rows], section["dim"], section["eps"])
        pca.save(out_dir / PCA)
        with atomic_path(out_dir / PCA_FEATURES) as tmp:
            out = allocate_npy(tmp, (len(x), pca.components.shape[1]), np.float32, out_dir / PCA_FEATURES)
            apply_in_chunks(pca, x, out)
            out.flush()
            del out
    total = float(np.sum(np.var(np.asarray(x[rows], dtype=np.float64), axis=0, ddof=1)))  # same ddof as the eigenvalues
    stats = {"dim": int(pca.components.shape[1]), "fit_rows": len(rows), "seconds": t.seconds,
             "explained_variance": float(pca.eigenvalues.sum() / total) if total > 0 else 0.0,
             "peak_rss_mb": peak_rss_mb()}
    write_json(out_dir / report("pca"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file; this stage reads its `pca` section")
    parser.add_argument("--features", required=True, help="features.npy written by extract")
    parser.add_argument("--out", required=True, help="directory for pca.npz and pca_features.npy")
    parser.add_argument("--epoch", type=int, default=0, help="epoch number (seeds the fitting sample)")
    args = parser.parse_args(argv)
    with cli_errors("pca"):
        stats = run_pca(load_params(args.params), args.features, args.out, args.epoch)
    print(f"pca: {stats['dim']} dims, {stats['explained_variance']:.1%} of variance, {stats['seconds']:.1f}s")


if __name__ == "__main__":
    main()
