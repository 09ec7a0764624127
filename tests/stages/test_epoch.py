"""stages.epoch: the chain the flow, the ablations and the tests share, and the epoch's metrics."""
from __future__ import annotations

import numpy as np
import pytest

from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.layout import RunLayout
from stages.core.schema import Params
from stages.epoch import EPOCH_STAGES, epoch_metrics, first_stage_to_run, reopen_damaged_epoch, run_stage


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


# ---------------------------------------------------------------- damaged files when a run resumes
def copy_run(run: RunLayout, dest) -> RunLayout:
    import shutil

    layout = RunLayout(run.dataset, dest / "epochs", dest / "checkpoints")
    shutil.copytree(run.epochs_root, layout.epochs_root)
    shutil.copytree(run.checkpoints, layout.checkpoints)
    return layout


def cut(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def finish(params: Params, layout: RunLayout, epoch: int, start: int) -> None:
    """What the flow does after first_stage_to_run: the stages from `start`, then metrics.json."""
    from stages.core.io import write_json

    for name in EPOCH_STAGES[start:]:
        run_stage(name, params, layout, epoch)
    write_json(layout.epoch(epoch) / "metrics.json", epoch_metrics(layout.epoch(epoch), epoch))


def same_epoch(a: RunLayout, b: RunLayout, epoch: int) -> None:
    import pandas as pd
    import torch

    for name in ("features.npy", "pca_features.npy"):
        np.testing.assert_array_equal(np.load(a.epoch(epoch) / name), np.load(b.epoch(epoch) / name))
    pd.testing.assert_frame_equal(pd.read_parquet(a.epoch(epoch) / "assignments.parquet"),
                                  pd.read_parquet(b.epoch(epoch) / "assignments.parquet"))
    ka, kb = (torch.load(x.checkpoint(epoch), weights_only=True) for x in (a, b))
    assert ka["model"].keys() == kb["model"].keys()
    assert all(torch.equal(ka["model"][k], kb["model"][k]) for k in ka["model"])


@pytest.mark.parametrize("damaged, rerun_from", [
    ("features.npy", "extract"),       # read by pca, which has not run: extract reruns
    ("pca_features.npy", "pca"),
    ("pca.npz", "pca"),
    ("clusters.npz", "cluster"),
    ("assignments.parquet", "labels"),
    ("pca.json", "pca"),                # a damaged report: its stage reruns
])
def test_a_damaged_file_of_an_unfinished_epoch_is_recomputed_not_trusted(tiny_run, small_params, tmp_path, damaged,
                                                                         rerun_from):
    layout = copy_run(tiny_run, tmp_path)
    d = layout.epoch(2)
    for name in ("train.json", "metrics.json"):  # killed during epoch 2's train
        (d / name).unlink()
    layout.checkpoint(2).unlink()
    cut(d / damaged)
    logged = []
    start = first_stage_to_run(small_params, layout, 2, log=logged.append)
    assert EPOCH_STAGES[start] == rerun_from
    assert len(logged) >= 1 and f"{damaged} cannot be used" in logged[0] and "rerunning" in logged[0]
    assert not any(layout.stage_done(2, s) for s in EPOCH_STAGES[start:])  # everything after reruns too
    finish(small_params, layout, 2, start)
    same_epoch(layout, tiny_run, 2)  # the result of the uninterrupted run


def test_intact_unfinished_epoch_resumes_after_its_last_stage(tiny_run, small_params, tmp_path):
    layout = copy_run(tiny_run, tmp_path)
    (layout.epoch(2) / "train.json").unlink()
    (layout.epoch(2) / "metrics.json").unlink()
    assert EPOCH_STAGES[first_stage_to_run(small_params, layout, 2, log=pytest.fail)] == "train"


def test_damaged_checkpoint_of_the_last_finished_epoch_is_recomputed(tiny_run, small_params, tmp_path):
    layout = copy_run(tiny_run, tmp_path)
    cut(layout.checkpoint(2))  # a half-written last checkpoint (last.pt is a hard link to it in a flow run)
    logged = []
    assert reopen_damaged_epoch(small_params, layout, 2, log=logged.append)
    assert "epoch_0002.pt cannot be used" in logged[0] and layout.completed_epochs() == [1]
    assert "--fresh" not in logged[0]  # the log says what the run does about it, not what the user could do
    start = first_stage_to_run(small_params, layout, 2, log=logged.append)
    assert EPOCH_STAGES[start] == "train"  # only train reruns, from epoch 1's kept checkpoint
    finish(small_params, layout, 2, start)
    same_epoch(layout, tiny_run, 2)
    assert layout.completed_epochs() == [1, 2]


def test_damaged_last_checkpoint_without_the_one_before_is_refused_keeping_the_epoch(tiny_run, small_params,
                                                                                     tmp_path):
    layout = copy_run(tiny_run, tmp_path)
    cut(layout.checkpoint(2))
    layout.checkpoint(1).unlink()
    with pytest.raises(StageError, match=r"epoch_0002.pt cannot be used: not a readable checkpoint.*cannot be "
                                         r"recomputed.*epoch_0001.pt not found"):
        reopen_damaged_epoch(small_params, layout, 2)
    assert layout.completed_epochs() == [1, 2]  # the finished epoch is still finished: nothing lost


def test_damaged_metrics_of_the_last_epoch_are_rebuilt_from_its_reports(tiny_run, small_params, tmp_path):
    layout = copy_run(tiny_run, tmp_path)
    cut(layout.epoch(2) / "metrics.json")
    for name in ("features.npy", "pca_features.npy"):  # as retention leaves a finished epoch
        (layout.epoch(2) / name).unlink()
    assert reopen_damaged_epoch(small_params, layout, 2, log=lambda m: None)
    assert first_stage_to_run(small_params, layout, 2, log=pytest.fail) == len(EPOCH_STAGES)  # nothing reruns
    finish(small_params, layout, 2, len(EPOCH_STAGES))
    assert read_json(layout.epoch(2) / "metrics.json") == read_json(tiny_run.epoch(2) / "metrics.json")
    assert not reopen_damaged_epoch(small_params, tiny_run, 2, log=pytest.fail)  # an intact epoch stays finished


def test_a_stage_rerun_after_retention_reruns_the_one_that_wrote_its_deleted_input(tiny_run, small_params, tmp_path):
    layout = copy_run(tiny_run, tmp_path)
    d = layout.epoch(2)
    for name in ("train.json", "metrics.json", "features.npy"):  # retention had deleted the features
        (d / name).unlink()
    layout.checkpoint(2).unlink()
    cut(d / "pca.json")
    logged = []
    start = first_stage_to_run(small_params, layout, 2, log=logged.append)
    assert EPOCH_STAGES[start] == "extract" and "features.npy not found" in logged[-1]
    finish(small_params, layout, 2, start)
    same_epoch(layout, tiny_run, 2)


def test_each_stage_s_command_line_takes_the_wiring_the_chain_runs_in_process(tiny_run, params_file, tmp_path):
    """pca, cluster and labels of epoch 2 through `python -m stages.<name>` with stage_arguments (as torchrun
    and the GPU check start them) write what the in-process chain wrote; extract and train take the same
    path under the GPU check's CPU run (tests/pipeline/tools/test_gpu_check.py)."""
    import shutil
    import subprocess
    import sys

    from stages.core.assignments import read_assignments
    from stages.core.layout import ASSIGNMENTS, CLUSTERING, FEATURES, PCA_FEATURES
    from stages.epoch import EPOCH_CHAIN, stage_arguments

    copy = RunLayout(tiny_run.dataset, tmp_path / "epochs", tiny_run.checkpoints)
    copy.epoch(2).mkdir(parents=True)
    shutil.copytree(tiny_run.epoch(1), copy.epoch(1))
    shutil.copy(tiny_run.epoch(2) / FEATURES, copy.epoch(2) / FEATURES)
    for stage in EPOCH_CHAIN:
        if stage.name in ("pca", "cluster", "labels"):
            args = stage_arguments(stage.name, copy, 2)
            assert args[::2] == [f"--{k.replace('_', '-')}" for k in stage.options(copy, 2, None)]
            done = subprocess.run([sys.executable, "-m", stage.module, "--params", params_file, *args],
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(copy.epoch(2) / PCA_FEATURES), np.load(tiny_run.epoch(2) / PCA_FEATURES))
    np.testing.assert_array_equal(np.load(copy.epoch(2) / CLUSTERING)["labels"],
                                  np.load(tiny_run.epoch(2) / CLUSTERING)["labels"])
    assert read_assignments(copy.epoch(2) / ASSIGNMENTS).equals(read_assignments(tiny_run.epoch(2) / ASSIGNMENTS))
    assert read_json(copy.epoch(2) / "labels.json")["nmi_previous"] == read_json(tiny_run.epoch(2) / "labels.json")[
        "nmi_previous"]
