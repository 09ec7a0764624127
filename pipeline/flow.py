"""The DeepCluster Prefect flow: every epoch runs the stage chain of stages/epoch.py, one task per stage.

A stage counts as done when its report (<stage>.json, written last and atomically) exists, an epoch
when its metrics.json exists, so a run killed at any point (kill -9 included) continues after the last
finished stage. Entry points, all on params.yaml:

    dvc repro                                     # the deepcluster stage runs `python -m pipeline.flow`
    prefect deployment run 'deepcluster/local' --param epochs=3 --param overrides='{"cluster.k": 50}'
    deepcluster run --set run.epochs=3 --set cluster.k=50   # = python -m pipeline.flow ...

Outside `dvc repro`, overrides are written into params.yaml first (as `dvc exp run -S` does) and the
run ends with `dvc commit deepcluster` + `dvc repro` (final evaluation, publishing), so dvc.lock
describes the workspace whichever entry point ran.
"""
from __future__ import annotations

if __name__ == "__main__":
    # `python -m pipeline.flow` (dvc.yaml's command): this module makes its Prefect flow and tasks when imported,
    # and Prefect reads its settings, logging and analytics switches then, so the command line's environment first.
    from pipeline import offline_environment

    offline_environment()

import argparse
import json
import os
import time
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline import offline_environment, project_root, tracking
from pipeline.logs import reporting
from pipeline.versioning import STAGE, DvcWorkspace, under_dvc_stage
from pipeline.workspace import (claim_workspace, refuse_resume, remove_stale_temp_files, resume_problems, run_identity,
                                workspace_lock)
from stages.core.checkpoints import init_checkpoint
from stages.core.errors import StageError, TransientError, cli_errors, failure_message, is_transient
from stages.core.io import read_json, write_json
from stages.core.layout import (CHECKPOINTS, DATASET, EPOCHS_ROOT, METRICS, RunLayout, apply_retention,
                                keeps_checkpoint, report)
from stages.core.params import flatten, load_params, parse_override
from stages.core.runtime import clock
from stages.core.schema import Params
from stages.epoch import EPOCH_STAGES, epoch_metrics, first_stage_to_run, reopen_damaged_epoch, run_stage, stage_inputs


# ------------------------------------------------------------------ one task per stage
def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition: only a transient fault is worth another try."""
    try:
        state.result()
    except Exception as e:
        return is_transient(e)
    return False


# A stage failing on a transient fault (an I/O error, out of memory, a GPU fault: stages.core.errors.is_transient)
# may succeed on a second try; each try starts the stage over, its outputs being atomic. Anything else
# (bad parameters or inputs, a damaged file) would fail again, hours later: it is never retried.
# NO_CACHE: resuming is decided by the reports on disk, not by Prefect's result cache.
@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def stage_task(name: str, params: Params, layout: RunLayout, epoch: int) -> dict:
    """One stage of the chain; its error names the stage and epoch and says what to do: a StageError
    (not retried) for bad inputs and anything unexpected, a TransientError (retried) for a transient fault."""
    try:
        return run_stage(name, params, layout, epoch)
    except StageError as e:
        raise StageError(f"stage {name}, epoch {epoch}: {e}") from e
    except Exception as e:
        if is_transient(e):
            raise TransientError(f"stage {name}, epoch {epoch}: {failure_message(e)}") from e
        inputs = ", ".join(str(p) for p in stage_inputs(name, layout, epoch))
        damaged = (f"The stage read {inputs}: if one of them is damaged (truncated, or from another run), delete "
                   f"{layout.epoch(epoch)} and rerun (an unfinished epoch is recomputed; a finished epoch's file needs "
                   "`dvc checkout` or --fresh)")
        raise StageError(f"stage {name}, epoch {epoch}: {failure_message(e, damaged)}") from e


def publish_last_checkpoint(layout: RunLayout, epoch: int) -> None:
    if any(e > epoch for e in layout.completed_epochs()):
        return  # an earlier epoch redone (its files were deleted): last.pt stays the newest network
    last, ckpt = layout.last_checkpoint, layout.checkpoint(epoch)
    if last.exists() and os.path.samefile(last, ckpt):
        # Already published (a resumed run redoes this step). Also required for correctness: renaming a
        # hard link onto another link of the same file is a no-op that would leave the temp link behind.
        return
    tmp = last.with_suffix(".pt.tmp")
    tmp.unlink(missing_ok=True)
    os.link(ckpt, tmp)  # a hard link: no copy, and the rename is atomic
    os.replace(tmp, last)


# ------------------------------------------------------------------ DVC and params.yaml
def versioned_workspace(layout: RunLayout, params_file: str | Path, enabled: bool) -> DvcWorkspace | None:
    """The DVC project to version this run in, or None: off, not a DVC project, or paths not dvc.yaml's."""
    ws = DvcWorkspace.find(project_root()) if enabled else None
    if ws is None:
        return None
    stage = yaml.safe_load((ws.root / "dvc.yaml").read_text()).get("stages", {}).get(STAGE, {})
    outs = {(ws.root / (next(iter(o)) if isinstance(o, dict) else o)).resolve() for o in stage.get("outs", [])}
    ours = outs == {layout.epochs_root.resolve(), layout.checkpoints.resolve()}
    return ws if ours and Path(params_file).resolve() == ws.root / "params.yaml" else None


def sync_params_file(params_file: str | Path, overrides: dict, log) -> None:
    """Write the run's overrides into params.yaml (comments kept), so dvc.lock records what produced the run."""
    from pipeline.apply_preset import apply_preset

    current = flatten(yaml.safe_load(Path(params_file).read_text()))  # as written: the overrides may fix a bad value
    changed = {k: v for k, v in overrides.items() if current.get(k) != v}
    if changed:
        apply_preset(params_file, changed, origin="flow override")
        log(f"params.yaml: set {changed} (the run's parameters, so dvc.lock records them)")


def entry_point() -> str:
    from prefect.runtime import deployment, flow_run

    if under_dvc_stage():
        return f"dvc exp run ({os.environ['DVC_EXP_NAME']})" if os.environ.get("DVC_EXP_NAME") else "dvc repro"
    if deployment.name:
        return f"deployment deepcluster/{deployment.name}, flow run {flow_run.name}"
    return f"flow run {flow_run.name}"


# ------------------------------------------------------------------ one epoch
def version_epoch(ws: DvcWorkspace | None, params: Params, layout: RunLayout, epoch: int) -> float:
    """Put what the epoch keeps into DVC's cache (see pipeline.versioning); returns the seconds it took."""
    if ws is None:
        return 0.0
    start = time.perf_counter()
    paths = [layout.epoch(epoch), layout.run_file]
    if epoch > 1:
        paths.append(layout.epoch(epoch - 1) / METRICS)  # written after that epoch was versioned
    if keeps_checkpoint(params, epoch):
        paths.append(layout.checkpoint(epoch))
    ws.cache_paths(paths)
    return time.perf_counter() - start


def finish_epoch(params: Params, layout: RunLayout, epoch: int, n_epochs: int, metrics: dict, ws: DvcWorkspace | None,
                 run_id: str, resumed: bool = False) -> dict:
    """Everything after the stages, idempotent so a run killed in the middle of it can redo it."""
    publish_last_checkpoint(layout, epoch)
    apply_retention(params, layout, epoch)
    start = time.perf_counter()
    if not (resumed and tracking.epoch_logged(run_id, epoch)):
        tracking.log_epoch(metrics, epoch)
    tracking.epoch_artifacts(metrics, read_json(layout.epoch(epoch) / report("labels"))["sizes"], epoch, n_epochs, run_id)
    return {"seconds_tracking": time.perf_counter() - start, "seconds_dvc": version_epoch(ws, params, layout, epoch)}


def run_epoch(params: Params, layout: RunLayout, epoch: int, n_epochs: int, ws: DvcWorkspace | None, run_id: str) -> dict:
    logger = get_run_logger()
    start = time.perf_counter()
    ran = 0.0  # seconds of stage compute in this process (a resumed epoch ran some stages before)
    start_at = first_stage_to_run(params, layout, epoch, log=logger.warning)
    for i, name in enumerate(EPOCH_STAGES):
        if i < start_at:
            logger.info(f"epoch {epoch}: {name} already done, skipping")
            continue
        logger.info(f"epoch {epoch}: {name} starting")
        stats = stage_task.with_options(name=name, task_run_name=f"{name}-epoch-{epoch:04d}")(name, params, layout, epoch)
        ran += stats["seconds"]
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()
                 if not isinstance(v, (list, dict))}  # without long lists (cluster sizes)
        logger.info(f"epoch {epoch}: {name} done in {stats['seconds']:.1f}s: {json.dumps(shown, sort_keys=True)}")
    metrics = epoch_metrics(layout.epoch(epoch), epoch)
    metrics.update(finish_epoch(params, layout, epoch, n_epochs, metrics, ws, run_id, resumed=start_at > 0))
    # Orchestration overhead: wall time of the epoch in this process minus the stages' own compute,
    # i.e. Prefect task calls, reading reports, MLflow, Prefect artifacts and DVC caching.
    metrics["seconds_overhead"] = time.perf_counter() - start - ran
    metrics["seconds_epoch"] = metrics["seconds_stages"] + metrics["seconds_overhead"]
    tracking.log_epoch({k: metrics[k] for k in ("seconds_overhead", "seconds_epoch", "seconds_tracking", "seconds_dvc")},
                       epoch)
    write_json(layout.epoch(epoch) / METRICS, metrics)  # the epoch is done
    return metrics


def epoch_line(metrics: dict, epoch: int, n_epochs: int, clock: RunClock) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    return (f"epoch {epoch}/{n_epochs}: loss {metrics['train_loss']:.3f}, NMI prev {fmt(metrics['nmi_previous'])}, "
            f"NMI labels {fmt(metrics['nmi_labels'])}, {metrics['n_clusters']} clusters "
            f"({metrics['empty_clusters']} empty, {metrics['singleton_clusters']} singletons), "
            f"{metrics['seconds_epoch']:.1f}s ({metrics['seconds_overhead']:.2f}s orchestration); {clock.summary()}")


class RunClock:
    """The run's elapsed time (its epochs' own seconds, so a resumed run counts the epochs it ran before) and
    the time left: the mean of the last few epochs times the epochs to go (epochs cost alike: the same stages
    on the same images; the last few follow a change of machine or load)."""

    RECENT = 5

    def __init__(self, n_epochs: int, finished_seconds: list[float]):
        self.n_epochs, self.seconds = n_epochs, list(finished_seconds)

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def left(self) -> float | None:
        recent = self.seconds[-self.RECENT:]
        return sum(recent) / len(recent) * max(self.n_epochs - len(self.seconds), 0) if recent else None

    def summary(self) -> str:
        left = self.left()
        return (f"run {clock(sum(self.seconds))} elapsed, "
                + ("time left unknown" if left is None else f"about {clock(left)} left"))


# ------------------------------------------------------------------ the flow
@flow(name="deepcluster", log_prints=True)
def deepcluster(epochs: int | None = None, overrides: dict | None = None, params_file: str = "params.yaml",
                dataset: str = DATASET, epochs_root: str = EPOCHS_ROOT, checkpoints: str = CHECKPOINTS,
                fresh: bool = False, dvc: bool = True) -> dict:
    """Train DeepCluster for `epochs` epochs (default: run.epochs), resuming a matching run in place.

    overrides: dotted params.yaml keys, e.g. {"cluster.k": 50}. fresh: discard the workspace's run.
    dvc: version the run with DVC when the project is a DVC project (per-epoch cache, dvc.lock).
    """
    logger = get_run_logger()
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides["run.epochs"] = epochs
    in_dvc = under_dvc_stage()
    if in_dvc and overrides:
        raise StageError("under `dvc repro` the parameters come from params.yaml only: edit it (or use "
                         "`dvc exp run -S key=value`) instead of passing overrides")
    layout = RunLayout(Path(dataset), Path(epochs_root), Path(checkpoints))
    ws = versioned_workspace(layout, params_file, dvc)
    if dvc and ws is None:
        logger.info("DVC versioning off: not run from the root of a DVC project with this run's paths in dvc.yaml")
    records_lock = ws is not None and not in_dvc  # under dvc repro, DVC writes dvc.lock itself

    params = load_params(params_file, overrides, origin="flow override")  # validated before anything changes
    with workspace_lock(layout.epochs_root, entry_point()):
        for tmp in remove_stale_temp_files(layout.epochs_root, layout.checkpoints):
            logger.info(f"removed {tmp}, left by a killed run")
        if records_lock:
            if not fresh and layout.run_file.exists():
                # Refuse before touching params.yaml; the dataset is compared after `dvc repro prepare`.
                identity = {**run_identity(params, layout), "dataset_version": None}
                refuse_resume(layout, resume_problems(read_json(layout.run_file), identity, params, layout))
            sync_params_file(params_file, overrides, log=logger.info)
            ws.repro("prepare", log=logger.info)  # the dataset, from params.yaml (a no-op when up to date)
        state = claim_workspace(params, layout, fresh, "fresh" if in_dvc else "refuse", log=logger.warning)
        n_epochs = params.run.epochs

        if not layout.checkpoint(0).exists() and not layout.checkpoint(1).exists():
            init_checkpoint(params, layout.dataset, layout.checkpoint(0))
        from prefect.runtime import flow_run

        # The flow run that started the run keeps the tag; one that resumes it is the last one.
        started = tracking.link_tags(flow_run.id, flow_run.name) if state["mlflow_run_id"] is None else {
            "prefect.last_flow_run_id": flow_run.id}
        tags = {"deepcluster.fingerprint": state["fingerprint"], "deepcluster.entry_point": entry_point(), **started}
        with tracking.start_run(params.model_dump(), run_name=f"deepcluster-{state['fingerprint']}", run_id=state["mlflow_run_id"],
                                tags=tags, system_metrics=True) as run:
            # run.json (versioned with the epochs) leads to the MLflow run and to the flow run and DVC experiment
            # that started it; written once, so that a rerun with nothing to do leaves the outputs as they were
            links = {"mlflow_run_id": run.info.run_id, "prefect_flow_run_id": flow_run.id,
                     "dvc_experiment": os.environ.get("DVC_EXP_NAME")}
            if state["mlflow_run_id"] != run.info.run_id:
                state.update(links)
                write_json(layout.run_file, state)
            logger.info(f"MLflow run {run.info.run_id} in {tracking.tracking_uri()}")
            done = [e for e in layout.completed_epochs() if e <= n_epochs]
            if done and reopen_damaged_epoch(params, layout, done[-1], log=logger.warning):
                done = done[:-1]
            if done:
                # The last finished epoch may have been killed between its metrics.json and the end
                # of its bookkeeping (MLflow, retention, DVC): redo that part, it is idempotent.
                metrics = read_json(layout.epoch(done[-1]) / METRICS)
                finish_epoch(params, layout, done[-1], n_epochs, metrics, ws, run.info.run_id, resumed=True)
                logger.info(f"resuming after epoch {done[-1]} of {n_epochs}")
            clock = RunClock(n_epochs, [read_json(layout.epoch(e) / METRICS).get("seconds_epoch") or 0.0 for e in done])
            update_progress = tracking.progress(len(done), n_epochs, run.info.run_id)
            for epoch in (e for e in range(1, n_epochs + 1) if e not in done):
                figures = run_epoch(params, layout, epoch, n_epochs, ws, run.info.run_id)
                clock.add(figures["seconds_epoch"])
                logger.info(epoch_line(figures, epoch, n_epochs, clock))
                update_progress(len(clock.seconds), clock.summary())
            # the newest finished epoch's figures (an earlier epoch whose files were deleted may have been redone)
            finished = [e for e in layout.completed_epochs() if e <= n_epochs]
            metrics = read_json(layout.epoch(finished[-1]) / METRICS) if finished else {}
        if records_lock:
            ws.commit_stage()  # dvc.lock <- params.yaml, the dataset, the code and the finished run
            ws.repro(log=logger.info)  # the stages downstream: final evaluation, publishing to MLflow
    return metrics


def main(argv: list[str] | None = None) -> None:
    offline_environment()  # for callers of main(); `python -m pipeline.flow` and `deepcluster run` set it before the import
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a parameter for this run, e.g. --set cluster.k=50 (repeatable); "
                             "in a DVC project it is written into params.yaml")
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--epochs-root", default=EPOCHS_ROOT)
    parser.add_argument("--checkpoints", default=CHECKPOINTS)
    parser.add_argument("--fresh", action="store_true", help="discard the workspace's existing run and start over")
    parser.add_argument("--no-dvc", action="store_true", help="do not version the run with DVC (the flow alone)")
    args = parser.parse_args(argv)
    with cli_errors("deepcluster"):
        overrides = dict(parse_override(s) for s in args.set)
        # Before anything starts or is deleted (--fresh): a bad value fails now, not hours into the run.
        load_params(args.params, overrides, origin="--set")
        with reporting():
            deepcluster(overrides=overrides, params_file=args.params, dataset=args.dataset,
                        epochs_root=args.epochs_root, checkpoints=args.checkpoints, fresh=args.fresh,
                        dvc=not args.no_dvc)


if __name__ == "__main__":
    main()
