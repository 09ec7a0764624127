import json
import shutil

import pytest
import torch

from pipeline.tools.screen import RESULTS, main, screen, table
from stages.core.layout import checkpoint_name
from stages.core.params import apply_overrides


def test_screen_runs_the_flows_epochs_and_scores_the_chosen_ones(small_params, fashion_dataset, tiny_run, tmp_path):
    rows = screen("same", small_params, [0, 1], fashion_dataset, root=tmp_path)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert 0 <= r["nmi"] <= 1 and 0 < r["acc"] <= 1 and 0 < r["knn"] <= 1 and r["acc_std"] >= 0
        assert 0 < r["knn_conv"] <= 1 and r["knn_conv_layer"] in {f"conv{i}" for i in range(1, 6)}
    # the same stages and seeds as a run of the flow: epoch 1's network is the flow's epoch 1
    mine = torch.load(tmp_path / "same" / "checkpoints" / tiny_run.checkpoint(1).name, weights_only=True)["model"]
    flows = torch.load(tiny_run.checkpoint(1), weights_only=True)["model"]
    assert mine.keys() == flows.keys()
    for key in flows:
        torch.testing.assert_close(mine[key], flows[key])
    assert not list((tmp_path / "same" / "epochs").glob("*/*.npy"))  # features are dropped once trained


def test_rerunning_a_name_resumes_without_training_or_scoring_again(small_params, fashion_dataset, tmp_path):
    screen("again", small_params, [1], fashion_dataset, root=tmp_path)
    ckpt = next((tmp_path / "again" / "checkpoints").glob("*0001*"))
    stamp = ckpt.stat().st_mtime_ns
    rows = screen("again", small_params, [0, 1], fashion_dataset, root=tmp_path)  # epoch 0 is new, 1 is done
    assert [r["epoch"] for r in rows] == [0, 1] and ckpt.stat().st_mtime_ns == stamp
    lines = (tmp_path / "again" / RESULTS).read_text().splitlines()
    assert sorted(json.loads(line)["epoch"] for line in lines) == [0, 1]
    assert "| again | 1 |" in table(tmp_path)


def test_a_fixed_eval_seed_scores_runs_of_another_seed_alike(small_params, fashion_dataset, tmp_path):
    (ours,) = screen("seed0", small_params, [0], fashion_dataset, root=tmp_path)
    other = apply_overrides(small_params, {"run.seed": 1})
    (theirs,) = screen("seed1", other, [0], fashion_dataset, root=tmp_path)
    # seed 0's random network under seed 1's run: with eval_seed 0 it must score exactly as in seed 0's screen
    (tmp_path / "swap" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "seed0" / "checkpoints" / checkpoint_name(0), tmp_path / "swap" / "checkpoints")
    (swapped,) = screen("swap", other, [0], fashion_dataset, root=tmp_path, eval_seed=0)
    assert swapped["eval_seed"] == 0 and theirs["eval_seed"] == 1
    keys = ("knn", "knn_conv", "knn_conv_layer", "acc", "nmi")
    assert {k: swapped[k] for k in keys} == {k: ours[k] for k in keys}
    # and a rescore under another eval seed is a new row, not the stored one
    (again,) = screen("swap", other, [0], fashion_dataset, root=tmp_path)
    assert again["eval_seed"] == 1 and len((tmp_path / "swap" / RESULTS).read_text().splitlines()) == 2


def test_overrides_reach_the_run_and_bad_ones_are_refused(small_params, fashion_dataset, tmp_path, write_params,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path, small_params)
    main(["lr", "--params", str(params), "--dataset", str(fashion_dataset), "--eval-at", "1",
          "--set", "train.lr_schedule=cosine", "--set", "run.epochs=4", "--set", "train.lr=0.2"])
    stats = json.loads(next((tmp_path / "data" / "screen" / "lr" / "epochs").glob("*/train.json")).read_text())
    assert stats["lr"] == 0.2  # epoch 1 of a cosine schedule starts at train.lr
    with pytest.raises(SystemExit) as refused:
        main(["bad", "--params", str(params), "--dataset", str(fashion_dataset), "--set", "train.lr=-1"])
    assert "train.lr" in str(refused.value.code)  # the message names the key, and nothing ran:
    assert not (tmp_path / "data" / "screen" / "bad").exists()
