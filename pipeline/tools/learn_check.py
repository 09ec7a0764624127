"""Catch a regression in learning before a release: on a small data set, does training beat random networks?

DeepCluster can look healthy (the loss falls, NMI(t-1, t) rises) while its features lose to the random
network it started from, and that happens first on small data sets. So this check prepares a seeded
subset of params.yaml's data source (5,000 training images by default). It runs params.yaml's recipe on
that subset for run.epochs epochs, in-process as `screen` does (no DVC, Prefect or MLflow). Then it scores
the trained network next to `evaluate.random_inits` random networks (seeds run.seed, run.seed + 1, ...),
all on the same held-out images and k-means seeds, as `evaluate` does: weighted kNN on each network's best
conv layer and on fc, k-means ACC and NMI (k = classes) on fc. It prints the margin over the random
networks' mean, with their spread. It exits 1 when a margin is not above its spread: a margin inside the
spread is no difference.

    make learn-check                                        # the embedded data set, the committed recipe
    python -m pipeline.tools.learn_check --images 5000      # the same
    python -m pipeline.tools.learn_check --set prepare.source=imagefolder --set prepare.path=/data/mnist5k \\
        --set prepare.image_size=28                          # another data set (its test split, or a held-out part)
    python -m pipeline.tools.learn_check --seeds 0 1 2 --set model.width=32   # a lever, over three training seeds

Each check starts afresh under data/learn-check/ (git-ignored; the prepared subset is kept). The table is
also written to data/learn-check/learn-check.json.

With --seeds, the check runs once per training seed s (run.seed = s: its own subset, training and random
networks s, s + 1, s + 2, under data/learn-check/seed<s>/) and adds the table docs/results.md reports: each
margin's mean and population sd over the seeds, the seeds' own margins, and on how many seeds the margin is
above its spread. One seed says little where the margin's spread over seeds is as large as the margin. It
exits 1 unless every margin is above its spread on every seed.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.tools.screen import screen
from stages.core.errors import StageError, cli_errors
from stages.core.io import read_json, write_json
from stages.core.params import apply_overrides, load_params, parse_override
from stages.core.schema import Params
from stages.evaluate import margin

ROOT = Path("data/learn-check")
RESULT = "learn-check.json"
MEASURES = {"knn_conv": "weighted kNN, best conv layer", "knn": "weighted kNN on fc", "acc": "k-means ACC, k = classes",
            "nmi": "k-means NMI, k = classes"}


def subset(params: Params, images: int, test_images: int | None, root: Path) -> Path:
    """The seeded subset of params' data source, prepared once under root and reused while its settings hold."""
    from stages.prepare import prepare

    section = params.prepare.model_copy(update={"max_train_images": images, "max_test_images": test_images})
    out = root / "dataset"
    settings = {"source": section.source, "path": str(section.path), "seed": params.run.seed,
                "settings": section.model_dump(mode="json")}
    marker = root / "subset.json"  # the settings that made root/dataset
    if not (marker.exists() and read_json(marker) == settings and out.exists()):
        shutil.rmtree(out, ignore_errors=True)
        prepare(section.source, section.path, out, section, seed=params.run.seed)
        write_json(marker, settings)
    return out


def judge(trained: dict, randoms: list[dict]) -> list[dict]:
    """Per measure: the trained score, the random networks' mean and spread (population sd, as `evaluate`
    reports it), the margin, and whether the margin is above the spread (a margin within it is none)."""
    if len(randoms) < 2:
        raise StageError("the check needs at least 2 random networks for a spread: set evaluate.random_inits >= 2")
    rows = []
    for key in MEASURES:
        if trained.get(key) is None:  # no conv layer scored (evaluate.probe_layers: [fc])
            continue
        values = np.array([r[key] for r in randoms], dtype=float)
        mean, sd = float(values.mean()), float(values.std())
        rows.append({"measure": key, "trained": float(trained[key]), "random_mean": mean, "random_sd": sd,
                     "margin": float(trained[key]) - mean, "passed": float(trained[key]) - mean > sd})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| measure | trained | random networks (mean ± sd) | trained − random | |", "|---|---:|---:|---|---|"]
    for r in rows:
        key = r["measure"]
        scale, digits = (1, 3) if key == "nmi" else (100, 2)
        shown = {f"trained.{key}": r["trained"], f"random.{key}": r["random_mean"], f"sd.{key}": r["random_sd"]}
        lines.append(f"| {MEASURES[key]} | {scale * r['trained']:.{digits}f} | {scale * r['random_mean']:.{digits}f} ± "
                     f"{scale * r['random_sd']:.{digits}f} | {margin(shown, f'trained.{key}', f'random.{key}', (f'sd.{key}',))} "
                     f"| {'ok' if r['passed'] else 'NOT ABOVE THE SPREAD'} |")
    return "\n".join(lines)


def learn_check(params: Params, images: int, test_images: int | None, root: Path = ROOT,
                kmeans_runs: int = 5) -> dict:
    """Prepare the subset, train run.epochs epochs from run.seed, score it and the random networks alike."""
    dataset = subset(params, images, test_images, root)
    runs = root / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # a release check judges this code, never a resumed older run
    seed, epochs, start = params.run.seed, params.run.epochs, time.monotonic()
    trained_rows = screen("trained", params, [0, epochs], dataset, root=runs, kmeans_runs=kmeans_runs)
    randoms = [trained_rows[0]]
    for i in range(1, params.evaluate.random_inits):
        other = apply_overrides(params, {"run.seed": seed + i})
        randoms += screen(f"random-seed{seed + i}", other, [0], dataset, root=runs, kmeans_runs=kmeans_runs,
                          eval_seed=seed)
    rows = judge(trained_rows[-1], randoms)
    result = {"images": images, "test_images": test_images, "epochs": epochs, "seed": seed,
              "random_seeds": [seed + i for i in range(params.evaluate.random_inits)],
              "source": params.prepare.source, "path": str(params.prepare.path), "rows": rows,
              "passed": all(r["passed"] for r in rows), "wall_s": round(time.monotonic() - start, 1)}
    write_json(root / RESULT, result)
    return result


def over_seeds(results: list[dict]) -> list[dict]:
    """Per measure, over checks with different training seeds: the seeds' margins, their mean and population sd,
    and on how many seeds the margin is above its random networks' spread."""
    out = []
    for key in MEASURES:
        rows = [r for result in results for r in result["rows"] if r["measure"] == key]
        if not rows:
            continue
        margins = np.array([r["margin"] for r in rows])
        out.append({"measure": key, "seeds": [result["seed"] for result in results], "margins": margins.tolist(),
                    "mean": float(margins.mean()), "sd": float(margins.std()),
                    "above": sum(r["passed"] for r in rows), "n": len(rows)})
    return out


def seeds_table(summary: list[dict]) -> str:
    lines = ["| measure | trained − random, mean ± sd over seeds | per seed | above the spread |", "|---|---|---|---|"]
    for r in summary:
        scale, fmt = (1, "+.3f") if r["measure"] == "nmi" else (100, "+.2f")
        lines.append(f"| {MEASURES[r['measure']]} | {scale * r['mean']:{fmt}} ± {scale * r['sd']:{fmt[1:]}} | "
                     f"{', '.join(f'{scale * m:{fmt}}' for m in r['margins'])} | {r['above']}/{r['n']} |")
    return "\n".join(lines)


def learn_check_seeds(params: Params, seeds: list[int], images: int, test_images: int | None, root: Path = ROOT,
                      kmeans_runs: int = 5, report=print) -> dict:
    """learn_check once per training seed, each under root/seed<s>; the margins over the seeds."""
    results = []
    for seed in seeds:
        result = learn_check(apply_overrides(params, {"run.seed": seed}), images, test_images, root / f"seed{seed}",
                             kmeans_runs)
        report(f"seed {seed} ({result['wall_s']:.0f} s):\n{table(result['rows'])}")
        results.append(result)
    summary = {"images": images, "test_images": test_images, "epochs": params.run.epochs, "seeds": seeds,
               "source": params.prepare.source, "path": str(params.prepare.path), "over_seeds": over_seeds(results),
               "passed": all(r["passed"] for r in results), "runs": results}
    write_json(root / RESULT, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key, as dvc exp run -S (e.g. another data source)")
    parser.add_argument("--images", type=int, default=5000,
                        help="training images in the subset: small enough that a recipe tuned on more data shows "
                             "whether it still learns, large enough that the spread of the random networks is small")
    parser.add_argument("--test-images", type=int, default=2000,
                        help="held-out images scored (0 = all): every network is scored on the same ones, so the "
                             "margins are paired")
    parser.add_argument("--kmeans-runs", type=int, default=5, help="k-means seeds per score")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="S",
                        help="run the check once per training seed and report each margin's mean ± sd over them "
                             "(default: run.seed once)")
    parser.add_argument("--root", default=str(ROOT))
    args = parser.parse_args(argv)
    with cli_errors("learn-check"):
        if args.images < 1 or args.test_images < 0:
            parser.error("--images must be 1 or more and --test-images 0 or more")
        if args.seeds and len(set(args.seeds)) != len(args.seeds):
            parser.error("--seeds must be different seeds")
        params = load_params(args.params, dict(parse_override(s) for s in args.set))
        if args.seeds:
            summary = learn_check_seeds(params, args.seeds, args.images, args.test_images or None, Path(args.root),
                                        args.kmeans_runs)
            print(f"learn check: {summary['images']:,} training images of {summary['source']} ({summary['path']}), "
                  f"{summary['epochs']} epochs, training seeds {summary['seeds']}")
            print(seeds_table(summary["over_seeds"]))
            if not summary["passed"]:
                print("learn check FAILED: on some seed a margin over the random networks is not above their spread",
                      file=sys.stderr)
                return 1
            print("learn check passed: on every seed every margin is above the random networks' spread")
            return 0
        result = learn_check(params, args.images, args.test_images or None, Path(args.root), args.kmeans_runs)
        print(f"learn check: {result['images']:,} training images of {result['source']} ({result['path']}), "
              f"{result['epochs']} epochs from seed {result['seed']}; random networks of seeds {result['random_seeds']}")
        print(table(result["rows"]))
        if not result["passed"]:
            print("learn check FAILED: a margin over the random networks is not above their spread", file=sys.stderr)
            return 1
        print("learn check passed: every margin is above the random networks' spread")
    return 0


if __name__ == "__main__":
    sys.exit(main())
