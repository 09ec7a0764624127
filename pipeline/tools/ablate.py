"""Single-stage reruns for ablations: rerun one stage of a finished epoch with other parameters.

    python -m pipeline.tools.ablate cluster --epoch 6 --set cluster.k=50 --set pca.dim=32 --name k50
    python -m pipeline.tools.ablate cluster --epoch 6 --set run.seed=1 --name seed1   # another k-means seed
    python -m pipeline.tools.ablate labels --epoch 7 --previous 3 --name vs3          # NMI against epoch 3
    python -m pipeline.tools.ablate evaluate --epoch 10 --set pca.dim=32 --name eval-pca32
    python -m pipeline.tools.inspect compare 6 k50:6                                  # vs the main run
    deepcluster compare --ablations                                                   # every ablation

Each reruns the named stage and the chain after it up to `labels` (or `evaluate final` on the epoch's
checkpoint) on epoch E's stored inputs, with the main run's parameters (data/epochs/run.json) plus the
overrides; `pca`/`cluster` re-extract features that retention did not keep from epoch E-1's checkpoint.
Results go to data/ablations/<name>/, built in a hidden temp directory and renamed into place, then
`dvc add`-ed and logged as an MLflow run nested under the main run (metrics at step E). The main run's
files are only read.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from pipeline import offline_environment, project_root, tracking
from pipeline.versioning import DvcWorkspace
from stages.core.assignments import nmi_between, read_assignments
from stages.core.checkpoints import load_checkpoint
from stages.core.errors import StageError, cli_errors
from stages.core.io import read_json, write_json
from stages.core.layout import (ABLATIONS_ROOT, ASSIGNMENTS, CHECKPOINTS, CLUSTERING, DATASET, DISPOSABLE, EPOCHS_ROOT,
                                FEATURES, METRICS, PCA, PCA_FEATURES, RUN_FILE, RunLayout, epoch_dir, report)
from stages.core.params import apply_overrides, parse_override
from stages.core.schema import Params
from stages.epoch import EPOCH_STAGES, epoch_stage, run_stage

# The stages an ablation reruns: after extract (features are kept, or re-extracted with the main run's
# network) up to labels (train would change the network itself); or `evaluate final` on an epoch's network.
RERUNNABLE = EPOCH_STAGES[EPOCH_STAGES.index("extract") + 1:EPOCH_STAGES.index("labels") + 1]
STAGES = (*RERUNNABLE, "evaluate")


def check_overrides(stage: str, overrides: dict) -> None:
    """Refuse the overrides that cannot change a rerun of `stage`: they would be silently ignored (the final
    evaluation reads several sections: any goes). A pca or cluster rerun starts at pca when its parameters
    differ from the main run's; a labels rerun uses the epoch's own clustering."""
    if stage == "evaluate":
        return
    first = stage if stage == "labels" else RERUNNABLE[0]
    keys = dict.fromkeys(k for name in RERUNNABLE[RERUNNABLE.index(first):] for k in epoch_stage(name).reads_params)
    allowed = tuple(k if "." in k else k + "." for k in keys)
    bad = [k for k in overrides if not k.startswith(allowed)]
    if bad:
        what = ", ".join(a.rstrip(".") for a in allowed) or "no parameter"
        raise StageError(f"{', '.join(bad)} cannot change a {stage} rerun (it depends on {what})")


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (no copy of N x D floats; the main run's file is
    only read), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def provide_features(params: Params, layout: RunLayout, src: Path, epoch: int, log) -> None:
    """Epoch `epoch`'s features in the ablation's epoch directory: kept by the retention policy, or
    re-extracted with the main run's checkpoint of epoch - 1 (same network, centre crops: deterministic)."""
    out = layout.epoch(epoch)
    if (src / FEATURES).exists():
        link_or_copy(src / FEATURES, out / FEATURES)
        return
    if not layout.checkpoint(epoch - 1).exists():
        raise StageError(
            f"epoch {epoch}'s features were not kept (extract.keep_features_every="
            f"{params.extract.keep_features_every}) and {layout.checkpoint(epoch - 1)}, the network that "
            f"computes them, was not kept either (train.keep_checkpoint_every="
            f"{params.train.keep_checkpoint_every}). Ablate an epoch whose features or previous "
            "checkpoint exist (`python -m pipeline.tools.inspect list` shows them), or set extract.keep_features_every for "
            "future runs")
    log(f"epoch {epoch}'s features were not kept: re-extracting them with {layout.checkpoint(epoch - 1)}")
    run_stage("extract", params, layout, epoch)


def ablation_metrics(out: Path, epoch: int, main_dir: Path) -> dict:
    """The figures an ablation changes, under the names of the main run's metrics.json for side-by-side
    views (stages.epoch.epoch_metrics needs all five stage reports; an ablation reruns only some)."""
    metrics = {"epoch": epoch}
    if (out / report("labels")).exists():
        lab = read_json(out / report("labels"))
        metrics.update({k: lab[k] for k in ("nmi_previous", "nmi_labels", "n_clusters", "empty_clusters")})
        metrics.update({f"cluster_size_{k}": lab[f"size_{k}"] for k in ("min", "median", "max", "cv")})
        metrics["nmi_main"] = nmi_between(read_assignments(out / ASSIGNMENTS), read_assignments(main_dir / ASSIGNMENTS))
    if (out / report("cluster")).exists():
        metrics["kmeans_loss"] = read_json(out / report("cluster")).get("objective")
    if (out / report("pca")).exists():
        metrics["pca_explained_variance"] = read_json(out / report("pca"))["explained_variance"]
    if (out / "eval" / METRICS).exists():
        metrics.update({f"eval.{k}": v for k, v in read_json(out / "eval" / METRICS).items()})
    return metrics


def rerun(stage: str, params: Params, main_params: dict, epoch: int, src: Path, layout: RunLayout, main_epochs_root: Path,
          previous: int | None, log) -> None:
    """Run the ablated stage and the chain after it (up to labels) into the ablation's epoch directory."""
    out = layout.epoch(epoch)
    out.mkdir(parents=True)
    if stage == "evaluate":
        from stages.evaluate import run_final_evaluation  # matplotlib and the probes: only for this stage

        ckpt = layout.checkpoint(epoch)
        if not ckpt.exists() and layout.last_checkpoint.exists() and load_checkpoint(layout.last_checkpoint)["epoch"] == epoch:
            ckpt = layout.last_checkpoint
        if not ckpt.exists():
            raise StageError(f"{ckpt} was not kept (train.keep_checkpoint_every="
                             f"{params.train.keep_checkpoint_every}): evaluate an epoch whose checkpoint exists")
        run_final_evaluation(params, layout.dataset, main_epochs_root, ckpt, out / "eval")
        return
    if stage == "cluster" and params.pca.model_dump() == main_params["pca"] and params.run.seed == main_params["run"]["seed"] \
            and (src / PCA_FEATURES).exists():
        for name in (PCA_FEATURES, PCA, report("pca")):  # the same PCA as the main run's: reuse it
            link_or_copy(src / name, out / name)
    elif stage in ("pca", "cluster"):
        provide_features(params, layout, src, epoch, log)
        log(f"pca: {run_stage('pca', params, layout, epoch)}")
    else:  # labels: from the epoch's own clustering
        for name in (CLUSTERING, report("cluster")):
            link_or_copy(src / name, out / name)
    if stage != "labels":
        stats = run_stage("cluster", params, layout, epoch)
        log(f"cluster: k={stats['k']}, {stats['empty_clusters']} empty")
    prev = epoch_dir(main_epochs_root, previous if previous is not None else epoch - 1)
    stats = run_stage("labels", params, layout, epoch, previous=prev)
    log(f"labels: NMI previous {stats['nmi_previous']}, NMI labels {stats['nmi_labels']}")
    for name in DISPOSABLE:  # large, and reproducible from what is kept
        (out / name).unlink(missing_ok=True)


def log_to_mlflow(name: str, record: dict, final_dir: Path, main_run_id: str | None) -> str:
    """A run nested under the main run: the ablation's figures at step = its epoch, and its files."""
    import mlflow

    tags = {"deepcluster.ablation": name, "deepcluster.stage": record["stage"], "deepcluster.epoch": str(record["epoch"])}
    with tracking.start_run(run_name=f"ablation-{name}", tags=tags, parent_run_id=main_run_id) as run:
        mlflow.log_params({"ablation.stage": record["stage"], "ablation.epoch": record["epoch"],
                           **{f"override.{k}": str(v) for k, v in record["overrides"].items()}})
        mlflow.log_metrics(tracking.numeric_metrics(record["metrics"]), step=record["epoch"])
        tracking.log_artifacts([final_dir], "ablation")
        return run.info.run_id


def ablate(stage: str, epoch: int, overrides: dict, name: str, *, previous: int | None = None, force: bool = False,
           epochs_root: str | Path = EPOCHS_ROOT, dataset: str | Path = DATASET, checkpoints: str | Path = CHECKPOINTS,
           root: str | Path = ABLATIONS_ROOT, dvc: bool = True, log=print) -> dict:
    if stage not in STAGES:
        raise StageError(f"cannot ablate {stage!r}: choose one of {', '.join(STAGES)}")
    if not name or "/" in name or name.startswith(".") or ":" in name:
        raise StageError(f"ablation name {name!r}: use letters, digits, - and _ (it names data/ablations/<name>)")
    check_overrides(stage, overrides)
    epochs_root, root = Path(epochs_root), Path(root)
    run_file, src = epochs_root / RUN_FILE, epoch_dir(epochs_root, epoch)
    if not run_file.exists():
        raise StageError(f"{run_file} not found: there is no run to ablate in {epochs_root}")
    if not (src / METRICS).exists():
        raise StageError(f"epoch {epoch} of {epochs_root} has not finished (no {src / METRICS}): "
                         "ablations rerun stages of finished epochs")
    run = read_json(run_file)
    # the main run's parameters, not today's params.yaml
    params = apply_overrides(run["params"], overrides, source=str(run_file))
    final = root / name
    if final.exists() and not force:
        raise StageError(f"{final} exists: choose another --name, or --force to replace it")

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))  # hidden: never taken for a result
    try:
        (tmp / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
        start = time.perf_counter()
        layout = RunLayout(Path(dataset), tmp, Path(checkpoints))
        rerun(stage, params, run["params"], epoch, src, layout, epochs_root, previous, log)
        record = {"name": name, "stage": stage, "epoch": epoch, "overrides": overrides,
                  "previous": previous if previous is not None else epoch - 1,
                  "main_run": {"epochs_root": str(epochs_root), "fingerprint": run["fingerprint"],
                               "mlflow_run_id": run.get("mlflow_run_id")},
                  "seconds": time.perf_counter() - start,
                  "metrics": ablation_metrics(layout.epoch(epoch), epoch, src)}
        write_json(tmp / "ablation.json", record)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)  # all or nothing: a killed ablation leaves only a hidden temp directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ws = DvcWorkspace.find(project_root()) if dvc else None
    if ws is not None:
        record["dvc_file"] = str(ws.add(final).relative_to(ws.root))
        log(f"versioned: {record['dvc_file']} (commit it with git: git add {record['dvc_file']} {root}/.gitignore)")
    record["mlflow_run_id"] = log_to_mlflow(name, record, final, run.get("mlflow_run_id"))
    log(f"MLflow run {record['mlflow_run_id']} (nested under {run.get('mlflow_run_id')})")
    return record


def list_ablations(root: str | Path = ABLATIONS_ROOT, epochs_root: str | Path = EPOCHS_ROOT) -> str:
    """Every ablation under `root` beside the main run's same epoch (`deepcluster compare --ablations`)."""
    import pandas as pd

    rows = []
    for f in sorted(Path(root).glob("*/ablation.json")):
        rec = read_json(f)
        m = rec["metrics"]
        main_file = epoch_dir(epochs_root, rec["epoch"]) / METRICS
        main = read_json(main_file) if main_file.exists() else {}
        rows.append({"name": rec["name"], "stage": rec["stage"], "epoch": rec["epoch"],
                     "overrides": " ".join(f"{k}={v}" for k, v in rec["overrides"].items()) or "-",
                     "clusters": m.get("n_clusters"), "nmi_labels": m.get("nmi_labels"),
                     "main_nmi_labels": main.get("nmi_labels"), "nmi_previous": m.get("nmi_previous"),
                     "main_nmi_previous": main.get("nmi_previous"), "nmi_main": m.get("nmi_main")})
    return pd.DataFrame(rows).to_string(index=False) if rows else f"no ablation under {root}"


def main(argv: list[str] | None = None) -> None:
    offline_environment()  # before MLflow is imported (log_to_mlflow)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=STAGES, help="the stage to rerun")
    parser.add_argument("--epoch", type=int, required=True, help="the (finished) epoch whose stored inputs are used")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a parameter, e.g. --set cluster.k=50 (repeatable)")
    parser.add_argument("--name", required=True, help="the ablation's name: results in data/ablations/<name>/")
    parser.add_argument("--previous", type=int, help="labels: the epoch to compute NMI against (default: epoch - 1)")
    parser.add_argument("--force", action="store_true", help="replace an existing ablation of that name")
    parser.add_argument("--no-dvc", action="store_true", help="do not `dvc add` the result")
    parser.add_argument("--epochs-root", default=EPOCHS_ROOT)
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--checkpoints", default=CHECKPOINTS)
    args = parser.parse_args(argv)
    with cli_errors("ablate"):
        overrides = dict(parse_override(s) for s in args.set)
        rec = ablate(args.stage, args.epoch, overrides, args.name, previous=args.previous, force=args.force,
                     epochs_root=args.epochs_root, dataset=args.dataset, checkpoints=args.checkpoints,
                     dvc=not args.no_dvc)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec["metrics"].items() if k != "epoch"}
    print(f"ablate: {args.name} ({args.stage}, epoch {args.epoch}) -> {ABLATIONS_ROOT}/{args.name}: {shown}")


if __name__ == "__main__":
    main()
