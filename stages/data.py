"""The canonical dataset written by `prepare` and read by every other stage.

Layout of a dataset directory:
  manifest.parquet  image_id, split, label (nullable), source, path (image trees only)
  pixels.npy        uint8 N x H x W x C, row i = manifest row i (small datasets only)
  dataset.json      kind ("array" | "files"), image_size, channels, classes, mean, std, counts
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from stages.artifacts import check_npy
from stages.common import DamagedArtifact, StageError, read_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class ImageSet:
    """One split of a canonical dataset: ids, labels (-1 = unknown) and a way to read pixels."""

    root: Path
    meta: dict
    ids: np.ndarray
    labels: np.ndarray
    pixels: np.ndarray | None  # memmap of this split's rows (kind == "array")
    paths: list[str] | None  # absolute file paths (kind == "files")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).all()) and len(self.labels) > 0


RERUN_PREPARE = "rerun `python -m stages.prepare` (or `dvc repro prepare`)"


def load_split(root: str | Path, split: str = "train") -> ImageSet:
    root = Path(root)
    if not (root / "manifest.parquet").exists():
        raise StageError(f"no dataset at {root}: run `python -m stages.prepare` (or `dvc repro prepare`) first")
    meta = read_json(root / "dataset.json")
    try:
        manifest = pd.read_parquet(root / "manifest.parquet")
    except Exception as e:  # Arrow raises several types for a damaged file
        raise DamagedArtifact(root / "manifest.parquet", f"not a readable parquet file ({e})", RERUN_PREPARE) from e
    rows = np.flatnonzero(manifest["split"].to_numpy() == split)
    if len(rows) == 0:
        raise StageError(f"dataset {root} has no images in split {split!r} (splits: {sorted(manifest['split'].unique())})")
    part = manifest.iloc[rows]
    labels = part["label"].fillna(-1).to_numpy().astype(np.int64)
    pixels = paths = None
    if meta["kind"] == "array":
        shape = check_npy(root / "pixels.npy", rows=len(manifest), dtype=np.uint8, ndim=4, fix=RERUN_PREPARE)
        size, channels = int(meta["image_size"]), int(meta["channels"])
        if shape[1:] != (size, size, channels):
            raise DamagedArtifact(root / "pixels.npy", f"holds {shape[1]}x{shape[2]} images with {shape[3]} channels, "
                                  f"but dataset.json says {size}x{size} with {channels}", RERUN_PREPARE)
        all_pixels = np.load(root / "pixels.npy", mmap_mode="r")
        # splits are written contiguously, so a slice keeps this a memmap instead of a copy
        if not np.array_equal(rows, np.arange(rows[0], rows[-1] + 1)):
            raise StageError(f"{root}/manifest.parquet: split {split!r} rows are not contiguous; re-run prepare")
        pixels = all_pixels[rows[0] : rows[-1] + 1]
    else:
        paths = part["path"].tolist()
    return ImageSet(root, meta, part["image_id"].to_numpy().astype(str), labels, pixels, paths)


# ---------------------------------------------------------------- reading pixels
class _FileImages(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int, channels: int):
        self.paths, self.size, self.channels = paths, size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_image(self.paths[i], self.size, self.channels)


def to_8bit(im: "PIL.Image.Image") -> "PIL.Image.Image":
    """16-bit and float grey images scaled to 8 bits; other images as they are.

    PIL's convert("L") clips instead of scaling: a 16-bit PNG comes out near-white, a float TIFF in
    [0, 1] black. 16-bit values keep their top byte (v >> 8); floats must lie in [0, 1] (the usual
    convention) and are rounded from v * 255. Anything else has no 8-bit meaning and is refused.
    """
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        v = np.asarray(im).astype(np.int64)
        if v.size and (v.min() < 0 or v.max() > 65535):
            raise StageError(f"{im.mode} image with values in [{v.min()}, {v.max()}]: only 8- and 16-bit integer "
                             "images can be scaled to 8 bits; convert it to an 8- or 16-bit image")
        return Image.fromarray((v >> 8).astype(np.uint8), "L")
    if im.mode == "F":
        v = np.asarray(im, dtype=np.float64)
        if not np.isfinite(v).all():
            raise StageError("float image with NaN or infinite values: they have no 8-bit value; fix or remove it")
        if v.size and (v.min() < 0.0 or v.max() > 1.0):
            raise StageError(f"float image with values in [{v.min():g}, {v.max():g}]: only floats in [0, 1] can be "
                             "scaled to 8 bits; rescale it, or save it as an 8- or 16-bit image")
        return Image.fromarray(np.rint(v * 255.0).astype(np.uint8), "L")
    return im


def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """File -> uint8 C x size x size: resize the short side to `size`, centre crop."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    with Image.open(path) as im:
        im = to_8bit(im).convert("L" if channels == 1 else "RGB")
        t = TF.pil_to_tensor(im)
    t = TF.resize(t, size, antialias=True)
    return TF.center_crop(t, [size, size])


def iterate_batches(images: ImageSet, order: np.ndarray, batch_size: int, num_workers: int = 0):
    """Yield uint8 batches (B x C x H x W) of the images at `order`, in that order."""
    if images.pixels is not None:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = np.asarray(images.pixels[idx])
            yield torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_FileImages(images.paths, images.image_size, images.channels), order.tolist()),
        batch_size=batch_size, shuffle=False, num_workers=num_workers, persistent_workers=False,
    )
    yield from loader


# ---------------------------------------------------------------- tensor transforms
def normalize(batch: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    x = batch.float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    h, w = batch.shape[-2:]
    if size > min(h, w):
        raise StageError(f"crop size {size} is larger than the images ({h}x{w}): lower extract.crop_size")
    top, left = (h - size) // 2, (w - size) // 2
    return batch[..., top : top + size, left : left + size]


def random_resized_crop_flip(
    batch: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for a whole float batch at once, one crop per image.

    Per-image torchvision transforms are a Python call per image; one affine_grid/grid_sample call
    does the same sampling for the whole batch (and runs on the GPU when the batch is there).
    """
    n = batch.shape[0]
    dev = batch.device
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n).uniform_(float(np.log(ratio[0])), float(np.log(ratio[1])), generator=generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # fraction of width covered by the crop
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(dev, batch.dtype), [n, batch.shape[1], size, size], align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
