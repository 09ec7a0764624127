"""Screen a recipe change quickly: DeepCluster epochs run in-process, scored at chosen epochs.

A full run (`dvc exp run`) scores only its last epoch, with every probe and picture. To compare many
recipe changes on two cores, this runs the same stages (stages.epoch.run_stage, no DVC, Prefect or MLflow)
and scores the features at a few epochs on what the method has room to move: weighted kNN on the best conv
layer and on fc, and k-means with k = classes on the PCA-whitened fc features (evaluate's protocol, fewer
seeds). The default run's table and the sweep that chose the recipe are in docs/results.md ("The recipe").

    python -m pipeline.tools.screen wd5e-4 --set train.weight_decay=0.0005 --eval-at 8,16
    python -m pipeline.tools.screen seed1 --set run.seed=1 --eval-seed 0 --eval-at 0,16   # another init, judged alike
    deepcluster compare --screens                      # every screened change, a row each

Needs a prepared dataset (data/dataset: `python -m stages.prepare` or one `make run`). Each change keeps its
checkpoints and results under data/screen/<name>/ (git-ignored); rerunning a name resumes it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stages.core.checkpoints import init_checkpoint, load_checkpoint, model_from_checkpoint
from stages.core.errors import StageError, cli_errors
from stages.core.layout import DATASET, RunLayout
from stages.core.params import load_params, parse_override
from stages.core.runtime import pick_device
from stages.core.schema import Params
from stages.epoch import EPOCH_STAGES, run_stage
from stages.evaluate import EvaluationData, evaluation_data, network_scores

SCREEN_ROOT = Path("data/screen")
RESULTS = "results.jsonl"


def score(params: Params, checkpoint: Path, data: EvaluationData, kmeans_runs: int, eval_seed: int) -> dict:
    """kNN (fc and the best conv layer) and k-means (k = classes, fc) on evaluate's held-out images, as
    `evaluate` scores them."""
    device = pick_device(params.extract.device)
    model = model_from_checkpoint(load_checkpoint(checkpoint, device), device)
    s = network_scores(model, data, params, device, eval_seed, kmeans_runs)
    return {key: s[key] for key in ("knn", "knn_conv", "knn_conv_layer", "acc", "acc_std", "nmi", "nmi_std")}


def screen(name: str, params: Params, eval_at: list[int], dataset: Path, root: Path = SCREEN_ROOT,
           kmeans_runs: int = 5, eval_seed: int | None = None) -> list[dict]:
    """Run epochs 1..max(eval_at) of `params` (resuming), scoring the checkpoints of eval_at (0 = random init).

    eval_seed picks the held-out subsets and k-means seeds (default run.seed, as `evaluate`): runs of
    different run.seed scored with one eval_seed differ only by their networks.
    """
    eval_seed = params.run.seed if eval_seed is None else eval_seed
    out = root / name
    layout = RunLayout(dataset, out / "epochs", out / "checkpoints")
    results_file = out / RESULTS
    stored = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    results = [r for r in stored if r.get("eval_seed", params.run.seed) == eval_seed]
    done = {r["epoch"] for r in results}
    data = evaluation_data(params.evaluate, dataset, eval_seed)  # read once, not per score
    if not data.labelled:  # before any epoch is trained
        raise StageError("the dataset has no labels: screening scores against them (prepare.source: fashion-mnist "
                         "or imagefolder)")
    layout.checkpoints.mkdir(parents=True, exist_ok=True)
    if not layout.checkpoint(0).exists():
        init_checkpoint(params, dataset, layout.checkpoint(0))
    for epoch in range(0, max(eval_at) + 1):
        if epoch > 0 and not layout.checkpoint(epoch).exists():
            start = time.perf_counter()
            stats = {stage: run_stage(stage, params, layout, epoch) for stage in EPOCH_STAGES}
            print(f"{name}: epoch {epoch} in {time.perf_counter() - start:.0f} s, loss {stats['train']['loss']:.3f}, "
                  f"NMI(t-1, t) {stats['labels'].get('nmi_previous')}", flush=True)
            for features in layout.epoch(epoch).glob("*.npy"):  # the N x D arrays: not needed once trained
                features.unlink()
        if epoch in eval_at and epoch not in done:
            row = {"name": name, "epoch": epoch, "eval_seed": eval_seed,
                   **score(params, layout.checkpoint(epoch), data, kmeans_runs, eval_seed)}
            print(json.dumps(row), flush=True)
            with open(results_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            results.append(row)
    return sorted(results, key=lambda r: r["epoch"])


def table(root: Path = SCREEN_ROOT) -> str:
    rows = ["| change | epoch | eval seed | weighted kNN, best conv layer | weighted kNN, fc | k-means ACC | k-means NMI |",
            "|---|---:|---:|---|---:|---:|---:|"]
    for results_file in sorted(root.glob(f"*/{RESULTS}")):
        for r in sorted((json.loads(line) for line in results_file.read_text().splitlines()), key=lambda r: r["epoch"]):
            conv = f"{100 * r['knn_conv']:.2f} ({r['knn_conv_layer']})" if r.get("knn_conv") is not None else ""
            rows.append(f"| {r['name']} | {r['epoch']} | {r.get('eval_seed', '')} | {conv} | {100 * r['knn']:.2f} | {100 * r['acc']:.1f} ± "
                        f"{100 * r['acc_std']:.1f} | {r['nmi']:.3f} ± {r['nmi_std']:.3f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a name for this change (its folder under data/screen)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key, as dvc exp run -S")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dataset", default=DATASET)
    parser.add_argument("--eval-at", default="8,16",
                        help="epochs to score (0 = random init); the run goes to the last. Two points show the "
                             "trend: on the defaults k-means peaks early and falls while kNN keeps rising")
    parser.add_argument("--kmeans-runs", type=int, default=5,
                        help="k-means seeds per score; their spread is printed beside the mean")
    parser.add_argument("--eval-seed", type=int, default=None,
                        help="seed of the held-out subsets and k-means runs (default: run.seed). Fix it to compare "
                             "runs of several run.seed values: the random network alone moves kNN by about 2 points")
    args = parser.parse_args(argv)
    with cli_errors("screen"):
        eval_at = sorted({int(x) for x in args.eval_at.split(",")})
        if eval_at[0] < 0:
            parser.error("--eval-at: epochs are 0 or more")
        params = load_params(args.params, dict(parse_override(s) for s in args.set))
        screen(args.name, params, eval_at, Path(args.dataset), kmeans_runs=args.kmeans_runs, eval_seed=args.eval_seed)


if __name__ == "__main__":
    main()
