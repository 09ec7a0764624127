"""stages.core.artifacts: every kind of file a stage reads is checked before use; truncated, swapped and
foreign copies of tiny_run's real artifacts are refused with a message naming the file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from stages.cluster import run_cluster
from stages.core.artifacts import (allocate_npy, check_architecture, check_assignments, check_json, check_npy,
                                   check_npz, require_free_space, train_rows)
from stages.core.checkpoints import init_checkpoint, load_checkpoint, verify_checkpoint
from stages.core.clustering import CLUSTERING_ARRAYS, load_clustering
from stages.core.data import load_split
from stages.core.errors import DamagedArtifact, StageError
from stages.core.io import free_bytes, read_json
from stages.core.params import apply_overrides
from stages.core.whitening import PCAWhitening
from stages.extract import run_extract
from stages.labels import run_labels
from stages.pca import run_pca
from stages.train import run_train


def truncated(src: Path, dst_dir: Path, keep: float = 0.5) -> Path:
    """A copy of `src` cut to `keep` of its bytes, as a full disk or a killed copy leaves it."""
    data = src.read_bytes()
    dst = dst_dir / src.name
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


# ---------------------------------------------------------------- each artifact kind, truncated
def test_intact_artifacts_pass(tiny_run, small_params):
    d, n = tiny_run.epoch(2), train_rows(tiny_run.dataset)
    assert n == 240
    assert check_npy(d / "features.npy", rows=n) == (240, small_params.model.fc_dim)
    assert check_npy(d / "pca_features.npy", rows=n) == (240, small_params.pca.dim)
    assert check_npz(d / "pca.npz", PCAWhitening.ARRAYS)["components"] == (32, 16)
    assert check_npz(d / "clusters.npz", CLUSTERING_ARRAYS)["centroids"] == (10, 16)
    assert len(check_assignments(d / "assignments.parquet", load_split(tiny_run.dataset).ids)) == 240
    assert check_json(d / "metrics.json")["epoch"] == 2
    assert verify_checkpoint(tiny_run.checkpoint(2), small_params.model, 1, 2)["epoch"] == 2


@pytest.mark.parametrize("name, check", [
    ("features.npy", lambda p: check_npy(p, rows=240)),
    ("pca_features.npy", lambda p: check_npy(p, rows=240)),
    ("pca.npz", lambda p: check_npz(p, PCAWhitening.ARRAYS)),
    ("clusters.npz", lambda p: check_npz(p, CLUSTERING_ARRAYS)),
    ("assignments.parquet", lambda p: check_assignments(p, np.array([]))),
    ("metrics.json", check_json),
    ("labels.json", check_json),
])
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_epoch_artifact_is_named(tiny_run, tmp_path, name, check, keep):
    path = truncated(tiny_run.epoch(2) / name, tmp_path, keep)
    with pytest.raises(DamagedArtifact, match=rf"{path.name} cannot be used") as e:
        check(path)
    assert e.value.path == path


def test_truncated_features_stop_pca_and_cluster_before_any_mmap(tiny_run, small_params, tmp_path):
    # before: numpy's "mmap length is greater than file size", retried twice as if transient
    for name, stage in (("features.npy", run_pca), ("pca_features.npy", run_cluster)):
        path = truncated(tiny_run.epoch(2) / name, tmp_path)
        with pytest.raises(DamagedArtifact, match=r"bytes, but its header describes a float32 array of shape "
                                                  r"\(240, \d+\).*truncated or half-written; run \w+ for this epoch"):
            stage(small_params, path, tmp_path / "out", 2, tiny_run.dataset)
        assert not (tmp_path / "out").exists()


def test_features_of_another_dataset_are_refused(tiny_run, small_params, tmp_path):
    np.save(tmp_path / "features.npy", np.load(tiny_run.epoch(2) / "features.npy")[:200])
    with pytest.raises(DamagedArtifact, match="has 200 rows but the dataset has 240 training images"):
        run_pca(small_params, tmp_path / "features.npy", tmp_path / "out", 2, tiny_run.dataset)
    np.save(tmp_path / "f64.npy", np.load(tiny_run.epoch(2) / "features.npy").astype(np.float64))
    with pytest.raises(DamagedArtifact, match="holds a 2-D float64 array"):
        check_npy(tmp_path / "f64.npy", rows=240)


def test_truncated_clustering_stops_labels(tiny_run, small_params, tmp_path):
    d = tmp_path / "0002"
    d.mkdir()
    truncated(tiny_run.epoch(2) / "clusters.npz", d)
    with pytest.raises(DamagedArtifact, match=r"clusters.npz cannot be used: not a readable .npz.*rerun|run the cluster"):
        run_labels(small_params, d, tiny_run.dataset, tiny_run.epoch(1))
    assert not (d / "assignments.parquet").exists()
    np.savez(d / "clusters.npz", labels=np.zeros(240, np.int64), centroids=np.zeros((10, 16), np.float32))
    with pytest.raises(DamagedArtifact, match=r"lacks the arrays \['distances', 'objective', 'seed'\]"):
        load_clustering(d / "clusters.npz")


def test_truncated_previous_assignments_name_the_way_back(tiny_run, small_params, tmp_path):
    """Epoch 1 is finished: its damaged assignments are named with the command that recomputes them."""
    prev, d = tmp_path / "0001", tmp_path / "0002"
    prev.mkdir()
    shutil.copytree(tiny_run.epoch(2), d)
    truncated(tiny_run.epoch(1) / "assignments.parquet", prev)
    with pytest.raises(DamagedArtifact, match=rf"0001/assignments.parquet cannot be used: not a readable parquet.*"
                                              rf"python -m stages.labels --epoch-dir {prev}"):
        run_labels(small_params, d, tiny_run.dataset, prev)
    shutil.copy(tiny_run.epoch(1) / "clusters.npz", prev)  # following the message's advice gets it back
    run_labels(small_params, prev, tiny_run.dataset, None)
    assert (prev / "assignments.parquet").read_bytes() == (tiny_run.epoch(1) / "assignments.parquet").read_bytes()
    assert run_labels(small_params, d, tiny_run.dataset, prev)["nmi_previous"] == pytest.approx(
        read_json(tiny_run.epoch(2) / "labels.json")["nmi_previous"])


def test_truncated_assignments_stop_train(tiny_run, small_params, tmp_path):
    path = truncated(tiny_run.epoch(2) / "assignments.parquet", tmp_path)
    with pytest.raises(DamagedArtifact, match="assignments.parquet cannot be used: not a readable parquet file"):
        run_train(small_params, tiny_run.dataset, path, tiny_run.checkpoint(1), tmp_path / "epoch_0002.pt", 2)
    assert not (tmp_path / "epoch_0002.pt").exists()


def test_truncated_pixels_are_refused_by_every_reader(fashion_dataset, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(fashion_dataset, root)
    truncated(fashion_dataset / "pixels.npy", root)
    with pytest.raises(DamagedArtifact, match=r"pixels.npy cannot be used: \d+ bytes, but its header describes a "
                                              r"uint8 array of shape \(280, 28, 28, 1\).*stages.prepare"):
        load_split(root, "train")


def test_pixels_of_another_image_size_are_refused(fashion_dataset, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(fashion_dataset, root)
    np.save(root / "pixels.npy", np.load(fashion_dataset / "pixels.npy")[:, :24, :24])
    with pytest.raises(DamagedArtifact, match="holds 24x24 images with 1 channels, but dataset.json says 28x28"):
        load_split(root, "train")


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_checkpoint_is_named_with_the_way_back(tiny_run, tmp_path, keep):
    path = truncated(tiny_run.checkpoint(2), tmp_path, keep)
    with pytest.raises(DamagedArtifact, match=r"epoch_0002.pt cannot be used: not a readable checkpoint.*"
                                              r"recomputes an epoch's checkpoint from the epoch before's"):
        load_checkpoint(path)


# ---------------------------------------------------------------- checkpoints of another network
@pytest.mark.parametrize("other", [{"model.width": 8}, {"model.fc_dim": 64}, {"model.sobel": False}])
def test_checkpoint_of_another_architecture_is_refused_not_trained_on(tiny_run, small_params, tmp_path, other):
    swapped = tmp_path / "epoch_0001.pt"
    init_checkpoint(apply_overrides(small_params, other), tiny_run.dataset, swapped)
    key = next(iter(other))
    message = rf"{swapped} cannot be used: holds another network than this run's \({key}: .* in the checkpoint"
    with pytest.raises(StageError, match=message):
        run_extract(small_params, tiny_run.dataset, swapped, tmp_path / "0002")
    with pytest.raises(StageError, match=message):
        run_train(small_params, tiny_run.dataset, tiny_run.epoch(2) / "assignments.parquet", swapped,
                  tmp_path / "epoch_0002.pt", 2)
    assert not (tmp_path / "0002").exists() and not (tmp_path / "epoch_0002.pt").exists()


def test_architecture_check_compares_the_input_channels(tiny_run, small_params):
    ckpt = load_checkpoint(tiny_run.checkpoint(1))
    check_architecture(ckpt, small_params.model, 1, "x.pt")
    with pytest.raises(StageError, match=r"input channels: 1 in the checkpoint, 3 in the dataset"):
        check_architecture(ckpt, small_params.model, 3, "x.pt")


def test_checkpoint_of_another_epoch_is_refused(tiny_run, small_params):
    with pytest.raises(DamagedArtifact, match="holds epoch 1's network, not epoch 2's"):
        verify_checkpoint(tiny_run.checkpoint(1), small_params.model, 1, 2)


# ---------------------------------------------------------------- disk space
def test_a_write_larger_than_the_free_space_is_refused_naming_path_and_bytes(tmp_path):
    free = free_bytes(tmp_path / "x")
    with pytest.raises(StageError, match=rf"not enough disk space to write {tmp_path}/sub/features.npy: "
                                         rf"{free + 2**40:,} bytes needed, [\d,]+ bytes free"):
        require_free_space(tmp_path / "sub" / "features.npy", free + 2**40)  # the folder need not exist yet
    with pytest.raises(StageError, match="not enough disk space"):
        allocate_npy(tmp_path / "big.npy", (free // 4 + 2**30, 1))
    require_free_space(tmp_path / "small.npy", 1000)


def test_allocated_npy_is_reserved_on_disk_and_a_valid_array(tmp_path):
    path = tmp_path / "a.npy"
    out = allocate_npy(path, (1000, 64), np.float32)
    # every block is reserved up front (not a sparse file): a full disk cannot surface later as SIGBUS
    assert path.stat().st_blocks * 512 >= 1000 * 64 * 4
    out[:] = np.arange(64000, dtype=np.float32).reshape(1000, 64)
    out.flush()
    del out
    assert check_npy(path, rows=1000) == (1000, 64)
    np.testing.assert_array_equal(np.load(path), np.arange(64000, dtype=np.float32).reshape(1000, 64))
