"""Stage `evaluate`.

`epoch`: gathers what the epoch's stages measured (their <stage>.json files) into
data/epochs/<epoch>/metrics.json: losses, NMI with the previous epoch and with the labels, cluster
counts and sizes, seconds per stage.

`final`: evaluates the run's last network on the held-out labelled split and writes the run's
per-epoch curves: data/eval/metrics.json (DVC metrics) and data/eval/epochs.csv (DVC plots).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from stages.checkpoints import load_checkpoint, model_from_checkpoint
from stages.cluster import run_kmeans
from stages.common import StageError, Timer, atomic_path, load_params, pick_device, read_json, seed_for, write_json
from stages.data import load_split
from stages.extract import extract_features
from stages.labels import nmi
from stages.pca import fit_pca_whitening

STAGE_FILES = ("extract", "pca", "cluster", "labels", "train")


def epoch_metrics(epoch_dir: str | Path, epoch: int) -> dict:
    """Flat per-epoch figures from the stage reports in `epoch_dir`."""
    epoch_dir = Path(epoch_dir)
    reports = {}
    for stage in STAGE_FILES:
        path = epoch_dir / f"{stage}.json"
        if not path.exists():
            raise StageError(f"{path} is missing: stage {stage!r} has not finished for epoch {epoch}")
        reports[stage] = read_json(path)
    lab, tr = reports["labels"], reports["train"]
    metrics = {
        "epoch": epoch,
        "train_loss": tr["loss"],
        "pseudo_label_accuracy": tr["pseudo_label_accuracy"],
        "kmeans_loss": reports["cluster"]["objective"],
        "nmi_previous": lab["nmi_previous"],
        "nmi_labels": lab["nmi_labels"],
        "n_clusters": lab["n_clusters"],
        "empty_clusters": lab["empty_clusters"],
        "cluster_size_min": lab["size_min"],
        "cluster_size_median": lab["size_median"],
        "cluster_size_max": lab["size_max"],
        "cluster_size_cv": lab["size_cv"],
        "pca_explained_variance": reports["pca"]["explained_variance"],
        "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in reports.values()),
    }
    for stage, report in reports.items():
        metrics[f"seconds_{stage}"] = report["seconds"]
    metrics["seconds_stages"] = sum(r["seconds"] for r in reports.values())
    return metrics


def run_epoch_evaluation(epoch_dir: str | Path, epoch: int) -> dict:
    metrics = epoch_metrics(epoch_dir, epoch)
    write_json(Path(epoch_dir) / "metrics.json", metrics)
    return metrics


def collect_epoch_metrics(epochs_root: str | Path) -> pd.DataFrame:
    files = sorted(Path(epochs_root).glob("[0-9][0-9][0-9][0-9]/metrics.json"))
    if not files:
        raise StageError(f"no finished epoch under {epochs_root}: run the DeepCluster flow first")
    return pd.DataFrame([read_json(f) for f in files]).sort_values("epoch").reset_index(drop=True)


def test_split_clustering(params: dict, dataset: str | Path, checkpoint: str | Path) -> dict:
    """k-means with k = number of classes on the held-out split's fc features, NMI with the labels."""
    images = load_split(dataset, "test")
    if not images.has_labels:
        return {}
    device = pick_device(params["extract"].get("device", "auto"))
    ckpt = load_checkpoint(checkpoint, device)
    model = model_from_checkpoint(ckpt, device)
    feats = np.empty((len(images), model.feature_dim), dtype=np.float32)
    extract_features(model, images, feats, crop_size=params["extract"]["crop_size"],
                     batch_size=params["extract"]["batch_size"], device=device, amp=params["extract"]["amp"])
    pca = fit_pca_whitening(feats, min(params["pca"]["dim"], feats.shape[1]), params["pca"]["eps"])
    n_classes = int(images.labels.max()) + 1
    c = run_kmeans(pca.transform(feats), n_classes, params["cluster"]["niter"],
                   seed_for(params["run"]["seed"], ckpt["epoch"], "evaluate"))
    return {"test_nmi_k_classes": nmi(images.labels, c.labels), "checkpoint_epoch": ckpt["epoch"]}


def run_final_evaluation(params: dict, dataset: str | Path, epochs_root: str | Path, checkpoint: str | Path,
                         out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    with Timer() as t:
        curves = collect_epoch_metrics(epochs_root)
        with atomic_path(out_dir / "epochs.csv") as tmp:
            curves.to_csv(tmp, index=False)
        last = curves.iloc[-1]
        summary = {"epochs": int(last["epoch"]), "last_nmi_previous": last["nmi_previous"],
                   "last_nmi_labels": last["nmi_labels"], "last_train_loss": last["train_loss"]}
        summary.update(test_split_clustering(params, dataset, checkpoint))
    summary["seconds"] = t.seconds
    summary = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.items()}
    write_json(out_dir / "metrics.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    ep = sub.add_parser("epoch", help="gather one epoch's metrics into <epoch-dir>/metrics.json")
    ep.add_argument("--epoch-dir", required=True)
    ep.add_argument("--epoch", type=int, required=True)
    fin = sub.add_parser("final", help="evaluate the run's last network and write the per-epoch curves")
    fin.add_argument("--params", default="params.yaml", help="params file (reads extract, pca, cluster, run)")
    fin.add_argument("--dataset", default="data/dataset")
    fin.add_argument("--epochs-root", default="data/epochs")
    fin.add_argument("--checkpoint", default="models/checkpoints/last.pt")
    fin.add_argument("--out", default="data/eval")
    args = parser.parse_args(argv)
    try:
        if args.mode == "epoch":
            m = run_epoch_evaluation(args.epoch_dir, args.epoch)
        else:
            m = run_final_evaluation(load_params(args.params), args.dataset, args.epochs_root, args.checkpoint, args.out)
    except StageError as e:
        sys.exit(f"evaluate: {e}")
    print("evaluate: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))


if __name__ == "__main__":
    main()
