"""Compare runs: one command over every kind of run the project makes, each view a markdown table.

    deepcluster compare                # DVC experiments: the workspace's run and every finished experiment
    deepcluster compare --study k      # one of the paper's studies (clustering, input, k) or all
    deepcluster compare --ablations    # single-stage reruns, beside the main run's same epoch
    deepcluster compare --screens      # screened recipe changes, a row per scored epoch

The words, one meaning each:
  run         one whole DeepCluster training and its final evaluation (`dvc repro`, `deepcluster run`).
  experiment  a run DVC recorded (`dvc exp run`, git refs): its params.yaml and data/eval/headline.json.
              The default view: a row per finished experiment (the newest of each name, every baseline
              commit), the parameters it changed against its baseline commit, and its figures; read from
              `dvc exp show --json -A`.
  study       one of the paper's comparisons, run as experiments named study-<row> (`deepcluster studies
              queue`). --study prints the studies report's table (`deepcluster studies report` also
              writes it with its pictures to docs/studies/).
  ablation    one stage of one finished epoch of the main run rerun with other parameters (`deepcluster
              ablate`, data/ablations/<name>/); the main run is left as it is. Same table as `ablate list`.
  screen      a few epochs run in-process and scored at chosen epochs (`deepcluster screen`,
              data/screen/<name>/). Same table as `screen --table`.
Figures: trained network / random init / raw pixels, as the evaluation report: best conv probe accuracy,
weighted kNN accuracy, k-means (k = classes) accuracy and NMI with the labels, in percent but NMI;
NMI(t-1, t) is the last epoch's NMI between consecutive clusterings. Per-epoch curves of every run and
ablation: MLflow (the last line printed says how to open it, on 127.0.0.1).
"""
from __future__ import annotations

import argparse

from pipeline.tools import studies
from stages.core.errors import cli_errors
from stages.core.params import flatten


def _params(data: dict) -> dict:
    return flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})


def _headline(data: dict) -> dict:
    return (((data.get("metrics") or {}).get("data/eval/headline.json")) or {}).get("data") or {}


def experiments_table(show: list | None = None) -> str:
    """The workspace's run, then each finished experiment: its changes against its baseline commit, its figures."""
    show = studies.exp_show() if show is None else show
    lines = [f"| experiment | baseline | changed parameters | NMI(t−1, t) last | {studies.FIGURES} |",
             "|---|---|---|---:|---|---|---|---|"]
    workspace = next((row.get("data") or {} for row in show if row.get("rev") == "workspace"), {})
    if _headline(workspace):
        lines.append(f"| workspace | – | params.yaml | {studies.last_nmi(_headline(workspace))} | "
                     f"{studies.figures(_headline(workspace))} |")
    found = studies.experiments(show)
    for name, exp in sorted(found.items(), key=lambda item: item[1]["timestamp"]):
        base, mine = _params(exp["baseline"]), _params(exp["data"])
        changed = studies.changes({k: v for k, v in mine.items() if base.get(k) != v}) or "none"
        m = _headline(exp["data"])
        lines.append(f"| `{name}` | {str(exp['baseline'].get('rev', ''))[:7]} | {changed} | {studies.last_nmi(m)} | "
                     f"{studies.figures(m)} |")
    if not found:
        lines.append("\nNo finished DVC experiment (`dvc exp run -n <name> -S key=value`; `dvc queue status` for queued ones).")
    return "\n".join(lines)


def mlflow_hint() -> str:
    from pipeline.tracking import tracking_uri

    return f"Per-epoch curves: mlflow ui --backend-store-uri {tracking_uri()} --host 127.0.0.1"


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
        elif args.ablations:
            from pipeline.tools.ablate import list_ablations  # the stages (torch): only for this view

            print(list_ablations())
        elif args.screens:
            from pipeline.tools.screen import table

            print(table())
        else:
            print(experiments_table())
    print(f"\n{mlflow_hint()}")


if __name__ == "__main__":
    main()
