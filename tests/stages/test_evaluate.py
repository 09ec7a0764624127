"""stages.evaluate final: a real two-epoch DeepCluster run on a few hundred Fashion-MNIST images, then
the whole evaluation (probes trained vs random vs pixels, kNN, clustering, pictures, report, MLflow)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.checkpoints import load_checkpoint
from stages.cluster import run_cluster
from stages.common import StageError, apply_overrides, epoch_dir, write_json
from stages.evaluate import (EVALUATE_DEFAULTS, epoch_metrics, evaluate_settings, main, random_init_network,
                             run_final_evaluation, score_tables)
from stages.extract import run_extract
from stages.labels import run_labels
from stages.pca import run_pca
from stages.prepare import prepare
from stages.train import init_checkpoint, run_train

REPO = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = {
    "prepare.max_train_images": 300, "prepare.max_test_images": 150,
    "model.width": 4, "model.fc_dim": 32, "extract.batch_size": 256, "extract.device": "cpu",
    "pca.dim": 16, "cluster.k": 10, "train.batch_size": 64, "train.device": "cpu",
    "evaluate.train_images": 200, "evaluate.probe_iters": 10, "evaluate.ascent_steps": 20,
    "evaluate.picture_filters": 3, "evaluate.picture_queries": 3, "evaluate.picture_neighbours": 4,
    "evaluate.picture_clusters": 3, "evaluate.picture_cluster_images": 4,
}
PICTURES = {"conv1_filters.png", "filters_conv1.png", "filters_conv3.png", "filters_conv5.png", "neighbours.png",
            "cluster_sizes.png", "epoch_curves.png", "cluster_samples.png"}


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    with open(REPO / "params.yaml") as f:
        return apply_overrides(yaml.safe_load(f), TINY)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_params) -> Path:
    """Two real DeepCluster epochs, stage by stage as the flow runs them, in a temp workspace."""
    if not FASHION.exists():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("run")
    dataset, epochs, ckpts = root / "data/dataset", root / "data/epochs", root / "models/checkpoints"
    prepare("fashion-mnist", FASHION, dataset, tiny_params["prepare"], seed=0)
    init_checkpoint(tiny_params, dataset, ckpts / "epoch_0000.pt")
    for e in (1, 2):
        d = epoch_dir(epochs, e)
        run_extract(tiny_params, dataset, ckpts / f"epoch_{e - 1:04d}.pt", d)
        run_pca(tiny_params, d / "features.npy", d, e)
        run_cluster(tiny_params, d / "pca_features.npy", d, e)
        run_labels(tiny_params, d, dataset, epoch_dir(epochs, e - 1))
        run_train(tiny_params, dataset, d / "assignments.parquet", ckpts / f"epoch_{e - 1:04d}.pt",
                  ckpts / f"epoch_{e:04d}.pt", e, d / "train.json")
        write_json(d / "metrics.json", epoch_metrics(d, e))
    shutil.copy(ckpts / "epoch_0002.pt", ckpts / "last.pt")
    return root


@pytest.fixture
def tracked(tmp_path, monkeypatch) -> str:
    """Real MLflow on SQLite in tmp_path; artifacts land under tmp_path too (cwd)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-tests")
    monkeypatch.chdir(tmp_path)
    return uri


def test_final_evaluation_end_to_end_with_mlflow(tiny_run, tiny_params, tmp_path, tracked):
    import mlflow

    from pipeline import tracking

    # the flow records its MLflow run in run.json; the evaluation must log into that same run
    with tracking.start_run(tiny_params, run_name="tiny") as run:
        run_id = run.info.run_id
    epochs = tmp_path / "epochs"
    shutil.copytree(tiny_run / "data/epochs", epochs)
    write_json(epochs / "run.json", {"fingerprint": "x", "mlflow_run_id": run_id, "params": tiny_params})
    out = tmp_path / "eval"
    m = run_final_evaluation(tiny_params, tiny_run / "data/dataset", epochs, tiny_run / "models/checkpoints/last.pt", out)

    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc"]
    for net in ("trained", "random"):
        for layer in layers:
            assert 0.0 <= m[f"probe.{net}.{layer}"] <= 1.0
        assert m[f"probe.{net}.best"] == max(m[f"probe.{net}.{c}"] for c in layers[:-1])
        assert 0.0 <= m[f"knn.{net}"] <= 1.0
        assert 0.0 <= m[f"cluster.{net}.nmi"] <= 1.0 and 0.0 <= m[f"cluster.{net}.acc"] <= 1.0
        assert -1.0 <= m[f"cluster.{net}.ari"] <= 1.0
    assert 0.3 < m["probe.pixels"] <= 1.0 and 0.0 <= m["knn.pixels"] <= 1.0
    assert m["test_nmi_k_classes"] == m["cluster.trained.nmi"]
    assert m["epochs"] == 2 and m["checkpoint_epoch"] == 2 and m["n_probe_train"] == 200 and m["n_test"] == 150
    assert m["first_nmi_previous"] == m["last_nmi_previous"]  # two epochs: one NMI with the previous epoch

    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(m)
    scores = {n: json.loads((out / "scores" / f"{n}.json").read_text()) for n in ("trained", "random", "pixels")}
    assert set(scores["trained"]) == {"acc", "ari", "knn", "nmi", "nmi_std", "probe_best", *[f"probe_{x}" for x in layers]}
    assert scores["pixels"]["probe_input"] == m["probe.pixels"]
    report = (out / "report.md").read_text()
    assert "| conv3 |" in report and "raw pixels" in report and "pictures/neighbours.png" in report
    assert {p.name for p in (out / "pictures").glob("*.png")} == PICTURES
    for p in (out / "pictures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000

    client = mlflow.MlflowClient(tracked)
    logged = client.get_run(run_id)
    assert logged.data.metrics["final.probe.trained.conv3"] == pytest.approx(m["probe.trained.conv3"])
    assert logged.data.metrics["final.cluster.pixels.nmi"] == pytest.approx(m["cluster.pixels.nmi"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation/pictures")}
    assert {f"evaluation/pictures/{p}" for p in PICTURES} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {"evaluation/metrics.json",
                                                                            "evaluation/report.md"}


def test_random_network_is_rebuilt_identically_when_epoch_0_was_deleted(tiny_run, tiny_params, tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copy(tiny_run / "models/checkpoints/last.pt", ckpts / "last.pt")
    trained = load_checkpoint(ckpts / "last.pt")
    rebuilt, source = random_init_network(tiny_params, ckpts / "last.pt", tiny_run / "data/dataset", trained, "cpu")
    original, _ = random_init_network(tiny_params, tiny_run / "models/checkpoints/last.pt", tiny_run / "data/dataset",
                                      trained, "cpu")
    assert source.startswith("rebuilt")
    body = {k: v for k, v in original.state_dict().items() if not k.startswith("top_layer.")}  # no head in a probe
    assert body and all(torch.equal(rebuilt.state_dict()[k], v) for k, v in body.items())


def test_cli_without_mlflow_and_without_pictures(tiny_run, tiny_params, tmp_path, tracked):
    params = apply_overrides(tiny_params, {"evaluate.pictures": False, "evaluate.probe_layers": ["conv5"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "eval"
    main(["final", "--params", str(tmp_path / "params.yaml"), "--dataset", str(tiny_run / "data/dataset"),
          "--epochs-root", str(tiny_run / "data/epochs"), "--checkpoint", str(tiny_run / "models/checkpoints/last.pt"),
          "--out", str(out), "--no-mlflow"])
    m = json.loads((out / "metrics.json").read_text())
    assert "probe.trained.conv5" in m and "probe.trained.conv3" not in m and "probe.trained.fc" not in m
    assert 0.0 <= m["knn.trained"] <= 1.0  # kNN and clustering use fc whatever is probed
    assert not (out / "pictures").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_evaluate_parameter_is_refused():
    with pytest.raises(StageError, match="probe_epochz"):
        evaluate_settings({"evaluate": {"probe_epochz": 3}})
    assert evaluate_settings({}) == EVALUATE_DEFAULTS  # params files from before the section existed


def test_repo_params_name_every_evaluate_setting():
    with open(REPO / "params.yaml") as f:
        assert set(yaml.safe_load(f)["evaluate"]) == set(EVALUATE_DEFAULTS)


def test_score_tables_are_one_row_per_feature_source():
    summary = {"probe.trained.conv1": 0.8, "probe.trained.best": 0.8, "probe.random.conv1": 0.7, "probe.pixels": 0.6,
               "knn.trained": 0.5, "cluster.trained.nmi": 0.4, "cluster.pixels.acc": 0.3, "epochs": 3, "seconds": 9.0}
    assert score_tables(summary) == {"trained": {"probe_conv1": 0.8, "probe_best": 0.8, "knn": 0.5, "nmi": 0.4},
                                     "random": {"probe_conv1": 0.7}, "pixels": {"probe_input": 0.6, "acc": 0.3}}


def test_missing_epochs_give_a_clear_error(tmp_path, tiny_params):
    with pytest.raises(StageError, match="no finished epoch"):
        run_final_evaluation(tiny_params, tmp_path, tmp_path / "epochs", tmp_path / "last.pt", tmp_path / "eval")


def test_artifacts_of_a_sqlite_store_land_beside_its_database(tmp_path, monkeypatch):
    from pipeline import tracking

    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "artifact-location")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.md").write_text("hello")
    with tracking.start_run({"a": 1}):
        tracking.log_artifacts([tmp_path / "report.md"], "evaluation")
    assert (tmp_path / "store" / "mlartifacts").is_dir()
    assert list((tmp_path / "store" / "mlartifacts").rglob("report.md"))
    assert not (tmp_path / "mlruns").exists()


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory, tiny_params, tiny_run) -> tuple[Path, dict]:
    """One epoch on an unlabelled folder of 120 PNG files (prepare.source: folder)."""
    from PIL import Image

    from stages.data import load_split

    root = tmp_path_factory.mktemp("folder")
    pixels = load_split(tiny_run / "data/dataset", "train").pixels[:120]
    for i, img in enumerate(pixels):
        Image.fromarray(np.asarray(img)[..., 0]).save(root / f"img_{i:03d}.png")
    params = apply_overrides(tiny_params, {"prepare.source": "folder", "prepare.image_size": 32, "cluster.k": 5,
                                           "evaluate.train_images": 80})
    dataset, ckpts, epochs = root / "dataset", root / "ckpt", root / "epochs"
    prepare("folder", root, dataset, params["prepare"], seed=0)
    init_checkpoint(params, dataset, ckpts / "epoch_0000.pt")
    d = epoch_dir(epochs, 1)
    run_extract(params, dataset, ckpts / "epoch_0000.pt", d)
    run_pca(params, d / "features.npy", d, 1)
    run_cluster(params, d / "pca_features.npy", d, 1)
    run_labels(params, d, dataset)
    run_train(params, dataset, d / "assignments.parquet", ckpts / "epoch_0000.pt", ckpts / "last.pt", 1, d / "train.json")
    write_json(d / "metrics.json", epoch_metrics(d, 1))
    return root, params


def test_unlabelled_folder_gets_pictures_and_no_scores(unlabelled_run, tmp_path):
    root, params = unlabelled_run
    out = tmp_path / "eval"
    m = run_final_evaluation(params, root / "dataset", root / "epochs", root / "ckpt" / "last.pt", out, log_mlflow=False)
    assert not any(k.startswith(("probe.", "knn.", "cluster.")) for k in m)
    assert m["n_probe_train"] == 80 and m["n_test"] == 40  # held out: the train images outside the subset
    assert {n: json.loads((out / "scores" / f"{n}.json").read_text()) for n in ("trained", "random", "pixels")} == \
        {"trained": {}, "random": {}, "pixels": {}}
    assert {p.name for p in (out / "pictures").glob("*.png")} == PICTURES
    assert "No labelled held-out split" in (out / "report.md").read_text()
