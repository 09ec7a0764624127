"""stages.core.assignments: NMI between epochs matched by image_id, cluster-size statistics, the assignments file."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from stages.core.assignments import (cluster_size_stats, match_clusters, nmi, nmi_between, read_assignments,
                                     size_histogram)
from stages.core.errors import StageError
from stages.core.layout import ASSIGNMENTS


def h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_nmi_uses_the_geometric_normalisation_of_the_paper():
    a = [0, 0, 1, 1]
    b = [0, 0, 0, 1]
    # By hand: H(A) = ln 2, H(B) = H(3/4, 1/4), H(B|A) = 1/2 * H(1/2, 1/2), I = H(B) - H(B|A).
    mutual = h(0.75, 0.25) - 0.5 * math.log(2)
    expected = mutual / math.sqrt(math.log(2) * h(0.75, 0.25))  # 0.3456; arithmetic mean: 0.3437
    assert nmi(np.array(a), np.array(b)) == pytest.approx(expected, rel=1e-9)
    assert nmi(np.array([0, 0, 1, 1, 2, 2]), np.array([5, 5, 9, 9, 1, 1])) == pytest.approx(1.0)  # relabelled
    assert nmi(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)  # independent


def test_nmi_is_scikit_learns_geometric_nmi_limit_cases_included():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, ka, n), rng.integers(0, kb, n)) for n, ka, kb in ((50, 3, 7), (5000, 300, 10), (1000, 1000, 2))]
    y = rng.integers(0, 10, 2000)
    cases += [(y, np.where(rng.random(2000) < 0.8, y, rng.integers(0, 10, 2000))),  # mostly the same
              (np.zeros(10, int), np.zeros(10, int)), (np.zeros(10, int), np.arange(10)), (np.arange(10), np.arange(10)),
              (np.array(["a", "b", "a"]), np.array([3, 4, 3])), (np.zeros(0, int), np.zeros(0, int))]
    for a, b in cases:
        assert nmi(a, b) == pytest.approx(normalized_mutual_info_score(a, b, average_method="geometric"), abs=1e-12)


def frame(ids, clusters) -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(ids), "cluster": np.asarray(clusters, dtype=np.int64)})


def test_nmi_between_epochs_matches_rows_by_image_id():
    rng = np.random.default_rng(0)
    ids = [f"img-{i:03d}" for i in range(300)]
    previous = rng.integers(0, 10, size=300)
    current = (previous * 7 + 3) % 10  # the same partition under new cluster ids
    current[:60] = rng.integers(0, 10, size=60)  # with some images moved
    cur = frame(ids, current)
    prev = frame(ids, previous)
    expected = nmi(current, previous)  # aligned rows: the plain NMI is the reference
    assert 0.3 < expected < 0.95
    shuffled = prev.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert not shuffled["image_id"].equals(prev["image_id"])
    assert nmi_between(cur, shuffled) == pytest.approx(expected, rel=1e-12)
    assert nmi_between(cur.sample(frac=1.0, random_state=2), shuffled) == pytest.approx(expected, rel=1e-12)
    # positional pairing of the shuffled rows would have given an unrelated, much lower value
    assert nmi(current, shuffled["cluster"].to_numpy()) < 0.2


def test_nmi_between_uses_only_the_images_both_epochs_share():
    ids = [f"i{i}" for i in range(8)]
    cur = frame(ids, [0, 0, 1, 1, 2, 2, 3, 3])
    prev = frame(ids[:6] + ["other-1", "other-2"], [4, 4, 5, 5, 6, 6, 0, 1])
    assert nmi_between(cur, prev) == pytest.approx(1.0)
    with pytest.raises(StageError, match="share no image_id"):
        nmi_between(cur, frame(["x", "y"], [0, 1]))


def test_cluster_size_stats_on_constructed_labels():
    labels = np.array([0, 0, 0, 2, 2, 5])  # sizes 3, 0, 2, 0, 0, 1, 0 for k = 7
    s = cluster_size_stats(labels, 7)
    assert s["k"] == 7 and s["n_clusters"] == 3 and s["empty_clusters"] == 4
    assert (s["size_min"], s["size_median"], s["size_max"]) == (1, 2.0, 3)
    assert s["size_cv"] == pytest.approx(math.sqrt(2 / 3) / 2)  # std(3, 2, 1) / mean(3, 2, 1)
    assert s["sizes"] == [3, 0, 2, 0, 0, 1, 0]
    balanced = cluster_size_stats(np.repeat(np.arange(4), 5), 4)
    assert balanced["size_cv"] == 0.0 and balanced["empty_clusters"] == 0


def test_match_clusters_pairs_groups_one_to_one_and_greedy_never_overcounts(monkeypatch):
    from stages.core import assignments as labels_module

    a = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    b = np.array([5, 5, 7, 7, 7, 7, 9, 9, 9, 5])  # best pairing 5-0, 7-1, 9-2: 2 + 3 + 3
    assert match_clusters(a, b) == (8, "hungarian")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 30, 2000), rng.integers(0, 30, 2000)
    best, _ = match_clusters(x, y)
    monkeypatch.setattr(labels_module, "MAX_DENSE_PAIRS", 5)
    greedy, method = match_clusters(x, y)
    assert method == "greedy" and greedy <= best
    assert match_clusters(a, b) == (8, "greedy")  # here the largest overlaps are the best pairing


def test_size_histogram_bins_by_powers_of_two():
    h = size_histogram(np.array([0, 0, 1, 2, 3, 5, 8]))
    assert h.to_dict("records") == [{"size": "0 (empty)", "clusters": 2, "images": 0},
                                    {"size": "1", "clusters": 1, "images": 1},
                                    {"size": "2-3", "clusters": 2, "images": 5},
                                    {"size": "4-7", "clusters": 1, "images": 5},
                                    {"size": "8-15", "clusters": 1, "images": 8}]


def test_read_assignments_missing_file_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="not found"):
        read_assignments(tmp_path / ASSIGNMENTS)
