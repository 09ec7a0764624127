"""pipeline.tools.studies: which experiments each study queues, and the table it reads back from DVC experiments."""
from __future__ import annotations

import pytest

from pipeline.tools.studies import PREFIX, ROWS, STUDIES, experiments, queue_command, rows_of, table
from stages.core.errors import StageError


def test_a_row_shared_by_several_studies_is_queued_once():
    rows = rows_of(["all"])
    assert sorted(rows) == sorted(ROWS) and len(rows) == len(set(rows))
    assert rows_of(["clustering", "input"]) == ["defaults", "pic", "raw"]
    with pytest.raises(StageError, match="unknown study learning: choose from clustering, input, k or all"):
        rows_of(["learning"])


def test_the_k_study_spans_10_to_1000_with_at_least_five_values():
    ks = [ROWS[r].get("cluster.k", "auto") for r in STUDIES["k"]]
    numbers = [k for k in ks if k != "auto"]
    assert len(ks) >= 5 and min(numbers) == 10 and max(numbers) == 1000


def test_queue_command_sets_each_change_as_a_yaml_value():
    args = queue_command("pic")
    assert args[args.index("-n") + 1] == PREFIX + "pic"
    sets = [args[i + 1] for i, a in enumerate(args) if a == "-S"]
    assert sets == ['cluster.method="pic"', 'cluster.k="auto"']
    assert [args[i + 1] for i, a in enumerate(args) if a == "-S"] and "--queue" in args
    assert [a for a in queue_command("raw") if a.startswith("model.")] == ["model.sobel=false"]


def test_only_finished_experiments_are_reported_and_the_newest_of_a_name_wins():
    def exp(name, rev, stamp, state="success"):
        return {"name": name, "executor": {"state": state},
                "revs": [{"rev": rev, "name": name, "error": None, "data": {"timestamp": stamp}}]}
    show = [{"rev": "workspace", "experiments": None},
            {"rev": "c1", "experiments": [exp("study-pic", "old", "2026-12-01T10:00:00")]},
            {"rev": "c2", "experiments": [exp("study-pic", "new", "2026-12-02T10:00:00"),
                                          exp("study-raw", "r", "2026-12-02T11:00:00", state="running"),
                                          exp("study-k30", "w", "2026-12-02T11:00:00", state="queued"),
                                          exp("study-k10", "q", "2026-12-02T11:00:00", state="failed")]}]
    found = experiments(show)
    assert {name: {k: e[k] for k in ("rev", "timestamp", "state")} for name, e in found.items()} == {
        "study-pic": {"rev": "new", "timestamp": "2026-12-02T10:00:00", "state": "success"}}
    assert found["study-pic"]["data"] == {"timestamp": "2026-12-02T10:00:00"}
    # queueing skips what is queued or running as well as what is done, and retries what failed
    assert sorted(experiments(show, states=("success", "queued", "running"))) == ["study-k30", "study-pic", "study-raw"]


def test_table_puts_each_row_under_its_studies_with_trained_random_and_pixel_figures():
    import pandas as pd

    m = {"probe.trained.best": 0.8945, "probe.random.best": 0.888, "knn.trained": 0.8115, "knn.random": 0.7802,
         "knn.pixels": 0.82, "cluster.trained.acc": 0.53257, "cluster.trained.acc_std": 0.058,
         "cluster.random.acc": 0.5477, "cluster.pixels.acc": 0.5061, "cluster.trained.nmi": 0.518,
         "cluster.trained.nmi_std": 0.01, "last_nmi_previous": 0.80247}
    row = {"metrics": m, "curves": pd.DataFrame({"epoch": [1, 2], "n_clusters": [300, 312]}), "sizes": None}
    text = table({"defaults": row})
    lines = [line for line in text.splitlines() if f"`{PREFIX}defaults`" in line]
    assert [line.split(" | ")[0] for line in lines] == ["| clustering", "| input", "| k"]
    assert "| 312 | 0.802 | 89.5 / 88.8 | 81.2 / 78.0 / 82.0 | 53.3 ± 5.8 / 54.8 / 50.6 | 0.518 ± 0.010 / – / – |" in lines[0]
