"""One DeepCluster epoch as a chain of stages on a run layout: the stage graph, written once.

`EPOCH_CHAIN` holds one record per stage, in the method's order (extract -> pca -> cluster -> labels ->
train): what it reads, how it runs in this process, its command line (for torchrun and the GPU check),
and how its outputs are checked before a resumed run trusts them. The flow, the resume logic, the
ablations, the screens, the GPU check and the torchrun launcher all loop over it; adding a stage is
one record here and its module (plus its file in dvc.yaml's deepcluster deps, which a test checks).

Each stage reads the files the previous ones wrote (stages/core/layout.py names them) and ends by
writing its <stage>.json report, so a chain can resume after the last finished stage.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from stages import cluster, extract, labels, pca, train
from stages.core.artifacts import check_assignments, check_json, check_npy, check_npz, first_problem, train_rows
from stages.core.checkpoints import verify_checkpoint
from stages.core.clustering import CLUSTERING_ARRAYS
from stages.core.data import load_split
from stages.core.distributed import announced, check_launch, check_world, launch, processes
from stages.core.errors import StageError, what_is_wrong
from stages.core.io import read_json
from stages.core.layout import (ASSIGNMENTS, CLUSTERING, DISPOSABLE, FEATURES, METRICS, PCA, PCA_FEATURES, RunLayout,
                                report)
from stages.core.schema import Params
from stages.core.whitening import PCAWhitening

Check = Callable[[], object]


@dataclass(frozen=True)
class EpochStage:
    """One stage of the epoch chain.

    options(layout, epoch, previous): the stage's files and numbers for `epoch`, as the keyword
      arguments of `run` that are also its command-line options (`checkpoint_in` is
      `--checkpoint-in`), so the in-process chain, torchrun and the GPU check wire it alike;
      `previous` is the epoch directory NMI(t-1, t) compares with.
    inputs(layout, epoch): the files it reads, named in the error of a stage that failed unexpectedly.
    outputs(params, layout, epoch, rows): checks of what it wrote, its report aside; `rows(file)` checks
      a features file, which retention may delete once the next stage is done.
    reads_params: the params.yaml sections (or keys) its outputs depend on.
    distributed: runs on run.nproc_per_node x run.nnodes processes under torchrun when that is > 1.
    """
    name: str
    run: Callable[..., dict]
    options: Callable[[RunLayout, int, Path | None], dict]
    inputs: Callable[[RunLayout, int], list[Path]]
    outputs: Callable[[Params, RunLayout, int, Callable[[str], Check]], list[Check]]
    reads_params: tuple[str, ...]
    distributed: bool = False

    @property
    def module(self) -> str:
        """What `python -m` runs: the stage's command line."""
        return self.run.__module__


EPOCH_CHAIN = (
    EpochStage("extract", extract.run_extract,
               lambda lay, e, prev: {"dataset": lay.dataset, "checkpoint": lay.checkpoint(e - 1), "out": lay.epoch(e)},
               lambda lay, e: [lay.dataset, lay.checkpoint(e - 1)],
               lambda params, lay, e, rows: [rows(FEATURES)], ("extract",), distributed=True),
    EpochStage("pca", pca.run_pca,
               lambda lay, e, prev: {"features": lay.epoch(e) / FEATURES, "out": lay.epoch(e), "epoch": e,
                                     "dataset": lay.dataset},
               lambda lay, e: [lay.epoch(e) / FEATURES],
               lambda params, lay, e, rows: [lambda: check_npz(lay.epoch(e) / PCA, PCAWhitening.ARRAYS),
                                             rows(PCA_FEATURES)], ("pca", "run.seed")),
    EpochStage("cluster", cluster.run_cluster,
               lambda lay, e, prev: {"features": lay.epoch(e) / PCA_FEATURES, "out": lay.epoch(e), "epoch": e,
                                     "dataset": lay.dataset},
               lambda lay, e: [lay.epoch(e) / PCA_FEATURES],
               lambda params, lay, e, rows: [lambda: check_npz(lay.epoch(e) / CLUSTERING, CLUSTERING_ARRAYS)],
               ("cluster", "run.seed")),
    EpochStage("labels", labels.run_labels,
               lambda lay, e, prev: {"epoch_dir": lay.epoch(e), "dataset": lay.dataset,
                                     "previous": lay.epoch(e - 1) if prev is None else prev},
               lambda lay, e: [lay.epoch(e) / CLUSTERING, lay.dataset, lay.epoch(e - 1) / ASSIGNMENTS],
               lambda params, lay, e, rows: [lambda: check_assignments(lay.epoch(e) / ASSIGNMENTS,
                                                                       load_split(lay.dataset).ids)], ()),
    EpochStage("train", train.run_train,
               lambda lay, e, prev: {"dataset": lay.dataset, "assignments": lay.epoch(e) / ASSIGNMENTS,
                                     "checkpoint_in": lay.checkpoint(e - 1), "checkpoint_out": lay.checkpoint(e),
                                     "epoch": e, "stats_out": lay.epoch(e) / report("train")},
               lambda lay, e: [lay.dataset, lay.epoch(e) / ASSIGNMENTS, lay.checkpoint(e - 1)],
               lambda params, lay, e, rows: [lambda: verify_checkpoint(lay.checkpoint(e), params.model,
                                                                       load_split(lay.dataset).channels, e)],
               ("model", "train", "run.seed"), distributed=True),
)
STAGES = {stage.name: stage for stage in EPOCH_CHAIN}
EPOCH_STAGES = tuple(STAGES)


def epoch_stage(name: str) -> EpochStage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: the epoch's stages are {', '.join(EPOCH_STAGES)}")
    return STAGES[name]


def run_stage(name: str, params: Params, layout: RunLayout, epoch: int, previous: str | Path | None = None) -> dict:
    """Run one stage of `epoch` on the layout's files; `previous` is the epoch directory NMI(t-1, t)
    compares with (default: epoch - 1 of the same layout; an ablation compares with the main run's).
    A distributed stage runs on run.nproc_per_node x run.nnodes processes under torchrun when that is
    more than one (stages/core/distributed.py), else here, in this process."""
    stage = epoch_stage(name)
    if stage.distributed and processes(params.run) > 1:
        return run_under_torchrun(stage, params, layout, epoch)
    return stage.run(params, **stage.options(layout, epoch, previous))


def stage_arguments(name: str, layout: RunLayout, epoch: int, previous: str | Path | None = None) -> list[str]:
    """The command line of `python -m stages.<name>` for what run_stage runs in-process (less --params)."""
    options = epoch_stage(name).options(layout, epoch, previous)
    return [arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def run_under_torchrun(stage: EpochStage, params: Params, layout: RunLayout, epoch: int) -> dict:
    """A distributed stage on the run's processes: the settings are checked here first (a bad one stops
    before any process starts), the processes read the run's params from a file beside the epoch's, and
    the stage's report is what they wrote."""
    name, section = stage.name, getattr(params, stage.name)
    n_images = train_rows(layout.dataset)
    if name == "train":
        n_images = train.draws_per_epoch(section, n_images)
    check_launch(params.run)
    check_world(processes(params.run), n_images=n_images, device=section.device, backend=params.run.dist_backend,
                section=name, local_size=params.run.nproc_per_node,
                batch_size=section.batch_size if name == "train" else None)
    d = layout.epoch(epoch)
    d.mkdir(parents=True, exist_ok=True)
    # Hidden: not an artifact, and one a killed run leaves behind is removed by the next (pipeline.workspace).
    fd, params_file = tempfile.mkstemp(dir=d, prefix=f".{name}.params.", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(params.model_dump(), f, sort_keys=False)
        args = ["--params", params_file, *stage_arguments(name, layout, epoch)]
        with announced(layout.epochs_root, name, epoch, args) if params.run.nnodes > 1 else nullcontext():
            launch(params.run, name, args)
    finally:
        os.unlink(params_file)
    return read_json(d / report(name))


def output_problem(name: str, params: Params, layout: RunLayout, epoch: int, needed: bool = False) -> StageError | None:
    """Why the outputs of stage `name` of `epoch` cannot be used (its report included), or None.

    Features files that retention deleted (DISPOSABLE) may be missing once the stage reading them is
    done, unless `needed`: that stage is about to run again.
    """
    d = layout.epoch(epoch)
    consumed = not needed and name != EPOCH_STAGES[-1] and layout.stage_done(
        epoch, EPOCH_STAGES[EPOCH_STAGES.index(name) + 1])

    def rows(file: str) -> Check:
        path = d / file
        return lambda: None if consumed and file in DISPOSABLE and not path.exists() else check_npy(
            path, rows=train_rows(layout.dataset))

    return first_problem([lambda: check_json(d / report(name)), *epoch_stage(name).outputs(params, layout, epoch, rows)])


def first_stage_to_run(params: Params, layout: RunLayout, epoch: int, log: Callable[[str], None] = print) -> int:
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


def reopen_damaged_epoch(params: Params, layout: RunLayout, epoch: int, log: Callable[[str], None] = print) -> bool:
    """A finished epoch whose metrics.json or checkpoint is damaged becomes unfinished, so the flow
    recomputes them (first_stage_to_run); True if it did. Refused, with the way back, when the
    checkpoint cannot be recomputed because the epoch before's is gone or damaged too."""
    problem = first_problem([lambda: check_json(layout.epoch(epoch) / METRICS)])
    ckpt_problem = output_problem("train", params, layout, epoch)
    if problem is None and ckpt_problem is None:
        return False
    if ckpt_problem is not None:
        channels = load_split(layout.dataset).channels
        before = first_problem([lambda: verify_checkpoint(layout.checkpoint(epoch - 1), params.model, channels,
                                                          epoch - 1)])
        if before is not None:
            raise StageError(f"{ckpt_problem}. It cannot be recomputed, as the checkpoint it starts from is not usable "
                             f"either: {before}")
    log(f"epoch {epoch}: {what_is_wrong(problem or ckpt_problem)}; recomputing it")
    (layout.epoch(epoch) / METRICS).unlink()
    return True


def stage_inputs(name: str, layout: RunLayout, epoch: int) -> list[Path]:
    """The files stage `name` of `epoch` reads, for error messages."""
    return epoch_stage(name).inputs(layout, epoch)


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
    return {"epoch": epoch, "train_loss": tr["loss"], "pseudo_label_accuracy": tr["pseudo_label_accuracy"],
            "kmeans_loss": reports["cluster"].get("objective"),  # None with PIC: not logged
            "refilled_clusters": reports["cluster"].get("refilled_clusters", 0),
            **{k: lab[k] for k in ("nmi_previous", "nmi_labels", "n_clusters", "empty_clusters", "singleton_clusters")},
            **{f"cluster_{k}": lab[k] for k in ("size_min", "size_median", "size_max", "size_cv")},
            "pca_explained_variance": reports["pca"]["explained_variance"],
            "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in reports.values()),
            **{f"seconds_{stage}": rep["seconds"] for stage, rep in reports.items()},
            "seconds_stages": sum(r["seconds"] for r in reports.values())}
