"""One DeepCluster epoch as a chain of stages on a run layout, written once for the flow, the
ablations and the tests: extract -> pca -> cluster -> labels -> train, then `epoch_metrics`.

Each stage reads the files the previous ones wrote (stages/layout.py names them) and ends by
writing its <stage>.json report, so a chain can resume after the last finished stage.
"""
from __future__ import annotations

from pathlib import Path

from stages.common import StageError, read_json
from stages.cluster import run_cluster
from stages.extract import run_extract
from stages.labels import run_labels
from stages.layout import ASSIGNMENTS, CLUSTERING, FEATURES, PCA_FEATURES, RunLayout, report
from stages.pca import run_pca
from stages.train import run_train


# The order is the method's: each stage consumes what the one before it wrote.
EPOCH_STAGES = ("extract", "pca", "cluster", "labels", "train")


def run_stage(name: str, params: dict, layout: RunLayout, epoch: int, previous: str | Path | None = None) -> dict:
    """Run one stage of `epoch` on the layout's files; `previous` is the epoch directory NMI(t-1, t)
    compares with (default: epoch - 1 of the same layout; an ablation compares with the main run's)."""
    d = layout.epoch(epoch)
    if name == "extract":
        return run_extract(params, layout.dataset, layout.checkpoint(epoch - 1), d)
    if name == "pca":
        return run_pca(params, d / FEATURES, d, epoch)
    if name == "cluster":
        return run_cluster(params, d / PCA_FEATURES, d, epoch)
    if name == "labels":
        return run_labels(params, d, layout.dataset, previous if previous is not None else layout.epoch(epoch - 1))
    if name == "train":
        return run_train(params, layout.dataset, d / ASSIGNMENTS, layout.checkpoint(epoch - 1),
                         layout.checkpoint(epoch), epoch, d / report("train"))
    raise ValueError(f"unknown stage {name!r}: the epoch's stages are {', '.join(EPOCH_STAGES)}")


def stage_inputs(name: str, layout: RunLayout, epoch: int) -> list[Path]:
    """The files stage `name` of `epoch` reads (as run_stage wires them), for error messages."""
    d, prev = layout.epoch(epoch), layout.epoch(epoch - 1)
    return {"extract": [layout.dataset, layout.checkpoint(epoch - 1)], "pca": [d / FEATURES],
            "cluster": [d / PCA_FEATURES], "labels": [d / CLUSTERING, layout.dataset, prev / ASSIGNMENTS],
            "train": [layout.dataset, d / ASSIGNMENTS, layout.checkpoint(epoch - 1)]}[name]


def epoch_metrics(epoch_dir: str | Path, epoch: int) -> dict:
    """Flat per-epoch figures from the stage reports in `epoch_dir`."""
    epoch_dir = Path(epoch_dir)
    reports = {}
    for stage in EPOCH_STAGES:
        path = epoch_dir / report(stage)
        if not path.exists():
            raise StageError(f"{path} is missing: stage {stage!r} has not finished for epoch {epoch}")
        reports[stage] = read_json(path)
    lab, tr = reports["labels"], reports["train"]
    metrics = {
        "epoch": epoch,
        "train_loss": tr["loss"],
        "pseudo_label_accuracy": tr["pseudo_label_accuracy"],
        "kmeans_loss": reports["cluster"].get("objective"),  # None with PIC: not logged
        "nmi_previous": lab["nmi_previous"],
        "nmi_labels": lab["nmi_labels"],
        "n_clusters": lab["n_clusters"],
        "empty_clusters": lab["empty_clusters"],
        "singleton_clusters": lab["singleton_clusters"],
        "cluster_size_min": lab["size_min"],
        "cluster_size_median": lab["size_median"],
        "cluster_size_max": lab["size_max"],
        "cluster_size_cv": lab["size_cv"],
        "pca_explained_variance": reports["pca"]["explained_variance"],
        "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in reports.values()),
    }
    for stage, rep in reports.items():
        metrics[f"seconds_{stage}"] = rep["seconds"]
    metrics["seconds_stages"] = sum(r["seconds"] for r in reports.values())
    return metrics
