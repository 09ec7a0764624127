"""Stage `pca`: PCA to `pca.dim` with whitening, then row L2 normalisation (paper Sec. 3.3).

The transform is fitted on at most `pca.max_fit_rows` rows (a seeded sample) and applied in chunks,
so ImageNet-sized feature files (1.28M x 4096) never need to sit in RAM. We fit with a float64
covariance and scipy's partial eigendecomposition (only the top `dim` eigenpairs) instead of
faiss.PCAMatrix, which computes all of them (`python -m pipeline.tools.benchmark --only pca` compares).

Whitening divides each component by sqrt(eigenvalue + eps * largest eigenvalue): the epsilon is
relative to the spectrum, so the transform is the same whatever the scale of the features (a
random-init network's fc outputs are orders of magnitude smaller than a trained one's), and
directions with almost no variance are not blown up to unit variance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.core.artifacts import train_rows, allocate_npy, check_npy
from stages.core.errors import cli_errors
from stages.core.io import atomic_path, write_json
from stages.core.layout import PCA, PCA_FEATURES, report
from stages.core.params import load_params, stage_parser
from stages.core.runtime import Timer, peak_rss_mb, seed_for, seeded_subset
from stages.core.schema import Params
from stages.core.whitening import apply_in_chunks, fit_pca_whitening


def run_pca(params: Params, features: str | Path, out: str | Path, epoch: int = 0,
            dataset: str | Path | None = None) -> dict:
    """dataset: the run's dataset; `features` must have a row per training image (None: not checked)."""
    section = params.pca
    out_dir = Path(out)
    check_npy(features, rows=train_rows(dataset) if dataset else None, fix="run extract for this epoch (again)")
    with Timer() as t:
        x = np.load(features, mmap_mode="r")
        rows = seeded_subset(len(x), section.max_fit_rows, seed_for(params.run.seed, epoch, "pca"))
        pca = fit_pca_whitening(x[rows], section.dim, section.eps)
        pca.save(out_dir / PCA)
        with atomic_path(out_dir / PCA_FEATURES) as tmp:
            whitened = allocate_npy(tmp, (len(x), pca.components.shape[1]), np.float32, out_dir / PCA_FEATURES)
            apply_in_chunks(pca, x, whitened)
            whitened.flush()
            del whitened
    total = float(np.sum(np.var(np.asarray(x[rows], dtype=np.float64), axis=0, ddof=1)))  # same ddof as the eigenvalues
    stats = {"dim": int(pca.components.shape[1]), "fit_rows": len(rows), "seconds": t.seconds,
             "explained_variance": float(pca.eigenvalues.sum() / total) if total > 0 else 0.0,
             "peak_rss_mb": peak_rss_mb()}
    write_json(out_dir / report("pca"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "params file; this stage reads its `pca` section")
    parser.add_argument("--features", required=True, help="features.npy written by extract")
    parser.add_argument("--out", required=True, help="directory for pca.npz and pca_features.npy")
    parser.add_argument("--epoch", type=int, default=0, help="epoch number (seeds the fitting sample)")
    parser.add_argument("--dataset", help="the run's dataset: the features must have a row per training image")
    args = parser.parse_args(argv)
    with cli_errors("pca"):
        stats = run_pca(load_params(args.params), args.features, args.out, args.epoch, args.dataset)
    print(f"pca: {stats['dim']} dims, {stats['explained_variance']:.1%} of variance, {stats['seconds']:.1f}s")


if __name__ == "__main__":
    main()
