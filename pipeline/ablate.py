"""Single-stage reruns for ablations: rerun one stage of a finished epoch with other parameters.

    python -m pipeline.ablate cluster --epoch 6 --set cluster.k=50 --set pca.dim=32 --name k50
    python -m pipeline.ablate cluster --epoch 6 --set run.seed=1 --name seed1   # another k-means seed
    python -m pipeline.ablate labels --epoch 7 --previous 3 --name vs3          # NMI against epoch 3
    python -m pipeline.ablate evaluate --epoch 10 --set pca.dim=32 --name eval-pca32
    python -m pipeline.ablate list                                              # side by side
    python -m pipeline.inspect compare 6 k50:6                                  # vs the main run

What each stage reruns, on epoch E's stored inputs, with the main run's parameters (data/epochs/
run.json) plus the overrides:
  pca, cluster  PCA (from features.npy) -> k-means -> labels (NMI with the main run's epoch E-1,
                with the labels, and with the main run's epoch E). `cluster` reuses the epoch's
                pca_features.npy when no pca.* is overridden and it was kept. Features exist only for
                epochs kept by extract.keep_features_every; otherwise they are re-extracted with
                epoch E-1's checkpoint when train.keep_checkpoint_every kept it.
  labels        assignments and NMI from the epoch's k-means result, against --previous.
  evaluate      `stages.evaluate final` on epoch E's checkpoint (kept by train.keep_checkpoint_every,
                or the last epoch's).

Results go to data/ablations/<name>/ (the epoch's files under <epoch>/, plus ablation.json and the
effective params.yaml), built in a temp directory and renamed into place, then `dvc add`-ed
(data/ablations/<name>.dvc, to commit with git) and logged as an MLflow run nested under the main
run (metrics with step=E, beside the main run's). The main run's files are only read: they stay
byte-identical. Large intermediates (features, pca_features) are not kept.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

import pipeline  # noqa: F401  (offline-safe environment defaults, before mlflow import)
from pipeline import PROJECT_ROOT
from pipeline.inspect import ABLATIONS_ROOT
from pipeline.versioning import DvcWorkspace, subprocess_env
from stages.common import StageError, apply_overrides, epoch_dir, parse_override, read_json, save_npy, write_json
from stages.labels import ASSIGNMENTS, nmi_between, read_assignments

STAGES = ("pca", "cluster", "labels", "evaluate")
# Which parameters can change each rerun; anything else would be silently ignored, so it is refused.
AFFECTS = {"pca": ("pca.", "cluster.", "run.seed"), "cluster": ("pca.", "cluster.", "run.seed"), "labels": (),
           "evaluate": None}  # None: any parameter (the final evaluation reads several sections)
NOT_KEPT = ("features.npy", "pca_features.npy", "image_ids.npy")  # large, and reproducible from what is kept


def check_overrides(stage: str, overrides: dict) -> None:
    allowed = AFFECTS[stage]
    if allowed is None:
        return
    bad = [k for k in overrides if not k.startswith(allowed)]
    if bad:
        what = ", ".join(a.rstrip(".") for a in allowed) or "no parameter"
        raise StageError(f"{', '.join(bad)} cannot change a {stage} rerun (it depends on {what})")


def main_run(epochs_root: Path) -> dict:
    run_file = epochs_root / "run.json"
    if not run_file.exists():
        raise StageError(f"{run_file} not found: there is no run to ablate in {epochs_root}")
    return read_json(run_file)


def finished_epoch_dir(epochs_root: Path, epoch: int) -> Path:
    d = epoch_dir(epochs_root, epoch)
    if not (d / "metrics.json").exists():
        raise StageError(f"epoch {epoch} of {epochs_root} has not finished (no {d / 'metrics.json'}): "
                         "ablations rerun stages of finished epochs")
    return d


def features_for(params: dict, src: Path, epoch: int, dataset: Path, checkpoints: Path, out: Path, log) -> Path:
    """Epoch `epoch`'s features: kept by the retention policy, or re-extracted with the stored checkpoint."""
    kept = src / "features.npy"
    if kept.exists():
        return kept
    ckpt = checkpoints / f"epoch_{epoch - 1:04d}.pt"
    keep_f = params["extract"].get("keep_features_every") or 0
    keep_c = params["train"].get("keep_checkpoint_every") or 0
    if not ckpt.exists():
        raise StageError(
            f"epoch {epoch}'s features were not kept (extract.keep_features_every={keep_f} keeps every n-th "
            f"epoch's features.npy; 0 = none) and {ckpt}, the network that computes them, was not kept either "
            f"(train.keep_checkpoint_every={keep_c}). Ablate an epoch whose features or previous checkpoint exist "
            f"(`python -m pipeline.inspect list` shows them), or set extract.keep_features_every for future runs; with "
            f"a checkpoint, `python -m stages.extract --checkpoint <epoch_{epoch - 1:04d}.pt> --out <dir>` recomputes them")
    from stages.extract import run_extract

    log(f"epoch {epoch}'s features were not kept: re-extracting them with {ckpt} (deterministic: same network, centre crops)")
    run_extract(params, dataset, ckpt, out)
    return out / "features.npy"


def ablation_metrics(out: Path, epoch: int, main_dir: Path) -> dict:
    """The figures an ablation changes, under the names of the main run's metrics.json for side-by-side views.

    (stages.evaluate.epoch_metrics needs all five stage reports; an ablation reruns only some.)
    """
    metrics = {"epoch": epoch}
    if (out / "labels.json").exists():
        lab = read_json(out / "labels.json")
        metrics.update(nmi_previous=lab["nmi_previous"], nmi_labels=lab["nmi_labels"], n_clusters=lab["n_clusters"],
                       empty_clusters=lab["empty_clusters"], cluster_size_min=lab["size_min"],
                       cluster_size_median=lab["size_median"], cluster_size_max=lab["size_max"],
                       cluster_size_cv=lab["size_cv"])
        metrics["nmi_main"] = nmi_between(read_assignments(out / ASSIGNMENTS), read_assignments(main_dir / ASSIGNMENTS))
    if (out / "cluster.json").exists():
        metrics["kmeans_loss"] = read_json(out / "cluster.json")["objective"]
    if (out / "pca.json").exists():
        metrics["pca_explained_variance"] = read_json(out / "pca.json")["explained_variance"]
    if (out / "eval" / "metrics.json").exists():
        metrics.update({f"eval.{k}": v for k, v in read_json(out / "eval" / "metrics.json").items()})
    return metrics


def rerun(stage: str, params: dict, main_params: dict, epoch: int, src: Path, out: Path, dataset: Path,
          epochs_root: Path, checkpoints: Path, previous: int | None, log) -> None:
    """Run the ablated stage(s) into `out` (the ablation's epoch directory)."""
    from stages.cluster import run_cluster
    from stages.labels import run_labels
    from stages.pca import run_pca

    out.mkdir(parents=True)
    prev_dir = epoch_dir(epochs_root, previous if previous is not None else epoch - 1)
    if stage in ("pca", "cluster"):
        same_pca = params["pca"] == main_params["pca"] and params["run"]["seed"] == main_params["run"]["seed"]
        if stage == "cluster" and same_pca and (src / "pca_features.npy").exists():
            # Same PCA as the main run: reuse its output (a hard link: no copy of N x d floats).
            os.link(src / "pca_features.npy", out / "pca_features.npy")
            shutil.copy2(src / "pca.npz", out / "pca.npz")
            shutil.copy2(src / "pca.json", out / "pca.json")
        else:
            run_pca(params, features_for(params, src, epoch, dataset, checkpoints, out, log), out, epoch)
        log(f"pca: {json.dumps(read_json(out / 'pca.json'))}")
        log(f"cluster: {json.dumps(run_cluster(params, out / 'pca_features.npy', out, epoch))}")
        write_image_ids(src, out)
    elif stage == "labels":
        for name in ("kmeans.npz", "cluster.json"):
            shutil.copy2(src / name, out / name)
        write_image_ids(src, out)
    if stage in ("pca", "cluster", "labels"):
        stats = run_labels(params, out, dataset, prev_dir)
        log(f"labels: {json.dumps({k: v for k, v in stats.items() if k != 'sizes'})}")
    else:  # evaluate: the final evaluation (owned by stages.evaluate) on this epoch's checkpoint
        ckpt = checkpoints / f"epoch_{epoch:04d}.pt"
        last = checkpoints / "last.pt"
        if not ckpt.exists() and last.exists() and _checkpoint_epoch(last) == epoch:
            ckpt = last
        if not ckpt.exists():
            raise StageError(f"{ckpt} was not kept (train.keep_checkpoint_every="
                             f"{params['train'].get('keep_checkpoint_every')}): evaluate an epoch whose checkpoint exists")
        cmd = [sys.executable, "-m", "stages.evaluate", "final", "--params", str(out.parent / "params.yaml"),
               "--dataset", str(dataset), "--epochs-root", str(epochs_root), "--checkpoint", str(ckpt),
               "--out", str(out / "eval")]
        proc = subprocess.run(cmd, cwd=PROJECT_ROOT, env=subprocess_env(), text=True, capture_output=True)
        for line in (proc.stdout + proc.stderr).splitlines():
            log(f"evaluate: {line}")
        if proc.returncode != 0:
            raise StageError(f"the final evaluation of epoch {epoch} failed (exit {proc.returncode}); output above")
    for name in NOT_KEPT:
        (out / name).unlink(missing_ok=True)


def write_image_ids(src: Path, out: Path) -> None:
    """The features' row order, which the labels stage needs: the epoch's image_ids.npy, or the same ids
    from its assignments (the retention policy drops image_ids.npy with the features)."""
    if (out / "image_ids.npy").exists():  # re-extracted with the features
        return
    if (src / "image_ids.npy").exists():
        shutil.copy2(src / "image_ids.npy", out / "image_ids.npy")
    else:
        save_npy(out / "image_ids.npy", read_assignments(src / ASSIGNMENTS)["image_id"].to_numpy().astype(str))


def _checkpoint_epoch(path: Path) -> int | None:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True).get("epoch")


def log_to_mlflow(name: str, record: dict, final_dir: Path, main_run_id: str | None) -> str:
    import mlflow

    from pipeline import tracking

    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", tracking.EXPERIMENT))
    parent = main_run_id
    if parent is not None:
        try:
            mlflow.get_run(parent)
        except mlflow.exceptions.MlflowException:
            parent = None  # the main run's MLflow run is gone (another mlflow.db): log a top-level run
    tags = {"deepcluster.ablation": name, "deepcluster.stage": record["stage"], "deepcluster.epoch": str(record["epoch"])}
    with mlflow.start_run(run_name=f"ablation-{name}", parent_run_id=parent, tags=tags) as run:
        mlflow.log_params({"ablation.stage": record["stage"], "ablation.epoch": record["epoch"],
                           **{f"override.{k}": str(v) for k, v in record["overrides"].items()}})
        mlflow.log_metrics(tracking.numeric_metrics(record["metrics"]), step=record["epoch"])
        tracking.log_artifacts([final_dir], "ablation")
        return run.info.run_id


def ablate(stage: str, epoch: int, overrides: dict, name: str, *, previous: int | None = None, force: bool = False,
           epochs_root: str | Path = "data/epochs", dataset: str | Path = "data/dataset",
           checkpoints: str | Path = "models/checkpoints", root: str | Path = ABLATIONS_ROOT, dvc: bool = True,
           log=print) -> dict:
    if stage not in STAGES:
        raise StageError(f"cannot ablate {stage!r}: choose one of {', '.join(STAGES)}")
    if not name or "/" in name or name.startswith(".") or ":" in name:
        raise StageError(f"ablation name {name!r}: use letters, digits, - and _ (it names data/ablations/<name>)")
    check_overrides(stage, overrides)
    epochs_root, dataset, checkpoints, root = Path(epochs_root), Path(dataset), Path(checkpoints), Path(root)
    run = main_run(epochs_root)
    src = finished_epoch_dir(epochs_root, epoch)
    params = apply_overrides(run["params"], overrides)  # the main run's parameters, not today's params.yaml
    final = root / name
    if final.exists() and not force:
        raise StageError(f"{final} exists: choose another --name, or --force to replace it")

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))  # hidden: never taken for a result
    try:
        (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        start = time.perf_counter()
        rerun(stage, params, run["params"], epoch, src, epoch_dir(tmp, epoch), dataset, epochs_root, checkpoints,
              previous, log)
        record = {"name": name, "stage": stage, "epoch": epoch, "overrides": overrides,
                  "previous": previous if previous is not None else epoch - 1,
                  "main_run": {"epochs_root": str(epochs_root), "fingerprint": run["fingerprint"],
                               "mlflow_run_id": run.get("mlflow_run_id")},
                  "seconds": time.perf_counter() - start,
                  "metrics": ablation_metrics(epoch_dir(tmp, epoch), epoch, src)}
        write_json(tmp / "ablation.json", record)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)  # all or nothing: a killed ablation leaves only a hidden temp directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ws = DvcWorkspace.find(PROJECT_ROOT) if dvc else None
    if ws is not None:
        record["dvc_file"] = str(ws.add(final).relative_to(ws.root))
        log(f"versioned: {record['dvc_file']} (commit it with git: git add {record['dvc_file']} {root}/.gitignore)")
    record["mlflow_run_id"] = log_to_mlflow(name, record, final, run.get("mlflow_run_id"))
    log(f"MLflow run {record['mlflow_run_id']} (nested under {run.get('mlflow_run_id')})")
    return record


def list_ablations(root: str | Path = ABLATIONS_ROOT, epochs_root: str | Path = "data/epochs"):
    import pandas as pd

    rows = []
    for f in sorted(Path(root).glob("*/ablation.json")):
        rec = read_json(f)
        m = rec["metrics"]
        main_file = epoch_dir(epochs_root, rec["epoch"]) / "metrics.json"
        main = read_json(main_file) if main_file.exists() else {}
        rows.append({"name": rec["name"], "stage": rec["stage"], "epoch": rec["epoch"],
                     "overrides": " ".join(f"{k}={v}" for k, v in rec["overrides"].items()) or "-",
                     "clusters": m.get("n_clusters"), "nmi_labels": m.get("nmi_labels"),
                     "main_nmi_labels": main.get("nmi_labels"), "nmi_previous": m.get("nmi_previous"),
                     "main_nmi_previous": main.get("nmi_previous"), "nmi_main": m.get("nmi_main")})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=(*STAGES, "list"), help="the stage to rerun, or `list` the ablations")
    parser.add_argument("--epoch", type=int, help="the (finished) epoch whose stored inputs are used")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a parameter, e.g. --set cluster.k=50 (repeatable)")
    parser.add_argument("--name", help="the ablation's name: results in data/ablations/<name>/")
    parser.add_argument("--previous", type=int, help="labels: the epoch to compute NMI against (default: epoch - 1)")
    parser.add_argument("--force", action="store_true", help="replace an existing ablation of that name")
    parser.add_argument("--no-dvc", action="store_true", help="do not `dvc add` the result")
    parser.add_argument("--epochs-root", default="data/epochs")
    parser.add_argument("--dataset", default="data/dataset")
    parser.add_argument("--checkpoints", default="models/checkpoints")
    args = parser.parse_args(argv)
    try:
        if args.stage == "list":
            table = list_ablations(epochs_root=args.epochs_root)
            print(table.to_string(index=False) if len(table) else f"no ablation under {ABLATIONS_ROOT}")
            return
        if args.epoch is None or not args.name:
            parser.error("--epoch and --name are required")
        overrides = dict(parse_override(s) for s in args.set)
        rec = ablate(args.stage, args.epoch, overrides, args.name, previous=args.previous, force=args.force,
                     epochs_root=args.epochs_root, dataset=args.dataset, checkpoints=args.checkpoints,
                     dvc=not args.no_dvc)
    except StageError as e:
        sys.exit(f"ablate: {e}")
    m = rec["metrics"]
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items() if k != "epoch"}
    print(f"ablate: {args.name} ({args.stage}, epoch {args.epoch}) -> {ABLATIONS_ROOT}/{args.name}: {shown}")


if __name__ == "__main__":
    main()
