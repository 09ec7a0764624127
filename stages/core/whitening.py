"""PCA whitening of the features before clustering (paper Sec. 3.3), fitted on a sample, applied in chunks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

from stages.core.artifacts import check_npz
from stages.core.errors import StageError
from stages.core.io import atomic_path


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

    # what save() writes, for stages.core.artifacts.check_npz
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
