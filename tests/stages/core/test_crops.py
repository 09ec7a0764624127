"""stages.core.crops: one warning, with the fix, when the crops are far smaller than the images; none otherwise."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.core.crops import crop_warning, image_side
from stages.prepare import main as prepare_main

DEFAULTS = {"extract.crop_size": 28, "train.crop_size": 28}  # params.yaml's, for 28 px Fashion-MNIST
PHOTOS = {"extract.crop_size": 224, "train.crop_size": 224}  # pipeline/presets/photos.yaml's


def test_28_px_crops_of_photos_are_warned_about_with_the_fix():
    warning = crop_warning(500, DEFAULTS)
    assert warning is not None and "\n" not in warning  # one line
    assert "extract.crop_size=28 and train.crop_size=28" in warning and "500 px" in warning
    assert "`photos` preset" in warning and "deepcluster preset photos" in warning


def test_crops_that_suit_the_images_are_not_warned_about():
    assert crop_warning(28, DEFAULTS) is None  # Fashion-MNIST, the default run
    assert crop_warning(32, DEFAULTS) is None  # CIFAR-sized images
    assert crop_warning(500, PHOTOS) is None  # photos with the photos preset
    assert crop_warning(256, PHOTOS) is None
    assert crop_warning(None, DEFAULTS) is None  # size unknown: no guess


def test_the_threshold_is_a_quarter_of_the_short_side():
    assert crop_warning(112, DEFAULTS) is None  # 28 * 4 = 112: not far smaller
    assert crop_warning(113, DEFAULTS) is not None
    only_train = crop_warning(500, {"extract.crop_size": 224, "train.crop_size": 96})
    assert only_train is not None and "train.crop_size=96" in only_train and "extract.crop_size" not in only_train


def test_image_side_is_the_median_short_side_of_the_training_images():
    manifest = pd.DataFrame({
        "split": ["train", "train", "train", "test"],
        "width": pd.array([640, 500, 300, 10], dtype="Int64"),
        "height": pd.array([480, 375, 1000, 10], dtype="Int64"),
    })
    assert image_side({"kind": "files", "image_size": 224}, manifest) == 375  # median of 480, 375, 300
    assert image_side({"kind": "array", "image_size": 28}, pd.DataFrame()) == 28
    assert image_side({"kind": "files", "image_size": 224}, manifest.drop(columns=["width"])) is None
    missing = manifest.assign(width=pd.array([None, None, None, 10], dtype="Int64"))
    assert image_side({"kind": "files", "image_size": 224}, missing) is None


@pytest.mark.parametrize("crops, warned", [(DEFAULTS, True), (PHOTOS, False)])
def test_prepare_prints_the_warning_once_for_photos_with_28_px_crops(tmp_path, write_params, small_params, capsys,
                                                                     crops, warned):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(tmp_path / "tree" / label / f"{i}.png")
    params = write_params(tmp_path, small_params, {"prepare.source": "imagefolder", "prepare.path": str(tmp_path / "tree"),
                                                   "prepare.num_workers": 1, **crops})
    prepare_main(["--params", str(params), "--out", str(tmp_path / "dataset")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "crop_size" in line]
    if warned:
        assert len(lines) == 1 and lines[0].startswith("prepare: warning:") and "300 px" in lines[0]
        assert "photos" in lines[0]
    else:
        assert lines == []
