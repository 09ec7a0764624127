"""stages.core.data: batched random-resized-crop + flip, centre crop, normalisation, the canonical dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stages.core.data import (center_crop, intensity_jitter, iterate_batches, load_split, normalize,
                              random_resized_crop_flip)
from stages.core.errors import StageError


@pytest.fixture(scope="module")
def digit_batch(digits) -> torch.Tensor:
    """16 real digits, 8x8 upsampled to 28x28, as a float batch (B x 1 x 28 x 28)."""
    x = torch.from_numpy(digits[0][:16].reshape(-1, 1, 8, 8))
    return torch.nn.functional.interpolate(x, size=28, mode="bilinear", align_corners=False)


def test_output_shape(digit_batch):
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop_flip(digit_batch, 20, scale=(0.3, 1.0), generator=g)
    assert out.shape == (16, 1, 20, 20) and out.dtype == digit_batch.dtype
    rgb = torch.rand(3, 3, 32, 32)
    assert random_resized_crop_flip(rgb, 28, generator=g).shape == (3, 3, 28, 28)


def test_full_crop_without_flip_is_the_identity(digit_batch):
    out = random_resized_crop_flip(digit_batch, 28, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False,
                                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, digit_batch, atol=1e-4, rtol=1e-5)


def test_flips_mirror_about_half_of_the_images(digit_batch):
    batch = digit_batch.repeat(4, 1, 1, 1)  # 64 images
    out = random_resized_crop_flip(batch, 28, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True,
                                   generator=torch.Generator().manual_seed(0))
    same = [torch.allclose(o, x, atol=1e-4) for o, x in zip(out, batch)]
    mirrored = [torch.allclose(o, x.flip(-1), atol=1e-4) for o, x in zip(out, batch)]
    assert all(s or m for s, m in zip(same, mirrored))  # every output is the image or its mirror
    n_flipped = sum(m and not s for s, m in zip(same, mirrored))
    assert 16 <= n_flipped <= 48  # p = 0.5 over 64 images: 32 +- 4 sd, so this is > 4 sd wide


def test_crops_are_seeded_by_the_generator(digit_batch):
    a = random_resized_crop_flip(digit_batch, 20, generator=torch.Generator().manual_seed(1))
    b = random_resized_crop_flip(digit_batch, 20, generator=torch.Generator().manual_seed(1))
    c = random_resized_crop_flip(digit_batch, 20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def crop_boxes(height: int, width: int, n: int, size: int, scale: tuple[float, float]) -> torch.Tensor:
    """(left, top, w, h) in pixels of n crops of a height x width image, read off the crops themselves.

    The image's two channels are its column and row numbers: bilinear resampling keeps such ramps exact,
    so a crop's first and last output pixel (at w / size apart inside the box) give its position and size.
    """
    ramps = torch.stack([torch.arange(width * 1.0).expand(height, width),
                         torch.arange(height * 1.0)[:, None].expand(height, width)])
    out = random_resized_crop_flip(ramps.expand(n, 2, height, width), size, scale, hflip=False,
                                   generator=torch.Generator().manual_seed(0))
    first, last = out[:, :, 0, 0], torch.stack([out[:, 0, 0, -1], out[:, 1, -1, 0]], 1)
    wh = (last - first) / (1 - 1 / size)
    return torch.cat([first - 0.5 * wh / size + 0.5, wh], 1)


def test_batch_crops_are_whole_pixel_windows():
    box = crop_boxes(28, 28, 500, 8, (0.5, 1.0))
    torch.testing.assert_close(box, box.round(), atol=1e-4, rtol=0)  # torchvision's integer boxes
    assert box.round().unique(dim=0).shape[0] > 400  # and they vary
    # no try fits a 10 x 40 image: torchvision's fallback, the centred box clamped to ratio 4/3
    torch.testing.assert_close(crop_boxes(10, 40, 50, 8, (0.5, 1.0)), torch.tensor([[13.0, 0, 13, 10]]).expand(50, 4),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("height, width", [(28, 28), (24, 40)])
def test_batch_crops_fit_the_image_and_follow_torchvisions_distribution(height, width):
    """Clamping a draw that does not fit (the old way) put 32 % of 28 px crops at full width or height
    (torchvision: 15 %) and raised the mean area from 0.70 to 0.74: torchvision redraws instead."""
    from torchvision.transforms import RandomResizedCrop

    n = 20000
    left, top, w, h = crop_boxes(height, width, n, 8, (0.5, 1.0)).round().T
    assert left.min() >= 0 and top.min() >= 0 and (left + w).max() <= width and (top + h).max() <= height
    torch.manual_seed(0)
    tv = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, height, width), [0.5, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)], dtype=torch.float32)
    tv_h, tv_w = tv[:, 2], tv[:, 3]

    def full(w, h):
        return ((w == width) | (h == height)).float().mean().item()

    # p ~ 0.15-0.35 over 20,000 draws each: the difference's sd is below 0.005; the mean area's below 0.0015
    assert full(w, h) == pytest.approx(full(tv_w, tv_h), abs=0.02)
    assert (w * h).mean().item() / (height * width) == pytest.approx((tv_w * tv_h).mean().item() / (height * width),
                                                                       abs=0.006)


def test_intensity_jitter_scales_and_shifts_each_image_within_its_bounds():
    # Constant images make each image's factor and offset readable: a 1 becomes c + b, a 0 becomes b.
    ones, zeros = torch.ones(500, 1, 4, 4), torch.zeros(500, 1, 4, 4)
    b = intensity_jitter(zeros, 0.4, torch.Generator().manual_seed(3))[:, 0, 0, 0]
    cb = intensity_jitter(ones, 0.4, torch.Generator().manual_seed(3))[:, 0, 0, 0]
    c = cb - b
    assert b.min() >= -0.4 and b.max() <= 0.4 and c.min() >= 0.6 and c.max() <= 1.4
    assert b.std() > 0.15 and c.std() > 0.15  # U(-0.4, 0.4): sd 0.23, drawn per image
    x = torch.rand(500, 1, 4, 4)
    y = intensity_jitter(x, 0.4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(y, x * c.view(-1, 1, 1, 1) + b.view(-1, 1, 1, 1))  # one (c, b) per image
    assert intensity_jitter(x, 0.0, torch.Generator().manual_seed(3)) is x


def test_small_scale_crops_zoom_in():
    # A 32x32 image whose left half is 0 and right half 1: a full crop keeps the mean at 0.5;
    # crops of 1% of the area see (almost) only one half, so most of them are nearly uniform.
    x = torch.zeros(200, 1, 32, 32)
    x[..., 16:] = 1.0
    out = random_resized_crop_flip(x, 32, scale=(0.01, 0.01), ratio=(1.0, 1.0), hflip=False,
                                   generator=torch.Generator().manual_seed(0))
    spread = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert (spread < 0.5).float().mean() > 0.5


def test_center_crop_and_normalize():
    batch = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    crop = center_crop(batch, 4)
    assert torch.equal(crop, batch[..., 1:5, 1:5])
    with pytest.raises(StageError, match="crop size 7 is larger than the images"):
        center_crop(batch, 7)
    x = normalize(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8), [0.5], [0.25])
    torch.testing.assert_close(x, torch.full((1, 1, 2, 2), 2.0))  # (1 - 0.5) / 0.25


def test_load_split_and_batches_of_the_prepared_dataset(fashion_dataset):
    train = load_split(fashion_dataset, "train")
    test = load_split(fashion_dataset, "test")
    assert len(train) == 240 and len(test) == 40
    assert train.channels == 1 and train.image_size == 28 and train.has_labels
    assert set(train.ids) & set(test.ids) == set()
    order = np.array([5, 0, 239])
    (batch,) = list(iterate_batches(train, order, batch_size=8))
    assert batch.shape == (3, 1, 28, 28) and batch.dtype == torch.uint8
    assert torch.equal(batch[0, 0], torch.from_numpy(np.array(train.pixels[5, :, :, 0])))
    with pytest.raises(StageError, match="no dataset at"):
        load_split(fashion_dataset.parent / "missing", "train")


# ---------------------------------------------------------------- 16-bit and float images
def test_16_bit_png_decodes_to_the_top_byte_of_each_value(tmp_path):
    from PIL import Image

    from stages.core.data import decode_image

    v16 = np.random.default_rng(0).integers(0, 65536, (32, 32)).astype(np.uint16)
    Image.fromarray(v16).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode == "I;16"  # a real 16-bit PNG: PIL's convert("L") clips it to near-white
    expected = (v16 >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(str(tmp_path / "grey16.png"), 32, 1)[0].numpy(), expected)
    rgb = decode_image(str(tmp_path / "grey16.png"), 32, 3).numpy()
    assert all((rgb[c] == expected).all() for c in range(3))


def test_float_tiff_in_0_1_decodes_to_rounded_times_255(tmp_path):
    from PIL import Image

    from stages.core.data import decode_image

    f = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    f[0, :3] = [0.0, 1.0, 0.5]
    Image.fromarray(f).save(tmp_path / "float.tif")
    out = decode_image(str(tmp_path / "float.tif"), 32, 1)[0].numpy()
    np.testing.assert_array_equal(out, np.rint(f.astype(np.float64) * 255).astype(np.uint8))
    assert out[0, :3].tolist() == [0, 255, 128]  # before: convert("L") truncated all of [0, 1] to 0 or 1: black


@pytest.mark.parametrize("values, message", [
    (np.linspace(0, 300, 64, dtype=np.float32), r"float image with values in \[0, 300\]: only floats in \[0, 1\]"),
    (np.full(64, np.nan, dtype=np.float32), "float image with NaN or infinite values"),
    (np.linspace(0, 70000, 64).astype(np.int32), r"I image with values in \[0, 70000\]: only 8- and 16-bit"),
])
def test_images_with_no_8_bit_meaning_are_refused(tmp_path, values, message):
    from PIL import Image

    from stages.core.data import decode_image

    Image.fromarray(values.reshape(8, 8)).save(tmp_path / "odd.tif")
    with pytest.raises(StageError, match=message):
        decode_image(str(tmp_path / "odd.tif"), 8, 1)


def test_8_bit_images_are_unchanged(tmp_path):
    from PIL import Image
    from skimage import data as skdata

    from stages.core.data import decode_image

    camera = skdata.camera()[:64, :64]
    Image.fromarray(camera).save(tmp_path / "camera.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "camera.png"), 64, 1)[0].numpy(), camera)


# ---------------------------------------------------------------- the training and centre views
def file_set(paths: list, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
    """An image tree's train split as load_split returns it, without prepare (mean 0, std 1: x = pixels / 255)."""
    from stages.core.data import ImageSet

    meta = {"kind": "files", "channels": 3, "image_size": 32, "mean": list(mean), "std": list(std)}
    n = len(paths)
    return ImageSet(Path("."), meta, np.array([str(i) for i in range(n)]), np.full(n, -1), None, [str(p) for p in paths])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """Six real photographs (scikit-image) of different sizes and aspect ratios, as JPEG and PNG files."""
    from PIL import Image
    from skimage import data as skdata

    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, img in enumerate([skdata.chelsea(), skdata.astronaut()[::2, ::3], skdata.coffee()[::3, ::2],
                             skdata.rocket(), skdata.camera()[::4, ::2], skdata.coins()]):
        paths.append(root / f"{i}.{'jpg' if i % 2 else 'png'}")
        Image.fromarray(img).save(paths[-1])
    return paths


def marked_image(path) -> None:
    """300 x 100, grey, with a red patch in its left 40 columns: outside the central 100 x 100 square."""
    from PIL import Image

    a = np.full((100, 300, 3), 100, dtype=np.uint8)
    a[30:70, 5:40] = (255, 0, 0)
    Image.fromarray(a).save(path)


def red(x: torch.Tensor) -> torch.Tensor:
    """Per image: does it hold marker pixels (red well above green)?"""
    return ((x[:, 0] - x[:, 1]) > 0.5).flatten(1).any(1)


def test_training_crops_come_from_the_original_image_and_the_centre_view_does_not(tmp_path):
    from stages.core.data import extract_batches, train_batches

    marked_image(tmp_path / "wide.png")
    images = file_set([tmp_path / "wide.png"])
    cpu = torch.device("cpu")
    (crops,) = train_batches(images, np.zeros(40, dtype=np.int64), 40, crop_size=32, scale=(0.08, 1.0), hflip=True,
                             device=cpu, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (40, 3, 32, 32)
    # Before, crops were taken from the centre-cropped 100 x 100 square, which the marker is outside of.
    assert red(crops).any()
    (centre,) = extract_batches(images, np.zeros(1, dtype=np.int64), 32, 8, cpu)
    assert centre.shape == (1, 3, 32, 32) and not red(centre).any()


def test_centre_view_is_resize_then_centre_crop():
    from stages.core.data import centre_box

    # 224: the paper's resize 256, crop 224 of a 500 x 375 image keeps the middle 375 * 224/256 = 328.125 px
    assert centre_box(500, 375, 224) == pytest.approx((250 - 164.0625, 187.5 - 164.0625, 250 + 164.0625,
                                                       187.5 + 164.0625))
    left, top, right, bottom = centre_box(100, 300, 28)  # round(28 * 256/224) = 32: 28/32 of the short side
    assert (right - left, bottom - top) == pytest.approx((87.5, 87.5)) and left + right == pytest.approx(100)


def test_crop_box_lies_inside_the_image_within_the_scale_and_ratio():
    from stages.core.data import crop_box

    rng = np.random.default_rng(0)
    for w, h in [(500, 375), (300, 100), (40, 400), (7, 5)]:
        for _ in range(50):
            left, top, right, bottom = crop_box(w, h, (0.08, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
    # a 40 x 400 image cannot hold a crop of ratio >= 3/4 covering >= 50 % of it: the fallback, a centre
    # crop clamped to the ratio range
    assert crop_box(40, 400, (0.5, 1.0), (3 / 4, 4 / 3), rng) == (0, 173, 40, 173 + 53)


def test_training_crops_are_seeded_per_image_and_independent_of_num_workers(photos):
    from stages.core.data import train_batches

    images = file_set(photos)
    rows = np.random.default_rng(0).integers(0, len(photos), 14)

    def epoch(workers: int, seed: int) -> list:
        return list(train_batches(images, rows, 4, crop_size=24, scale=(0.08, 1.0), hflip=True,
                                  device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed),
                                  num_workers=workers))

    in_process, two_workers = epoch(0, 1), epoch(2, 1)
    assert [b.shape[0] for b in in_process] == [4, 4, 4, 2]
    for a, b in zip(in_process, two_workers, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(torch.cat(epoch(0, 2)), torch.cat(in_process))  # another epoch, other crops


def test_array_batches_are_the_batched_transforms_of_before(fashion_dataset):
    from stages.core.data import extract_batches, train_batches

    images = load_split(fashion_dataset, "train")
    rows = np.random.default_rng(0).integers(0, len(images), 150)
    cpu = torch.device("cpu")
    g_new, g_old = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    new = list(train_batches(images, rows, 64, crop_size=24, scale=(0.5, 1.0), hflip=True, device=cpu,
                             generator=g_new, num_workers="auto"))
    mean, std = images.meta["mean"], images.meta["std"]
    old = [random_resized_crop_flip(normalize(b, mean, std), 24, (0.5, 1.0), hflip=True, generator=g_old)
           for b in iterate_batches(images, rows, 64)]
    assert len(new) == len(old) == 3 and all(torch.equal(a, b) for a, b in zip(new, old))
    assert torch.equal(g_new.get_state(), g_old.get_state())  # the generator moves on as before
    order = np.arange(len(images))
    new = list(extract_batches(images, order, 24, 100, cpu, num_workers="auto"))
    old = [normalize(center_crop(b, 24), mean, std) for b in iterate_batches(images, order, 100)]
    assert all(torch.equal(a, b) for a, b in zip(new, old, strict=True))


def test_auto_workers_are_the_usable_cores_for_files_and_none_for_arrays(fashion_dataset, photos, monkeypatch):
    import os

    from stages.core.data import loader_workers

    files, arrays = file_set(photos), load_split(fashion_dataset, "train")
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers("auto", files) == cores and loader_workers(3, files) == 3 and loader_workers(0, files) == 0
    assert loader_workers("auto", arrays) == 0 and loader_workers(4, arrays) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more ranks than cores: still one each
    assert loader_workers("auto", files) == 1


def test_a_file_that_does_not_decode_is_a_mean_colour_image_named_on_stderr(tmp_path, photos, capsys):
    """A truncated JPEG passes prepare's header check; hours into a run it must not end the run."""
    from stages.core.data import extract_batches, train_batches

    whole = (tmp_path / "whole.jpg")
    whole.write_bytes(photos[1].read_bytes())
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[:2000])
    mean = (0.2, 0.4, 0.6)
    images = file_set([whole, cut], mean=mean, std=(0.5, 0.5, 0.5))
    cpu = torch.device("cpu")
    (x,) = extract_batches(images, np.array([0, 1, 0]), 16, 8, cpu)
    (y,) = train_batches(images, np.array([1, 0]), 8, crop_size=16, scale=(0.08, 1.0), hflip=True, device=cpu,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[0], x[2]) and x[0].abs().sum() > 0
    fill = [(round(255 * m) / 255 - m) / 0.5 for m in mean]  # the mean colour, rounded to 8 bits, normalised
    for blank in (x[1], y[0]):
        torch.testing.assert_close(blank, torch.tensor(fill).view(3, 1, 1).expand(3, 16, 16))
    err = capsys.readouterr().err
    assert err.count(f"cannot decode {cut}") == 2 and "1 of 3 images could not be decoded" in err


def test_decode_gpu_gives_the_views_of_the_workers_decoding(photos, tmp_path):
    """decode: gpu runs torchvision.io.decode_jpeg + roi_align on the device; on a CPU (here) the same code
    with libjpeg: the same crops and flips as PIL's, resampled a little differently. On CUDA: make gpu-check."""
    from stages.core.data import _FileViews, decode_on_device, extract_batches

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(photos[1].read_bytes()[:2000])
    paths = [str(p) for p in photos] + [str(cut)]  # JPEGs, PNGs (decoded in the worker) and a damaged JPEG
    rows = np.array([1, 0, 3, 5, 2, 6, 4])
    for seed in (None, 7):
        raw = _FileViews(paths, rows, 3, 48, [10, 20, 30], seed, (0.08, 1.0), True, raw_jpegs=True)
        items = [raw[j] for j in range(len(rows))]
        assert [("jpeg" in item) for item in items] == [True, False, True, True, False, True, False]
        got, errors = decode_on_device(items, 48, 3, [10, 20, 30], torch.device("cpu"))
        want = torch.stack([raw.decoded(j)[0] for j in range(len(rows))])
        assert [bool(e) for e in errors] == [False] * 5 + [True, False]
        diff = (got.float() - want.float()).abs().mean(dim=(1, 2, 3))
        mirrored = (got.float() - want.float().flip(-1)).abs().mean(dim=(1, 2, 3))
        # of 255: the same view (PIL's DCT-scaled draft and resampling differ by a few levels); the view
        # 2 px to the side differs by 8-40 on these photographs, its mirror image by 16-80
        assert (diff < 8).all() and (diff < mirrored / 2)[:5].all(), (diff, mirrored)
        assert torch.equal(got[5], torch.tensor([10, 20, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 48, 48))
    with pytest.raises(StageError, match="decode: gpu decodes JPEGs with nvJPEG on a CUDA device"):
        next(extract_batches(file_set(photos), rows[:2], 48, 2, torch.device("cpu"), decode="gpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check runs it)")
def test_decode_gpu_on_cuda_gives_the_workers_views(photos):
    from stages.core.data import extract_batches, train_batches

    images, cuda = file_set(photos), torch.device("cuda")
    rows = np.array([1, 0, 3, 5, 2, 4, 1])
    for decode in ("cpu", "gpu"):
        centre = torch.cat(list(extract_batches(images, rows, 64, 4, cuda, num_workers=2, decode=decode)))
        crops = torch.cat(list(train_batches(images, rows, 4, crop_size=64, scale=(0.08, 1.0), hflip=True, device=cuda,
                                             generator=torch.Generator().manual_seed(0), num_workers=2, decode=decode)))
        if decode == "cpu":
            want = (centre, crops)
    for got, expected in zip((centre, crops), want):
        assert got.device.type == "cuda" and got.shape == expected.shape == (7, 3, 64, 64)
        assert ((got - expected).abs().mean(dim=(1, 2, 3)) * 255 < 8).all()  # file_set: x = pixels / 255
