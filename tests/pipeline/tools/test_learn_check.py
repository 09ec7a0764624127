import json

import pytest

from pipeline.tools.learn_check import RESULT, judge, main, over_seeds, seeds_table, table
from stages.core.errors import StageError


def scores(knn, acc, nmi, knn_conv=None):
    return {"knn": knn, "acc": acc, "nmi": nmi, "knn_conv": knn_conv}


RANDOMS = [scores(0.78, 0.50, 0.48), scores(0.80, 0.54, 0.50), scores(0.79, 0.52, 0.49)]  # sd 0.0082, 0.0163, 0.0082


def test_a_margin_passes_only_above_the_random_networks_spread():
    rows = {r["measure"]: r for r in judge(scores(0.82, 0.53, 0.60), RANDOMS)}
    assert rows["knn"]["random_mean"] == pytest.approx(0.79) and rows["knn"]["random_sd"] == pytest.approx(0.00816, abs=1e-4)
    assert rows["knn"]["margin"] == pytest.approx(0.03) and rows["knn"]["passed"]
    assert rows["nmi"]["passed"]
    assert not rows["acc"]["passed"]  # +1 point over the mean, inside a 1.6-point spread: no difference
    assert not judge(scores(0.75, 0.60, 0.60), RANDOMS)[0]["passed"]  # under the random networks


def test_the_best_conv_layers_knn_is_judged_first_when_it_was_scored():
    randoms = [{**r, "knn_conv": v} for r, v in zip(RANDOMS, (0.82, 0.83, 0.84))]
    rows = judge(scores(0.82, 0.53, 0.60, knn_conv=0.835), randoms)
    assert [r["measure"] for r in rows] == ["knn_conv", "knn", "acc", "nmi"]
    assert rows[0]["margin"] == pytest.approx(0.005) and not rows[0]["passed"]  # inside the 0.8-point spread
    assert "| weighted kNN, best conv layer | 83.50 | 83.00 ± 0.82 |" in table(rows)


def test_the_table_calls_a_margin_inside_the_spread_no_difference():
    text = table(judge(scores(0.82, 0.53, 0.60), RANDOMS))
    knn, acc, nmi = text.splitlines()[2:]
    assert "82.00" in knn and "79.00 ± 0.82" in knn and "+3.0 +- 0.8 |" in knn and knn.endswith("| ok |")
    assert "(no difference)" in acc and acc.endswith("NOT ABOVE THE SPREAD |")
    assert "0.600" in nmi and "+0.110 +- 0.008" in nmi


def test_one_random_network_has_no_spread_and_is_refused():
    with pytest.raises(StageError, match="random_inits >= 2"):
        judge(scores(0.8, 0.5, 0.5), RANDOMS[:1])


def test_over_seeds_gives_each_margins_mean_sd_and_seeds_above_the_spread():
    # seed 0: knn +3.0 (above 0.8), acc +1.0 (inside 1.6), nmi +0.110; seed 1: knn +1.0, acc -3.0, nmi +0.050
    results = [{"seed": 0, "rows": judge(scores(0.82, 0.53, 0.60), RANDOMS)},
               {"seed": 1, "rows": judge(scores(0.80, 0.49, 0.54), RANDOMS)}]
    summary = {r["measure"]: r for r in over_seeds(results)}
    assert list(summary) == ["knn", "acc", "nmi"]  # no conv kNN scored: no row
    assert summary["knn"]["margins"] == pytest.approx([0.03, 0.01])
    assert summary["knn"]["mean"] == pytest.approx(0.02) and summary["knn"]["sd"] == pytest.approx(0.01)  # population
    assert summary["knn"]["above"] == 2 and summary["acc"]["above"] == 0 and summary["nmi"]["above"] == 2
    assert summary["acc"]["mean"] == pytest.approx(-0.01) and summary["acc"]["sd"] == pytest.approx(0.02)
    knn, acc, nmi = seeds_table(over_seeds(results)).splitlines()[2:]
    assert knn == "| weighted kNN on fc | +2.00 ± 1.00 | +3.00, +1.00 | 2/2 |"
    assert acc == "| k-means ACC, k = classes | -1.00 ± 2.00 | +1.00, -3.00 | 0/2 |"
    assert nmi == "| k-means NMI, k = classes | +0.080 ± 0.030 | +0.110, +0.050 | 2/2 |"


@pytest.mark.slow
def test_the_check_trains_scores_three_random_networks_and_exits_by_its_verdict(small_params, write_params, tmp_path,
                                                                                capsys):
    params = write_params(tmp_path, small_params, {"run.epochs": 2})
    root = tmp_path / "check"
    argv = ["--params", str(params), "--images", "200", "--test-images", "60", "--kmeans-runs", "2", "--root", str(root)]
    code = main(argv)
    out = capsys.readouterr().out
    result = json.loads((root / RESULT).read_text())
    assert code == (0 if result["passed"] else 1)
    assert result["random_seeds"] == [0, 1, 2] and result["epochs"] == 2
    assert [r["measure"] for r in result["rows"]] == ["knn_conv", "knn", "acc", "nmi"]
    knn = result["rows"][1]
    assert 0 < knn["trained"] <= 1 and knn["random_sd"] > 0  # three different random networks
    assert "| weighted kNN on fc |" in out and "| weighted kNN, best conv layer |" in out and "200 training images" in out
    # the subset is what was asked: 200 training and 60 held-out images of the source
    meta = json.loads((root / "dataset" / "dataset.json").read_text())
    assert meta["counts"] == {"train": 200, "test": 60}
    # a second check prepares nothing again but trains again: a release is judged on the code it runs
    prepared = (root / "dataset" / "dataset.json").stat().st_mtime_ns
    trained = next((root / "runs" / "trained" / "checkpoints").glob("*0002*"))
    stamp = trained.stat().st_mtime_ns
    main(argv)
    assert (root / "dataset" / "dataset.json").stat().st_mtime_ns == prepared
    assert next((root / "runs" / "trained" / "checkpoints").glob("*0002*")).stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_the_check_over_seeds_runs_each_seed_with_its_own_random_networks(small_params, write_params, tmp_path,
                                                                          capsys):
    params = write_params(tmp_path, small_params, {"run.epochs": 1})
    root = tmp_path / "check"
    code = main(["--params", str(params), "--images", "120", "--test-images", "40", "--kmeans-runs", "2",
                 "--seeds", "3", "5", "--root", str(root)])
    out = capsys.readouterr().out
    summary = json.loads((root / RESULT).read_text())
    runs = [json.loads((root / f"seed{s}" / RESULT).read_text()) for s in (3, 5)]
    assert [r["seed"] for r in runs] == [3, 5]
    assert runs[0]["random_seeds"] == [3, 4, 5] and runs[1]["random_seeds"] == [5, 6, 7]
    assert code == (0 if all(r["passed"] for r in runs) else 1) and summary["passed"] == (code == 0)
    knn = next(r for r in summary["over_seeds"] if r["measure"] == "knn")
    assert knn["margins"] == pytest.approx([next(r["margin"] for r in run["rows"] if r["measure"] == "knn")
                                            for run in runs])
    assert knn["above"] == sum(next(r["passed"] for r in run["rows"] if r["measure"] == "knn") for run in runs)
    assert "seed 3 (" in out and "seed 5 (" in out and "training seeds [3, 5]" in out
    assert "| weighted kNN on fc |" in out and "/2 |" in out


def test_repeated_seeds_are_refused(tmp_path):
    with pytest.raises(SystemExit) as refused:
        main(["--seeds", "1", "1", "--root", str(tmp_path)])
    assert refused.value.code == 2


def test_bad_sizes_are_refused_with_the_option_named(tmp_path):
    with pytest.raises(SystemExit) as refused:
        main(["--images", "0", "--root", str(tmp_path)])
    assert refused.value.code == 2
