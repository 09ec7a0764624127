"""stages.prepare: real Fashion-MNIST IDX files, image trees made of skimage's sample images, bad sources."""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from stages.core.data import iterate_batches, load_split
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.prepare import prepare, read_idx
from tests.conftest import phases_printed


def raw_idx(path: Path, header: int) -> np.ndarray:
    """Independent reader: gunzip and skip the header (16 bytes for images, 8 for labels)."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


# ---------------------------------------------------------------- IDX
def test_read_idx_real_fashion_mnist(fashion_mnist_dir):
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10  # the Fashion-MNIST test set is balanced, labels 0..9
    np.testing.assert_array_equal(images.ravel(), raw_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz", 16))


def test_read_idx_hand_made_files(tmp_path):
    # IDX: two zero bytes, a type code (0x0C = int32, 0x0D = float32), ndim, big-endian dims and data.
    values = np.arange(24).reshape(2, 3, 4) - 5
    path = tmp_path / "ints-idx3"
    path.write_bytes(bytes([0, 0, 0x0C, 3]) + np.array([2, 3, 4], ">u4").tobytes() + values.astype(">i4").tobytes())
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, values)
    floats = np.array([0.5, -2.25, 1e6])
    with gzip.open(tmp_path / "floats-idx1.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + np.array([3], ">u4").tobytes() + floats.astype(">f4").tobytes())
    out = read_idx(tmp_path / "floats-idx1.gz")
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, floats.astype(np.float32))

    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(StageError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 0x08, 1]) + np.array([10], ">u4").tobytes() + bytes(3))
    with pytest.raises(StageError, match="truncated"):
        read_idx(tmp_path / "short")


def test_prepare_fashion_mnist_subset(fashion_dataset, fashion_mnist_dir):
    manifest = pd.read_parquet(fashion_dataset / "manifest.parquet")
    assert list(manifest.columns) == ["image_id", "split", "label", "source", "path"]
    assert manifest["split"].value_counts().to_dict() == {"train": 240, "test": 40}
    assert manifest["image_id"].is_unique
    pixels = np.load(fashion_dataset / "pixels.npy")
    assert pixels.shape == (280, 28, 28, 1) and pixels.dtype == np.uint8

    # Every kept row is the original image and label at the index its id names.
    train_images = raw_idx(fashion_mnist_dir / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    train_labels = raw_idx(fashion_mnist_dir / "train-labels-idx1-ubyte.gz", 8)
    train = manifest[manifest["split"] == "train"]
    idx = train["image_id"].str.removeprefix("train-").astype(int).to_numpy()
    np.testing.assert_array_equal(train["label"].to_numpy(dtype=np.int64), train_labels[idx])
    np.testing.assert_array_equal(pixels[: len(train), :, :, 0], train_images[idx])

    meta = read_json(fashion_dataset / "dataset.json")
    assert meta["kind"] == "array" and meta["channels"] == 1 and meta["image_size"] == 28
    assert len(meta["classes"]) == 10
    assert meta["mean"][0] == pytest.approx(train_images[idx].mean() / 255.0, rel=1e-6)
    assert meta["unreadable"] == 0


def test_prepare_missing_idx_files_name_them(tmp_path, small_params):
    with pytest.raises(StageError, match="has no train-images-idx3-ubyte"):
        prepare("fashion-mnist", tmp_path, tmp_path / "out", small_params.prepare)


# ---------------------------------------------------------------- image trees
def save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def image_tree(tmp_path):
    """Real photographs in class folders, one corrupt file, one file that is not an image."""
    root = tmp_path / "tree"
    save(root / "animals" / "chelsea.png", skdata.chelsea())
    save(root / "people" / "astronaut.png", skdata.astronaut())
    save(root / "people" / "camera.png", skdata.camera())
    save(root / "things" / "coins.png", skdata.coins())
    save(root / "things" / "coffee.jpg", skdata.coffee())
    (root / "things" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "things" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_labels_from_folders_and_corrupt_file_skipped(tmp_path, image_tree, small_params):
    out = tmp_path / "dataset"
    meta = prepare("imagefolder", image_tree, out, small_params.prepare)
    manifest = pd.read_parquet(out / "manifest.parquet")
    labels = dict(zip(manifest["image_id"], manifest["label"]))
    # image_id = path relative to the tree's root
    assert labels == {"animals/chelsea.png": 0, "people/astronaut.png": 1, "people/camera.png": 1,
                      "things/coffee.jpg": 2, "things/coins.png": 2}
    assert meta["classes"] == ["animals", "people", "things"]
    assert meta["kind"] == "files" and meta["channels"] == 3 and meta["image_size"] == 32
    assert meta["unreadable"] == 2 and meta["counts"] == {"train": 5}

    skipped = pd.read_csv(out / "unreadable.csv").sort_values("path")  # every skipped file, with the reason
    assert list(skipped["path"]) == [str((image_tree / "things" / n).resolve()) for n in ("broken.png", "notes.txt")]
    assert skipped["error"].iloc[1].startswith("not an image file by its extension (.txt")
    assert skipped["error"].str.len().min() > 0
    assert not (out / "pixels.npy").exists()

    images = load_split(out, "train")
    assert images.has_labels and len(images) == 5
    batches = list(iterate_batches(images, np.arange(len(images)), batch_size=8))
    assert batches[0].shape == (5, 3, 32, 32) and batches[0].dtype == torch.uint8
    camera = list(images.ids).index("people/camera.png")
    assert (batches[0][camera, 0] == batches[0][camera, 2]).all()  # grey decoded to 3 equal channels


def test_prepare_on_a_tree_prints_each_phase_with_the_trees_counts(tmp_path, image_tree, small_params, capsys):
    prepare("imagefolder", image_tree, tmp_path / "dataset", small_params.prepare)
    out = capsys.readouterr().out
    assert phases_printed(out, "prepare") == [
        (f"scanning {image_tree}", "6 image files, 1 skipped"),  # notes.txt
        ("checking 6 image headers", "5 readable, 1 unreadable"),  # broken.png
        ("measuring the channel mean/std on 5 images", ANY),
        (f"writing {tmp_path / 'dataset'}", "5 train images")]
    headers = [line for line in out.splitlines() if line.startswith("prepare:   headers ")]
    assert [line.split(" (")[0] for line in headers] == [f"prepare:   headers {n}/6" for n in range(1, 7)]


def test_prepare_fashion_mnist_prints_a_line_as_it_reads_and_as_it_writes(tmp_path, fashion_mnist_dir, small_params,
                                                                          capsys):
    prepare("fashion-mnist", fashion_mnist_dir, tmp_path / "dataset", small_params.prepare)
    assert phases_printed(capsys.readouterr().out, "prepare") == [
        (f"reading Fashion-MNIST from {fashion_mnist_dir}", "280 images"),
        (f"writing {tmp_path / 'dataset'}", "240 train, 40 test images")]


def test_imagefolder_train_and_test_subtrees(tmp_path, small_params):
    root = tmp_path / "tree"
    save(root / "train" / "cat" / "a.png", skdata.chelsea())
    save(root / "train" / "coin" / "b.png", skdata.coins())
    save(root / "train" / "coin" / "c.png", skdata.camera())
    save(root / "test" / "cat" / "d.png", skdata.astronaut())
    prepare("imagefolder", root, tmp_path / "out", small_params.prepare)
    m = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    assert m["split"].to_dict() == {"train/cat/a.png": "train", "train/coin/b.png": "train",
                                    "train/coin/c.png": "train", "test/cat/d.png": "test"}
    assert m["label"].to_dict() == {"train/cat/a.png": 0, "train/coin/b.png": 1, "train/coin/c.png": 1,
                                    "test/cat/d.png": 0}


def test_flat_unlabelled_folder_has_null_labels(tmp_path, small_params):
    root = tmp_path / "flat"
    save(root / "camera.png", skdata.camera())
    save(root / "coins.png", skdata.coins())
    save(root / "sub" / "astronaut.png", skdata.astronaut())
    meta = prepare("folder", root, tmp_path / "out", small_params.prepare)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert len(manifest) == 3 and manifest["label"].isna().all()
    assert (manifest["source"] == "folder").all()
    assert meta["classes"] is None and meta["unreadable"] == 0
    images = load_split(tmp_path / "out", "train")
    assert not images.has_labels and (images.labels == -1).all()


# ---------------------------------------------------------------- bad sources stop with a clear message
def test_missing_source_names_the_path(tmp_path, small_params):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(StageError, match=f"source path {missing} does not exist"):
        prepare("folder", missing, tmp_path / "out", small_params.prepare)


@pytest.mark.parametrize("source", ["folder", "imagefolder"])
def test_empty_source_names_the_path(tmp_path, small_params, source):
    empty = tmp_path / "empty"
    (empty / "some-class").mkdir(parents=True)
    (empty / "some-class" / "readme.txt").write_text("no images here")
    with pytest.raises(StageError, match=f"no images .* found under {empty}"):
        prepare(source, empty, tmp_path / "out", small_params.prepare)
    assert not (tmp_path / "out").exists()


def test_only_corrupt_images_is_refused(tmp_path, small_params):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(StageError, match=f"none of the 1 images under {root} could be read"):
        prepare("folder", root, tmp_path / "out", small_params.prepare)


def test_only_corrupt_images_message_says_which_files_and_why(tmp_path, params_file, run_cli):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"garbage")
    result = run_cli("prepare", "--params", params_file, "--source", "folder", "--path", root,
                       "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0
    assert "a.jpg" in result.stderr + result.stdout


def test_unknown_source_is_refused(tmp_path, small_params):
    with pytest.raises(StageError, match="unknown source 'csv'"):
        prepare("csv", tmp_path, tmp_path / "out", small_params.prepare)


def test_cli_empty_folder_exits_non_zero_naming_the_path(tmp_path, params_file, run_cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    result = run_cli("prepare", "--params", params_file, "--source", "folder", "--path", empty, "--out", out,
                       cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("prepare: ") and str(empty) in result.stderr
    assert "Traceback" not in result.stderr  # a message for the user, not a crash
    assert not out.exists()


def test_prepare_replaces_an_existing_dataset_whole(tmp_path, image_tree, small_params):
    out = tmp_path / "dataset"
    prepare("imagefolder", image_tree, out, small_params.prepare)
    flat = tmp_path / "flat"
    save(flat / "moon.png", skdata.moon())
    prepare("folder", flat, out, small_params.prepare)
    assert pd.read_parquet(out / "manifest.parquet")["image_id"].tolist() == ["moon.png"]
    assert pd.read_csv(out / "unreadable.csv").empty  # nothing left over from the previous dataset
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "flat", "tree"]  # no .tmp / .old left


def test_val_and_test_subtrees_are_both_imported(tmp_path, small_params):
    root = tmp_path / "tree"
    save(root / "train" / "a" / "x.png", skdata.camera())
    save(root / "val" / "a" / "y.png", skdata.coins())
    save(root / "test" / "a" / "z.png", skdata.moon())
    prepare("imagefolder", root, tmp_path / "out", small_params.prepare)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert len(manifest) == 3


def test_image_ids_stay_unique_when_val_and_test_hold_the_same_file_name(tmp_path, small_params):
    root = tmp_path / "tree"
    save(root / "train" / "a" / "x.png", skdata.camera())
    save(root / "val" / "a" / "y.png", skdata.coins())
    save(root / "test" / "a" / "y.png", skdata.moon())
    prepare("imagefolder", root, tmp_path / "out", small_params.prepare)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert len(manifest) == 3 and manifest["image_id"].is_unique


# ---------------------------------------------------------------- every skipped file or folder is listed
def without_file_permission_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that even root gets EACCES on a
    chmod 000 folder (the build machine runs the tests as root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0 and os.geteuid() == 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def test_unreadable_folder_and_unscalable_images_are_listed_with_their_reason(tmp_path, params_file):
    root = tmp_path / "tree"
    save(root / "cats" / "chelsea.png", skdata.chelsea())
    v16 = (skdata.camera().astype(np.uint16) * 257)  # 16-bit, full range
    save(root / "cats" / "camera16.png", v16)
    save(root / "cats" / "bright.tif", np.full((16, 16), 300.0, np.float32))  # a float image outside [0, 1]
    save(root / "locked" / "coins.png", skdata.coins())
    (root / "locked").chmod(0)
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params_file), "--source",
                               "imagefolder", "--path", str(root), "--out", str(tmp_path / "out")],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              preexec_fn=without_file_permission_override)
    finally:
        (root / "locked").chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    listed = pd.read_csv(tmp_path / "out" / "unreadable.csv").set_index("path")["error"].to_dict()
    assert listed == {
        str((root / "locked").resolve()): "folder not readable: PermissionError: Permission denied",
        str((root / "cats" / "bright.tif").resolve()): "StageError: float image with values in [300, 300]: only "
        "floats in [0, 1] can be scaled to 8 bits; rescale it, or save it as an 8- or 16-bit image",
    }
    assert "2 unreadable, listed in" in proc.stdout and f"skipping unreadable {root.resolve() / 'locked'}" in proc.stderr
    images = load_split(tmp_path / "out", "train")
    assert sorted(images.ids) == ["cats/camera16.png", "cats/chelsea.png"]  # the 16-bit image is kept, scaled


# ---------------------------------------------------------------- header checks, not decoding
def test_prepare_reads_headers_only_and_records_each_images_original_size(tmp_path, small_params):
    """Policy for a file whose header is fine but whose data is not (a truncated JPEG): prepare keeps it
    (it reads headers only, so an ImageNet-sized tree is not decoded once just to be checked); the stages
    that load it feed it as a mean-colour image and name it on stderr (tests/stages/test_data.py)."""
    root = tmp_path / "tree"
    save(root / "cats" / "chelsea.jpg", skdata.chelsea())
    save(root / "cats" / "coffee.jpg", skdata.coffee())
    (root / "cats" / "cut.jpg").write_bytes((root / "cats" / "coffee.jpg").read_bytes()[:3000])
    (root / "cats" / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)  # not even a header
    meta = prepare("imagefolder", root, tmp_path / "out", small_params.prepare)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("image_id")
    assert manifest[["width", "height"]].to_dict("index") == {
        "cats/chelsea.jpg": {"width": 451, "height": 300}, "cats/coffee.jpg": {"width": 600, "height": 400},
        "cats/cut.jpg": {"width": 600, "height": 400}}
    assert meta["unreadable"] == 1
    assert pd.read_csv(tmp_path / "out" / "unreadable.csv")["path"].tolist() == [str((root / "cats" / "garbage.jpg")
                                                                                    .resolve())]


def test_histogram_stats_are_channel_stats():
    from stages.prepare import channel_stats, histogram_stats

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(4)]
    flat = np.concatenate([im.reshape(-1, 1, 3) for im in images])  # channel_stats needs equal sizes: one column
    np.testing.assert_allclose(histogram_stats(images), channel_stats(flat), rtol=1e-12)
    assert histogram_stats([np.zeros((4, 4, 1), np.uint8)]) == ([0.0], [1e-3])  # a flat image: std floored
