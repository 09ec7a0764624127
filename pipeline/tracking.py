"""Tracking: one MLflow run per DeepCluster run (per-epoch figures with step=epoch) and the Prefect
artifacts of a flow run (per-epoch cluster sizes and summary under stable keys, a progress bar).

`python -m pipeline.tracking publish` is the dvc.yaml stage `publish`: it logs the final evaluation
(figures as `final.<key>` at step = last epoch, report, scores, pictures) and the last model into the
run's MLflow run, whichever entry point ran. The stages themselves never talk to MLflow.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import offline_environment, project_root
from stages.core.assignments import size_histogram
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.layout import (CHECKPOINTS, EPOCHS_ROOT, EVAL, EVAL_CLUSTER_SIZES, EVAL_CURVES, LAST_CHECKPOINT,
                                METRICS, RUN_FILE)
from stages.core.params import flatten

if TYPE_CHECKING:  # imported where used: MLflow reads its telemetry switch when imported (offline_environment)
    import mlflow

EXPERIMENT = "deepcluster"

# Prefect artifact keys: stable, so the Prefect UI shows each key's history across epochs and runs.
SIZES_KEY = "deepcluster-cluster-sizes"
SUMMARY_KEY = "deepcluster-epoch-summary"
PROGRESS_KEY = "deepcluster-progress"


def tracking_uri() -> str:
    # MLflow 3's default store is this SQLite file; the file store is deprecated.
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{project_root() / 'mlflow.db'}")


def start_run(params: dict | None = None, run_name: str | None = None, run_id: str | None = None,
              tags: dict | None = None, parent_run_id: str | None = None) -> mlflow.ActiveRun:
    """Start an MLflow run in the project's experiment, or resume `run_id` (a resumed DeepCluster run
    keeps its MLflow run). A run id or parent the store no longer has (mlflow.db deleted or
    replaced) is dropped: the figures go to a new top-level run rather than nowhere."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    if mlflow.get_experiment_by_name(name) is None:
        # A new experiment's artifacts go beside a SQLite store's file (mlartifacts/), so they follow it (a test's
        # temp store keeps its own): MLflow's default for a database store is ./mlruns under whatever directory the
        # process happens to run in. Other stores (a tracking server) decide for themselves.
        sqlite = uri.startswith("sqlite:///")
        location = str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts") if sqlite else None
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    run_id, parent_run_id = (_existing_run(r) for r in (run_id, parent_run_id))
    run = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags, parent_run_id=parent_run_id,
                           nested=parent_run_id is not None)
    if run_id is None and params is not None:
        mlflow.log_params({k: str(v) for k, v in flatten(params).items()})
    return run


def _existing_run(run_id: str | None) -> str | None:
    import mlflow

    if run_id is None:
        return None
    try:
        return mlflow.get_run(run_id).info.run_id
    except mlflow.exceptions.MlflowException:
        return None


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """Keep the figures MLflow can plot: finite numbers (not None, NaN or a bool)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def log_epoch(metrics: dict, epoch: int) -> None:
    import mlflow

    mlflow.log_metrics(numeric_metrics({k: v for k, v in metrics.items() if k != "epoch"}), step=epoch)


def epoch_logged(run_id: str, epoch: int, key: str = "train_loss") -> bool:
    """Whether the run already holds `epoch`'s figures (a run killed after logging them resumes)."""
    import mlflow

    history = mlflow.tracking.MlflowClient(tracking_uri()).get_metric_history(run_id, key)
    return any(m.step == epoch for m in history)


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    import mlflow

    for path in paths:
        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        elif path.exists():
            mlflow.log_artifact(str(path), artifact_path)


# ------------------------------------------------------------------ Prefect artifacts
def epoch_artifacts(metrics: dict, sizes: list[int], epoch: int, n_epochs: int) -> None:
    """Cluster-size histogram table and a markdown summary of `epoch`, under stable keys."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    hist = size_histogram(sizes)
    create_table_artifact(key=SIZES_KEY, table=hist.to_dict("records"),
                          description=f"Epoch {epoch}: clusters per size bin (k = {len(sizes)})")
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()) if not isinstance(v, (list, dict)))
    create_markdown_artifact(key=SUMMARY_KEY, description=f"DeepCluster epoch {epoch}/{n_epochs}",
                             markdown=f"# DeepCluster epoch {epoch} of {n_epochs}\n\n| figure | value |\n|---|---|\n{rows}\n")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress(done: int, total: int) -> Callable[[int], None]:
    """The run's progress artifact (percent of epochs finished); returns its update(done), called after every epoch."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    n = max(total, 1)
    artifact = create_progress_artifact(progress=100.0 * done / n, key=PROGRESS_KEY,
                                        description=f"DeepCluster: epochs finished of {total}")
    return lambda done: update_progress_artifact(artifact, progress=100.0 * done / n)


# ------------------------------------------------------------------ the `publish` stage
def publish(epochs_root: str | Path, eval_dir: str | Path, model: str | Path) -> str:
    """Log into the run's MLflow run the final figures (`final.<key>`, step = the run's last epoch), the
    evaluation's files (metrics, report, curves, score tables, pictures) and the last model; returns its id."""
    import mlflow

    run_file, eval_dir = Path(epochs_root) / RUN_FILE, Path(eval_dir)
    if not run_file.exists():
        raise StageError(f"{run_file} not found: run the deepcluster stage first")
    if not (eval_dir / METRICS).exists():
        raise StageError(f"{eval_dir / METRICS} not found: run the evaluate stage first")
    state = read_json(run_file)
    with start_run(state["params"], run_name=f"deepcluster-{state['fingerprint']}", run_id=state.get("mlflow_run_id")) as run:
        metrics = read_json(eval_dir / METRICS)
        mlflow.log_metrics({f"final.{k}": v for k, v in numeric_metrics(metrics).items()},
                           step=int(metrics.get("epochs") or 0))
        log_artifacts([eval_dir / METRICS, eval_dir / "report.md", eval_dir / EVAL_CURVES, eval_dir / EVAL_CLUSTER_SIZES],
                      "evaluation")
        log_artifacts([eval_dir / "scores"], "evaluation/scores")
        log_artifacts([eval_dir / "pictures"], "evaluation/pictures")
        log_artifacts([model], "model")
        return run.info.run_id


def main(argv: list[str] | None = None) -> None:
    offline_environment()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="log the final evaluation and the last model to the run's MLflow run")
    pub.add_argument("--epochs-root", default=EPOCHS_ROOT)
    pub.add_argument("--eval", default=EVAL, help="the final evaluation's directory")
    pub.add_argument("--model", default=f"{CHECKPOINTS}/{LAST_CHECKPOINT}")
    args = parser.parse_args(argv)
    try:
        run_id = publish(args.epochs_root, args.eval, args.model)
    except StageError as e:
        sys.exit(f"publish: {e}")
    print(f"publish: {args.eval} and {args.model} logged to MLflow run {run_id} ({tracking_uri()})")


if __name__ == "__main__":
    main()
