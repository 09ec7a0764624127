"""The canonical dataset written by `prepare` and read by every other stage.

Layout of a dataset directory:
  manifest.parquet  image_id, split, label (nullable), source, path, width, height (image trees only)
  pixels.npy        uint8 N x H x W x C, row i = manifest row i (small datasets only)
  dataset.json      kind ("array" | "files"), image_size, channels, classes, mean, std, counts

The stages read batches through two functions, one per view of an image:
  extract_batches  the centre view (extract, probes): no randomness
  train_batches    the training view: RandomResizedCrop + flip, seeded per epoch
Both yield normalised float batches on the device. In-memory arrays (kind "array") are sliced and
transformed a whole batch at a time in the main process; image trees (kind "files") are decoded once
per image per pass in DataLoader workers, which also crop; the uint8 crops travel to a GPU (a quarter
of the bytes of floats) and are normalised there in one batched op (on a CPU, in the workers).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from stages.core.artifacts import check_npy
from stages.core.errors import DamagedArtifact, StageError
from stages.core.io import read_json

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


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float grey images scaled to 8 bits; other images as they are.

    PIL's convert("L") clips instead of scaling: a 16-bit PNG comes out near-white, a float TIFF in
    [0, 1] black. 16-bit values keep their top byte (v >> 8); floats must lie in [0, 1] (the usual
    convention) and are rounded from v * 255. Anything else has no 8-bit meaning and is refused.
    """
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


def open_8bit(path: str, channels: int, short_side: int | None = None) -> Image.Image:
    """The decoded file as an 8-bit grey (channels 1) or RGB image, at its own size; with `short_side`,
    a JPEG may decode at 1/2, 1/4 or 1/8 scale (DCT scaling) when that still leaves short_side pixels."""
    with Image.open(path) as im:
        if short_side is not None:
            ratio = short_side / min(im.size)
            im.draft(None, (math.ceil(im.width * ratio), math.ceil(im.height * ratio)))
        return to_8bit(im).convert("L" if channels == 1 else "RGB")


def centred_square(width: int, height: int, side: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the square of `side` in the middle of a width x height image."""
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """File -> uint8 C x size x size: the short side resized to `size`, centre crop (prepare.image_size's
    square, which the pictures show and prepare measures the channel mean/std on)."""
    im = open_8bit(path, channels)
    # one PIL resampling of the centred square: resize + crop in one step (as _FileViews)
    return pil_to_tensor(im.resize((size, size), Image.BILINEAR, box=centred_square(im.width, im.height, min(im.size))))


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """uint8 C x H x W. Through numpy, not torchvision: importing torchvision takes seconds per process."""
    pixels = np.array(im)
    return torch.from_numpy(pixels.reshape(*pixels.shape[:2], -1)).permute(2, 0, 1).contiguous()


def iterate_batches(images: ImageSet, order: np.ndarray, batch_size: int, num_workers: int = 0):
    """Yield uint8 batches (B x C x H x W) of the images at `order`, in that order."""
    if images.pixels is not None:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = np.asarray(images.pixels[idx])
            yield torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return
    files = _FileImages(images.paths, images.image_size, images.channels)
    yield from torch.utils.data.DataLoader(torch.utils.data.Subset(files, order.tolist()), batch_size=batch_size,
                                           shuffle=False, num_workers=num_workers, persistent_workers=False)


# ---------------------------------------------------------------- the views the stages train and extract on
# The centre view resizes the short side to round(crop_size * 256/224), then centre-crops crop_size: the paper's
# (and AlexNet's) resize-256 + centre-crop-224 at 224, the same proportions at any other size.
RESIZE_PER_CROP = 256 / 224
# RandomResizedCrop's aspect-ratio range (torchvision's and the paper's); the array path's default too.
CROP_RATIO = (3 / 4, 4 / 3)
# Batches each worker decodes ahead: torch's default. At 256 x 3 x 224 x 224 uint8 a batch is 38 MB, so
# 2 per worker keeps 16 workers' queue near 1.2 GB (pinned, on CUDA) while hiding one batch's decoding
# (4x that on a CPU, where the workers send normalised floats).
PREFETCH_FACTOR = 2


def loader_workers(setting: int | str, images: ImageSet) -> int:
    """DataLoader worker processes for a `num_workers` setting; 0 = decode in this process.

    auto: none for in-memory arrays (slicing a memmap is faster than any inter-process copy), else the
    cores this process may run on, shared among the processes torchrun starts on this machine
    (LOCAL_WORLD_SIZE), so that one rank per GPU does not oversubscribe the CPUs.
    """
    if images.pixels is not None:
        return 0
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def centre_box(width: int, height: int, crop_size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of the region of a width x height image that the centre view keeps.

    Resizing the short side to round(crop_size * RESIZE_PER_CROP) and cropping crop_size from the middle
    keeps the centred square of side short * crop_size / that; resampling this box straight to crop_size
    is the same view in one resampling instead of two.
    """
    return centred_square(width, height, min(width, height) * crop_size / round(crop_size * RESIZE_PER_CROP))


def crop_sizes(width: int, height: int, area: np.ndarray, aspect: np.ndarray,
               ratio: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel width and height of RandomResizedCrops of a width x height image, and whether each fitted.

    torchvision's RandomResizedCrop.get_params, vectorised: row i of `area` (fractions of the image) and
    `aspect` holds crop i's tries; it takes the first try that fits in the image, else the whole image
    clamped to `ratio`, which the caller centres. Clamping a try that does not fit instead would pile
    crops up at full width or height, shifting the area and ratio distribution.
    """
    w = np.round(np.sqrt(width * height * area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(width * height * area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)[:, None]  # 0 where no try fits: replaced by the fallback below
    w, h, fitted = (np.take_along_axis(a, first, axis=1)[:, 0] for a in (w, h, fits))
    if width / height < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif width / height > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    return np.where(fitted, w, fw), np.where(fitted, h, fh), fitted


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a RandomResizedCrop of a width x height image, drawn from `rng`:
    crop_sizes' ten tries, a random position if one fitted, else centred. A numpy Generator instead of
    torch's global RNG, so that each image's crop has its own seed.
    """
    area = rng.uniform(scale[0], scale[1], (1, 10))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (1, 10)))
    (w,), (h,), (fitted,) = crop_sizes(width, height, area, aspect, ratio)
    if fitted:
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    else:
        left, top = (width - w) // 2, (height - h) // 2
    return int(left), int(top), int(left + w), int(top + h)


def sample_rng(seed: int, position: int) -> np.random.Generator:
    """The augmentation RNG of the image at `position` in an epoch's sample: a function of the two
    alone, so crops do not depend on which worker (or how many) decodes the image."""
    return np.random.default_rng([seed, position])


class _FileViews(torch.utils.data.Dataset):
    """Item j: the image at paths[rows[j]], decoded once, as a uint8 C x crop x crop view.

    Training view (seed given): a RandomResizedCrop of the ORIGINAL image (as the paper: a crop of
    8 % of a photograph, not of an already centre-cropped square) and a flip, from sample_rng(seed, j).
    Centre view (seed None): centre_box. A file that cannot be decoded here (a truncated JPEG passes
    prepare's header check; a file changed since prepare) must not end a run hours in: the item is
    the dataset's mean colour (0 after normalisation) and its error, which the main process reports.
    """

    def __init__(self, paths: list[str], rows: np.ndarray, channels: int, crop_size: int, fill: list[int],
                 seed: int | None = None, scale: tuple[float, float] = (0.08, 1.0), hflip: bool = True,
                 raw_jpegs: bool = False):
        self.paths, self.rows, self.channels, self.crop_size = paths, rows, channels, crop_size
        self.fill, self.seed, self.scale, self.hflip = fill, seed, scale, hflip
        self.raw_jpegs = raw_jpegs  # decode: gpu: JPEGs leave the worker undecoded (see decode_on_device)
        self.norm: tuple[list[float], list[float]] | None = None  # (mean, std): normalise in the worker

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, str] | dict:
        return self.raw_item(j) if self.raw_jpegs else self.decoded(j)

    def decoded(self, j: int) -> tuple[torch.Tensor, str]:
        try:
            pixels, error = pil_to_tensor(self.view(self.paths[self.rows[j]], j)), ""
        except Exception as e:  # PIL raises many types for damaged files
            blank = torch.tensor(self.fill, dtype=torch.uint8).view(-1, 1, 1)
            pixels, error = blank.expand(-1, self.crop_size, self.crop_size).clone(), f"{type(e).__name__}: {e}"
        return (pixels if self.norm is None else normalize(pixels[None], *self.norm)[0]), error

    def geometry(self, width: int, height: int, j: int) -> tuple[tuple[float, float, float, float], bool]:
        """The view's box in the image and whether to mirror it (the same draws in either decode mode)."""
        if self.seed is None:
            return centre_box(width, height, self.crop_size), False
        rng = sample_rng(self.seed, j)
        box = crop_box(width, height, self.scale, CROP_RATIO, rng)
        return box, bool(self.hflip and rng.random() < 0.5)

    def raw_item(self, j: int) -> dict:
        """decode: gpu: a JPEG's bytes, its view's box and flip (from its header); other files decoded here."""
        path = self.paths[self.rows[j]]
        try:
            with Image.open(path) as im:
                if im.format == "JPEG" and im.mode in ("L", "RGB"):
                    box, flip = self.geometry(im.width, im.height, j)
                    return {"jpeg": torch.from_numpy(np.fromfile(path, dtype=np.uint8)), "box": box, "flip": flip}
        except Exception:  # reported by the decoding below
            pass
        pixels, error = self.decoded(j)
        return {"pixels": pixels, "error": error}

    def view(self, path: str, j: int) -> Image.Image:
        size = (self.crop_size, self.crop_size)
        if self.seed is None:  # the centre view needs no more than its resized short side
            im = open_8bit(path, self.channels, short_side=round(self.crop_size * RESIZE_PER_CROP))
            return im.resize(size, Image.BILINEAR, box=centre_box(im.width, im.height, self.crop_size))
        im = open_8bit(path, self.channels)
        box, flip = self.geometry(im.width, im.height, j)
        out = im.resize(size, Image.BILINEAR, box=box)
        return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def decode_on_device(items: list[dict], crop_size: int, channels: int, fill: list[int],
                     device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """decode: gpu: a batch of raw_item()s -> uint8 B x C x crop x crop on `device`, and each item's error.

    JPEGs are decoded by torchvision.io.decode_jpeg on the device (nvJPEG on CUDA; libjpeg on a CPU, which
    only the tests use) and their box resampled by roi_align with adaptive sampling (bilinear samples
    averaged over each output pixel: antialiased like PIL's resize, not bit-equal to it). torchvision 0.29
    deprecates its decoders for TorchCodec's: move when this option has been measured on a GPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.ops import roi_align

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out = torch.empty(len(items), channels, crop_size, crop_size, dtype=torch.uint8, device=device)
    errors = [item.get("error", "") for item in items]
    jpegs = [k for k, item in enumerate(items) if "jpeg" in item]
    try:
        decoded = decode_jpeg([items[k]["jpeg"] for k in jpegs], mode=mode, device=device) if jpegs else []
    except RuntimeError:  # one damaged file fails the whole call: decode one by one to find it
        decoded = []
        for k in jpegs:
            try:
                decoded.append(decode_jpeg(items[k]["jpeg"], mode=mode, device=device))
            except RuntimeError as e:
                decoded.append(None)
                errors[k] = f"{type(e).__name__}: {e}"
    for k, img in zip(jpegs, decoded):
        if img is None:
            out[k] = torch.tensor(fill, dtype=torch.uint8, device=device).view(-1, 1, 1)
            continue
        box = torch.tensor([[0.0, *items[k]["box"]]], dtype=torch.float32, device=device)
        view = roi_align(img[None].float(), box, crop_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)[0]
        out[k] = (view.flip(-1) if items[k]["flip"] else view).round_().clamp_(0, 255).to(torch.uint8)
    for k, item in enumerate(items):
        if "pixels" in item:
            out[k] = item["pixels"].to(device)
    return out, errors


def _file_batches(images: ImageSet, rows: np.ndarray, crop_size: int, batch_size: int, num_workers: int | str,
                  device: torch.device, decode: str, **view):
    """Normalised batches on `device` of the _FileViews (`view`: the training view's seed, scale and hflip) of
    the images at `rows`; undecodable files reported on stderr as they come. decode: gpu -> JPEGs decoded on
    the device; cpu -> by PIL in the workers."""
    if decode == "gpu" and device.type != "cuda":
        raise StageError(f"decode: gpu decodes JPEGs with nvJPEG on a CUDA device, but this stage runs on "
                         f"{device}: set decode: cpu (or device: cuda)")
    dataset = _FileViews(images.paths, np.asarray(rows), images.channels, crop_size,
                         [round(255 * m) for m in images.meta["mean"]], raw_jpegs=decode == "gpu", **view)
    workers = loader_workers(num_workers, images)
    extra = {"prefetch_factor": PREFETCH_FACTOR} if workers > 0 else {}
    # One loader per pass: its workers start once and decode the whole pass (persistent within it).
    if dataset.raw_jpegs:
        extra["collate_fn"] = list  # bytes of different lengths: decode_on_device takes the list
    mean, std = images.meta["mean"], images.meta["std"]
    # On a CPU the workers normalise (the same ops per image, so the same numbers) and the main process, which
    # runs the network on the same cores, does not; a GPU gets uint8 (a quarter of the bytes) and normalises.
    dataset.norm = (mean, std) if device.type == "cpu" and workers > 0 else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda", **extra)
    bad = 0
    for b, batch in enumerate(loader):
        if dataset.raw_jpegs:
            batch, errors = decode_on_device(batch, dataset.crop_size, dataset.channels, dataset.fill, device)
        else:
            batch, errors = batch
        for k, error in enumerate(errors):
            if error:
                bad += 1
                path = images.paths[dataset.rows[b * batch_size + k]]
                print(f"data: cannot decode {path} ({error}); it is used as a mean-colour image this pass",
                      file=sys.stderr)
        yield batch.to(device, non_blocking=True) if dataset.norm else normalize(batch.to(device, non_blocking=True),
                                                                                 mean, std)
    if bad:
        print(f"data: {bad} of {len(dataset)} images could not be decoded this pass (remove them and rerun "
              "prepare)", file=sys.stderr)


def extract_batches(images: ImageSet, order: np.ndarray, crop_size: int, batch_size: int, device: torch.device,
                    num_workers: int | str = 0, decode: str = "cpu"):
    """Normalised float batches (B x C x crop x crop, on `device`) of the centre view of the images at `order`."""
    if images.pixels is None:
        yield from _file_batches(images, order, crop_size, batch_size, num_workers, device, decode)
        return
    mean, std = images.meta["mean"], images.meta["std"]
    for batch in iterate_batches(images, order, batch_size):
        yield normalize(center_crop(batch, crop_size).to(device, non_blocking=True), mean, std)


def train_batches(images: ImageSet, rows: np.ndarray, batch_size: int, *, crop_size: int,
                  scale: tuple[float, float], hflip: bool, device: torch.device, generator: torch.Generator,
                  num_workers: int | str = 0, decode: str = "cpu"):
    """Normalised float batches (B x C x crop x crop, on `device`) of random resized crops of the images
    at `rows`, in that order; every draw comes from `generator` (seeded per epoch).

    Arrays: random_resized_crop_flip on each whole batch, on the device. Files: one seed is drawn from
    `generator` for the pass and each image's crop from sample_rng(seed, its position in `rows`), in the
    workers, so a pass's batches are the same with any num_workers. decode: gpu (image trees, CUDA):
    JPEGs are decoded on the device instead (decode_on_device), with the same crops and flips.
    """
    if images.pixels is None:
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        yield from _file_batches(images, rows, crop_size, batch_size, num_workers, device, decode, seed=seed,
                                 scale=tuple(scale), hflip=hflip)
        return
    mean, std = images.meta["mean"], images.meta["std"]
    for batch in iterate_batches(images, rows, batch_size):
        x = normalize(batch.to(device, non_blocking=True), mean, std)
        yield random_resized_crop_flip(x, crop_size, tuple(scale), hflip=hflip, generator=generator)


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


def intensity_jitter(batch: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image contrast and brightness jitter of a normalised batch: x * c + b, c ~ U(1 - s, 1 + s),
    b ~ U(-s, s) (in units of the data set's std). The grey-image counterpart of the paper's colour
    augmentations, which its Sobel input makes moot: without it, images of one class shot darker or
    with less contrast can form their own clusters, and the network learns to tell them apart.
    """
    if strength <= 0:
        return batch
    n = batch.shape[0]
    c = torch.empty(n).uniform_(1 - strength, 1 + strength, generator=generator)
    b = torch.empty(n).uniform_(-strength, strength, generator=generator)
    shape = (n,) + (1,) * (batch.dim() - 1)
    return batch * c.view(shape).to(batch.device, batch.dtype) + b.view(shape).to(batch.device, batch.dtype)


def random_resized_crop_flip(batch: torch.Tensor, size: int, scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = CROP_RATIO, hflip: bool = True,
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for a whole float batch at once, one crop per image.

    Per-image torchvision transforms are a Python call per image; one affine_grid/grid_sample call
    does the same sampling for the whole batch (and runs on the GPU when the batch is there).
    """
    n, (height, width), dev = batch.shape[0], batch.shape[-2:], batch.device
    area = torch.empty(n, 10).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w, h, fitted = (torch.from_numpy(a) for a in crop_sizes(width, height, area.double().numpy(),
                                                            log_r.double().exp().numpy(), ratio))
    # top-left corner: uniform over the positions inside the image, as torchvision's; the fallback centred
    corner = torch.rand(n, 2, generator=generator)
    left = torch.where(fitted, (corner[:, 0] * (width - w + 1)).floor(), (width - w) // 2)
    top = torch.where(fitted, (corner[:, 1] * (height - h + 1)).floor(), (height - h) // 2)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(n)
    # affine_grid (align_corners=False) puts the image's edges at -1 and 1: the box's half-size is the
    # fraction of the image it covers, its centre (2 * left + w) / width - 1
    w, h = w / width, h / height
    cx, cy = 2 * left / width + w - 1, 2 * top / height + h - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta.to(dev, batch.dtype), [n, batch.shape[1], size, size], align_corners=False)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
