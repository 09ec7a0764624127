"""The paper's studies as DVC experiments on the workspace's data and params, and their comparison.

    deepcluster studies queue all --start   # `dvc exp run --queue` per row, then `dvc queue start`
    dvc queue status                        # progress (`dvc queue logs study-<row>` for one run)
    deepcluster studies report              # docs/studies/: table (markdown) + pictures
    deepcluster compare --study k           # one study's table, printed only

Studies (each row a whole DeepCluster run with the final evaluation of `dvc repro`):
- clustering: k-means (the defaults) vs Power Iteration Clustering (paper Table 4);
- input: the fixed Sobel layer (the defaults) vs raw pixels (paper Table 3);
- k: the number of k-means clusters from 10 to 1,000, the defaults' `k: auto` among them (paper Fig. 2c).
A row shared by several studies (the defaults) runs once. Experiments are named `study-<row>`; `report`
reads `dvc exp show --json -A` (every baseline commit; the newest finished experiment of each name wins),
and each experiment's committed evaluation files (data/eval, git-tracked) through `git show`. Without a
`study-defaults` experiment, the defaults row is HEAD's committed data/eval (what `dvc repro` of the committed
params gave, when it was committed with them).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipeline.versioning import subprocess_env  # the queued runs' `python -m ...`: this environment's python
from stages.core.errors import StageError
from stages.core.io import atomic_path
from stages.core.layout import EVAL, EVAL_CLUSTER_SIZES, EVAL_CURVES, METRICS

PREFIX = "study-"
ROWS: dict[str, dict] = {  # row -> its params.yaml changes against the workspace's params
    "defaults": {},
    "pic": {"cluster.method": "pic", "cluster.k": "auto"},  # PIC finds the number of clusters itself
    "raw": {"model.sobel": False},
    "k10": {"cluster.k": 10},
    "k30": {"cluster.k": 30},
    "k100": {"cluster.k": 100},
    "k1000": {"cluster.k": 1000},
}
STUDIES: dict[str, tuple[str, ...]] = {
    "clustering": ("defaults", "pic"),
    "input": ("defaults", "raw"),
    "k": ("k10", "k30", "k100", "defaults", "k1000"),
}


def rows_of(studies: list[str]) -> list[str]:
    names = list(STUDIES) if "all" in studies else studies
    unknown = [s for s in names if s not in STUDIES]
    if unknown:
        raise StageError(f"unknown study {', '.join(unknown)}: choose from {', '.join(STUDIES)} or all")
    return list(dict.fromkeys(row for s in names for row in STUDIES[s]))


def queue_command(row: str) -> list[str]:
    args = [sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", PREFIX + row]
    for key, value in ROWS[row].items():
        args += ["-S", f"{key}={json.dumps(value)}"]  # JSON scalars are YAML: false, 10, "pic"
    return args


def queue(studies: list[str], start: bool) -> None:
    known = experiments(states=("success", "queued", "running"))
    for row in rows_of(studies):
        name = PREFIX + row
        if name in known:
            print(f"{name}: already {known[name]['state']} ({known[name]['rev'][:7]}); `dvc exp remove {name}` "
                  f"(or `dvc queue remove {name}`) to run it again")
            continue
        subprocess.run(queue_command(row), check=True, env=subprocess_env())
    if start:
        # one worker: two runs at once would share the machine's cores and each take more than twice as long
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], check=True, env=subprocess_env())


# ------------------------------------------------------------------ report
def exp_show() -> list:
    """`dvc exp show --json -A`: the workspace, every baseline commit and their experiments, with params and metrics."""
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", "-A", "--no-fetch"],
                          check=False, capture_output=True, text=True, env=subprocess_env())
    if done.returncode != 0:
        raise StageError(f"`dvc exp show` failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(done.stdout)


def experiments(show: list | None = None, states: tuple[str, ...] = ("success",)) -> dict[str, dict]:
    """name -> {rev, timestamp, state, data, baseline} of each experiment in one of `states` (DVC's executor
    states: success, queued, running, failed), from exp_show(); the newest of a name wins. data and baseline:
    the experiment's and its baseline commit's params and metrics, as `dvc exp show` gives them."""
    show = exp_show() if show is None else show
    found: dict[str, dict] = {}
    for commit in show:
        for exp in commit.get("experiments") or []:
            rev = exp["revs"][0]
            state = (exp.get("executor") or {}).get("state", "success")  # no executor: a finished, fetched one
            if state not in states or (state == "success" and (rev.get("error") or not rev.get("data"))):
                continue
            name, stamp = exp.get("name") or rev.get("name"), (rev.get("data") or {}).get("timestamp") or ""
            if name and (name not in found or stamp > found[name]["timestamp"]):
                found[name] = {"rev": rev["rev"], "timestamp": stamp, "state": state, "data": rev.get("data") or {},
                               "baseline": commit.get("data") or {}}
    return found


def committed_file(rev: str, path: str) -> str | None:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def load_row(rev: str) -> dict:
    """An experiment's evaluation (data/eval/metrics.json), curves and cluster sizes, from its commit."""
    metrics = committed_file(rev, f"{EVAL}/{METRICS}")
    if metrics is None:
        raise StageError(f"experiment {rev[:7]} has no {EVAL}/{METRICS}: it did not finish its evaluation")
    curves, sizes = (committed_file(rev, f"{EVAL}/{name}") for name in (EVAL_CURVES, EVAL_CLUSTER_SIZES))
    return {"metrics": json.loads(metrics), "curves": pd.read_csv(io.StringIO(curves)) if curves else None,
            "sizes": json.loads(sizes)["sizes"] if sizes else None}


FIGURES = ("best conv probe: trained / random | kNN: trained / random / pixels | "
           "k-means (k = classes) ACC: trained / random / pixels | NMI: trained / random / pixels")


def _cell(m: dict, key: str, std: bool = False, nmi: bool = False) -> str:
    """A percentage, or an NMI to 3 decimals; with std, ± the `<key>_std` spread where there is one."""
    scale, fmt = (1, ".3f") if nmi else (100, ".1f")
    v, s = m.get(key), m.get(key + "_std") if std else None
    return "–" if v is None else f"{scale * v:{fmt}}" + (f" ± {scale * s:{fmt}}" if s is not None else "")


def figures(m: dict) -> str:
    """An evaluation's figures (metrics.json or headline.json) as the cells under FIGURES, as the default run's report."""
    inits = ("trained", "random", "pixels")
    return " | ".join([f"{_cell(m, 'probe.trained.best')} / {_cell(m, 'probe.random.best')}",
                       " / ".join(_cell(m, f"knn.{i}") for i in inits),
                       " / ".join(_cell(m, f"cluster.{i}.acc", std=i == "trained") for i in inits),
                       " / ".join(_cell(m, f"cluster.{i}.nmi", std=True, nmi=True) for i in inits)])


def last_nmi(m: dict) -> str:
    return _cell(m, "last_nmi_previous", nmi=True)


def changes(params: dict) -> str:
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items())


def table(rows: dict[str, dict], studies: list[str] | None = None) -> str:
    """One markdown row per (study, row): trained vs random init vs raw pixels."""
    lines = [f"| study | experiment | change | clusters (last epoch) | NMI(t−1, t) last | {FIGURES} |",
             "|---|---|---|---:|---:|---|---|---|---|"]
    for study in studies or STUDIES:
        for name in (n for n in STUDIES[study] if n in rows):
            m, curves = rows[name]["metrics"], rows[name]["curves"]
            clusters = int(curves["n_clusters"].iloc[-1]) if curves is not None else "–"
            source = "`HEAD` (the committed run)" if rows[name].get("source") == "HEAD" else f"`{PREFIX}{name}`"
            lines.append(f"| {study} | {source} | {changes(ROWS[name]) or 'defaults'} | {clusters} | {last_nmi(m)} | "
                         f"{figures(m)} |")
    return "\n".join(lines) + "\n"


def plot_scores(rows: dict[str, dict], path: Path) -> None:
    """Per study, the trained network's headline figures per row, with the random-init and pixel baselines."""
    from stages.core.pictures import plt, save_figure  # the Agg backend, atomic PNG writes

    keys = [("probe.trained.best", "probe.random.best", "probe.pixels", "best conv probe"),
            ("knn.trained", "knn.random", "knn.pixels", "weighted kNN"),
            ("cluster.trained.acc", "cluster.random.acc", "cluster.pixels.acc", "k-means ACC"),
            ("cluster.trained.nmi", "cluster.random.nmi", "cluster.pixels.nmi", "k-means NMI")]
    studies = [(s, [n for n in names if n in rows]) for s, names in STUDIES.items()]
    studies = [(s, names) for s, names in studies if names]
    fig, axes = plt.subplots(len(studies), len(keys), figsize=(4 * len(keys), 3 * len(studies)), squeeze=False)
    for i, (study, names) in enumerate(studies):
        for j, (trained, random, pixels, title) in enumerate(keys):
            ax = axes[i, j]
            values = [rows[n]["metrics"].get(trained) or 0 for n in names]
            ax.bar(range(len(names)), values, color="tab:blue", label="trained")
            for key, style, label in ((random, "--", "random init"), (pixels, ":", "raw pixels")):
                ref = [rows[n]["metrics"].get(key) for n in names]
                if any(r is not None for r in ref):
                    ax.plot(range(len(names)), ref, "k" + style, marker="o", ms=3, label=label)
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
            lo = min(v for v in values + [rows[n]["metrics"].get(random) or 1 for n in names] if v)
            ax.set_ylim(max(0.0, lo - 0.1), None)
            ax.set_title(f"{study}: {title}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def plot_curves_and_sizes(rows: dict[str, dict], path: Path) -> None:
    """NMI(t−1, t) per epoch overlaid for each study (paper Fig. 2b), and k-means vs PIC cluster sizes."""
    import numpy as np

    from stages.core.pictures import plt, save_figure

    fig, axes = plt.subplots(1, len(STUDIES) + 1, figsize=(4.2 * (len(STUDIES) + 1), 3.4))
    for ax, (study, names) in zip(axes, STUDIES.items()):
        for name in names:
            curves = rows.get(name, {}).get("curves")
            if curves is not None:
                ax.plot(curves["epoch"], curves["nmi_previous"], label=name)
        ax.set_title(f"{study}: NMI(t−1, t)", fontsize=9)
        ax.set_xlabel("epoch")
    ax = axes[-1]
    for name in STUDIES["clustering"]:
        sizes = rows.get(name, {}).get("sizes")
        if sizes:
            bins = np.logspace(0, np.log10(max(sizes)) + 0.1, 30)
            ax.hist(sizes, bins=bins, histtype="step", label=f"{name} ({len(sizes)} clusters)")
    ax.set(xscale="log", xlabel="images per cluster (last epoch)", ylabel="clusters")
    ax.set_title("cluster sizes: k-means vs PIC", fontsize=9)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def report(out: Path | None, show: list | None = None, studies: list[str] = ("all",)) -> str:
    """The studies' table from the finished experiments; with `out`, written there with its pictures."""
    names = rows_of(list(studies))
    done = experiments(show)
    rows = {name: load_row(done[PREFIX + name]["rev"]) for name in names if PREFIX + name in done}
    if "defaults" in names and "defaults" not in rows and committed_file("HEAD", f"{EVAL}/{METRICS}") is not None:
        # the committed `dvc repro` of the committed params is the defaults row, when it was not run as an experiment
        rows["defaults"] = {**load_row("HEAD"), "source": "HEAD"}
    if not rows:
        raise StageError(f"no finished experiment named {PREFIX}<row>: run `deepcluster studies queue all --start` "
                         "first (or `dvc exp pull origin -A --no-cache` to fetch published ones)")
    text = table(rows, list(STUDIES) if "all" in studies else list(studies))
    missing = [PREFIX + n for n in names if n not in rows]
    if missing:
        text += f"\nNot run yet: {', '.join(missing)}.\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "studies.md") as tmp:
            tmp.write_text(text)
        plot_scores(rows, out / "studies.png")
        plot_curves_and_sizes(rows, out / "nmi_and_sizes.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue each study's experiments (`dvc exp run --queue`)")
    q.add_argument("studies", nargs="+", help=f"{', '.join(STUDIES)} or all")
    q.add_argument("--start", action="store_true", help="then start one queue worker (`dvc queue start -j 1`)")
    r = sub.add_parser("report", help="the studies' table and pictures from the finished experiments")
    r.add_argument("--out", default="docs/studies", help="directory for studies.md, studies.png, nmi_and_sizes.png")
    args = parser.parse_args(argv)
    try:
        if args.command == "queue":
            queue(args.studies, args.start)
        else:
            print(report(Path(args.out)), end="")
    except StageError as e:
        sys.exit(f"studies: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"studies: {' '.join(map(str, e.cmd[1:]))} failed (exit {e.returncode}); see its output above")


if __name__ == "__main__":
    main()
