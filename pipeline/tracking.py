"""MLflow tracking: one run per DeepCluster run, per-epoch figures with step=epoch."""
from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow

from pipeline import PROJECT_ROOT
from stages.common import flatten

EXPERIMENT = "deepcluster"


def tracking_uri() -> str:
    # MLflow 3's default store is this SQLite file; the file store is deprecated.
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}")


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (mlartifacts/).

    MLflow's default for a database store is ./mlruns under whatever directory the process happens
    to run in; beside the database, artifacts follow it (a test's temp store keeps its own).
    Other stores (a tracking server) decide for themselves.
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def start_run(params: dict, run_name: str | None = None, run_id: str | None = None) -> mlflow.ActiveRun:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    mlflow.set_experiment(name)
    run = mlflow.start_run(run_id=run_id, run_name=run_name)
    if run_id is None:
        mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
    return run


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """Keep the figures MLflow can plot: numbers that are neither None nor NaN."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def log_epoch(metrics: dict, epoch: int) -> None:
    mlflow.log_metrics(numeric_metrics({k: v for k, v in metrics.items() if k != "epoch"}), step=epoch)


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path)
