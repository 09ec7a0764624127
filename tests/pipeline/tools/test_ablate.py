"""pipeline.tools.ablate on a real two-epoch run (no DVC project: versioning off), with MLflow on SQLite."""
from __future__ import annotations

import shutil

import mlflow
import pytest

from pipeline import tracking
from pipeline.tools.ablate import ablate, provide_features
from stages.core.errors import StageError
from stages.core.io import read_json, write_json
from stages.core.layout import RunLayout
from stages.core.params import apply_overrides


@pytest.fixture
def main_run(tmp_path, tiny_run, tiny_eval, small_params, mlflow_uri) -> tuple[RunLayout, str]:
    """A copy of tiny_run with its MLflow run holding the published final evaluation, as after `dvc repro`."""
    layout = RunLayout(tiny_run.dataset, tmp_path / "epochs", tmp_path / "checkpoints")
    shutil.copytree(tiny_run.epochs_root, layout.epochs_root)
    shutil.copytree(tiny_run.checkpoints, layout.checkpoints)
    with tracking.start_run(small_params.model_dump(), run_name="main") as run:
        run_id = run.info.run_id
    write_json(layout.run_file, {"fingerprint": "f", "mlflow_run_id": run_id, "params": small_params.model_dump()})
    tracking.publish(layout.epochs_root, tiny_eval[0], layout.last_checkpoint, layout.dataset)
    return layout, run_id


def snapshot(client: mlflow.MlflowClient, run_id: str) -> tuple[dict, list]:
    run = client.get_run(run_id)
    paths = sorted(a.path for top in client.list_artifacts(run_id) for a in
                   ([top] if not top.is_dir else client.list_artifacts(run_id, top.path)))
    return run.data.metrics, paths


@pytest.mark.slow
def test_evaluate_ablation_logs_into_its_own_nested_run_and_leaves_the_main_run_alone(main_run, tmp_path, mlflow_uri):
    layout, main_id = main_run
    client = mlflow.MlflowClient(mlflow_uri)
    before = snapshot(client, main_id)
    rec = ablate("evaluate", 2, {"evaluate.knn_k": 5}, "knn5", epochs_root=layout.epochs_root, dataset=layout.dataset,
                 checkpoints=layout.checkpoints, root=tmp_path / "ablations", dvc=False, log=lambda _: None)
    assert snapshot(client, main_id) == before  # used to receive the ablation's final.* figures and pictures
    nested = client.get_run(rec["mlflow_run_id"])
    assert nested.data.tags["mlflow.parentRunId"] == main_id
    assert nested.data.metrics["eval.knn.trained"] == pytest.approx(rec["metrics"]["eval.knn.trained"])
    assert read_json(tmp_path / "ablations" / "knn5" / "0002" / "eval" / "metrics.json")["knn.trained"] == \
        pytest.approx(rec["metrics"]["eval.knn.trained"])


@pytest.mark.slow
def test_labels_ablation_against_the_main_runs_previous_epoch(main_run, tmp_path):
    layout, _ = main_run
    rec = ablate("labels", 2, {}, "same", epochs_root=layout.epochs_root, dataset=layout.dataset,
                 checkpoints=layout.checkpoints, root=tmp_path / "ablations", dvc=False, log=lambda _: None)
    main = read_json(layout.epoch(2) / "metrics.json")
    assert rec["metrics"]["nmi_main"] == pytest.approx(1.0)  # the same clustering, relabelled from it
    assert rec["metrics"]["nmi_previous"] == pytest.approx(main["nmi_previous"])
    assert rec["metrics"]["nmi_labels"] == pytest.approx(main["nmi_labels"])


@pytest.mark.slow
def test_an_override_that_cannot_change_the_rerun_is_refused(main_run, tmp_path):
    layout, _ = main_run
    with pytest.raises(StageError, match="train.lr cannot change a cluster rerun"):
        ablate("cluster", 2, {"train.lr": 0.1}, "lr", epochs_root=layout.epochs_root, dataset=layout.dataset,
               checkpoints=layout.checkpoints, root=tmp_path / "ablations", dvc=False)
    assert not (tmp_path / "ablations").exists()


def test_ablation_without_features_or_checkpoint_explains_what_to_do(tmp_path, small_params):
    params = apply_overrides(small_params, {"extract.keep_features_every": 0, "train.keep_checkpoint_every": 5})
    layout = RunLayout(tmp_path / "dataset", tmp_path / "ablation", tmp_path / "ckpt")
    layout.epoch(7).mkdir(parents=True)
    with pytest.raises(StageError, match=r"keep_features_every=0.*epoch_0006.pt.*keep_checkpoint_every=5"):
        provide_features(params, layout, tmp_path / "main" / "0007", 7, print)
