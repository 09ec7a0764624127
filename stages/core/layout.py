"""Where a run's files live and which of them are kept: the one place that names them.

data/epochs/<epoch>/ holds each stage's outputs and its <stage>.json report (metrics.json once the epoch
is done), data/epochs/run.json the run's identity, models/checkpoints/ epoch_<epoch>.pt and last.pt.
Retention: fc features are N x D floats per epoch and an AlexNet checkpoint with its momentum about
half a gigabyte, so only every n-th epoch keeps them; assignments, reports and metrics are always kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.core.schema import Params

DATASET = "data/dataset"
EPOCHS_ROOT = "data/epochs"
CHECKPOINTS = "models/checkpoints"
ABLATIONS_ROOT = "data/ablations"
EVAL = "data/eval"

RUN_FILE = "run.json"
FEATURES = "features.npy"
PCA = "pca.npz"
PCA_FEATURES = "pca_features.npy"
CLUSTERING = "clusters.npz"
ASSIGNMENTS = "assignments.parquet"
METRICS = "metrics.json"  # written last: the epoch is done
LAST_CHECKPOINT = "last.pt"
# The final evaluation's files in EVAL (with METRICS, the full table)
EVAL_HEADLINE = "headline.json"  # the one declared DVC metric: trained vs random init vs raw pixels
EVAL_CURVES = "epochs.csv"  # one row per epoch (NMI, loss, cluster sizes)
EVAL_CLUSTER_SIZES = "cluster_sizes.json"  # the last clustering's sizes, largest first
# Large, and recomputable from a kept checkpoint: what retention may delete from an epoch.
DISPOSABLE = (FEATURES, PCA_FEATURES)


def report(stage: str) -> str:
    """A stage's report, written last and atomically: its presence means the stage finished."""
    return f"{stage}.json"


def epoch_dir(epochs_root: str | Path, epoch: int) -> Path:
    return Path(epochs_root) / f"{epoch:04d}"


def checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:04d}.pt"


@dataclass(frozen=True)
class RunLayout:
    dataset: Path = Path(DATASET)
    epochs_root: Path = Path(EPOCHS_ROOT)
    checkpoints: Path = Path(CHECKPOINTS)

    def epoch(self, e: int) -> Path:
        return epoch_dir(self.epochs_root, e)

    def checkpoint(self, e: int) -> Path:
        return self.checkpoints / checkpoint_name(e)

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def run_file(self) -> Path:
        return self.epochs_root / RUN_FILE

    def stage_done(self, e: int, stage: str) -> bool:
        return (self.epoch(e) / report(stage)).exists()

    def completed_epochs(self) -> list[int]:
        return sorted(int(p.parent.name) for p in self.epochs_root.glob(f"[0-9][0-9][0-9][0-9]/{METRICS}"))


def keeps_checkpoint(params: Params, epoch: int) -> bool:
    every = params.train.keep_checkpoint_every
    return epoch == 0 or (bool(every) and epoch % every == 0)


def apply_retention(params: Params, layout: RunLayout, epoch: int) -> None:
    """Drop what the retention policy does not keep, once `epoch` is complete.

    The last two finished epochs keep their checkpoints: the next epoch starts from the last one,
    and the one before is what the last one is recomputed from if it is damaged.
    """
    every = params.extract.keep_features_every
    if not (every and epoch % every == 0):
        for name in DISPOSABLE:
            (layout.epoch(epoch) / name).unlink(missing_ok=True)
    if epoch > 2 and not keeps_checkpoint(params, epoch - 2):
        layout.checkpoint(epoch - 2).unlink(missing_ok=True)
