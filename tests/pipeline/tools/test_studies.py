"""pipeline.tools.studies: which experiments each study queues, the table it reads back from DVC experiments,
and what its scores' picture draws."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.tools.studies import (
    PANELS,
    PREFIX,
    ROWS,
    STUDIES,
    draw_scores,
    experiments,
    queue_command,
    seed_margins,
    seed_table,
    seeded_runs,
    report,
    row_label,
    rows_from_table,
    rows_of,
    score_points,
    table,
    y_floor,
)
from stages.core.errors import StageError

REPO = Path(__file__).resolve().parents[3]


def test_a_row_shared_by_several_studies_is_queued_once():
    rows = rows_of(["all"])
    assert sorted(rows) == sorted(ROWS) and len(rows) == len(set(rows))
    assert rows_of(["clustering", "input"]) == ["defaults", "pic", "raw"]
    with pytest.raises(StageError, match="unknown study learning: choose from clustering, input, k, levers, k_rule or all"):
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


def test_a_seeded_experiment_is_the_row_with_its_training_seed_and_named_after_both():
    args = queue_command("width32", seed=2)
    assert args[args.index("-n") + 1] == f"{PREFIX}width32-s2"
    assert [args[i + 1] for i, a in enumerate(args) if a == "-S"] == ["model.width=32", "run.seed=2"]
    done = {f"{PREFIX}{name}": {"rev": name} for name in ("k10-s0", "k10-s3", "k100-s1", "k10", "k10-sx", "pic-s0")}
    assert seeded_runs(done, "k10") == {0: "k10-s0", 3: "k10-s3"}  # not k100's, not the unseeded run


def seed_run(knn: float, knn_sd: float, acc: float, acc_sd: float, probe: float) -> dict:
    return {"knn.trained": knn, "knn.random_inits": 0.80, "knn.random_inits_std": knn_sd,
            "cluster.trained.acc": acc, "cluster.trained.acc_std": acc_sd, "cluster.random_inits.acc": 0.50,
            "cluster.random_inits.acc_std": acc_sd, "probe.trained.best": probe, "probe.random.best": 0.88}


def test_margins_over_seeds_are_the_mean_and_sd_of_each_runs_margin_counted_against_its_own_spread():
    runs = [seed_run(0.83, 0.01, 0.56, 0.03, 0.89), seed_run(0.81, 0.02, 0.44, 0.03, 0.885),
            seed_run(0.82, 0.005, 0.51, 0.03, 0.88)]
    by = {r["column"]: r for r in seed_margins(runs)}
    knn, acc, probe = by["kNN, fc"], by["k-means ACC"], by["best conv probe vs random init"]
    # kNN margins 3, 1, 2 points against spreads 1, 2, 0.5: above in the first and the last run only
    assert knn["margins"] == pytest.approx([0.03, 0.01, 0.02]) and knn["mean"] == pytest.approx(0.02)
    assert knn["sd"] == pytest.approx(0.01 * (2 / 3) ** 0.5) and (knn["above"], knn["below"]) == (2, 0)
    # ACC margins +6, -6, +1 against both sides' spreads combined: sqrt(2) x 3 = 4.24 points
    assert acc["mean"] == pytest.approx(0.01 / 3) and (acc["above"], acc["below"]) == (1, 1)
    assert probe["mean"] == pytest.approx(0.005) and probe["above"] is None  # one probe per network: no spread
    assert by["k-means NMI"]["n"] == 0 and by["kNN, best conv layer"]["n"] == 0  # not recorded: not invented
    assert by["best conv probe"]["n"] == 0  # runs before the random networks were probed: no spread invented
    text = seed_table({"width32": {0: runs[0], 1: runs[1], 2: runs[2]}})
    row = next(line for line in text.splitlines() if line.startswith("| levers | width32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["model.width=32", "0, 1, 2", "–", "+2.0 ± 0.8, 2/3 above",
                         "+0.3 ± 4.9, 1/3 above, 1 below", "–", "–", "+0.5 ± 0.4"]
    # the seeds' table under a report's table is not read back as the main table's rows
    assert rows_from_table(table(study_rows()) + "\n" + text) == rows_from_table(table(study_rows()))


def test_the_best_conv_probe_margin_is_over_the_random_networks_mean_against_their_spread():
    runs = [seed_run(0.83, 0.01, 0.56, 0.03, probe) | {"probe.random_inits.best": 0.88,
                                                       "probe.random_inits.best_std": sd}
            for probe, sd in ((0.89, 0.003), (0.885, 0.006), (0.878, 0.001))]
    probe = next(r for r in seed_margins(runs) if r["column"] == "best conv probe")
    # margins +1.0, +0.5, -0.2 points against spreads 0.3, 0.6, 0.1: above in the first, below in the last
    assert probe["margins"] == pytest.approx([0.01, 0.005, -0.002]) and probe["n"] == 3
    assert (probe["above"], probe["below"]) == (1, 1)


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
    m = {"probe.trained.best": 0.8945, "probe.random.best": 0.888, "knn.trained": 0.8115, "knn.random": 0.7802,
         "knn.pixels": 0.82, "cluster.trained.acc": 0.53257, "cluster.trained.acc_std": 0.058,
         "cluster.random.acc": 0.5477, "cluster.pixels.acc": 0.5061, "cluster.trained.nmi": 0.518,
         "cluster.trained.nmi_std": 0.01, "last_nmi_previous": 0.80247}
    row = {"metrics": m, "curves": pd.DataFrame({"epoch": [1, 2], "n_clusters": [300, 312]}), "sizes": None}
    text = table({"defaults": row})
    lines = [line for line in text.splitlines() if f"`{PREFIX}defaults`" in line]
    assert [line.split(" | ")[0] for line in lines] == ["| clustering", "| input", "| k", "| levers"]
    assert "| 312 | 0.802 | 89.5 / 88.8 | 81.2 / 78.0 / 82.0 | 53.3 ± 5.8 / 54.8 / 50.6 | 0.518 ± 0.010 / – / – |" in lines[0]


def metrics(acc: float, knn: float, **more) -> dict:
    """A run's headline figures as evaluate writes them (fractions), with the spreads it records."""
    return {"knn.trained": knn, "knn.random": 0.780, "knn.random_inits": 0.789, "knn.random_inits_std": 0.009,
            "knn.pixels": 0.820, "cluster.trained.acc": acc, "cluster.trained.acc_std": 0.058,
            "cluster.random.acc": 0.548, "cluster.random.acc_std": 0.024, "cluster.pixels.acc": 0.506,
            "cluster.trained.nmi": 0.518, "cluster.trained.nmi_std": 0.052, "cluster.random.nmi": 0.492,
            "cluster.pixels.nmi": 0.503, "probe.trained.best": 0.895, "probe.random.best": 0.888, **more}


def study_rows() -> dict[str, dict]:
    def row(m, n_clusters):
        return {"metrics": m, "curves": pd.DataFrame({"epoch": [1, 2], "n_clusters": [n_clusters - 1, n_clusters]}),
                "sizes": None}
    return {"defaults": row(metrics(0.533, 0.812), 312), "k10": row(metrics(0.492, 0.768), 10),
            "pic": row(metrics(0.507, 0.790), 1176),
            "raw": row(metrics(0.491, 0.791, **{"cluster.random.acc": 0.590, "cluster.random.acc_std": None}), 312)}


def test_a_reports_table_reads_back_as_the_figures_it_printed():
    rows = study_rows()
    text = table(rows)
    back = rows_from_table(text)
    assert sorted(back) == sorted(rows) and table(back) == text
    m = back["defaults"]["metrics"]
    assert m["cluster.trained.acc"] == pytest.approx(0.533) and m["cluster.trained.acc_std"] == pytest.approx(0.058)
    assert m["cluster.random.nmi"] == pytest.approx(0.492) and "cluster.random.nmi_std" not in m
    assert "cluster.random.acc_std" not in m  # the table prints no ± for it, so none is read back
    assert back["pic"]["clusters"] == 1176 and back["pic"]["source"] == f"`{PREFIX}pic`"
    # the committed studies, whose experiments are gone, are redrawn from their table: it must read back whole
    committed = (REPO / "docs/ablations/ablations.md").read_text()
    rows = rows_from_table(committed)
    later = set(STUDIES["levers"]) | set(STUDIES["k_rule"])  # studies run after that report
    assert sorted(rows) == sorted(set(ROWS) - later | {"defaults"})
    assert rows["k30"]["source"] == "`abl-k30`"
    assert table(rows, ["clustering", "input", "k"]) in committed


def test_report_from_a_table_redraws_the_scores_without_the_experiments(tmp_path):
    (tmp_path / "old.md").write_text("Some words first.\n\n" + table(study_rows()))
    text = report(tmp_path / "out", from_table=tmp_path / "old.md")
    assert text.startswith(table(study_rows())) and "Not run yet: study-k30, study-k100, study-k1000" in text
    assert (tmp_path / "out/studies.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out/nmi_and_sizes.png").exists()  # a table keeps no curves to draw


def test_the_reference_run_is_labelled_by_its_settings():
    assert row_label("defaults", 312) == "k=312 (default)"
    assert row_label("defaults", None) == "k=auto (default)"
    assert row_label("k10", 10) == "k=10"
    assert row_label("pic", 1176) == "PIC: 1176 clusters"
    assert row_label("raw", 312) == "k=312, no Sobel"
    assert row_label("width32", 312) == "k=312, width 32"
    assert row_label("draws40k", 312) == "k=312, 40,000 draws/epoch"
    assert row_label("n5k", 78) == "k=78, 5,000 images"
    assert row_label("refill", 312) == "k=312, clusters under 0.25 x mean refilled"
    assert row_label("n5k_k156", None) == "k=156, 5,000 images"


def test_score_points_carry_each_spread_and_lie_on_k_where_the_study_varies_k():
    knn, acc = PANELS[0], PANELS[1]
    points = score_points(study_rows(), "k", acc)
    assert [(p["x"], p["label"]) for p in points] == [(10, "k=10"), (312, "k=312 (default)")]
    assert points[1]["trained"] == pytest.approx((53.3, 5.8))
    assert points[1]["random"] == pytest.approx((54.8, 2.4)) and points[1]["pixels"][0] == pytest.approx(50.6)
    assert points[1]["pixels"][1] is None  # no spread recorded: none invented
    # kNN's random init: the mean over random networks with their spread, before the run's own network alone
    assert score_points(study_rows(), "k", knn)[0]["random"] == pytest.approx((78.9, 0.9))
    without = {n: {**r, "metrics": {k: v for k, v in r["metrics"].items() if "random_inits" not in k}}
               for n, r in study_rows().items()}
    assert score_points(without, "k", knn)[0]["random"] == (78.0, None)
    # categories are positions, not numbers; the input study's rows keep their own random network
    points = score_points(study_rows(), "input", acc)
    assert [p["x"] for p in points] == [0, 1] and points[1]["random"][0] == pytest.approx(59.0)
    assert points[1]["random"][1] is None and points[0]["random"][1] == pytest.approx(2.4)


def test_an_axis_starts_at_zero_unless_the_values_sit_far_above_it():
    assert y_floor([(53.3, 5.8), (10.0, 4.0)], 100) == 0
    assert y_floor([(81.2, None), (76.8, None), (82.0, None)], 100) == 75
    assert y_floor([(0.518, 0.052), (0.436, 0.039)], 1) == 0.3  # a round number, written on the axis


def test_the_picture_joins_no_separate_settings_and_writes_every_value_and_spread():
    from matplotlib.container import ErrorbarContainer

    rows = study_rows()
    fig = draw_scores(rows)
    studies = ["clustering", "input", "k"]
    assert fig.axes[0].get_title() == "clustering: weighted kNN (%)" and len(fig.axes) == len(studies) * len(PANELS)
    for i, ax in enumerate(fig.axes):
        study, panel = studies[i // len(PANELS)], PANELS[i % len(PANELS)]
        points = score_points(rows, study, panel)
        drawn = [line for line in ax.lines if line.get_linestyle() not in ("None", "")]
        if study == "k":  # numeric k: one line through the trained points, with markers
            assert any(list(line.get_xdata()) == [10, 312] and line.get_marker() == "o" for line in drawn)
        else:  # no line spans two settings' positions
            assert all(sum(min(line.get_xdata()) <= p["x"] <= max(line.get_xdata()) for p in points) <= 1
                       for line in drawn)
        fmt = ".1f" if panel[4] == 100 else ".3f"
        written = {f"{v:{fmt}}" + ("" if s is None else f" ± {s:{fmt}}") for p in points for v, s in [p["trained"]]}
        assert written <= {t.get_text() for t in ax.texts}
        # the error bars are the recorded spreads: each bar's half-height is the sd
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        halves = sorted(float(seg[1][1] - seg[0][1]) / 2 for seg in bars.lines[2][0].get_segments())
        assert halves == pytest.approx(sorted((p["trained"][1] or 0) for p in points))
        bottom = ax.get_ylim()[0]
        assert bottom == 0 or f"axis starts at {bottom:g}, not 0" in ax.get_ylabel()
