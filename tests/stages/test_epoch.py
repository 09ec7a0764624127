"""stages.epoch: the chain the flow, the ablations and the tests share, and the epoch's metrics."""
from __future__ import annotations

import numpy as np
import pytest

from stages.common import StageError, read_json
from stages.epoch import EPOCH_STAGES, epoch_metrics, run_stage
from stages.layout import RunLayout


def test_the_chain_runs_in_the_methods_order():
    assert list(EPOCH_STAGES) == ["extract", "pca", "cluster", "labels", "train"]


def test_each_stage_reads_what_the_one_before_wrote(tiny_run):
    """tiny_run ran the chain: every report is there, and the files agree with each other."""
    d = tiny_run.epoch(2)
    reports = {name: read_json(d / f"{name}.json") for name in EPOCH_STAGES}
    assert reports["extract"]["checkpoint_epoch"] == 1  # epoch 2 clusters epoch 1's network
    assert np.load(d / "pca_features.npy").shape == (reports["extract"]["n_images"], reports["pca"]["dim"])
    assert reports["labels"]["k"] == reports["cluster"]["k"]
    assert reports["train"]["n_clusters"] == reports["labels"]["n_clusters"]
    m = epoch_metrics(d, 2)
    assert m["train_loss"] == reports["train"]["loss"] and m["nmi_previous"] == reports["labels"]["nmi_previous"]
    assert m["seconds_stages"] == pytest.approx(sum(r["seconds"] for r in reports.values()))


def test_labels_compares_with_the_previous_directory_it_is_given(tiny_run, small_params, tmp_path):
    import shutil

    layout = RunLayout(tiny_run.dataset, tmp_path / "epochs", tiny_run.checkpoints)
    shutil.copytree(tiny_run.epoch(2), layout.epoch(2))
    same = run_stage("labels", small_params, layout, 2, previous=tiny_run.epoch(2))
    assert same["nmi_previous"] == pytest.approx(1.0)
    assert run_stage("labels", small_params, layout, 2)["nmi_previous"] is None  # no epoch 1 in this layout


def test_metrics_of_an_unfinished_epoch_name_the_missing_stage(tiny_run, tmp_path):
    import shutil

    shutil.copytree(tiny_run.epoch(1), tmp_path / "0001")
    (tmp_path / "0001" / "train.json").unlink()
    with pytest.raises(StageError, match="stage 'train' has not finished for epoch 1"):
        epoch_metrics(tmp_path / "0001", 1)
