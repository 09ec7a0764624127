"""stages.pca: PCA whitening + L2 normalisation (paper Sec. 3.3) on sklearn's real digits."""
from __future__ import annotations

import numpy as np
import pytest

from stages.core.errors import StageError
from stages.core.params import apply_overrides
from stages.core.runtime import seed_for, seeded_subset
from stages.core.whitening import PCAWhitening
from stages.pca import run_pca

DIM = 16  # well below the rank of the digits (some of their 64 pixels are always 0)


def test_run_pca_writes_the_whitened_features_and_report(tmp_path, digits, small_params):
    x = digits[0]
    np.save(tmp_path / "features.npy", x)
    stats = run_pca(small_params, tmp_path / "features.npy", tmp_path / "out", epoch=1)
    y = np.load(tmp_path / "out" / "pca_features.npy")
    assert y.shape == (len(x), small_params.pca.dim) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    assert (tmp_path / "out" / "pca.json").exists() and (tmp_path / "out" / "pca.npz").exists()
    assert 0.0 < stats["explained_variance"] < 1.0
    assert stats["fit_rows"] == len(x)


def test_run_pca_on_nan_features_stops_with_a_clear_message(tmp_path, digits, small_params):
    x = digits[0].copy()
    x[10] = np.nan
    np.save(tmp_path / "features.npy", x)
    with pytest.raises(StageError, match="NaN or infinite"):
        run_pca(small_params, tmp_path / "features.npy", tmp_path / "out")
    assert not (tmp_path / "out" / "pca.json").exists()  # the stage did not report success


def test_run_pca_missing_features_names_the_file(tmp_path, small_params):
    with pytest.raises(StageError, match=str(tmp_path / "features.npy")):
        run_pca(small_params, tmp_path / "features.npy", tmp_path / "out")


def test_explained_variance_is_at_most_one(tmp_path, small_params):
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    np.save(tmp_path / "features.npy", x)
    params = apply_overrides(small_params, {"pca.dim": 4})
    stats = run_pca(params, tmp_path / "features.npy", tmp_path / "out")
    assert stats["explained_variance"] == pytest.approx(1.0, abs=1e-6)


def test_cli_nan_features_exit_non_zero_with_the_message(tmp_path, digits, params_file, run_cli):
    x = digits[0].copy()
    x[[1, 2, 3]] = np.nan
    np.save(tmp_path / "features.npy", x)
    result = run_cli("pca", "--params", params_file, "--features", tmp_path / "features.npy",
                       "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("pca: ") and "3 rows hold NaN or infinite features" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_pca_fits_on_the_projects_seeded_sample_for_the_epoch(tmp_path, digits, small_params):
    x = digits[0]
    np.save(tmp_path / "features.npy", x)
    params = apply_overrides(small_params, {"pca.max_fit_rows": 300, "run.seed": 5})
    run_pca(params, tmp_path / "features.npy", tmp_path / "out", epoch=3)
    rows = seeded_subset(len(x), 300, seed_for(5, 3, "pca"))
    np.testing.assert_allclose(PCAWhitening.load(tmp_path / "out" / "pca.npz").mean, x[rows].mean(axis=0), rtol=1e-5)
