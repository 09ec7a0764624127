"""stages.extract: pre-ReLU fc features of every training image, eval mode, dataset order."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from stages.core.checkpoints import init_checkpoint, load_checkpoint, model_from_checkpoint
from stages.core.data import center_crop, load_split, normalize
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.params import apply_overrides
from stages.extract import run_extract


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, fashion_dataset, small_params):
    root = tmp_path_factory.mktemp("extract")
    init_checkpoint(small_params, fashion_dataset, root / "epoch_0000.pt")
    stats = run_extract(small_params, fashion_dataset, root / "epoch_0000.pt", root / "0001")
    return root, stats


def test_features_cover_every_training_image_in_dataset_order(extracted, fashion_dataset, small_params):
    root, stats = extracted
    feats = np.load(root / "0001" / "features.npy")
    train = load_split(fashion_dataset, "train")
    assert feats.shape == (len(train), small_params.model.fc_dim) and feats.dtype == np.float32
    assert sorted(p.name for p in (root / "0001").iterdir()) == ["extract.json", "features.npy"]  # no id file
    assert np.isfinite(feats).all()
    assert (feats < 0).any()  # taken before the ReLU
    assert stats["checkpoint_epoch"] == 0 and stats["n_images"] == len(train)
    assert read_json(root / "0001" / "extract.json")["feature_dim"] == small_params.model.fc_dim


def test_features_are_the_eval_mode_centre_crop_fc_output(extracted, fashion_dataset):
    root, _ = extracted
    feats = np.load(root / "0001" / "features.npy")
    train = load_split(fashion_dataset, "train")
    model = model_from_checkpoint(load_checkpoint(root / "epoch_0000.pt")).eval()
    x = torch.from_numpy(np.array(train.pixels[:10])).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = model.fc_features(normalize(center_crop(x, 28), train.meta["mean"], train.meta["std"]))
    np.testing.assert_allclose(feats[:10], expected.numpy(), rtol=1e-4, atol=1e-5)
    # In train() mode dropout (p = 0.5) would make the features random; eval() features are fixed.
    model.train()
    with torch.no_grad():
        noisy = model.fc_features(normalize(center_crop(x, 28), train.meta["mean"], train.meta["std"]))
    assert not np.allclose(feats[:10], noisy.numpy(), atol=1e-3)


def test_missing_checkpoint_is_a_stage_error(tmp_path, fashion_dataset, small_params):
    with pytest.raises(StageError, match="epoch_0000.pt not found"):
        run_extract(small_params, fashion_dataset, tmp_path / "epoch_0000.pt", tmp_path / "0001")


def test_crop_size_other_than_the_networks_input_is_refused_before_any_output(extracted, fashion_dataset,
                                                                              small_params, tmp_path):
    root, _ = extracted
    params = apply_overrides(small_params, {"extract.crop_size": 24})
    with pytest.raises(StageError, match=r"extract.crop_size=24, but the network .* 28 px"):
        run_extract(params, fashion_dataset, root / "epoch_0000.pt", tmp_path / "0001")
    assert not (tmp_path / "0001").exists()


def file_size_limit(max_bytes: int):
    """preexec_fn: no file of the process may grow past max_bytes, as on a full disk (EFBIG instead of ENOSPC)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


@pytest.mark.slow
def test_full_disk_during_extract_is_a_clear_error_and_the_rerun_gives_the_same_features(tiny_run, params_file,
                                                                                        tmp_path):
    import subprocess
    import sys

    out = tmp_path / "0001"
    cmd = [sys.executable, "-m", "stages.extract", "--params", str(params_file), "--dataset", str(tiny_run.dataset),
           "--checkpoint", str(tiny_run.checkpoint(0)), "--out", str(out)]
    # 240 x 32 float32 features do not fit in 20 kB; before, a memmap on a full disk died of SIGBUS
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=file_size_limit(20_000))
    assert proc.returncode == 1, proc.stderr
    assert re.search(rf"extract: could not write {out}/features.npy \(OSError: \[Errno 27\] File too large\): "
                     r"30,848 bytes needed, [\d,]+ bytes free on its disk .* rerun: the run resumes at this stage",
                     proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no partial features, no temp file
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # the disk has room again
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(tiny_run.epoch(1) / "features.npy"))


def test_a_disk_too_small_for_the_features_is_refused_before_any_compute(tiny_run, small_params, tmp_path):
    """A real small disk: a 16 kB tmpfs (needs root; skipped where mounting is not allowed)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(StageError, match=rf"not enough disk space to write {disk}/0001/features.npy: 30,848 bytes "
                                             r"needed, 16,384 bytes free on its disk"):
            run_extract(small_params, tiny_run.dataset, tiny_run.checkpoint(0), disk / "0001")
        assert [p.name for p in (disk / "0001").iterdir()] == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)
