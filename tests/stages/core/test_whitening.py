"""stages.core.whitening: PCA whitening + L2 normalisation (paper Sec. 3.3) on sklearn's real digits."""
from __future__ import annotations

import numpy as np
import pytest

from stages.core.errors import StageError
from stages.core.whitening import PCAWhitening, apply_in_chunks, fit_pca_whitening


DIM = 16  # well below the rank of the digits (some of their 64 pixels are always 0)


@pytest.fixture(scope="module")
def fitted(digits):
    x, _ = digits
    return x, fit_pca_whitening(x, DIM, eps=1e-5)


def test_transformed_rows_have_unit_l2_norm(fitted):
    x, pca = fitted
    y = pca.transform(x)
    assert y.shape == (len(x), DIM)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_whitened_features_have_identity_covariance(fitted):
    x, pca = fitted
    y = pca.whiten(x).astype(np.float64)
    # eigenvalue/(eigenvalue + eps * largest) with eps = 1e-5 and the 16th digit variance above 1% of
    # the largest -> identity to ~1e-3; the tolerance covers that and float32 arithmetic.
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(DIM), atol=2e-3)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)


def test_components_are_the_top_principal_directions(fitted):
    x, pca = fitted
    expected = np.sort(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False)))[::-1][:DIM]
    np.testing.assert_allclose(pca.eigenvalues, expected, rtol=1e-4)
    np.testing.assert_allclose(pca.components.T @ pca.components, np.eye(DIM), atol=1e-5)


def test_constant_feature_rows_stay_finite():
    # A zero-variance direction and an all-zero row are exactly what the eps guards against.
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    x[:, 5] = 3.0
    pca = fit_pca_whitening(x, 6)
    y = pca.transform(np.vstack([x, pca.mean[None]]))
    assert np.isfinite(y).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_raise_a_clear_stage_error(digits, bad):
    x = digits[0][:200].copy()
    x[[3, 17], 5] = bad
    with pytest.raises(StageError, match=r"2 rows hold NaN or infinite features"):
        fit_pca_whitening(x, DIM)


def test_non_finite_rows_outside_the_fit_sample_are_caught_when_applying(fitted):
    x, pca = fitted
    x = x[:100].copy()
    x[70, 0] = np.nan
    with pytest.raises(StageError, match="NaN or infinite"):
        apply_in_chunks(pca, x, np.empty((len(x), DIM), np.float32), chunk=32)


@pytest.mark.parametrize("dim", [0, -1, 65])
def test_dim_out_of_range_is_refused(digits, dim):
    with pytest.raises(StageError, match=rf"pca.dim={dim} must be between 1 and the feature dimension 64"):
        fit_pca_whitening(digits[0], dim)


def test_too_few_rows_is_refused(digits):
    with pytest.raises(StageError, match="at least 2 rows"):
        fit_pca_whitening(digits[0][:1], 4)


def test_apply_in_chunks_equals_one_shot_transform(fitted):
    x, pca = fitted
    out = np.full((len(x), DIM), np.nan, np.float32)
    apply_in_chunks(pca, x, out, chunk=100)  # 1797 rows: 17 full chunks and a ragged last one
    np.testing.assert_allclose(out, pca.transform(x), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path, fitted):
    x, pca = fitted
    pca.save(tmp_path / "pca.npz")
    loaded = PCAWhitening.load(tmp_path / "pca.npz")
    for field in ("mean", "components", "eigenvalues"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(pca, field))
    assert loaded.eps == pca.eps
    np.testing.assert_array_equal(loaded.transform(x[:50]), pca.transform(x[:50]))


@pytest.mark.parametrize("scale", [1e-4, 1e3])
def test_whitening_does_not_depend_on_the_scale_of_the_features(fitted, scale):
    """A random-init network's fc features are tiny: an absolute eps used to flatten their whitening."""
    x, pca = fitted
    scaled = fit_pca_whitening(x * scale, DIM, eps=1e-5)
    np.testing.assert_allclose(np.abs(scaled.transform(x * scale)), np.abs(pca.transform(x)), atol=1e-3)
    y = scaled.whiten(x * scale).astype(np.float64)
    np.testing.assert_allclose(np.cov(y, rowvar=False).diagonal(), 1.0, atol=2e-3)
