"""The paper's studies as DVC experiments on the workspace's data and params, and their comparison.

    deepcluster studies queue all --start   # `dvc exp run --queue` per row, then `dvc queue start`
    deepcluster studies queue levers --seeds 0 1 2 --start  # each row once per training seed
    dvc queue status                        # progress (`dvc queue logs study-<row>` for one run)
    deepcluster studies report              # docs/studies/: table (markdown) + pictures
    deepcluster compare --study k           # one study's table, printed only

Studies (each row a whole DeepCluster run with the final evaluation of `dvc repro`):
- clustering: k-means (the defaults) vs Power Iteration Clustering (paper Table 4);
- input: the fixed Sobel layer (the defaults) vs raw pixels (paper Table 3);
- k: the number of k-means clusters from 10 to 1,000, the defaults' `k: auto` among them (paper Fig. 2c);
- levers: width 32 instead of 16, 40,000 draws per epoch instead of one per image (twice the default
  data's 20,000), and clusters under a quarter of the mean size refilled (`cluster.refill_below`), against
  the defaults;
- k_rule: 5,000 images with the rules' k = N/64 (78) against k growing as √N (156: the default's 312 at 20k
  times √(5k/20k)), the lever "k growing less than linearly with N" at a size where the two rules differ.
A row shared by several studies (the defaults) runs once. Experiments are named `study-<row>`; `report`
reads `dvc exp show --json -A` (every baseline commit; the newest finished experiment of each name wins),
and each experiment's committed evaluation files (data/eval, git-tracked) through `git show`. Without a
`study-defaults` experiment, the defaults row is HEAD's committed data/eval (what `dvc repro` of the committed
params gave, when it was committed with them). `report --from-table <studies.md>` redraws the scores' picture
from an earlier report's table instead, for experiments no longer at hand (docs/ablations: the `abl-<row>` runs).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    "width32": {"model.width": 32},
    "draws40k": {"train.samples_per_epoch": 40000},
    "refill": {"cluster.refill_below": 0.25},  # the clusters that docs/results.md "Small clusters" counted
    "n5k": {"prepare.max_train_images": 5000},  # the rules' k = N/64 = 78
    "n5k_k156": {"prepare.max_train_images": 5000, "cluster.k": 156},  # k ∝ √N through the default's 312 at 20k
}
STUDIES: dict[str, tuple[str, ...]] = {
    "clustering": ("defaults", "pic"),
    "input": ("defaults", "raw"),
    "k": ("k10", "k30", "k100", "defaults", "k1000"),
    "levers": ("defaults", "width32", "draws40k", "refill"),
    "k_rule": ("n5k", "n5k_k156"),
}
SEED = "-s"  # study-<row>-s<seed>: the row run with run.seed=<seed>


def rows_of(studies: list[str]) -> list[str]:
    names = list(STUDIES) if "all" in studies else studies
    unknown = [s for s in names if s not in STUDIES]
    if unknown:
        raise StageError(f"unknown study {', '.join(unknown)}: choose from {', '.join(STUDIES)} or all")
    return list(dict.fromkeys(row for s in names for row in STUDIES[s]))


def experiment_name(row: str, seed: int | None = None) -> str:
    return PREFIX + row + ("" if seed is None else f"{SEED}{seed}")


def queue_command(row: str, seed: int | None = None) -> list[str]:
    args = [sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", experiment_name(row, seed)]
    changes = ROWS[row] | ({} if seed is None else {"run.seed": seed})
    for key, value in changes.items():
        args += ["-S", f"{key}={json.dumps(value)}"]  # JSON scalars are YAML: false, 10, "pic"
    return args


def queue(studies: list[str], start: bool, seeds: list[int] | None = None) -> None:
    known = experiments(states=("success", "queued", "running"))
    for row in rows_of(studies):
        for seed in seeds or [None]:
            name = experiment_name(row, seed)
            if name in known:
                print(f"{name}: already {known[name]['state']} ({known[name]['rev'][:7]}); `dvc exp remove {name}` "
                      f"(or `dvc queue remove {name}`) to run it again")
                continue
            subprocess.run(queue_command(row, seed), check=True, env=subprocess_env())
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
    result = subprocess.run(["git", "show", f"{rev}:{path}"], check=False, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def load_row(rev: str) -> dict:
    """An experiment's evaluation (data/eval/metrics.json), curves and cluster sizes, from its commit."""
    metrics = committed_file(rev, f"{EVAL}/{METRICS}")
    if metrics is None:
        raise StageError(f"experiment {rev[:7]} has no {EVAL}/{METRICS}: it did not finish its evaluation")
    curves, sizes = (committed_file(rev, f"{EVAL}/{name}") for name in (EVAL_CURVES, EVAL_CLUSTER_SIZES))
    return {"metrics": json.loads(metrics), "curves": pd.read_csv(io.StringIO(curves)) if curves else None,
            "sizes": json.loads(sizes)["sizes"] if sizes else None}


def clusters(row: dict) -> int | None:
    """The last epoch's number of clusters (k, or what PIC found): from the curves, else as a table recorded it."""
    curves = row.get("curves")
    return int(curves["n_clusters"].iloc[-1]) if curves is not None else row.get("clusters")


INITS = ("trained", "random", "pixels")
# FIGURES' cells: the metrics in each (trained / random / pixels), their display scale, which carry `± <key>_std`
CELLS = ((("probe.trained.best", "probe.random.best"), 100, ()),
         (tuple(f"knn.{i}" for i in INITS), 100, ()),
         (tuple(f"cluster.{i}.acc" for i in INITS), 100, ("cluster.trained.acc",)),
         (tuple(f"cluster.{i}.nmi" for i in INITS), 1, tuple(f"cluster.{i}.nmi" for i in INITS)))
FIGURES = ("best conv probe: trained / random | kNN: trained / random / pixels | "
           "k-means (k = classes) ACC: trained / random / pixels | NMI: trained / random / pixels")


def _cell(m: dict, key: str, scale: int = 100, std: bool = False) -> str:
    """A percentage (scale 100) or an NMI to 3 decimals; with std, ± the `<key>_std` spread where there is one."""
    fmt = ".1f" if scale == 100 else ".3f"
    v, s = m.get(key), m.get(key + "_std") if std else None
    return "–" if v is None else f"{scale * v:{fmt}}" + (f" ± {scale * s:{fmt}}" if s is not None else "")


def figures(m: dict) -> str:
    """An evaluation's figures (metrics.json or headline.json) as the cells under FIGURES, as the default run's report."""
    return " | ".join(" / ".join(_cell(m, key, scale, key in stds) for key in keys) for keys, scale, stds in CELLS)


def parse_figures(cells: list[str]) -> dict:
    """figures()' cells back into metrics (rounded as printed, `_std` where a ± was): a report's table is the
    only record left of experiments whose refs are gone (the `abl-<row>` runs behind docs/ablations)."""
    m = {}
    for cell, (keys, scale, _) in zip(cells, CELLS):
        for key, text in zip(keys, cell.split(" / ")):
            for suffix, number in zip(("", "_std"), text.split(" ± ")):
                if number.strip() != "–":
                    m[key + suffix] = float(number) / scale
    return m


def last_nmi(m: dict) -> str:
    return _cell(m, "last_nmi_previous", scale=1)


def changes(params: dict) -> str:
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items())


def table(rows: dict[str, dict], studies: list[str] | None = None) -> str:
    """One markdown row per (study, row): trained vs random init vs raw pixels."""
    lines = [f"| study | experiment | change | clusters (last epoch) | NMI(t−1, t) last | {FIGURES} |",
             "|---|---|---|---:|---:|---|---|---|---|"]
    for study in studies or STUDIES:
        for name in (n for n in STUDIES[study] if n in rows):
            m, n = rows[name]["metrics"], clusters(rows[name])
            source = rows[name].get("source") or f"`{PREFIX}{name}`"
            lines.append(f"| {study} | {source} | {changes(ROWS[name]) or 'defaults'} | {'–' if n is None else n} | "
                         f"{last_nmi(m)} | {figures(m)} |")
    return "\n".join(lines) + "\n"


def rows_from_table(text: str) -> dict[str, dict]:
    """table()'s rows read back: row -> metrics, clusters and the experiment cell (its `source`), as printed."""
    by_change = {changes(params) or "defaults": row for row, params in ROWS.items()}
    rows = {}
    for line in text.split(SEEDS_HEADING)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in STUDIES and cells[2] in by_change:
            m = parse_figures(cells[5:]) | ({} if cells[4] == "–" else {"last_nmi_previous": float(cells[4])})
            rows[by_change[cells[2]]] = {"metrics": m, "curves": None, "sizes": None, "source": cells[1],
                                         "clusters": int(cells[3]) if cells[3].isdigit() else None}
    return rows


# ------------------------------------------------------------------ over training seeds
SEEDS_HEADING = "## Over training seeds"
# (column, trained, random networks, the spreads combined as report.md's margins against the random inits do)
MARGINS = (("kNN, best conv layer", "knn_conv.trained", "knn_conv.random_inits", ("knn_conv.random_inits_std",)),
           ("kNN, fc", "knn.trained", "knn.random_inits", ("knn.random_inits_std",)),
           ("k-means ACC", "cluster.trained.acc", "cluster.random_inits.acc",
            ("cluster.trained.acc_std", "cluster.random_inits.acc_std")),
           ("k-means NMI", "cluster.trained.nmi", "cluster.random_inits.nmi",
            ("cluster.trained.nmi_std", "cluster.random_inits.nmi_std")),
           ("best conv probe", "probe.trained.best", "probe.random_inits.best", ("probe.random_inits.best_std",)),
           ("best conv probe vs random init", "probe.trained.best", "probe.random.best", ()))


def seeded_runs(done: dict[str, dict], row: str) -> dict[int, str]:
    """seed -> rev of the row's finished `study-<row>-s<seed>` experiments."""
    prefix = experiment_name(row) + SEED
    return {int(name[len(prefix):]): found["rev"] for name, found in done.items()
            if name.startswith(prefix) and name[len(prefix):].isdigit()}


def seed_margins(runs: list[dict]) -> list[dict]:
    """Per MARGINS column, over the runs (one per training seed) that recorded it: each run's margin of the
    trained network over its random networks and that margin's spread, their mean and population sd over the
    runs (as the learn check and docs/results.md report seeds), and how many runs put the margin above (below)
    its spread. No spread: the count is None."""
    out = []
    for column, trained, random, spreads in MARGINS:
        have = [m for m in runs if m.get(trained) is not None and m.get(random) is not None]
        margins = np.array([m[trained] - m[random] for m in have], dtype=float)
        spread = np.array([np.hypot.reduce([m.get(k) or 0.0 for k in spreads]) for m in have], dtype=float)
        out.append({"column": column, "nmi": trained.endswith(".nmi"), "n": len(have), "margins": margins.tolist(),
                    "mean": float(margins.mean()) if len(have) else None,
                    "sd": float(margins.std()) if len(have) > 1 else None,
                    "above": int((margins > spread).sum()) if spreads else None,
                    "below": int((margins < -spread).sum()) if spreads else None})
    return out


def _margin_cell(r: dict) -> str:
    if r["n"] == 0:
        return "–"
    scale, fmt = (1, "+.3f") if r["nmi"] else (100, "+.1f")
    text = f"{scale * r['mean']:{fmt}}" + ("" if r["sd"] is None else f" ± {scale * r['sd']:{fmt[1:]}}")
    if r["above"] is not None:
        text += f", {r['above']}/{r['n']} above" + (f", {r['below']} below" if r["below"] else "")
    return text


def seed_table(by_seed: dict[str, dict[int, dict]], studies: list[str] | None = None) -> str:
    """Per (study, row) run with several training seeds: the margins over the random networks across seeds."""
    lines = [SEEDS_HEADING, "", "Trained minus the mean of its random networks, per run; mean ± sd (population) "
             "over the training seeds, and in how many runs the margin is above (below) its spread: the random networks' "
             "spread, and for k-means both sides' spread over k-means seeds. The probe against random init has no "
             "spread: one probe per network.", "",
             f"| study | row | change | training seeds | {' | '.join(c for c, *_ in MARGINS)} |",
             "|---|---|---|---|" + "---|" * len(MARGINS)]
    for study in studies or STUDIES:
        for name in (n for n in STUDIES[study] if n in by_seed):
            runs = by_seed[name]
            cells = " | ".join(_margin_cell(r) for r in seed_margins([runs[s] for s in sorted(runs)]))
            lines.append(f"| {study} | {name} | {changes(ROWS[name]) or 'defaults'} | "
                         f"{', '.join(map(str, sorted(runs)))} | {cells} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the scores' picture
# (panel, trained, random-init keys (the first recorded wins), raw-pixel key, scale, what a bar or band is)
PANELS = (("weighted kNN (%)", "knn.trained", ("knn.random_inits", "knn.random"), "knn.pixels", 100,
           "trained: one run, no bar; band: ± sd over random nets"),
          ("k-means ACC (%)", "cluster.trained.acc", ("cluster.random.acc",), "cluster.pixels.acc", 100,
           "error bars and bands: ± sd over k-means seeds"),
          ("k-means NMI", "cluster.trained.nmi", ("cluster.random.nmi",), "cluster.pixels.nmi", 1,
           "error bars and bands: ± sd over k-means seeds"),
          ("best conv probe (%)", "probe.trained.best", ("probe.random_inits.best", "probe.random.best"),
           "probe.pixels", 100, "trained: one run, no bar; band: ± sd over random nets"))
NUMERIC = {"k": "k (clusters in the last epoch, log scale)"}  # studies whose rows lie on a numeric axis
REFERENCES = (("random", "tab:red", "--", "random init"), ("pixels", "dimgray", ":", "raw pixels"))


def numeric_axis(rows: dict[str, dict], study: str) -> bool:
    """Whether the study's rows lie on a numeric axis: k, when every row's k is known."""
    return study in NUMERIC and all(clusters(rows[n]) for n in STUDIES[study] if n in rows)


def row_label(name: str, n_clusters: int | None) -> str:
    """A row by its settings, the number of clusters made concrete: `k=312 (default)`, not `defaults`."""
    change = ROWS[name]
    k = n_clusters if n_clusters is not None else change.get("cluster.k", "auto")
    parts = [f"PIC: {n_clusters or '?'} clusters" if change.get("cluster.method") == "pic" else f"k={k}"]
    parts += ["no Sobel"] if change.get("model.sobel") is False else []
    parts += [f"width {change['model.width']}"] if "model.width" in change else []
    parts += [f"{change['train.samples_per_epoch']:,} draws/epoch"] if "train.samples_per_epoch" in change else []
    parts += [f"{change['prepare.max_train_images']:,} images"] if "prepare.max_train_images" in change else []
    if "cluster.refill_below" in change:
        parts.append(f"clusters under {change['cluster.refill_below']:g} x mean refilled")
    return ", ".join(parts) + ("" if change else " (default)")


def _value(m: dict, key: str, scale: int) -> tuple[float, float | None] | None:
    """(value, sd) scaled for display; sd None where the run recorded no spread, None where no value."""
    if m.get(key) is None:
        return None
    return scale * m[key], None if m.get(key + "_std") is None else scale * m[key + "_std"]


def score_points(rows: dict[str, dict], study: str, panel: tuple) -> list[dict]:
    """One panel's points: per row of the study, its x, label, and (value, sd) of the trained network and the
    random-init and raw-pixel references. x is k on a numeric study's axis, else the row's index."""
    _, trained, randoms, pixels, scale, _ = panel
    points, numeric = [], numeric_axis(rows, study)
    for i, name in enumerate(n for n in STUDIES[study] if n in rows):
        m, k = rows[name]["metrics"], clusters(rows[name])
        random = next((key for key in randoms if m.get(key) is not None), randoms[-1])
        points.append({"x": k if numeric else i, "label": row_label(name, k),
                       "trained": _value(m, trained, scale), "random": _value(m, random, scale),
                       "pixels": _value(m, pixels, scale)})
    return points


def y_floor(values: list[tuple[float, float | None]], scale: int) -> float:
    """Where a panel's axis starts: 0, unless the values and their spreads sit in a narrow band far above it
    (kNN and probes: 76–90 %), then a round number below them, which the axis label then states."""
    lows, highs = [v - (s or 0) for v, s in values], [v + (s or 0) for v, s in values]
    step = 5 if scale == 100 else 0.05
    floor = round(step * ((min(lows) - 0.3 * (max(highs) - min(lows))) // step), 2)
    return 0.0 if floor < 0.4 * max(highs) else floor


def _text(value: tuple[float, float | None], scale: int) -> str:
    fmt = ".1f" if scale == 100 else ".3f"
    return f"{value[0]:{fmt}}" + ("" if value[1] is None else f" ± {value[1]:{fmt}}")


def _draw_panel(ax, points: list[dict], numeric: bool, scale: int) -> None:
    """The trained network per row as a point with its sd, and each row's references as a band over that row's
    own span: rows may have other references (no Sobel: another random network), so no band crosses rows."""
    box = {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8}  # legible over the bands
    for ref, colour, style, name in REFERENCES:
        have = [p for p in points if p[ref] is not None]
        shared = len({p[ref] for p in have}) == 1  # one label for the study then, in the right margin
        for i, p in enumerate(have):
            (v, s), (lo, hi) = p[ref], (p["x"] / 1.4, p["x"] * 1.4) if numeric else (p["x"] - 0.3, p["x"] + 0.3)
            ax.plot([lo, hi], [v, v], color=colour, ls=style, lw=1.2, label=name if i == 0 else None, zorder=1)
            if s is not None:
                ax.fill_between([lo, hi], v - s, v + s, color=colour, alpha=0.15, lw=0, zorder=0)
            other = p["pixels" if ref == "random" else "random"]
            above = other is None or v >= other[0]  # the higher reference's label above its line, the lower's below
            where = ((1.0, v), ("axes fraction", "data")) if shared else ((hi, v), "data")
            if not shared or i == len(have) - 1:
                ax.annotate(_text(p[ref], scale), where[0], xycoords=where[1], xytext=(2, 1 if above else -1),
                            textcoords="offset points", fontsize=6, color=colour, va="bottom" if above else "top")
    have = [p for p in points if p["trained"] is not None]
    # a line only along a numeric axis (k); separate settings stay separate points
    ax.errorbar([p["x"] for p in have], [p["trained"][0] for p in have], yerr=[p["trained"][1] or 0 for p in have],
                fmt="-o" if numeric else "o", color="tab:blue", ms=5, capsize=4, label="trained", zorder=3)
    for p in have:
        (v, s) = p["trained"]
        sign = -1 if p["random"] and v < p["random"][0] else 1
        # written beyond its error bar on the side away from the random init, clear of the bands
        ax.annotate(_text(p["trained"], scale), (p["x"], v + sign * (s or 0)), xytext=(0, 5 * sign),
                    textcoords="offset points", ha="center", va="bottom" if sign > 0 else "top", fontsize=7,
                    color="tab:blue", bbox=box, zorder=4)


def draw_scores(rows: dict[str, dict]):
    """Per study a row of panels, one per headline figure, every value written on it (see _draw_panel)."""
    from stages.core.pictures import plt  # the Agg backend

    # a study whose only run is the shared defaults has nothing to compare: drawn only when no study has more
    studies = ([s for s in STUDIES if any(n in rows for n in STUDIES[s] if n != "defaults")] or
               [s for s in STUDIES if any(n in rows for n in STUDIES[s])])
    fig, axes = plt.subplots(len(studies), len(PANELS), figsize=(4.4 * len(PANELS), 3.4 * len(studies)),
                             squeeze=False)
    for ax_row, study in zip(axes, studies):
        numeric = numeric_axis(rows, study)
        for ax, panel in zip(ax_row, PANELS):
            title, scale, spread = panel[0], panel[4], panel[5]
            points = score_points(rows, study, panel)
            _draw_panel(ax, points, numeric, scale)
            xs, labels = [p["x"] for p in points], [p["label"] for p in points]
            if numeric:  # the axis says k: the ticks say its values
                ax.set(xscale="log", xlim=(min(xs) / 2, max(xs) * 2))
                ax.set_xlabel(NUMERIC[study], fontsize=7)
                labels = [label.removeprefix("k=") for label in labels]
            else:
                ax.set_xlim(-0.5, len(points) - 0.5)
            ax.set_xticks(xs, labels, rotation=15, ha="right", fontsize=7)
            ax.minorticks_off()
            values = [p[key] for p in points for key in INITS if p[key] is not None]
            floor, top = y_floor(values, scale), max(v + (s or 0) for v, s in values)
            ax.set_ylim(floor, top + 0.12 * (top - floor))
            ax.set_ylabel(spread + (f"\naxis starts at {floor:g}, not 0" if floor else ""), fontsize=7)
            ax.set_title(f"{study}: {title}", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.text(0.5, 0, "One training run per setting: no spread over training seeds. Error bars and bands: ± 1 sd "
             "where the metrics carry one, none where they do not.", ha="center", va="top", fontsize=8)
    fig.tight_layout()
    return fig


def plot_scores(rows: dict[str, dict], path: Path) -> None:
    from stages.core.pictures import save_figure  # atomic PNG writes, closes the figure

    save_figure(draw_scores(rows), path, dpi=110)


def plot_curves_and_sizes(rows: dict[str, dict], path: Path) -> None:
    """NMI(t−1, t) per epoch overlaid for each study (paper Fig. 2b), and k-means vs PIC cluster sizes."""
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


def report(out: Path | None, show: list | None = None, studies: list[str] = ("all",),
           from_table: Path | None = None) -> str:
    """The studies' table from the finished experiments (or from an earlier report's table, whose experiments
    may be gone); with `out`, written there with its pictures."""
    names = rows_of(list(studies))
    if from_table is not None:
        rows = {n: row for n, row in rows_from_table(from_table.read_text()).items() if n in names}
        by_seed = {}  # a table keeps the margins over seeds only as printed
    else:
        done = experiments(show)
        seeded = {name: seeded_runs(done, name) for name in names}
        rows = {}
        for name in names:
            if PREFIX + name in done:
                rows[name] = load_row(done[PREFIX + name]["rev"])
            elif seeded[name]:  # only run with seeds: the main table shows the lowest seed's run
                seed = min(seeded[name])
                rows[name] = {**load_row(seeded[name][seed]), "source": f"`{experiment_name(name, seed)}`"}
        by_seed = {name: {seed: load_row(rev)["metrics"] for seed, rev in runs.items()}
                   for name, runs in seeded.items() if runs}
    if "defaults" in names and "defaults" not in rows and committed_file("HEAD", f"{EVAL}/{METRICS}") is not None:
        # the committed `dvc repro` of the committed params is the defaults row, when it was not run as an experiment
        rows["defaults"] = {**load_row("HEAD"), "source": "`HEAD` (the committed run)"}
    if not rows:
        raise StageError(f"no finished experiment named {PREFIX}<row>: run `deepcluster studies queue all --start` "
                         "first (or `dvc exp pull origin -A --no-cache` to fetch published ones)")
    chosen = list(STUDIES) if "all" in studies else list(studies)
    text = table(rows, chosen)
    if from_table is None and by_seed:
        text += "\n" + seed_table(by_seed, chosen)
    missing = [PREFIX + n for n in names if n not in rows]
    if missing:
        text += f"\nNot run yet: {', '.join(missing)}.\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "studies.md") as tmp:
            tmp.write_text(text)
        plot_scores(rows, out / "studies.png")
        if any(row["curves"] is not None or row["sizes"] for row in rows.values()):  # a table keeps neither
            plot_curves_and_sizes(rows, out / "nmi_and_sizes.png")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="queue each study's experiments (`dvc exp run --queue`)")
    q.add_argument("studies", nargs="+", help=f"{', '.join(STUDIES)} or all")
    q.add_argument("--start", action="store_true", help="then start one queue worker (`dvc queue start -j 1`)")
    q.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="run each row once per training seed (run.seed), as study-<row>-s<seed>: a margin of a "
                        "point or two over random networks needs several seeds to tell from noise")
    r = sub.add_parser("report", help="the studies' table and pictures from the finished experiments")
    r.add_argument("--out", default="docs/studies", help="directory for studies.md, studies.png, nmi_and_sizes.png")
    r.add_argument("--from-table", type=Path, help="an earlier report's studies.md instead of the experiments: "
                   "redraws its pictures (the scores only: a table keeps no curves) without the runs")
    args = parser.parse_args(argv)
    try:
        if args.command == "queue":
            queue(args.studies, args.start, args.seeds)
        else:
            print(report(Path(args.out), from_table=args.from_table), end="")
    except StageError as e:
        sys.exit(f"studies: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"studies: {' '.join(map(str, e.cmd[1:]))} failed (exit {e.returncode}); see its output above")


if __name__ == "__main__":
    main()
