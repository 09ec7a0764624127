"""Checks that a file a stage reads is complete and belongs to this run, before it is used.

A truncated or swapped file must stop with a `DamagedArtifact` naming it and saying how to get it
back, not with whatever numpy, zipfile, Arrow or torch raise half-way through a stage (a raw mmap
error, a bus error, a network of another architecture trained on). The checks read headers and
metadata, not the data: cheap enough to run before every use.

Also here: writing large files so that a full disk is a clear error before the write (the space is
checked, then reserved) rather than a bus error inside a memmap.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from stages.core.errors import DamagedArtifact, StageError
from stages.core.io import free_bytes, read_json, write_refused
from stages.core.schema import Model


# ---------------------------------------------------------------- .npy / .npz
def check_npy(path: str | Path, *, rows: int | None = None, dtype: np.dtype | type = np.float32, ndim: int = 2,
              fix: str | None = None) -> tuple[int, ...]:
    """The shape of a complete .npy array of `dtype` with `ndim` dimensions (and `rows` rows, if given), from
    its header and size, without reading the data."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found" + (f": {fix}" if fix else ""))
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, found = read(f)
            offset = f.tell()
    except (ValueError, EOFError, OSError) as e:
        raise DamagedArtifact(path, f"not a readable .npy file ({e})", fix) from e
    expected = offset + int(np.prod(shape, dtype=np.int64)) * found.itemsize
    size = path.stat().st_size
    if size != expected:
        raise DamagedArtifact(path, f"{size} bytes, but its header describes a {found} array of shape {shape} "
                                    f"({expected} bytes): it was truncated or half-written", fix)
    if found != np.dtype(dtype) or len(shape) != ndim:
        raise DamagedArtifact(path, f"holds a {len(shape)}-D {found} array {shape}, expected {ndim}-D "
                                    f"{np.dtype(dtype)}", fix)
    if rows is not None and shape[0] != rows:
        raise DamagedArtifact(path, f"has {shape[0]} rows but the dataset has {rows} training images: "
                                    "it is from another dataset or run", fix)
    return shape


def check_npz(path: str | Path, shapes: dict[str, tuple], fix: str | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes of a complete .npz holding `shapes`' arrays; in a wanted shape, None = any size and a
    name = the same size wherever that name appears (e.g. {"labels": ("n",), "distances": ("n",)})."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found" + (f": {fix}" if fix else ""))
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # every member's CRC: a truncated or overwritten file fails here
            if bad is not None:
                raise DamagedArtifact(path, f"member {bad} fails its checksum", fix)
        with np.load(path) as z:
            found = {name: z[name].shape for name in shapes if name in z.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise DamagedArtifact(path, f"not a readable .npz archive ({e})", fix) from e
    missing = sorted(set(shapes) - set(found))
    if missing:
        raise DamagedArtifact(path, f"lacks the arrays {missing}", fix)
    sizes: dict[str, int] = {}
    for name, want in shapes.items():
        got = found[name]
        ok = len(got) == len(want)
        for w, g in zip(want, got) if ok else ():
            if isinstance(w, int):
                ok = ok and w == g
            elif isinstance(w, str):
                ok = ok and sizes.setdefault(w, g) == g
        if not ok:
            raise DamagedArtifact(path, f"array {name!r} has shape {got}, expected {want}", fix)
    return found


# ---------------------------------------------------------------- parquet, JSON
def check_assignments(path: str | Path, image_ids: np.ndarray, fix: str | None = None) -> "pd.DataFrame":
    """An epoch's assignments.parquet, complete and listing exactly `image_ids` in that order."""
    import pandas as pd
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found" + (f": {fix}" if fix else ""))
    try:
        df = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DamagedArtifact(path, f"not a readable parquet file ({e})", fix) from e
    missing = sorted({"image_id", "cluster", "distance"} - set(df.columns))
    if missing:
        raise DamagedArtifact(path, f"lacks the columns {missing}", fix)
    listed = df["image_id"].to_numpy().astype(str)
    if len(df) != len(image_ids):
        raise DamagedArtifact(path, f"lists {len(df)} images, but the dataset has {len(image_ids)} training images: "
                                    "it is from another dataset or run", fix)
    if not np.array_equal(listed, image_ids):
        what = "in another order than" if set(listed) == set(image_ids) else "other images than"
        raise DamagedArtifact(path, f"lists the images {what} the dataset's training images: it is from another "
                                    "dataset or run", fix)
    return df


def check_json(path: str | Path) -> dict:
    """A stage report, metrics.json or run.json: complete JSON holding an object."""
    if not Path(path).exists():
        raise StageError(f"{path} not found")
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DamagedArtifact(path, f"holds a JSON {type(obj).__name__}, not an object")
    return obj


# ---------------------------------------------------------------- checkpoints
# The model settings that decide a network's layers: a checkpoint built with other values is another network.
ARCHITECTURE_KEYS = ("arch", "sobel", "width", "fc_dim")


def check_architecture(ckpt: dict, model: Model, in_channels: int, path: str | Path) -> None:
    """Refuse a checkpoint whose network is not the one this run's params.yaml describes."""
    stored = ckpt.get("model_params") or {}
    diff = [f"model.{k}: {stored.get(k)!r} in the checkpoint, {getattr(model, k)!r} in params"
            for k in ARCHITECTURE_KEYS if stored.get(k) != getattr(model, k)]
    if ckpt.get("in_channels") != in_channels:
        diff.append(f"input channels: {ckpt.get('in_channels')!r} in the checkpoint, {in_channels} in the dataset")
    if diff:
        raise DamagedArtifact(path, f"holds another network than this run's ({'; '.join(diff)}): it was not written "
                                    "by this run", "put this run's checkpoint back, or start over with --fresh")


# ---------------------------------------------------------------- large writes
def require_free_space(path: str | Path, needed: int) -> None:
    """Refuse a write of `needed` bytes beside `path` that the disk has no room for."""
    free = free_bytes(path)
    if needed > free:
        raise StageError(f"not enough disk space to write {path}: {needed:,} bytes needed, {free:,} bytes free on its "
                         "disk. Free some space (or lower the retention settings, extract.keep_features_every and "
                         "train.keep_checkpoint_every) and rerun: the run resumes at this stage")


def allocate_npy(path: str | Path, shape: tuple[int, ...], dtype: np.dtype | type = np.float32,
                 name: str | Path | None = None) -> np.memmap:
    """A writable .npy memmap at `path` whose blocks are reserved on disk up front; `name`: the
    file's final name, for the messages (`path` is usually atomic_path's temp file).

    np.lib.format.open_memmap makes a sparse file: on a full disk the first write to a page with no
    block behind it kills the process with SIGBUS. posix_fallocate reserves the blocks first, so a
    full disk is an OSError here, before any compute.
    """
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize + 128
    require_free_space(name or path, needed)
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            os.posix_fallocate(f.fileno(), 0, f.tell() + needed - 128)
    except OSError as e:
        raise write_refused(name or path, e, needed) from e
    return np.lib.format.open_memmap(path, mode="r+")


def nbytes(obj) -> int:
    """Bytes of tensor and array data in a nested state (a checkpoint's size, less its small overhead)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def train_rows(dataset: str | Path) -> int:
    """Training images in the dataset's manifest: the row count of every per-epoch array."""
    import pyarrow.parquet as pq

    split = pq.read_table(Path(dataset) / "manifest.parquet", columns=["split"]).column("split").to_numpy()
    return int((split == "train").sum())


def first_problem(checks: Iterable) -> StageError | None:
    """Run zero-argument checks in order; the first StageError one raises, or None."""
    for check in checks:
        try:
            check()
        except StageError as e:
            return e
    return None
