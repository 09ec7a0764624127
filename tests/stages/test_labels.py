"""stages.labels: NMI between epochs matched by image_id, cluster-size statistics, assignments.parquet."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

from stages.core.assignments import (nmi)
from stages.core.clustering import Clustering, save_clustering
from stages.core.data import load_split
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.layout import ASSIGNMENTS
from stages.labels import run_labels


def write_epoch(directory, labels: np.ndarray, k: int) -> None:
    """A clustering of the training images, row i = training image i (what cluster writes)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    save_clustering(directory / "clusters.npz", Clustering(
        labels=labels.astype(np.int64), distances=rng.random(len(labels)).astype(np.float32),
        centroids=np.zeros((k, 4), np.float32), objective=np.ones(3), seed=1))


def test_run_labels_writes_assignments_and_statistics(tmp_path, fashion_dataset, small_params):
    train = load_split(fashion_dataset, "train")
    k = 12
    labels = train.labels.copy()  # cluster = true class: NMI with the labels is 1; clusters 10, 11 empty
    write_epoch(tmp_path / "0001", labels, k)
    s1 = run_labels(small_params, tmp_path / "0001", fashion_dataset, previous=tmp_path / "0000")

    a = pd.read_parquet(tmp_path / "0001" / ASSIGNMENTS)
    assert list(a.columns) == ["image_id", "cluster", "distance"]
    assert a["image_id"].tolist() == list(train.ids) and a["cluster"].tolist() == labels.tolist()
    assert a["cluster"].dtype == np.int64 and a["distance"].dtype == np.float32
    assert s1["nmi_previous"] is None  # no previous epoch
    assert s1["nmi_labels"] == pytest.approx(1.0)
    assert s1["k"] == k and s1["empty_clusters"] == k - len(np.unique(labels))
    assert read_json(tmp_path / "0001" / "labels.json") == s1

    # Epoch 2: the clusters renamed: the same partition, NMI 1; half the images moved: NMI below 1.
    write_epoch(tmp_path / "0002", (labels + 3) % k, k)
    s2 = run_labels(small_params, tmp_path / "0002", fashion_dataset, previous=tmp_path / "0001")
    assert s2["nmi_previous"] == pytest.approx(1.0) and s2["nmi_labels"] == pytest.approx(1.0)
    moved = labels.copy()
    moved[::2] = np.random.default_rng(2).integers(0, 10, size=len(moved[::2]))
    write_epoch(tmp_path / "0003", moved, k)
    s3 = run_labels(small_params, tmp_path / "0003", fashion_dataset, previous=tmp_path / "0002")
    assert s3["nmi_previous"] == pytest.approx(nmi(moved, labels)) and s3["nmi_previous"] < 0.9


def test_run_labels_on_unlabelled_images_reports_no_label_nmi(tmp_path, small_params):
    from PIL import Image
    from skimage import data as skdata

    from stages.prepare import prepare

    (tmp_path / "flat").mkdir()
    for name in ("camera", "coins", "moon"):
        Image.fromarray(getattr(skdata, name)()).save(tmp_path / "flat" / f"{name}.png")
    prepare("folder", tmp_path / "flat", tmp_path / "dataset", small_params.prepare)
    write_epoch(tmp_path / "0001", np.array([0, 2, 2]), 3)
    s = run_labels(small_params, tmp_path / "0001", tmp_path / "dataset")
    assert s["nmi_labels"] is None and s["nmi_previous"] is None
    assert (s["n_clusters"], s["empty_clusters"], s["sizes"]) == (2, 1, [1, 0, 2])


def test_run_labels_refuses_a_clustering_of_another_dataset(tmp_path, fashion_dataset, small_params):
    train = load_split(fashion_dataset, "train")
    write_epoch(tmp_path / "e", np.zeros(len(train) - 1, np.int64), 2)
    with pytest.raises(StageError, match=f"{len(train) - 1} cluster labels but .* {len(train)} training images"):
        run_labels(small_params, tmp_path / "e", fashion_dataset)
    assert not (tmp_path / "e" / ASSIGNMENTS).exists()


