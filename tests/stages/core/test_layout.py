"""stages.core.layout: where a run's files live and what the retention policy keeps."""
from __future__ import annotations

import pytest

from stages.core.layout import RunLayout, apply_retention
from stages.core.params import apply_overrides


@pytest.mark.parametrize("keep_features, keep_checkpoints, features_kept, checkpoints_kept", [
    (0, 5, [], [0, 5, 6]),  # the defaults: no features, every 5th checkpoint (and the last two)
    (2, 0, [2, 4, 6], [0, 5, 6]),
    (0, 4, [], [0, 4, 5, 6]),
])
def test_retention_policy(tmp_path, small_params, keep_features, keep_checkpoints, features_kept, checkpoints_kept):
    params = apply_overrides(small_params, {"extract.keep_features_every": keep_features,
                                            "train.keep_checkpoint_every": keep_checkpoints})
    layout = RunLayout(tmp_path / "dataset", tmp_path / "epochs", tmp_path / "checkpoints")
    layout.checkpoints.mkdir()
    layout.checkpoint(0).write_bytes(b"0")
    for epoch in range(1, 7):  # what each finished epoch leaves before retention
        layout.epoch(epoch).mkdir(parents=True)
        for name in ("features.npy", "pca_features.npy", "assignments.parquet", "clusters.npz", "metrics.json"):
            (layout.epoch(epoch) / name).write_bytes(b"x")
        layout.checkpoint(epoch).write_bytes(b"x")
        apply_retention(params, layout, epoch)
    assert [e for e in range(1, 7) if (layout.epoch(e) / "features.npy").exists()] == features_kept
    assert [e for e in range(1, 7) if (layout.epoch(e) / "pca_features.npy").exists()] == features_kept
    assert [e for e in range(0, 7) if layout.checkpoint(e).exists()] == checkpoints_kept
    assert all((layout.epoch(e) / name).exists() for e in range(1, 7)
               for name in ("assignments.parquet", "clusters.npz", "metrics.json"))


def test_layout_names_and_finished_epochs(tmp_path):
    layout = RunLayout(tmp_path / "d", tmp_path / "epochs", tmp_path / "ckpt")
    assert layout.epoch(7) == tmp_path / "epochs" / "0007"
    assert layout.checkpoint(12) == tmp_path / "ckpt" / "epoch_0012.pt"
    for e, done in ((1, True), (2, True), (3, False)):
        layout.epoch(e).mkdir(parents=True)
        (layout.epoch(e) / "labels.json").write_text("{}")
        if done:
            (layout.epoch(e) / "metrics.json").write_text("{}")
    assert layout.completed_epochs() == [1, 2]
    assert layout.stage_done(3, "labels") and not layout.stage_done(3, "train")
