"""pipeline.workspace: the run's identity (what makes a run resumable) and its agreement with dvc.yaml."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.workspace import CODE_MODULES, EPOCH_SECTIONS, claim_workspace, run_fingerprint
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.layout import RunLayout
from stages.core.params import apply_overrides

REPO = Path(__file__).resolve().parents[2]


def test_fingerprint_ignores_the_epoch_count_and_the_evaluation(small_params):
    same = [{"run.epochs": 50}, {"evaluate.knn_k": 5, "evaluate.pictures": False}, {"prepare.num_workers": 1},
            {"train.keep_checkpoint_every": 3}]
    other = [{"run.seed": 1}, {"cluster.k": 11}, {"pca.dim": 8}, {"train.lr": 0.3}, {"model.sobel": False}]
    base = run_fingerprint(small_params)
    assert all(run_fingerprint(apply_overrides(small_params, o)) == base for o in same)
    assert all(run_fingerprint(apply_overrides(small_params, o)) != base for o in other)


def test_a_finished_run_is_resumed_after_an_evaluate_change(tmp_path, small_params):
    layout = RunLayout(tmp_path / "dataset", tmp_path / "epochs", tmp_path / "ckpt")
    first = claim_workspace(small_params, layout, fresh=False)
    (layout.epoch(1)).mkdir(parents=True)
    (layout.epoch(1) / "metrics.json").write_text("{}")
    changed = apply_overrides(small_params, {"evaluate.knn_k": 3})
    again = claim_workspace(changed, layout, fresh=False)  # refused with "cannot be resumed" before
    assert again["fingerprint"] == first["fingerprint"]
    assert read_json(layout.run_file)["params"]["evaluate"]["knn_k"] == 3
    assert (layout.epoch(1) / "metrics.json").exists()


def test_dvc_yaml_deepcluster_stage_lists_the_code_and_sections_the_run_identity_hashes():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["deepcluster"]
    stage_code = {d.removeprefix("stages/") for d in stage["deps"] if d.startswith("stages/")}
    assert stage_code == {m.removesuffix("/*.py") for m in CODE_MODULES}
    assert set(stage["params"]) == {"run", *EPOCH_SECTIONS}


def test_fresh_without_a_dataset_for_the_new_run_keeps_the_old_run(tmp_path, small_params, fashion_dataset):
    layout = RunLayout(tmp_path / "dataset", tmp_path / "epochs", tmp_path / "ckpt")
    shutil.copytree(fashion_dataset, layout.dataset)
    claim_workspace(small_params, layout, fresh=False)
    (layout.epoch(1)).mkdir(parents=True)
    (layout.epoch(1) / "metrics.json").write_text("{}")
    shutil.rmtree(layout.dataset)  # e.g. a wrong --dataset: the new run could not even start
    with pytest.raises(StageError, match=r"no dataset at .*dataset for the new run.*was left as it is"):
        claim_workspace(apply_overrides(small_params, {"cluster.k": 5}), layout, fresh=True)
    assert (layout.epoch(1) / "metrics.json").exists() and layout.run_file.exists()
