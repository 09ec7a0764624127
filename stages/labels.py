"""Stage `labels`: the epoch's pseudo-label file and how it relates to the last epoch and true labels.

Writes <epoch>/assignments.parquet (image_id, cluster, distance), row i = row i of the dataset's
train split (the order extract and cluster keep), and labels.json: cluster-size statistics, NMI with
the previous epoch's assignments (paper Fig. 2b) and NMI with the true labels where known (Fig. 2a;
for monitoring only, never used for model selection).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.core.assignments import cluster_size_stats, nmi, nmi_between, read_assignments, write_assignments
from stages.core.clustering import load_clustering
from stages.core.data import load_split
from stages.core.errors import StageError, cli_errors
from stages.core.io import write_json
from stages.core.layout import ASSIGNMENTS, CLUSTERING, report
from stages.core.params import load_params, stage_parser
from stages.core.runtime import Timer
from stages.core.schema import Params


def run_labels(params: Params, epoch_dir: str | Path, dataset: str | Path, previous: str | Path | None = None) -> dict:
    epoch_dir = Path(epoch_dir)
    with Timer() as t:
        c = load_clustering(epoch_dir / CLUSTERING)
        images = load_split(dataset, "train")
        if len(images) != len(c.labels):
            raise StageError(f"{epoch_dir / CLUSTERING} holds {len(c.labels)} cluster labels but {dataset} has "
                             f"{len(images)} training images: the dataset changed; rerun this epoch from extract")
        write_assignments(epoch_dir / ASSIGNMENTS, images.ids, c.labels, c.distances)
        stats = cluster_size_stats(c.labels, c.k)
        stats["nmi_previous"] = None
        prev_file = Path(previous) / ASSIGNMENTS if previous else None
        if prev_file is not None and prev_file.exists():
            current = pd.DataFrame({"image_id": images.ids, "cluster": c.labels})
            # a finished epoch's assignments are a function of its clustering: the way back if they are damaged
            fix = (f"recompute it from that epoch's {CLUSTERING} with `python -m stages.labels --epoch-dir {previous} "
                   f"--dataset {dataset}`, or restore it with `dvc checkout`, then rerun")
            stats["nmi_previous"] = nmi_between(current, read_assignments(prev_file, fix))
        stats["nmi_labels"] = nmi(images.labels, c.labels) if images.has_labels else None
    stats["seconds"] = t.seconds
    write_json(epoch_dir / report("labels"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "params file (this stage has no section of its own)")
    parser.add_argument("--epoch-dir", required=True, help="epoch directory holding clusters.npz")
    parser.add_argument("--dataset", default="data/dataset", help="canonical dataset (true labels, if any)")
    parser.add_argument("--previous", help="previous epoch directory, for NMI between consecutive epochs")
    args = parser.parse_args(argv)
    with cli_errors("labels"):
        s = run_labels(load_params(args.params), args.epoch_dir, args.dataset, args.previous)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    print(f"labels: {s['n_clusters']} clusters ({s['empty_clusters']} empty), sizes {s['size_min']}/"
          f"{s['size_median']:.0f}/{s['size_max']}, NMI prev {fmt(s['nmi_previous'])}, NMI labels {fmt(s['nmi_labels'])}")


if __name__ == "__main__":
    main()
