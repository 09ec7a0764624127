"""Tracking: one MLflow run per DeepCluster run (per-epoch figures with step=epoch) and the Prefect
artifacts of a flow run (per-epoch cluster sizes and summary under stable keys, a progress bar).

Every record leads to the others: the MLflow run is tagged with the DVC experiment, the git revision and
the Prefect flow run (link_tags); the Prefect artifacts and data/epochs/run.json name the MLflow run.

`python -m pipeline.tracking publish` is the dvc.yaml stage `publish`: it logs the final evaluation
(figures as `final.<key>` at step = last epoch, report, scores, pictures) and the last model into the
run's MLflow run, whichever entry point ran, and registers the model (`models:/deepcluster@last-finished`,
docs/operations.md "The trained model"). The stages themselves never talk to MLflow.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import offline_environment, project_root, store_root
from stages.core.assignments import size_histogram
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.layout import (CHECKPOINTS, DATASET, EPOCHS_ROOT, EVAL, EVAL_CLUSTER_SIZES, EVAL_CURVES, LAST_CHECKPOINT,
                                METRICS, RUN_FILE)
from stages.core.params import flatten

if TYPE_CHECKING:  # imported where used: MLflow reads its telemetry switch when imported (offline_environment)
    import mlflow

EXPERIMENT = "deepcluster"
REGISTERED_MODEL = "deepcluster"  # the registry's name for the feature extractor of every published run
LAST_FINISHED = "last-finished"  # its alias: the newest run published outside a DVC experiment

# Prefect artifact keys: stable, so the Prefect UI shows each key's history across epochs and runs.
SIZES_KEY = "deepcluster-cluster-sizes"
SUMMARY_KEY = "deepcluster-epoch-summary"
PROGRESS_KEY = "deepcluster-progress"


def tracking_uri() -> str:
    # MLflow 3's default store is this SQLite file; the file store is deprecated.
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{store_root() / 'mlflow.db'}")


def git_revision(root: Path) -> dict[str, str]:
    """The commit the code came from, under MLflow's own tag (its UI shows it as the run's source version),
    and whether tracked files differed from it (a `dvc exp run -S` or an edit: the commit alone is not the code)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()}


def link_tags(flow_run_id: str | None = None, flow_run_name: str | None = None) -> dict[str, str]:
    """Tags that lead from an MLflow run to the DVC experiment (DVC_EXP_NAME and DVC_EXP_BASELINE_REV, set by
    `dvc exp run`), the git revision and the Prefect flow run that produced it."""
    tags = {"dvc.experiment": os.environ.get("DVC_EXP_NAME"), "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
            "prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name, **git_revision(project_root())}
    return {k: v for k, v in tags.items() if v}


def start_run(params: dict | None = None, run_name: str | None = None, run_id: str | None = None,
              tags: dict | None = None, parent_run_id: str | None = None, system_metrics: bool = False) -> mlflow.ActiveRun:
    """Start an MLflow run in the project's experiment, or resume `run_id` (a resumed DeepCluster run
    keeps its MLflow run). A run id or parent the store no longer has (mlflow.db deleted or
    replaced) is dropped: the figures go to a new top-level run rather than nowhere. system_metrics: CPU,
    memory, disk and (with pynvml) GPU use, sampled by a background thread every 10 s (benchmark: costs nothing measurable)."""
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
                           nested=parent_run_id is not None, log_system_metrics=system_metrics)
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
def epoch_artifacts(metrics: dict, sizes: list[int], epoch: int, n_epochs: int, run_id: str) -> None:
    """Cluster-size histogram table and a markdown summary of `epoch` (naming the run's MLflow run and DVC
    experiment), under stable keys."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    hist = size_histogram(sizes)
    create_table_artifact(key=SIZES_KEY, table=hist.to_dict("records"),
                          description=f"Epoch {epoch}: clusters per size bin (k = {len(sizes)})")
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()) if not isinstance(v, (list, dict)))
    create_markdown_artifact(key=SUMMARY_KEY, description=f"DeepCluster epoch {epoch}/{n_epochs}, {links(run_id)}",
                             markdown=f"# DeepCluster epoch {epoch} of {n_epochs}\n\n{links(run_id)}\n\n"
                                      f"| figure | value |\n|---|---|\n{rows}\n")


def links(run_id: str) -> str:
    experiment = os.environ.get("DVC_EXP_NAME")
    return (f"MLflow run `{run_id}` ({tracking_uri()}), "
            + (f"DVC experiment `{experiment}`" if experiment else "not a DVC experiment"))


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def progress(done: int, total: int, run_id: str) -> Callable[[int, str], None]:
    """The run's progress artifact (percent of epochs finished); returns its update(done, times), called after
    every epoch with the run's elapsed time and time left."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    n = max(total, 1)
    describe = lambda done, times: f"DeepCluster: {done} of {total} epochs finished{times}; {links(run_id)}"
    artifact = create_progress_artifact(progress=100.0 * done / n, key=PROGRESS_KEY, description=describe(done, ""))
    return lambda done, times: update_progress_artifact(artifact, progress=100.0 * done / n,
                                                        description=describe(done, f", {times}"))


# ------------------------------------------------------------------ the `publish` stage
def publish(epochs_root: str | Path, eval_dir: str | Path, model: str | Path, dataset: str | Path) -> str:
    """Log into the run's MLflow run the final figures (`final.<key>`, step = the run's last epoch), the
    evaluation's files (metrics, report, curves, score tables, pictures), the last checkpoint and the
    registered feature extractor; returns the MLflow run's id.

    A DVC experiment that only re-evaluated a run trained outside it (`dvc exp run -S evaluate.knn_k=3`)
    gets its own run, nested under the training run, rather than overwriting that run's final figures.
    """
    import mlflow

    run_file, eval_dir = Path(epochs_root) / RUN_FILE, Path(eval_dir)
    if not run_file.exists():
        raise StageError(f"{run_file} not found: run the deepcluster stage first")
    if not (eval_dir / METRICS).exists():
        raise StageError(f"{eval_dir / METRICS} not found: run the evaluate stage first")
    state = read_json(run_file)
    mlflow.set_tracking_uri(tracking_uri())
    training = _existing_run(state.get("mlflow_run_id"))
    experiment = os.environ.get("DVC_EXP_NAME")
    own = training is None or experiment == mlflow.get_run(training).data.tags.get("dvc.experiment")
    where = ({"run_id": training, "run_name": f"deepcluster-{state['fingerprint']}"} if own else
             {"parent_run_id": training, "run_name": f"evaluate-{experiment}"})
    with start_run(state["params"], tags=link_tags(), **where) as run:
        metrics = read_json(eval_dir / METRICS)
        mlflow.log_metrics({f"final.{k}": v for k, v in numeric_metrics(metrics).items()},
                           step=int(metrics.get("epochs") or 0))
        log_artifacts([eval_dir / METRICS, eval_dir / "report.md", eval_dir / EVAL_CURVES, eval_dir / EVAL_CLUSTER_SIZES],
                      "evaluation")
        log_artifacts([eval_dir / "scores"], "evaluation/scores")
        log_artifacts([eval_dir / "pictures"], "evaluation/pictures")
        log_artifacts([model], "checkpoint")  # every stateful object, to resume or fine-tune with this project
        log_model(model, dataset, state["params"]["extract"]["crop_size"], alias=None if experiment else LAST_FINISHED)
        return run.info.run_id


def log_model(checkpoint: str | Path, dataset: str | Path, crop_size: int, alias: str | None) -> int:
    """Log the trained network as an MLflow model (`model`, a torch.export program: weights and graph, no
    pickled code) that maps images in [0, 1] to the clustered features, with its signature and the centre
    view it expects; register it as a version of REGISTERED_MODEL and point `alias` at it. Returns the version."""
    import mlflow
    import numpy as np
    import torch

    from stages.core.checkpoints import FeatureExtractor, load_checkpoint, model_from_checkpoint
    from stages.core.data import RESIZE_PER_CROP, load_split

    ckpt, meta = load_checkpoint(checkpoint), load_split(dataset, "train").meta
    extractor = FeatureExtractor(model_from_checkpoint(ckpt), meta["mean"], meta["std"])
    example = np.random.default_rng(0).random((2, ckpt["in_channels"], crop_size, crop_size), dtype=np.float32)
    view = {"channels": ckpt["in_channels"], "resize": round(crop_size * RESIZE_PER_CROP), "crop_size": crop_size,
            "epoch": ckpt["epoch"]}
    info = mlflow.pytorch.log_model(
        extractor, name="model", serialization_format="pt2", input_example=example, metadata=view,
        registered_model_name=REGISTERED_MODEL,
        # stated, not inferred: inferring them loads the model again in a child process
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    version = int(info.registered_model_version)
    if alias:
        mlflow.MlflowClient(tracking_uri()).set_registered_model_alias(REGISTERED_MODEL, alias, version)
    return version


def main(argv: list[str] | None = None) -> None:
    offline_environment()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="log the final evaluation and the last model to the run's MLflow run")
    pub.add_argument("--epochs-root", default=EPOCHS_ROOT)
    pub.add_argument("--eval", default=EVAL, help="the final evaluation's directory")
    pub.add_argument("--model", default=f"{CHECKPOINTS}/{LAST_CHECKPOINT}")
    pub.add_argument("--dataset", default=DATASET, help="the prepared dataset: the model carries its normalisation")
    args = parser.parse_args(argv)
    try:
        run_id = publish(args.epochs_root, args.eval, args.model, args.dataset)
    except StageError as e:
        sys.exit(f"publish: {e}")
    print(f"publish: {args.eval} and {args.model} logged to MLflow run {run_id} ({tracking_uri()}); "
          f"the model: models:/{REGISTERED_MODEL}/<version> (newest outside an experiment: models:/{REGISTERED_MODEL}@{LAST_FINISHED})")


if __name__ == "__main__":
    main()
