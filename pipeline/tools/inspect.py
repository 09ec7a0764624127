"""Inspect a run's per-epoch cluster assignments: list epochs, show one, compare two.

    python -m pipeline.tools.inspect list                       # epochs of the run in the workspace
    python -m pipeline.tools.inspect show 3                     # epoch 3's assignments and cluster sizes
    python -m pipeline.tools.inspect show 3 --rev HEAD~1        # ... as committed in git (read through DVC)
    python -m pipeline.tools.inspect compare 2 3                # NMI, images that changed cluster, sizes
    python -m pipeline.tools.inspect compare 7 k50:7            # main run vs the ablation named k50

An epoch is its number (the main run) or `<ablation>:<epoch>`. With `--rev`, files are read through
DVC (`dvc.api.DVCFileSystem`) at that git revision, from DVC's cache. "Changed cluster": the two
epochs' clusters are first paired one-to-one (stages.labels.match_clusters), since cluster ids mean
nothing across epochs; an image changed cluster when its cluster in B is not its A cluster's partner.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.assignments import match_clusters, nmi_between, size_histogram
from stages.core.errors import StageError
from stages.core.layout import (ABLATIONS_ROOT, ASSIGNMENTS, CHECKPOINTS, EPOCHS_ROOT, FEATURES, METRICS,
                                checkpoint_name, epoch_dir, report)


@dataclass(frozen=True)
class Ref:
    """One epoch of one run: `epochs_root` holds <epoch>/ directories; `rev` None = the workspace."""

    epochs_root: str
    epoch: int
    rev: str | None = None
    label: str = ""

    @property
    def dir(self) -> str:
        return epoch_dir(self.epochs_root, self.epoch).as_posix()


def parse_ref(spec: str, rev: str | None = None, epochs_root: str = EPOCHS_ROOT,
              ablations_root: str = ABLATIONS_ROOT) -> Ref:
    """'7' -> main run epoch 7; 'k50:7' -> ablation k50, epoch 7."""
    name, _, number = spec.rpartition(":")
    if not number.isdigit():
        raise StageError(f"{spec!r} is not an epoch: use a number (7) or <ablation>:<number> (k50:7)")
    root = f"{ablations_root}/{name}" if name else epochs_root
    return Ref(root, int(number), rev, spec + (f"@{rev}" if rev else ""))


class Reader:
    """Reads run files from the workspace, or through DVC at a git revision."""

    def __init__(self, repo: str | Path = ".", rev: str | None = None):
        self.repo, self.rev = Path(repo), rev
        self._fs = None
        if rev is not None:
            from dvc.api import DVCFileSystem

            try:
                self._fs = DVCFileSystem(str(self.repo), rev=rev)
            except Exception as e:  # unknown revision, not a git/DVC repo, ...
                raise StageError(f"cannot open revision {rev!r} of {self.repo.resolve()} through DVC: {e}") from e

    def exists(self, path: str) -> bool:
        return self._fs.exists(path) if self._fs else (self.repo / path).exists()

    def listdir(self, path: str) -> list[str]:
        if self._fs is None:
            p = self.repo / path
            return sorted(x.name for x in p.iterdir()) if p.is_dir() else []
        return sorted(Path(p).name for p in self._fs.ls(path, detail=False)) if self._fs.isdir(path) else []

    def read_bytes(self, path: str) -> bytes:
        try:
            return (self.repo / path).read_bytes() if self._fs is None else self._fs.cat_file(path)
        except FileNotFoundError:
            where = f"revision {self.rev}" if self.rev else "the workspace"
            hint = ("`dvc checkout` restores tracked files that were deleted; `--rev HEAD` reads the last "
                    "committed version through DVC") if self.rev is None else (
                    "is dvc.lock of that commit tracking it, and is the file in the DVC cache (`dvc pull`)?")
            raise StageError(f"{path} not found in {where}: {hint}") from None
        except Exception as e:  # DVC: object missing from the cache, no remote configured, ...
            raise StageError(f"cannot read {path} at revision {self.rev}: {type(e).__name__}: {e}") from e


def load_assignments(ref: Ref, reader: Reader) -> pd.DataFrame:
    """One epoch's assignments (image_id, cluster, distance)."""
    return pd.read_parquet(io.BytesIO(reader.read_bytes(f"{ref.dir}/{ASSIGNMENTS}")))


def load_report(ref: Ref, name: str, reader: Reader) -> dict | None:
    path = f"{ref.dir}/{name}"
    return json.loads(reader.read_bytes(path)) if reader.exists(path) else None


def cluster_sizes(assignments: pd.DataFrame) -> np.ndarray:
    return np.bincount(assignments["cluster"].to_numpy())


def compare_assignments(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """NMI, images that changed cluster (see module doc) and cluster counts of two epochs."""
    joined = a.merge(b, on="image_id", suffixes=("_a", "_b"))
    if len(joined) == 0:
        raise StageError("the two epochs share no image_id: were they run on different datasets?")
    matched, method = match_clusters(joined["cluster_a"].to_numpy(), joined["cluster_b"].to_numpy())
    n = len(joined)
    return {"images": n, "nmi": nmi_between(a, b), "changed": n - matched, "changed_fraction": (n - matched) / n,
            "matching": method, "clusters_a": int(joined["cluster_a"].nunique()),
            "clusters_b": int(joined["cluster_b"].nunique())}


# ------------------------------------------------------------------ CLI
def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def cmd_list(args) -> None:
    reader = Reader(args.repo, args.rev)
    root = f"{ABLATIONS_ROOT}/{args.ablation}" if args.ablation else args.epochs_root
    epochs = [int(n) for n in reader.listdir(root)  # those with assignments, in order
              if re.fullmatch(r"\d{4}", n) and reader.exists(f"{root}/{n}/{ASSIGNMENTS}")]
    if not epochs:
        where = f"revision {args.rev}" if args.rev else "the workspace"
        sys.exit(f"inspect: no epoch with assignments under {root} in {where}")
    rows = []
    for e in epochs:
        ref = Ref(root, e, args.rev)
        m = load_report(ref, METRICS, reader) or load_report(ref, report("labels"), reader) or {}
        rows.append({"epoch": e, "clusters": m.get("n_clusters"), "empty": m.get("empty_clusters"),
                     "nmi_previous": m.get("nmi_previous"), "nmi_labels": m.get("nmi_labels"),
                     "train_loss": m.get("train_loss"),
                     "features": "kept" if reader.exists(f"{ref.dir}/{FEATURES}") else "-",
                     "checkpoint": "kept" if reader.exists(f"{CHECKPOINTS}/{checkpoint_name(e)}") else "-"})
    table = pd.DataFrame(rows)
    if args.json:
        print(table.to_json(orient="records"))
        return
    print(f"{root}{' @ ' + args.rev if args.rev else ''}: {len(epochs)} epochs")
    print(table.to_string(index=False, na_rep="-", formatters={c: _fmt for c in table.columns}))


def cmd_show(args) -> None:
    reader = Reader(args.repo, args.rev)
    ref = parse_ref(args.epoch, args.rev, args.epochs_root)
    df = load_assignments(ref, reader)
    if args.out:
        df.to_csv(args.out, index=False) if args.out.endswith(".csv") else df.to_parquet(args.out, index=False)
    sizes = cluster_sizes(df)
    clusters = int((sizes > 0).sum())
    if args.json:
        print(json.dumps({"epoch": ref.label, "images": len(df), "clusters": clusters, "sizes": sizes.tolist()}))
        return
    print(f"epoch {ref.label}: {len(df)} images in {clusters} clusters "
          f"(sizes min {sizes[sizes > 0].min()}, median {np.median(sizes[sizes > 0]):.0f}, max {sizes.max()})")
    print(df.head(args.head).to_string(index=False))
    print(f"\ncluster sizes:\n{size_histogram(sizes).to_string(index=False)}")
    if args.out:
        print(f"\nwrote {len(df)} rows to {args.out}")


def cmd_compare(args) -> None:
    ref_a = parse_ref(args.a, args.rev, args.epochs_root)
    ref_b = parse_ref(args.b, args.rev_b or args.rev, args.epochs_root)
    reader_a = Reader(args.repo, ref_a.rev)
    reader_b = reader_a if ref_b.rev == ref_a.rev else Reader(args.repo, ref_b.rev)
    a, b = load_assignments(ref_a, reader_a), load_assignments(ref_b, reader_b)
    result = compare_assignments(a, b)
    hist_a, hist_b = size_histogram(cluster_sizes(a)), size_histogram(cluster_sizes(b))
    if args.json:
        result.update(sizes_a=hist_a.to_dict("records"), sizes_b=hist_b.to_dict("records"))
        print(json.dumps(result))
        return
    print(f"{ref_a.label} vs {ref_b.label}: {result['images']} images in both")
    print(f"  NMI                {result['nmi']:.4f}")
    print(f"  changed cluster    {result['changed']} images ({result['changed_fraction']:.1%}), "
          f"after pairing clusters one-to-one ({result['matching']})")
    print(f"  non-empty clusters {result['clusters_a']} vs {result['clusters_b']}")
    hist = hist_a.merge(hist_b, on="size", how="outer", suffixes=(f" {ref_a.label}", f" {ref_b.label}"))
    hist = hist.sort_values("size", key=lambda s: s.str.extract(r"^(\d+)")[0].astype(int)).fillna(0)  # by bin
    print("\ncluster sizes:")
    print(hist.astype({c: int for c in hist.columns if c != "size"}).to_string(index=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=".", help="project root (default: the current directory)")
    parser.add_argument("--epochs-root", default=EPOCHS_ROOT, help="the main run's epochs directory")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list a run's epochs with their key figures")
    ls.add_argument("--rev", help="git revision to read through DVC (default: the workspace)")
    ls.add_argument("--ablation", help="list an ablation's epochs instead of the main run's")
    show = sub.add_parser("show", help="one epoch's assignments and cluster-size histogram")
    show.add_argument("epoch", help="epoch number, or <ablation>:<epoch>")
    show.add_argument("--rev", help="git revision to read through DVC (default: the workspace)")
    show.add_argument("--head", type=int, default=5, help="rows to print")
    show.add_argument("--out", help="also write the assignments to this .csv or .parquet file")
    cmp_ = sub.add_parser("compare", help="NMI, changed images and cluster sizes of two epochs")
    cmp_.add_argument("a", help="epoch number, or <ablation>:<epoch>")
    cmp_.add_argument("b", help="epoch number, or <ablation>:<epoch>")
    cmp_.add_argument("--rev", help="git revision of both (default: the workspace)")
    cmp_.add_argument("--rev-b", help="git revision of the second one, if different")
    for command in (ls, show, cmp_):
        command.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        {"list": cmd_list, "show": cmd_show, "compare": cmd_compare}[args.command](args)
    except StageError as e:
        sys.exit(f"inspect: {e}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends the command quietly
    main()
