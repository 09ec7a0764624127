"""The DeepCluster Prefect flow: every epoch runs extract -> pca -> cluster -> labels -> train -> evaluate.

Each stage reads and writes files only (data/epochs/<epoch>/...), so any stage can also be run on its
own with `python -m stages.<name>`. A stage counts as done when its report (<stage>.json) exists: it
is written last and atomically, so rerunning the flow on the same workspace continues after the
last finished stage instead of starting over.

    python -m pipeline.flow                      # params.yaml as is
    python -m pipeline.flow --set run.epochs=3 --set cluster.k=50
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pipeline  # noqa: F401  (offline-safe environment defaults, before prefect/mlflow import)
from prefect import flow, get_run_logger, task

from pipeline import tracking
from stages.common import StageError, epoch_dir, load_params, parse_override, read_json, write_json
from stages.cluster import run_cluster
from stages.evaluate import epoch_metrics
from stages.extract import run_extract
from stages.labels import run_labels
from stages.pca import run_pca
from stages.train import init_checkpoint, run_train


@dataclass(frozen=True)
class Layout:
    """Where a run's artifacts live."""

    dataset: Path
    epochs_root: Path
    checkpoints: Path

    def epoch(self, e: int) -> Path:
        return epoch_dir(self.epochs_root, e)

    def checkpoint(self, e: int) -> Path:
        return self.checkpoints / f"epoch_{e:04d}.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def run_file(self) -> Path:
        return self.epochs_root / "run.json"


# Settings that change speed or disk use but not results: a run may resume with other values.
NOT_IN_FINGERPRINT = {"run": {"epochs"}, "extract": {"batch_size", "num_workers", "device", "keep_features_every"},
                      "train": {"num_workers", "device", "keep_checkpoint_every"}, "prepare": {"num_workers"}}


def run_fingerprint(params: dict) -> str:
    """Hash of everything that changes results; run.epochs is left out so a run can be extended."""
    relevant = {section: ({k: v for k, v in values.items() if k not in NOT_IN_FINGERPRINT.get(section, ())}
                          if isinstance(values, dict) else values)
                for section, values in params.items()}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ tasks: one per stage
@task(name="extract")
def extract_task(params: dict, layout: Layout, epoch: int) -> dict:
    return run_extract(params, layout.dataset, layout.checkpoint(epoch - 1), layout.epoch(epoch))


@task(name="pca")
def pca_task(params: dict, layout: Layout, epoch: int) -> dict:
    return run_pca(params, layout.epoch(epoch) / "features.npy", layout.epoch(epoch), epoch)


@task(name="cluster")
def cluster_task(params: dict, layout: Layout, epoch: int) -> dict:
    return run_cluster(params, layout.epoch(epoch) / "pca_features.npy", layout.epoch(epoch), epoch)


@task(name="labels")
def labels_task(params: dict, layout: Layout, epoch: int) -> dict:
    return run_labels(params, layout.epoch(epoch), layout.dataset, layout.epoch(epoch - 1))


@task(name="train")
def train_task(params: dict, layout: Layout, epoch: int) -> dict:
    d = layout.epoch(epoch)
    return run_train(params, layout.dataset, d / "assignments.parquet", layout.checkpoint(epoch - 1),
                     layout.checkpoint(epoch), epoch, d / "train.json")


STAGES = [("extract", extract_task), ("pca", pca_task), ("cluster", cluster_task), ("labels", labels_task),
          ("train", train_task)]


def stage_done(layout: Layout, epoch: int, stage: str) -> bool:
    return (layout.epoch(epoch) / f"{stage}.json").exists()


def apply_retention(params: dict, layout: Layout, epoch: int) -> None:
    """Drop what the retention policy does not keep, once `epoch` is complete.

    fc features are N x D floats per epoch (ImageNet/AlexNet: 21 GB) and a checkpoint of AlexNet is
    ~0.5 GB with momentum buffers; assignments, statistics and metrics are always kept.
    """
    keep_feat = params["extract"].get("keep_features_every") or 0
    if not (keep_feat and epoch % keep_feat == 0):
        for name in ("features.npy", "pca_features.npy"):
            (layout.epoch(epoch) / name).unlink(missing_ok=True)
    keep_ckpt = params["train"].get("keep_checkpoint_every") or 0
    prev = epoch - 1
    if prev > 0 and not (keep_ckpt and prev % keep_ckpt == 0):
        layout.checkpoint(prev).unlink(missing_ok=True)


def publish_last_checkpoint(layout: Layout, epoch: int) -> None:
    if layout.last_checkpoint.exists() and os.path.samefile(layout.last_checkpoint, layout.checkpoint(epoch)):
        return  # already published (renaming a hard link onto itself would leave the temp link behind)
    tmp = layout.last_checkpoint.with_suffix(".pt.tmp")
    tmp.unlink(missing_ok=True)
    os.link(layout.checkpoint(epoch), tmp)  # a hard link: no copy, and the rename is atomic
    os.replace(tmp, layout.last_checkpoint)


def claim_workspace(params: dict, layout: Layout, fresh: bool) -> dict:
    """Start or resume the run in this workspace; refuse to mix artifacts of different parameters."""
    fingerprint = run_fingerprint(params)
    if fresh:
        shutil.rmtree(layout.epochs_root, ignore_errors=True)
        shutil.rmtree(layout.checkpoints, ignore_errors=True)
    if layout.run_file.exists():
        state = read_json(layout.run_file)
        if state["fingerprint"] != fingerprint:
            raise StageError(
                f"{layout.epochs_root} holds a run made with other parameters (fingerprint {state['fingerprint']}, "
                f"now {fingerprint}). Rerun with --fresh to discard it, or restore the parameters to resume it.")
        return state
    state = {"fingerprint": fingerprint, "mlflow_run_id": None, "params": params}
    write_json(layout.run_file, state)
    return state


@flow(name="deepcluster", log_prints=True)
def deepcluster(epochs: int | None = None, overrides: dict | None = None, params_file: str = "params.yaml",
                dataset: str = "data/dataset", epochs_root: str = "data/epochs",
                checkpoints: str = "models/checkpoints", fresh: bool = False) -> dict:
    """Train DeepCluster for `epochs` epochs (default: run.epochs), resuming a matching run in place."""
    logger = get_run_logger()
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides["run.epochs"] = epochs
    params = load_params(params_file, overrides)
    layout = Layout(Path(dataset), Path(epochs_root), Path(checkpoints))
    state = claim_workspace(params, layout, fresh)
    n_epochs = int(params["run"]["epochs"])

    if not layout.checkpoint(0).exists() and not layout.checkpoint(1).exists():
        init_checkpoint(params, layout.dataset, layout.checkpoint(0))
    with tracking.start_run(params, run_name=f"deepcluster-{state['fingerprint']}", run_id=state["mlflow_run_id"]) as run:
        if state["mlflow_run_id"] is None:
            state["mlflow_run_id"] = run.info.run_id
            write_json(layout.run_file, state)
        metrics = {}
        for epoch in range(1, n_epochs + 1):
            metrics_file = layout.epoch(epoch) / "metrics.json"
            if metrics_file.exists():
                metrics = read_json(metrics_file)
                continue
            start = time.perf_counter()
            for name, stage_task in STAGES:
                if stage_done(layout, epoch, name):
                    logger.info(f"epoch {epoch}: {name} already done, skipping")
                    continue
                stats = stage_task.with_options(task_run_name=f"{name}-epoch-{epoch:04d}")(params, layout, epoch)
                logger.info(f"epoch {epoch}: {name} done in {stats['seconds']:.1f}s")
            metrics = epoch_metrics(layout.epoch(epoch), epoch)
            metrics["seconds_epoch"] = time.perf_counter() - start
            metrics["seconds_overhead"] = metrics["seconds_epoch"] - metrics["seconds_stages"]
            tracking.log_epoch(metrics, epoch)
            publish_last_checkpoint(layout, epoch)
            # metrics.json marks the epoch done, so it is written after everything else the epoch does;
            # retention only deletes what a finished epoch no longer needs.
            write_json(metrics_file, metrics)
            apply_retention(params, layout, epoch)
            logger.info(
                f"epoch {epoch}/{n_epochs}: loss {metrics['train_loss']:.3f}, NMI prev {metrics['nmi_previous']}, "
                f"NMI labels {metrics['nmi_labels']}, {metrics['empty_clusters']} empty, {metrics['seconds_epoch']:.0f}s")
        # Idempotent: repairs last.pt if a previous run was killed between an epoch's end and its publication.
        # The newest finished epoch, not n_epochs: a rerun may ask for fewer epochs than are done.
        done = sorted(int(f.parent.name) for f in layout.epochs_root.glob("[0-9][0-9][0-9][0-9]/metrics.json"))
        if done:
            publish_last_checkpoint(layout, done[-1])
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a parameter for this run, e.g. --set cluster.k=50 (repeatable)")
    parser.add_argument("--dataset", default="data/dataset")
    parser.add_argument("--epochs-root", default="data/epochs")
    parser.add_argument("--checkpoints", default="models/checkpoints")
    parser.add_argument("--fresh", action="store_true", help="discard the workspace's existing run and start over")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        deepcluster(overrides=overrides, params_file=args.params, dataset=args.dataset,
                    epochs_root=args.epochs_root, checkpoints=args.checkpoints, fresh=args.fresh)
    except StageError as e:
        sys.exit(f"deepcluster: {e}")


if __name__ == "__main__":
    main()
