"""One DeepCluster epoch as a chain of stages on a run layout, written once for the flow, the
ablations and the tests: extract -> pca -> cluster -> labels -> train, then `epoch_metrics`.

Each stage reads the files the previous ones wrote (stages/core/layout.py names them) and ends by
writing its <stage>.json report, so a chain can resume after the last finished stage.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import yaml

from stages.cluster import run_cluster
from stages.core.artifacts import check_assignments, check_json, check_npy, check_npz, first_problem, train_rows
from stages.core.checkpoints import verify_checkpoint
from stages.core.clustering import CLUSTERING_ARRAYS
from stages.core.data import load_split
from stages.core.distributed import announced, check_launch, check_world, launch, processes
from stages.core.errors import StageError, what_is_wrong
from stages.core.io import read_json
from stages.core.layout import (ASSIGNMENTS, CLUSTERING, DISPOSABLE, FEATURES, METRICS, PCA, PCA_FEATURES, RunLayout,
                                report)
from stages.core.whitening import PCAWhitening
from stages.extract import run_extract
from stages.labels import run_labels
from stages.pca import run_pca
from stages.train import run_train

# The order is the method's: each stage consumes what the one before it wrote.
EPOCH_STAGES = ("extract", "pca", "cluster", "labels", "train")


def run_stage(name: str, params: dict, layout: RunLayout, epoch: int, previous: str | Path | None = None) -> dict:
    """Run one stage of `epoch` on the layout's files; `previous` is the epoch directory NMI(t-1, t)
    compares with (default: epoch - 1 of the same layout; an ablation compares with the main run's).
    extract and train run on run.nproc_per_node x run.nnodes processes under torchrun when that is
    more than one (stages/core/distributed.py), else here, in this process."""
    d = layout.epoch(epoch)
    if name in DISTRIBUTED_STAGES and processes(params["run"]) > 1:
        return run_under_torchrun(name, params, layout, epoch)
    if name == "extract":
        return run_extract(params, layout.dataset, layout.checkpoint(epoch - 1), d)
    if name == "pca":
        return run_pca(params, d / FEATURES, d, epoch, train_rows(layout.dataset))
    if name == "cluster":
        return run_cluster(params, d / PCA_FEATURES, d, epoch, train_rows(layout.dataset))
    if name == "labels":
        return run_labels(params, d, layout.dataset, previous if previous is not None else layout.epoch(epoch - 1))
    if name == "train":
        return run_train(params, layout.dataset, d / ASSIGNMENTS, layout.checkpoint(epoch - 1),
                         layout.checkpoint(epoch), epoch, d / report("train"))
    raise ValueError(f"unknown stage {name!r}: the epoch's stages are {', '.join(EPOCH_STAGES)}")


# The stages that run on several processes when run.nproc_per_node * run.nnodes > 1.
DISTRIBUTED_STAGES = ("extract", "train")


def stage_arguments(name: str, layout: RunLayout, epoch: int) -> list[str]:
    """The command line of `python -m stages.<name>` for what run_stage runs in-process (less --params)."""
    d = layout.epoch(epoch)
    if name == "extract":
        return ["--dataset", layout.dataset, "--checkpoint", layout.checkpoint(epoch - 1), "--out", d]
    if name == "train":
        return ["--dataset", layout.dataset, "--assignments", d / ASSIGNMENTS, "--checkpoint-in",
                layout.checkpoint(epoch - 1), "--checkpoint-out", layout.checkpoint(epoch), "--epoch", epoch,
                "--stats-out", d / report("train")]
    raise ValueError(f"stage {name!r} does not run under torchrun: only {', '.join(DISTRIBUTED_STAGES)} do")


def run_under_torchrun(name: str, params: dict, layout: RunLayout, epoch: int) -> dict:
    """Stage `name` on the run's processes: the settings are checked here first (a bad one stops before
    any process starts), the processes read the run's params from a file beside the epoch's, and the
    stage's report is what they wrote."""
    section = params[name]
    n_images = train_rows(layout.dataset)
    if name == "train":
        n_images = section["samples_per_epoch"] or n_images
    check_launch(params["run"])
    check_world(processes(params["run"]), n_images=n_images, device=section["device"],
                backend=params["run"]["dist_backend"], section=name, local_size=params["run"]["nproc_per_node"],
                batch_size=section.get("batch_size") if name == "train" else None)
    d = layout.epoch(epoch)
    d.mkdir(parents=True, exist_ok=True)
    # Hidden: not an artifact, and one a killed run leaves behind is removed by the next (pipeline.workspace).
    fd, params_file = tempfile.mkstemp(dir=d, prefix=f".{name}.params.", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(params, f, sort_keys=False)
        args = ["--params", params_file, *stage_arguments(name, layout, epoch)]
        with announced(layout.epochs_root, name, epoch, args) if params["run"]["nnodes"] > 1 else nullcontext():
            launch(params["run"], name, args)
    finally:
        os.unlink(params_file)
    return read_json(d / report(name))


def output_problem(name: str, params: dict, layout: RunLayout, epoch: int, needed: bool = False) -> StageError | None:
    """Why the outputs of stage `name` of `epoch` cannot be used (its report included), or None.

    Features files that retention deleted (DISPOSABLE) may be missing once the stage reading them is
    done, unless `needed`: that stage is about to run again.
    """
    d = layout.epoch(epoch)
    consumed = not needed and name != EPOCH_STAGES[-1] and layout.stage_done(
        epoch, EPOCH_STAGES[EPOCH_STAGES.index(name) + 1])

    def features(file: str) -> Callable[[], object]:
        path = d / file
        return lambda: None if consumed and file in DISPOSABLE and not path.exists() else check_npy(
            path, rows=train_rows(layout.dataset))

    checks = [lambda: check_json(d / report(name))]
    if name == "extract":
        checks.append(features(FEATURES))
    elif name == "pca":
        checks += [lambda: check_npz(d / PCA, PCAWhitening.ARRAYS), features(PCA_FEATURES)]
    elif name == "cluster":
        checks.append(lambda: check_npz(d / CLUSTERING, CLUSTERING_ARRAYS))
    elif name == "labels":
        checks.append(lambda: check_assignments(d / ASSIGNMENTS, load_split(layout.dataset).ids))
    elif name == "train":
        checks.append(lambda: verify_checkpoint(layout.checkpoint(epoch), params["model"],
                                                load_split(layout.dataset).channels, epoch))
    return first_problem(checks)


def first_stage_to_run(params: dict, layout: RunLayout, epoch: int, log: Callable[[str], None] = print) -> int:
    """Where an unfinished epoch resumes: the index in EPOCH_STAGES of the first stage not done, or of
    the first done stage whose outputs are damaged (recomputed, not trusted). The reports from there
    on are removed, so every later stage reruns on the recomputed files.
    """
    done = [layout.stage_done(epoch, s) for s in EPOCH_STAGES]
    start = done.index(False) if False in done else len(EPOCH_STAGES)
    for i, name in enumerate(EPOCH_STAGES[:start]):
        if (problem := output_problem(name, params, layout, epoch)) is not None:
            log(f"epoch {epoch}: {what_is_wrong(problem)}; rerunning {name}")
            start = i
            break
    # The first stage to run reads the outputs of the one before, which retention may have deleted.
    while start > 0 and (problem := output_problem(EPOCH_STAGES[start - 1], params, layout, epoch, True)) is not None:
        log(f"epoch {epoch}: {what_is_wrong(problem)}; rerunning {EPOCH_STAGES[start - 1]}")
        start -= 1
    for name in EPOCH_STAGES[start:]:
        (layout.epoch(epoch) / report(name)).unlink(missing_ok=True)
    return start


def reopen_damaged_epoch(params: dict, layout: RunLayout, epoch: int, log: Callable[[str], None] = print) -> bool:
    """A finished epoch whose metrics.json or checkpoint is damaged becomes unfinished, so the flow
    recomputes them (first_stage_to_run); True if it did. Refused, with the way back, when the
    checkpoint cannot be recomputed because the epoch before's is gone or damaged too."""
    problem = first_problem([lambda: check_json(layout.epoch(epoch) / METRICS)])
    ckpt_problem = output_problem("train", params, layout, epoch)
    if problem is None and ckpt_problem is None:
        return False
    if ckpt_problem is not None:
        channels = load_split(layout.dataset).channels
        before = first_problem([lambda: verify_checkpoint(layout.checkpoint(epoch - 1), params["model"], channels,
                                                          epoch - 1)])
        if before is not None:
            raise StageError(f"{ckpt_problem}. It cannot be recomputed, as the checkpoint it starts from is not usable "
                             f"either: {before}")
    log(f"epoch {epoch}: {what_is_wrong(problem or ckpt_problem)}; recomputing it")
    (layout.epoch(epoch) / METRICS).unlink()
    return True


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
