"""pipeline.tracking: which per-epoch figures reach MLflow."""
from __future__ import annotations

from pipeline.tracking import numeric_metrics


def test_numeric_metrics_keeps_finite_numbers_only():
    metrics = {"loss": 1.5, "n_clusters": 97, "nmi_previous": None, "nan": float("nan"), "inf": float("inf"),
               "flag": True, "device": "cpu"}
    assert numeric_metrics(metrics) == {"loss": 1.5, "n_clusters": 97.0}
