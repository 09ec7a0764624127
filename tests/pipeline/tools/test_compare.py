"""pipeline.tools.compare: the experiments' table from `dvc exp show --json`, and each view through main()."""
from __future__ import annotations

import json

from pipeline.tools.compare import experiments_table, main

HEADLINE = {"probe.trained.best": 0.8942, "probe.random.best": 0.888, "knn.trained": 0.8265, "knn.random": 0.7802,
            "knn.pixels": 0.82, "cluster.trained.acc": 0.5271, "cluster.random.acc": 0.5477,
            "cluster.pixels.acc": 0.5061, "cluster.trained.nmi": 0.5258, "cluster.random.nmi": 0.492,
            "cluster.pixels.nmi": 0.5034, "last_nmi_previous": 0.78}


def data(rev, k, headline=None, stamp=None):
    """As `dvc exp show --json` gives a revision's data."""
    return {"rev": rev, "timestamp": stamp, "params": {"params.yaml": {"data": {"cluster": {"k": k, "method": "kmeans"}}}},
            "metrics": {"data/eval/headline.json": {"data": headline or {}}}}


def test_each_finished_experiment_shows_what_it_changed_against_its_baseline_and_its_figures():
    exp = {"name": "k50", "executor": {"state": "success"},
           "revs": [{"rev": "e1", "name": "k50", "error": None, "data": data("e1", 50, HEADLINE, "2026-12-02T10:00:00")}]}
    queued = {"name": "k99", "executor": {"state": "queued"}, "revs": [{"rev": "e2", "name": "k99", "data": data("e2", 99)}]}
    show = [{"rev": "workspace", "data": data("workspace", "auto", HEADLINE)},
            {"rev": "abcdef123", "data": data("abcdef123", "auto"), "experiments": [exp, queued]}]
    lines = experiments_table(show).splitlines()
    assert lines[2].startswith("| workspace | – | params.yaml | 0.780 | 89.4 / 88.8 | 82.7 / 78.0 / 82.0 |")
    assert lines[3] == ("| `k50` | abcdef1 | cluster.k=50 | 0.780 | 89.4 / 88.8 | 82.7 / 78.0 / 82.0 | "
                        "52.7 / 54.8 / 50.6 | 0.526 / 0.492 / 0.503 |")
    assert len(lines) == 4  # the queued experiment has no figures yet


def test_without_experiments_the_table_says_how_to_run_one():
    assert "No finished DVC experiment" in experiments_table([{"rev": "workspace", "data": {}}])


def test_screens_and_ablations_views_print_their_tools_tables_and_the_mlflow_pointer(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "screen" / "wd").mkdir(parents=True)
    row = {"name": "wd", "epoch": 8, "eval_seed": 0, "knn": 0.81, "acc": 0.5, "acc_std": 0.01, "nmi": 0.5, "nmi_std": 0.01}
    later = {**row, "epoch": 16, "knn_conv": 0.85, "knn_conv_layer": "conv2"}  # scored since kNN on conv layers
    (tmp_path / "data" / "screen" / "wd" / "results.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(later) + "\n")
    main(["--screens"])
    out = capsys.readouterr().out
    assert "| wd | 8 | 0 |  | 81.00 | 50.0 ± 1.0 | 0.500 ± 0.010 |" in out  # a row from before: no conv cell
    assert "| wd | 16 | 0 | 85.00 (conv2) | 81.00 | 50.0 ± 1.0 | 0.500 ± 0.010 |" in out
    assert out.rstrip().endswith("--host 127.0.0.1") and "mlflow ui --backend-store-uri" in out
    main(["--ablations"])
    assert "no ablation under data/ablations" in capsys.readouterr().out
