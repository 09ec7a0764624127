"""stages.data: batched random-resized-crop + flip, centre crop, normalisation, the canonical dataset."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.common import StageError
from stages.data import center_crop, iterate_batches, load_split, normalize, random_resized_crop_flip


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

    from stages.data import decode_image

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

    from stages.data import decode_image

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

    from stages.data import decode_image

    Image.fromarray(values.reshape(8, 8)).save(tmp_path / "odd.tif")
    with pytest.raises(StageError, match=message):
        decode_image(str(tmp_path / "odd.tif"), 8, 1)


def test_8_bit_images_are_unchanged(tmp_path):
    from PIL import Image
    from skimage import data as skdata

    from stages.data import decode_image

    camera = skdata.camera()[:64, :64]
    Image.fromarray(camera).save(tmp_path / "camera.png")
    np.testing.assert_array_equal(decode_image(str(tmp_path / "camera.png"), 64, 1)[0].numpy(), camera)
