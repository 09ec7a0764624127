"""Compare runs: one command over every kind of run the project makes, each view a markdown table.

    deepcluster compare                # DVC experiments: the workspace's run and every finished experiment
    deepcluster compare --study k      # one of the paper's studies (clustering, input, k) or all
    deepcluster compare --ablations    # single-stage reruns, beside the main run's same epoch
    deepcluster compare --screens      # screened recipe changes, a row per scored epoch

The words, one meaning each:
  run         one whole training and its final evaluation (`dvc repro`, `deepcluster run`).
  experiment  a run DVC recorded (`dvc exp run`). The default view, from `dvc exp show --json -A`: a row per
              finished experiment (the newest of each name, any baseline commit), the parameters it changed
              against its baseline commit, its data/eval/headline.json.
  study       one of the paper's comparisons, run as experiments named study-<row> (`deepcluster studies`).
              --study prints `deepcluster studies report`'s table and writes no file.
  ablation    one stage of a finished epoch of the main run, rerun with other parameters (`deepcluster ablate`).
  screen      a few epochs run in-process, scored at chosen epochs (`deepcluster screen`).
Figures, as in the evaluation report: trained network / random init / raw pixels for the best conv probe,
weighted kNN and k-means (k = classes) accuracy (%) and NMI; NMI(t−1, t) is the last epoch's. Per-epoch
curves of every run and ablation are in MLflow: the last line printed opens its UI on 127.0.0.1.
"""
from __future__ import annotations

import argparse

from pipeline.tools import studies
from stages.core.errors import cli_errors
from stages.core.params import flatten


def _file(data: dict, kind: str, name: str) -> dict:
    """One file's content in a revision's data of `dvc exp show --json` ({} when absent)."""
    return ((data.get(kind) or {}).get(name) or {}).get("data") or {}


def experiments_table(show: list | None = None) -> str:
    """The workspace's run, then each finished experiment: its changes against its baseline commit, its figures."""
    show = studies.exp_show() if show is None else show
    lines = [f"| experiment | baseline | changed parameters | NMI(t−1, t) last | {studies.FIGURES} |",
             "|---|---|---|---:|---|---|---|---|"]
    workspace = _file(next((r.get("data") or {} for r in show if r.get("rev") == "workspace"), {}), "metrics",
                      "data/eval/headline.json")
    if workspace:
        lines.append(f"| workspace | – | params.yaml | {studies.last_nmi(workspace)} | {studies.figures(workspace)} |")
    found = studies.experiments(show)
    for name, exp in sorted(found.items(), key=lambda item: item[1]["timestamp"]):
        base, mine = (flatten(_file(d, "params", "params.yaml")) for d in (exp["baseline"], exp["data"]))
        m = _file(exp["data"], "metrics", "data/eval/headline.json")
        lines.append(f"| `{name}` | {str(exp['baseline'].get('rev'))[:7]} | "
                     f"{studies.changes({k: v for k, v in mine.items() if base.get(k) != v}) or 'none'} | "
                     f"{studies.last_nmi(m)} | {studies.figures(m)} |")
    if not found:
        lines.append("\nNo finished DVC experiment (`dvc exp run -n <name> -S key=value`; `dvc queue status`).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--study", choices=(*studies.STUDIES, "all"), help="the paper's studies: study-<row> experiments")
    view.add_argument("--ablations", action="store_true", help="single-stage reruns (data/ablations/)")
    view.add_argument("--screens", action="store_true", help="screened recipe changes (data/screen/)")
    args = parser.parse_args(argv)
    with cli_errors("compare"):
        if args.study:
            print(studies.report(None, studies=[args.study]), end="")
        elif args.ablations or args.screens:  # these import the stages (torch): only for their views
            from pipeline.tools.ablate import list_ablations
            from pipeline.tools.screen import table

            print(list_ablations() if args.ablations else table())
        else:
            print(experiments_table())
    from pipeline.tracking import tracking_uri  # MLflow itself is not imported

    print(f"\nPer-epoch curves: mlflow ui --backend-store-uri {tracking_uri()} --host 127.0.0.1")


if __name__ == "__main__":
    main()
