"""Stage `prepare`: import a source into the canonical dataset (see stages/core/data.py for the layout).

Sources:
  fashion-mnist  gzipped IDX files (the embedded default, Debian package dataset-fashion-mnist)
  imagefolder    <root>/<class>/<image>, labels from folder names; optional <root>/{train,val,test}/ splits
  folder         a flat (or nested) folder of unlabelled images: uncurated data, as the paper's YFCC100M
"""
from __future__ import annotations

import gzip
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.core.crops import crop_warning, image_side
from stages.core.data import IMAGE_EXTENSIONS, decode_image, to_8bit
from stages.core.errors import StageError, cli_errors
from stages.core.io import write_json
from stages.core.params import load_params, stage_parser
from stages.core.runtime import Phases, seeded_subset
from stages.core.schema import Prepare

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


# ---------------------------------------------------------------- IDX (Fashion-MNIST / MNIST)
def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): 2 zero bytes, dtype code, ndim, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise StageError(f"{path} is not an IDX file (bad magic number): point prepare.path at the Fashion-MNIST IDX files")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    dtype = np.dtype(IDX_DTYPES[raw[2]]).newbyteorder(">")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise StageError(f"{path} is truncated: header says {tuple(dims)}, file holds {data.size} values")
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def import_idx(root: Path, limits: dict[str, int | None], seed: int) -> tuple[pd.DataFrame, np.ndarray, dict]:
    frames, arrays = [], []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_file = _find(root, f"{prefix}-images-idx3-ubyte")
        lab_file = _find(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(img_file), read_idx(lab_file)
        if len(images) != len(labels):
            raise StageError(f"{img_file} has {len(images)} images but {lab_file} has {len(labels)} labels")
        keep = seeded_subset(len(images), limits.get(split), seed)
        frames.append(pd.DataFrame({"image_id": [f"{split}-{i:05d}" for i in keep], "split": split,
                                    "label": pd.array(labels[keep].astype(np.int64), dtype="Int64"),
                                    "source": "fashion-mnist", "path": pd.array([None] * len(keep), dtype="string")}))
        arrays.append(images[keep][..., None])
    return pd.concat(frames, ignore_index=True), np.concatenate(arrays), {"classes": FASHION_CLASSES}


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise StageError(f"{root} has no {stem}[.gz]: install it with `apt-get install dataset-fashion-mnist` or set prepare.path")


# ---------------------------------------------------------------- image trees
def list_images(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files under `root`, and what was skipped (folders that could not be listed, files that are
    not images by their extension), with the reason.

    Path.rglob skips a folder it cannot open without a word; os.walk reports it.
    """
    images, skipped = [], []

    def unreadable(error: OSError) -> None:
        skipped.append((str(Path(error.filename).resolve()), f"folder not readable: {type(error).__name__}: "
                                                             f"{error.strerror}"))

    for folder, _, files in os.walk(root, onerror=unreadable):
        for f in files:
            path = Path(folder) / f
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                skipped.append((str(path.resolve()), f"not an image file by its extension ({path.suffix or 'none'}; "
                                                     f"read: {', '.join(IMAGE_EXTENSIONS)})"))
    return sorted(p for p in images if p.is_file()), sorted(skipped)


def scan_image_tree(root: Path, labelled: bool) -> tuple[pd.DataFrame, list[str], list[tuple[str, str]]]:
    """Manifest rows for an image tree, its classes and the folders skipped (path, reason).

    Labels come from the class folder; splits from train/val/test folders.
    """
    split_roots = [(s, root / d) for s, d in (("train", "train"), ("test", "val"), ("test", "test")) if (root / d).is_dir()]
    if not any(s == "train" for s, _ in split_roots):
        split_roots = [("train", root)]
    rows, classes, skipped = [], set(), []
    for split, split_root in split_roots:
        paths, unlisted = list_images(split_root)
        skipped += unlisted
        for path in paths:
            rel = path.relative_to(split_root)
            label_name = rel.parts[0] if labelled and len(rel.parts) > 1 else None
            if label_name:
                classes.add(label_name)
            # relative to the root, so val/ and test/ (both the "test" split) can't collide
            rows.append((path.relative_to(root).as_posix(), split, label_name, str(path.resolve())))
    classes = sorted(classes)
    index = {c: i for i, c in enumerate(classes)}
    df = pd.DataFrame(rows, columns=["image_id", "split", "label_name", "path"])
    df["label"] = pd.array([index.get(c) if c else None for c in df["label_name"]], dtype="Int64")
    df["source"] = "imagefolder" if labelled else "folder"
    df["path"] = df["path"].astype("string")
    return df.drop(columns="label_name")[["image_id", "split", "label", "source", "path"]], classes, skipped


# Modes whose 8-bit meaning depends on the values (16- and 32-bit integers, floats: see data.to_8bit);
# only these are decoded to check them. Every JPEG and 8-bit PNG is "L", "RGB", "P", "CMYK", ...
VALUE_DEPENDENT_MODES = ("I", "F")


def check_image(path: str) -> tuple[str | None, int, int]:
    """(None, width, height) if the file is an image PIL can read, else (the reason, 0, 0).

    Only the header is read (format, mode, size): decoding ImageNet's 1.28M files to check them is an
    hour and a half at ~240 images/s (`python -m pipeline.tools.benchmark --only images`). So a file whose header is
    fine but whose data is not (a truncated JPEG) passes here; the loaders feed it as a mean-colour
    image and name it on stderr each pass (stages.core.data._FileViews). Images with 16-bit, 32-bit or float
    pixels (rare, never JPEGs) are decoded, since whether they have an 8-bit meaning depends on their values.
    """
    try:
        with Image.open(path) as im:
            if im.width < 1 or im.height < 1:
                return "empty image", 0, 0
            if im.mode.startswith(VALUE_DEPENDENT_MODES):
                im.load()
                to_8bit(im)
            return None, im.width, im.height
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}", 0, 0


def drop_unreadable(df: pd.DataFrame, workers: int = 8, phases: Phases | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The readable rows with their images' width and height, and the report of the others (path, error);
    with `phases`, a progress line every tenth of the files (1.28M headers take minutes)."""
    paths = df["path"].tolist()
    with ThreadPoolExecutor(max(workers, 1)) as pool:  # header reads wait on the disk: threads overlap them
        checks = pool.map(check_image, paths) if workers > 0 else map(check_image, paths)  # 0: in this thread
        checks = list(phases.progress(checks, len(paths), "headers") if phases else checks)
    errors = [c[0] for c in checks]
    bad = np.array([e is not None for e in errors], dtype=bool)
    report = pd.DataFrame({"path": df["path"][bad].tolist(), "error": [e for e in errors if e is not None]})
    df = df.assign(width=pd.array([c[1] for c in checks], dtype="Int64"),
                   height=pd.array([c[2] for c in checks], dtype="Int64"))
    return df[~bad].reset_index(drop=True), report


def _pixels_or_none(path: str, size: int, channels: int) -> np.ndarray | None:
    """H x W x C pixels of prepare.image_size's square, or None for a file that passed the header check but
    does not decode (it is reported when a stage loads it)."""
    try:
        return decode_image(path, size, channels).permute(1, 2, 0).numpy()
    except Exception:  # PIL raises many types for damaged files
        return None


def histogram_stats(images: list[np.ndarray]) -> tuple[list[float], list[float]]:
    """channel_stats of uint8 H x W x C images from per-channel histograms: exact, and without the N x H x W x C
    float64 copy (500 images at 256 px: 800 MB and seconds)."""
    counts = sum(np.stack([np.bincount(im[..., c].ravel(), minlength=256) for c in range(im.shape[-1])])
                 for im in images)
    values = np.arange(256) / 255.0
    n = counts.sum(axis=1)
    mean = counts @ values / n
    var = np.maximum(counts @ values**2 / n - mean**2, 0.0)
    return mean.tolist(), np.maximum(np.sqrt(var), 1e-3).tolist()


def channel_stats(pixels: np.ndarray, max_rows: int = 20000) -> tuple[list[float], list[float]]:
    sample = pixels[: max_rows].astype(np.float64) / 255.0
    axes = tuple(range(sample.ndim - 1))
    return sample.mean(axis=axes).tolist(), np.maximum(sample.std(axis=axes), 1e-3).tolist()


def import_tree(path: Path, source: str, section: Prepare, limits: dict[str, int | None], seed: int,
                phases: Phases) -> tuple[pd.DataFrame, pd.DataFrame, dict, tuple[list[float], list[float]]]:
    """An image tree's manifest (readable images, subsets drawn), the unreadable report, meta, and mean/std:
    three phases (scan, header check, mean/std), each with a progress line."""
    with phases.phase(f"scanning {path}") as phase:
        manifest, classes, skipped = scan_image_tree(path, labelled=source == "imagefolder")
        phase.note = f"{len(manifest):,} image files" + (f", {len(skipped):,} skipped" if skipped else "")
    if manifest.empty:
        raise StageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}: check prepare.path"
                         + "".join(f"; skipped {p} ({e})" for p, e in skipped))
    with phases.phase(f"checking {len(manifest):,} image headers") as phase:
        manifest, report = drop_unreadable(manifest, section.num_workers, phases)
        phase.note = f"{len(manifest):,} readable, {len(report):,} unreadable"
    report = pd.concat([pd.DataFrame(skipped, columns=["path", "error"]), report], ignore_index=True)
    if manifest.empty:
        examples = "; ".join(f"{p}: {e}" for p, e in report.head(3).itertuples(index=False))
        raise StageError(f"none of the {len(report)} images under {path} could be read, e.g. {examples}")
    for p, e in report.itertuples(index=False):
        print(f"prepare: skipping unreadable {p} ({e})", file=sys.stderr)
    parts = []
    for split in ("train", "test"):
        part = manifest[manifest["split"] == split]
        parts.append(part.iloc[seeded_subset(len(part), limits[split], seed)])
    manifest = pd.concat(parts, ignore_index=True)
    size, channels = section.image_size, 3
    meta = {"kind": "files", "classes": classes or None, "image_size": size, "channels": channels}
    sample = manifest["path"].iloc[seeded_subset(len(manifest), 500, seed)]
    with phases.phase(f"measuring the channel mean/std on {len(sample):,} images") as phase:
        with ThreadPoolExecutor(max(1, section.num_workers)) as pool:  # PIL decodes without the GIL
            decoded = [d for d in pool.map(lambda p: _pixels_or_none(p, size, channels), sample) if d is not None]
        if not decoded:
            raise StageError(f"none of the {len(sample)} images sampled for the channel mean/std under {path} "
                             "could be decoded, though their headers could be read: check the files")
        stats = histogram_stats(decoded)
        phase.note = f"mean {' '.join(f'{v:.3f}' for v in stats[0])}, std {' '.join(f'{v:.3f}' for v in stats[1])}"
    return manifest, report, meta, stats


def write_dataset(out: Path, manifest: pd.DataFrame, pixels: np.ndarray | None, report: pd.DataFrame,
                  meta: dict) -> None:
    """Write into a temp directory and swap it in whole, so a crash never leaves a mixed dataset."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest.to_parquet(tmp / "manifest.parquet", index=False)
    if pixels is not None:
        np.save(tmp / "pixels.npy", np.ascontiguousarray(pixels))
    report.to_csv(tmp / "unreadable.csv", index=False)
    write_json(tmp / "dataset.json", meta)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


# ---------------------------------------------------------------- the stage
def prepare(source: str, path: str | Path, out: str | Path, section: Prepare, seed: int = 0) -> dict:
    path, out = Path(path), Path(out)
    if not path.exists():
        raise StageError(f"source path {path} does not exist: set prepare.path in params.yaml or pass --path")
    limits = {"train": section.max_train_images, "test": section.max_test_images}
    report = pd.DataFrame(columns=["path", "error"])
    phases = Phases("prepare", total=2 if source == "fashion-mnist" else 4)
    if source == "fashion-mnist":
        with phases.phase(f"reading Fashion-MNIST from {path}") as phase:
            manifest, pixels, meta = import_idx(path, limits, seed)
            meta.update(kind="array", image_size=int(pixels.shape[1]), channels=int(pixels.shape[-1]))
            mean, std = channel_stats(pixels[(manifest["split"] == "train").to_numpy()])
            phase.note = f"{len(manifest):,} images"
    elif source in ("imagefolder", "folder"):
        manifest, report, meta, (mean, std) = import_tree(path, source, section, limits, seed, phases)
        pixels = None
    else:
        raise StageError(f"unknown source {source!r}: use fashion-mnist, imagefolder or folder")
    if (manifest["split"] == "train").sum() == 0:
        raise StageError(f"source {path} gave no training images")

    counts = manifest["split"].value_counts().to_dict()
    meta.update(source=source, source_path=str(path), mean=mean, std=std, counts=counts, unreadable=len(report))
    with phases.phase(f"writing {out}") as phase:
        write_dataset(out, manifest, pixels, report, meta)
        phase.note = ", ".join(f"{n:,} {split}" for split, n in counts.items()) + " images"
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "params file; this stage reads its `prepare` section")
    parser.add_argument("--source", help="overrides prepare.source (fashion-mnist | imagefolder | folder)")
    parser.add_argument("--path", help="overrides prepare.path: where the source lives")
    parser.add_argument("--out", default="data/dataset", help="canonical dataset directory to write")
    args = parser.parse_args(argv)
    with cli_errors("prepare"):
        params = load_params(args.params)
        section = params.prepare
        meta = prepare(args.source or section.source, args.path or section.path, args.out, section, params.run.seed)
    print(f"prepare: {meta['counts']} images from {meta['source']} -> {args.out}"
          + (f"; {meta['unreadable']} unreadable, listed in {args.out}/unreadable.csv" if meta["unreadable"] else ""))
    # The defaults' 28 px crops run on photos too, as thumbnails: say so once, with the fix (stages/core/crops.py).
    files = meta["kind"] == "files"  # an image tree: its manifest holds every image's width and height
    side = image_side(meta, pd.read_parquet(Path(args.out) / "manifest.parquet") if files else pd.DataFrame())
    warning = crop_warning(side, {"extract.crop_size": params.extract.crop_size,
                                  "train.crop_size": params.train.crop_size})
    if warning:
        print(f"prepare: {warning}", file=sys.stderr)


if __name__ == "__main__":
    main()
