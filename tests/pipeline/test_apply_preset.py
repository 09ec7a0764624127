"""pipeline.apply_preset: params.yaml edited in place, comments and untouched values kept as written."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.apply_preset import apply_preset, load_preset
from stages.core.errors import StageError

REPO = Path(__file__).resolve().parents[2]


def test_only_the_overridden_lines_change(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_preset(tmp_path / "params.yaml", {"cluster.niter": 21, "train.samples_per_epoch": 5000})
    before = (REPO / "params.yaml").read_text().splitlines()
    after = (tmp_path / "params.yaml").read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 2  # nulls elsewhere stay `null`, comments stay
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["samples_per_epoch"] == 5000


def test_the_imagenet_preset_names_only_existing_keys(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_preset(tmp_path / "params.yaml", load_preset("imagenet"))
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["model"]["arch"] == "alexnet"
    with pytest.raises(StageError, match="unknown parameter 'cluster.kk'"):
        apply_preset(tmp_path / "params.yaml", {"cluster.kk": 3})


# The paper's ImageNet settings (Caron et al. 2018, Sec. 4 "Implementation details") and the official code's
# defaults (facebookresearch/deepcluster main.py), written out here, not read from the preset.
PAPER_IMAGENET = {
    "model.arch": "alexnet",          # AlexNet with BatchNorm, no LRN
    "model.sobel": True,              # "a fixed linear transformation based on Sobel filters"
    "model.dropout": 0.5,
    "extract.crop_size": 224,         # centre crop 224 of the image resized to 256
    "extract.amp": False,             # the official code runs fp32
    "pca.dim": 256,                   # "PCA-reduced to 256 dimensions, whitened and l2-normalized"
    "cluster.method": "kmeans",
    "cluster.k": 10000,               # "k = 10,000"
    "cluster.niter": 20,              # official clustering.py: niter = 20
    "train.lr": 0.05,                 # "learning rate of 0.05", constant
    "train.lr_schedule": "constant",
    "train.momentum": 0.9,
    "train.weight_decay": 1e-5,       # official --wd -5, i.e. 10^-5
    "train.batch_size": 256,
    "train.crop_size": 224,
    "train.crop_scale": [0.08, 1.0],  # RandomResizedCrop(224) with torchvision's default range
    "train.hflip": True,
    "train.intensity_jitter": 0.0,    # no colour or intensity jitter
    "train.amp": False,
    "train.samples_per_epoch": None,  # N images per epoch, sampled uniformly over the clusters
    "train.min_samples_per_epoch": 0,  # no floor: N draws even on a small image tree
    "run.epochs": 500,                # "trained for 500 epochs"
}


def test_the_imagenet_preset_is_the_papers_settings(tmp_path):
    """The values a run gets after `deepcluster preset imagenet` (the preset over params.yaml's defaults, so a
    default the preset forgets to override is caught too), against the table above."""
    from stages.core.params import flatten, load_params

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_preset(tmp_path / "params.yaml", load_preset("imagenet"))
    got = flatten(load_params(tmp_path / "params.yaml").model_dump())
    assert {k: got[k] for k in PAPER_IMAGENET} == PAPER_IMAGENET


def test_a_preset_is_validated_by_the_schema_and_written_normalised(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(StageError, match=r"preset train.lr=-0.1 is not allowed: train.lr must be float > 0"):
        apply_preset(tmp_path / "params.yaml", {"train.lr": -0.1, "cluster.niter": 5})
    assert (tmp_path / "params.yaml").read_text() == before  # refused as a whole: nothing written
    apply_preset(tmp_path / "params.yaml", {"train.lr": "1e-3"})  # what YAML makes of `train.lr: 1e-3`
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["train"]["lr"] == 0.001


def test_the_photos_preset_sets_network_crops_and_image_size_together(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    apply_preset(tmp_path / "params.yaml", load_preset("photos"))  # validated by the schema, or StageError
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert params["prepare"]["source"] == "imagefolder" and params["prepare"]["image_size"] == 256
    assert params["model"]["arch"] == "alexnet"
    assert params["extract"]["crop_size"] == params["train"]["crop_size"] == 224  # one input size for the fc layers
    assert params["train"]["crop_scale"] == [0.08, 1.0] and params["pca"]["dim"] == 256
    # every line of the preset says why its value is what it is
    for line in (REPO / "pipeline" / "presets" / "photos.yaml").read_text().splitlines():
        assert not line.strip() or line.startswith("#") or "  # " in line, line
