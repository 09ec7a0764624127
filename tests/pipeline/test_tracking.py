"""pipeline.tracking: which figures reach MLflow, where artifacts land, and the `publish` stage."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.tracking import numeric_metrics, publish
from stages.core.errors import StageError
from stages.core.io import write_json

PICTURES = {"conv1_filters.png", "filters_conv1.png", "filters_conv3.png", "filters_conv5.png", "neighbours.png",
            "cluster_sizes.png", "epoch_curves.png", "cluster_samples.png"}


def test_numeric_metrics_keeps_finite_numbers_only():
    metrics = {"loss": 1.5, "n_clusters": 97, "nmi_previous": None, "nan": float("nan"), "inf": float("inf"),
               "flag": True, "device": "cpu"}
    assert numeric_metrics(metrics) == {"loss": 1.5, "n_clusters": 97.0}


def test_artifacts_of_a_sqlite_store_land_beside_its_database(tmp_path, monkeypatch):
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "artifact-location")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.md").write_text("hello")
    with tracking.start_run({"a": 1}):
        tracking.log_artifacts([tmp_path / "report.md"], "evaluation")
    assert list((tmp_path / "store" / "mlartifacts").rglob("report.md"))
    assert not (tmp_path / "mlruns").exists()


def test_a_nested_run_whose_parent_is_gone_becomes_a_top_level_run(mlflow_uri):
    with tracking.start_run(run_name="child", parent_run_id="0123456789abcdef0123456789abcdef") as run:
        pass
    assert "mlflow.parentRunId" not in mlflow.MlflowClient(mlflow_uri).get_run(run.info.run_id).data.tags


@pytest.mark.slow
def test_publish_logs_the_final_evaluation_and_the_model_into_the_runs_mlflow_run(tiny_run, tiny_eval, small_params,
                                                                                  tmp_path, mlflow_uri):
    out, m = tiny_eval
    with tracking.start_run(small_params.model_dump(), run_name="tiny") as run:  # the flow's run, recorded in run.json
        run_id = run.info.run_id
    write_json(tmp_path / "run.json", {"fingerprint": "x", "mlflow_run_id": run_id, "params": small_params.model_dump()})
    assert publish(tmp_path, out, tiny_run.last_checkpoint, tiny_run.dataset) == run_id
    client = mlflow.MlflowClient(mlflow_uri)
    logged = client.get_run(run_id)
    assert logged.data.metrics["final.probe.trained.conv3"] == pytest.approx(m["probe.trained.conv3"])
    assert logged.data.metrics["final.cluster.pixels.nmi"] == pytest.approx(m["cluster.pixels.nmi"])
    assert client.get_metric_history(run_id, "final.knn.trained")[0].step == 2  # the run's last epoch
    pictures = {a.path for a in client.list_artifacts(run_id, "evaluation/pictures")}
    assert pictures == {f"evaluation/pictures/{p}" for p in PICTURES}
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {"evaluation/metrics.json",
                                                                            "evaluation/report.md"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/last.pt"]
    # the feature extractor, registered, the alias on it: outside a DVC experiment it is the last finished run
    version = client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.LAST_FINISHED)
    assert version.run_id == run_id


@pytest.mark.slow
def test_the_registered_model_gives_the_trained_networks_features_without_project_code(tiny_run, tiny_eval, small_params,
                                                                                     tmp_path, mlflow_uri, monkeypatch):
    from stages.core.checkpoints import load_checkpoint, model_from_checkpoint
    from stages.core.data import load_split, normalize

    write_json(tmp_path / "run.json", {"fingerprint": "x", "mlflow_run_id": None, "params": small_params.model_dump()})
    publish(tmp_path, tiny_eval[0], tiny_run.last_checkpoint, tiny_run.dataset)
    monkeypatch.setenv("DVC_EXP_NAME", "an-experiment")  # an experiment's model: a new version, the alias stays put
    publish(tmp_path, tiny_eval[0], tiny_run.last_checkpoint, tiny_run.dataset)
    client = mlflow.MlflowClient(mlflow_uri)
    versions = client.search_model_versions(f"name='{tracking.REGISTERED_MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert int(client.get_model_version_by_alias(tracking.REGISTERED_MODEL, tracking.LAST_FINISHED).version) == 1
    uri = f"models:/{tracking.REGISTERED_MODEL}@{tracking.LAST_FINISHED}"
    loaded = mlflow.pytorch.load_model(uri)
    assert type(loaded).__module__.startswith("torch.fx")  # an exported graph, not an unpickled project class
    images = load_split(tiny_run.dataset, "test")
    batch = torch.from_numpy(np.asarray(images.pixels[:5])).permute(0, 3, 1, 2)  # 28 px crops of 28 px images: the images
    meta = images.meta
    network = model_from_checkpoint(load_checkpoint(tiny_run.last_checkpoint)).eval()
    with torch.no_grad():
        expected = network.fc_features(normalize(batch, meta["mean"], meta["std"]))
        got = loaded(batch.float() / 255)
    assert got.shape == (5, small_params.model.fc_dim)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    view = mlflow.models.get_model_info(uri).metadata
    assert view == {"channels": 1, "resize": 32, "crop_size": small_params.extract.crop_size, "epoch": 2}


def test_publish_without_an_evaluation_names_the_missing_stage(tmp_path, small_params, mlflow_uri):
    write_json(tmp_path / "run.json", {"fingerprint": "x", "mlflow_run_id": None, "params": small_params.model_dump()})
    with pytest.raises(StageError, match="run the evaluate stage first"):
        publish(tmp_path, tmp_path / "eval", tmp_path / "last.pt", tmp_path / "dataset")
