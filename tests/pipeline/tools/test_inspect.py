"""pipeline.tools.inspect: comparing two epochs' assignments (the CLI itself runs in test_orchestration)."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline.tools.inspect import compare_assignments, parse_ref
from stages.core.errors import StageError


def test_compare_pairs_clusters_before_counting_changed_images():
    ids = [f"i{n}" for n in range(8)]
    a = pd.DataFrame({"image_id": ids, "cluster": [0, 0, 0, 1, 1, 1, 2, 2]})
    relabelled = pd.DataFrame({"image_id": ids, "cluster": [5, 5, 5, 3, 3, 3, 9, 9]})
    same = compare_assignments(a, relabelled)
    assert same["changed"] == 0 and same["nmi"] == pytest.approx(1.0)
    moved = relabelled.assign(cluster=[5, 5, 3, 3, 3, 3, 9, 9])  # one image moved
    assert compare_assignments(a, moved)["changed"] == 1
    # rows in another order are matched by image_id
    assert compare_assignments(a, relabelled.iloc[::-1])["changed"] == 0


def test_refs_name_the_main_run_or_an_ablation():
    assert parse_ref("7").dir == "data/epochs/0007"
    assert parse_ref("k50:7").dir == "data/ablations/k50/0007"
    with pytest.raises(StageError, match="is not an epoch"):
        parse_ref("k50:x")
