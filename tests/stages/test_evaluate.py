"""stages.evaluate final: a real two-epoch DeepCluster run on a few hundred Fashion-MNIST images, then
the whole evaluation (probes trained vs random vs pixels, kNN, clustering, pictures, report)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stages.core.checkpoints import init_checkpoint, load_checkpoint
from stages.core.errors import StageError
from stages.core.layout import RunLayout, checkpoint_name
from stages.core.params import apply_overrides
from stages.core.probes import knn_leave_one_out_accuracy
from stages.core.schema import Evaluate, Params
from stages.evaluate import (EvaluationData, choose_knn_layer, conv_knn, main, margin, random_init_network,
                             run_final_evaluation, score_tables)
from stages.prepare import prepare
from tests.conftest import phases_printed, run_epochs

REPO = Path(__file__).resolve().parents[2]
PICTURES = {"conv1_filters.png", "filters_conv1.png", "filters_conv3.png", "filters_conv5.png", "neighbours.png",
            "cluster_sizes.png", "epoch_curves.png", "cluster_samples.png"}
LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc"]


@pytest.mark.slow  # a two-epoch run and its evaluation
def test_final_evaluation_scores_every_layer_of_both_networks_and_pixels(tiny_eval):
    out, m = tiny_eval
    for net in ("trained", "random"):
        for layer in LAYERS:
            assert m[f"probe.{net}.{layer}"] > 0.3, (net, layer)  # chance is 0.1
        assert m[f"probe.{net}.best"] == max(m[f"probe.{net}.{c}"] for c in LAYERS[:-1])
        assert m[f"knn.{net}"] > 0.2 and m[f"cluster.{net}.nmi"] > 0.1 and f"cluster.{net}.ari" in m
    assert m["probe.pixels"] > 0.3 and m["knn.pixels"] > 0.3
    assert m["test_nmi_k_classes"] == m["cluster.trained.nmi"]
    assert m["epochs"] == 2 and m["checkpoint_epoch"] == 2 and m["n_probe_train"] == 200 and m["n_test"] == 40
    assert m["first_nmi_previous"] == m["last_nmi_previous"]  # two epochs: one NMI with the previous epoch

    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(m)
    scores = {n: json.loads((out / "scores" / f"{n}.json").read_text()) for n in ("trained", "random", "pixels")}
    assert set(scores["trained"]) == {"acc", "acc_std", "ari", "knn", "knn_conv", "nmi", "nmi_std", "probe_best",
                                      *[f"probe_{x}" for x in LAYERS]}
    for net in ("trained", "random"):  # kNN on each network's own best conv layer
        assert m[f"knn_conv.{net}_layer"] in LAYERS[:-1] and m[f"knn_conv.{net}"] > 0.2
        assert scores[net]["knn_conv"] == m[f"knn_conv.{net}"]
    assert len(m["knn_conv.random_inits_layers"].split(", ")) == m["random_inits"]
    assert scores["pixels"]["probe_input"] == m["probe.pixels"]
    report = (out / "report.md").read_text()
    assert "| conv3 |" in report and "raw pixels" in report and "pictures/neighbours.png" in report
    assert {p.name for p in (out / "pictures").glob("*.png")} == PICTURES
    for p in (out / "pictures").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000


def phase_titles(stdout: str) -> list[str]:
    """The titles of the phases `evaluate final` printed, each checked to open and close with its number."""
    return [title for title, _ in phases_printed(stdout, "evaluate")]


def item_lines(stdout: str, what: str) -> list[str]:
    """What the progress lines of `what` (probe, picture, random network) name, in order."""
    return re.findall(rf"^evaluate:   {what} \d+/\d+ (.+) in ", stdout, flags=re.M)


@pytest.mark.slow  # a two-epoch run and its evaluation
def test_final_evaluation_prints_a_line_as_each_phase_starts_and_ends(tiny_eval, tiny_run, small_params):
    out, m = tiny_eval
    stdout = (out.parent / "stdout.txt").read_text()
    kmeans = f"weighted kNN, k-means x{small_params.evaluate.kmeans_runs}"
    images = "features of 200 probe-train + 40 held-out images"
    assert phase_titles(stdout) == [
        f"loading {tiny_run.last_checkpoint} and its random init",
        f"trained network: {images}", "trained network: linear probes conv1..fc", f"trained network: {kmeans}",
        f"random init: {images}", "random init: linear probes conv1..fc", f"random init: {kmeans}",
        "conv probes, weighted kNN, k-means of 2 more random networks",
        "raw pixels: linear probe, weighted kNN, k-means",
        f"pictures into {out / 'pictures'}", f"writing the metrics and report.md into {out}"]
    assert item_lines(stdout, "probe") == LAYERS * 2
    assert item_lines(stdout, "random network") == ["run.seed + 1", "run.seed + 2"]
    assert sorted(f"{name}.png" for name in item_lines(stdout, "picture")) == sorted(PICTURES)
    assert f"kNN {m['knn.trained']:.1%}" in stdout  # the figures as they come


@pytest.mark.slow  # a two-epoch run and its evaluation
def test_random_network_is_rebuilt_identically_when_epoch_0_was_deleted(tiny_run, small_params, tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copy(tiny_run.last_checkpoint, ckpts / "last.pt")
    trained = load_checkpoint(ckpts / "last.pt")
    rebuilt, source = random_init_network(small_params, ckpts / "last.pt", tiny_run.dataset, trained, "cpu")
    original, _ = random_init_network(small_params, tiny_run.last_checkpoint, tiny_run.dataset, trained, "cpu")
    assert source.startswith("rebuilt")
    body = {k: v for k, v in original.state_dict().items() if not k.startswith("top_layer.")}  # no head in a probe
    assert body and all(torch.equal(rebuilt.state_dict()[k], v) for k, v in body.items())


@pytest.mark.slow  # a two-epoch run and its evaluation
def test_cli_without_pictures_writes_every_output_dvc_yaml_declares(tiny_run, small_params, tmp_path, capsys):
    """evaluate.pictures: false used to leave out data/eval/pictures, and `dvc repro` failed on it."""
    params = apply_overrides(small_params, {"evaluate.pictures": False, "evaluate.probe_layers": ["conv5"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    out = tmp_path / "eval"
    main(["final", "--params", str(tmp_path / "params.yaml"), "--dataset", str(tiny_run.dataset),
          "--epochs-root", str(tiny_run.epochs_root), "--checkpoint", str(tiny_run.last_checkpoint), "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert "probe.trained.conv5" in m and "probe.trained.conv3" not in m and "probe.trained.fc" not in m
    stdout = capsys.readouterr().out
    titles = phase_titles(stdout)
    assert len(titles) == 10 and "trained network: linear probes conv5" in titles
    assert not any(t.startswith("pictures") for t in titles) and item_lines(stdout, "probe") == ["conv5", "conv5"]
    assert "knn.trained" in m and "cluster.trained.nmi" in m  # kNN and clustering use fc whatever is probed
    assert m["knn_conv.trained_layer"] == m["knn_conv.random_layer"] == "conv5"  # the only conv layer probed
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    declared = [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots") for o in stage[key]]
    assert declared and all(d.startswith("data/eval/") for d in declared)
    missing = [d for d in declared if not (out / d.removeprefix("data/eval/")).exists()]
    assert not missing
    assert not list((out / "pictures").iterdir())


@pytest.mark.slow  # a two-epoch run and its evaluation
def test_extract_crop_size_other_than_the_networks_input_is_a_stage_error(tiny_run, small_params, tmp_path):
    params = apply_overrides(small_params, {"extract.crop_size": 24})
    with pytest.raises(StageError, match=r"extract.crop_size=24.*28 px"):
        run_final_evaluation(params, tiny_run.dataset, tiny_run.epochs_root, tiny_run.last_checkpoint, tmp_path / "e")


def test_unknown_or_missing_evaluate_parameters_are_refused(repo_params):
    raw = repo_params.model_dump()  # as read from params.yaml
    with pytest.raises(StageError, match="unknown key 'evaluate.probe_epochz'"):
        apply_overrides({**raw, "evaluate": {**raw["evaluate"], "probe_epochz": 3}}, {})
    with pytest.raises(StageError, match="has no key 'evaluate.knn_k'"):
        apply_overrides({**raw, "evaluate": {k: v for k, v in raw["evaluate"].items() if k != "knn_k"}}, {})
    with pytest.raises(StageError, match="has no section 'evaluate'"):
        apply_overrides({k: v for k, v in raw.items() if k != "evaluate"}, {})


def test_repo_params_name_every_evaluate_setting(repo_params):
    assert repo_params.evaluate.model_fields_set == set(Evaluate.model_fields)


def test_score_tables_are_one_row_per_feature_source():
    summary = {"probe.trained.conv1": 0.8, "probe.trained.best": 0.8, "probe.random.conv1": 0.7, "probe.pixels": 0.6,
               "knn.trained": 0.5, "cluster.trained.nmi": 0.4, "cluster.pixels.acc": 0.3, "epochs": 3, "seconds": 9.0}
    assert score_tables(summary) == {"trained": {"probe_conv1": 0.8, "probe_best": 0.8, "knn": 0.5, "nmi": 0.4},
                                     "random": {"probe_conv1": 0.7}, "pixels": {"probe_input": 0.6, "acc": 0.3}}


def test_missing_epochs_give_a_clear_error(tmp_path, small_params):
    with pytest.raises(StageError, match="no finished epoch"):
        run_final_evaluation(small_params, tmp_path, tmp_path / "epochs", tmp_path / "last.pt", tmp_path / "eval")


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory, small_params, fashion_dataset) -> tuple[RunLayout, Params]:
    """One epoch on an unlabelled folder of 120 PNG files (prepare.source: folder)."""
    from PIL import Image

    from stages.core.data import load_split

    root = tmp_path_factory.mktemp("folder")
    pixels = load_split(fashion_dataset, "train").pixels[:120]
    for i, img in enumerate(pixels):
        Image.fromarray(np.asarray(img)[..., 0]).save(root / f"img_{i:03d}.png")
    params = apply_overrides(small_params, {"prepare.source": "folder", "prepare.image_size": 32, "cluster.k": 5,
                                            "evaluate.train_images": 80})
    prepare("folder", root, root / "dataset", params.prepare, seed=0)
    return run_epochs(params, RunLayout(root / "dataset", root / "epochs", root / "ckpt"), (1,)), params


@pytest.mark.slow  # a two-epoch run and its evaluation
def test_unlabelled_folder_gets_pictures_and_no_scores(unlabelled_run, tmp_path, capsys):
    layout, params = unlabelled_run
    out = tmp_path / "eval"
    m = run_final_evaluation(params, layout.dataset, layout.epochs_root, layout.last_checkpoint, out)
    images = "features of 80 probe-train + 40 held-out images"
    assert phase_titles(capsys.readouterr().out) == [  # no probes, kNN or k-means without labels
        f"loading {layout.last_checkpoint} and its random init", f"trained network: {images}",
        f"random init: {images}", f"pictures into {out / 'pictures'}", f"writing the metrics and report.md into {out}"]
    assert not any(k.startswith(("probe.", "knn.", "cluster.")) for k in m)
    assert m["n_probe_train"] == 80 and m["n_test"] == 40  # held out: the train images outside the subset
    assert {n: json.loads((out / "scores" / f"{n}.json").read_text()) for n in ("trained", "random", "pixels")} == \
        {"trained": {}, "random": {}, "pixels": {}}
    assert {p.name for p in (out / "pictures").glob("*.png")} == PICTURES
    assert "No labelled held-out split" in (out / "report.md").read_text()


def test_margins_are_differences_in_points_with_the_spreads_combined_and_within_them_no_difference():
    m = {"knn.trained": 0.81, "knn.random": 0.75, "cluster.trained.acc": 0.6, "cluster.trained.acc_std": 0.03,
         "cluster.random.acc": 0.5, "cluster.random.acc_std": 0.04, "cluster.trained.nmi": 0.6,
         "cluster.trained.nmi_std": 0.0, "cluster.random.nmi": 0.65, "cluster.random.nmi_std": 0.0,
         "knn.random_inits": 0.80, "knn.random_inits_std": 0.015}
    assert margin(m, "knn.trained", "knn.random") == "+6.0"
    acc_spreads = ("cluster.trained.acc_std", "cluster.random.acc_std")
    assert margin(m, "cluster.trained.acc", "cluster.random.acc", acc_spreads) == "+10.0 +- 5.0"
    assert margin(m, "cluster.trained.nmi", "cluster.random.nmi", ("cluster.trained.nmi_std",)) == "-0.050 +- 0.000"
    # +1.0 over the random networks' mean, whose spread is 1.5 points: not a gain
    assert margin(m, "knn.trained", "knn.random_inits", ("knn.random_inits_std",)) == "+1.0 +- 1.5 (no difference)"
    assert margin({**m, "cluster.trained.acc": 0.54}, "cluster.trained.acc", "cluster.random.acc", acc_spreads) == \
        "+4.0 +- 5.0 (no difference)"
    assert margin(m, "knn.trained", "knn.pixels") == "n/a"


def test_the_last_clusterings_sizes_are_kept_with_the_evaluation(tiny_eval, tiny_run, small_params):
    import pandas as pd

    out, m = tiny_eval
    kept = json.loads((out / "cluster_sizes.json").read_text())
    clusters = pd.read_parquet(tiny_run.epoch(2) / "assignments.parquet")["cluster"].to_numpy()
    counts = np.bincount(clusters)
    assert kept["epoch"] == m["epochs"] == 2 and kept["method"] == small_params.cluster.method
    assert kept["sizes"] == sorted(counts[counts > 0].tolist(), reverse=True)
    assert sum(kept["sizes"]) == small_params.prepare.max_train_images


@pytest.mark.slow  # two evaluations of a two-epoch run
def test_random_inits_average_the_run_s_own_and_the_next_seeds_networks(tiny_run, small_params, tmp_path):
    params = apply_overrides(small_params, {"evaluate.random_inits": 2, "evaluate.pictures": False,
                                            "evaluate.probe_layers": ["conv1", "conv3", "fc"]})
    two = run_final_evaluation(params, tiny_run.dataset, tiny_run.epochs_root, tiny_run.last_checkpoint, tmp_path / "a")
    # the network a run of run.seed + 1 starts from, judged as the random init of the same trained network
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    shutil.copy(tiny_run.last_checkpoint, ckpts / "last.pt")
    init_checkpoint(apply_overrides(params, {"run.seed": params.run.seed + 1}), tiny_run.dataset,
                    ckpts / checkpoint_name(0))
    one = apply_overrides(params, {"evaluate.random_inits": 1})
    nxt = run_final_evaluation(one, tiny_run.dataset, tiny_run.epochs_root, ckpts / "last.pt", tmp_path / "b")
    assert nxt["knn.random"] != two["knn.random"]  # another network
    assert two["knn.random_inits"] == pytest.approx((two["knn.random"] + nxt["knn.random"]) / 2)
    assert two["knn.random_inits_std"] == pytest.approx(abs(two["knn.random"] - nxt["knn.random"]) / 2)
    for m in ("acc", "nmi"):
        assert two[f"cluster.random_inits.{m}"] == pytest.approx((two[f"cluster.random.{m}"] + nxt[f"cluster.random.{m}"]) / 2)
    assert nxt["knn.random_inits"] == nxt["knn.random"] and nxt["knn.random_inits_std"] == 0  # one network: itself
    # the best conv probe too: each network on its own best conv layer, probed as the run's random init is
    assert any(nxt[f"probe.random.{layer}"] != two[f"probe.random.{layer}"] for layer in ("conv1", "conv3"))
    best = lambda m: max(("conv1", "conv3"), key=lambda layer: m[f"probe.random.{layer}"])
    for m in (two, nxt):
        assert m["probe.random.best"] == m[f"probe.random.{best(m)}"]
    assert two["probe.random_inits.best"] == pytest.approx((two["probe.random.best"] + nxt["probe.random.best"]) / 2)
    spread = abs(two["probe.random.best"] - nxt["probe.random.best"]) / 2
    assert two["probe.random_inits.best_std"] == pytest.approx(spread)
    assert two["probe.random_inits.best_layers"] == f"{best(two)}, {best(nxt)}"
    headline = json.loads((tmp_path / "a" / "headline.json").read_text())
    assert headline["knn.random_inits"] == two["knn.random_inits"]
    assert headline["probe.random_inits.best"] == two["probe.random_inits.best"]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "2 random inits fc" in report
    assert (f"2 random inits {100 * two['probe.random_inits.best']:.1f} +- "
            f"{100 * two['probe.random_inits.best_std']:.1f} % ({two['probe.random_inits.best_layers']})") in report


def test_the_report_gives_every_margin_over_the_random_networks_with_its_spread(tiny_eval):
    out, m = tiny_eval
    report = (out / "report.md").read_text()
    n = m["random_inits"]
    for measure in ("best conv probe", "weighted kNN, best conv layer,", "weighted kNN, fc,", "k-means ACC",
                    "k-means NMI"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {measure} vs the {n} random inits"))
        cell = row.split("|")[2].strip()
        diff, spread = (float(x) for x in cell.split(" (")[0].split(" +- "))
        assert cell.endswith("(no difference)") == (abs(diff) <= spread)
    probe_row = next(line for line in report.splitlines()
                     if line.startswith(f"| best conv probe vs the {n} random inits"))
    assert f"{100 * (m['probe.trained.best'] - m['probe.random_inits.best']):+.1f} +- " \
           f"{100 * m['probe.random_inits.best_std']:.1f}" in probe_row
    knn_row = next(line for line in report.splitlines() if line.startswith(f"| weighted kNN, fc, vs the {n} random inits"))
    assert f"+- {100 * m['knn.random_inits_std']:.1f}" in knn_row
    conv_row = next(line for line in report.splitlines() if line.startswith("| best conv layer |"))
    assert f"{100 * m['knn_conv.trained']:.1f} ({m['knn_conv.trained_layer']})" in conv_row
    assert f"+- {100 * m['knn_conv.random_inits_std']:.1f}" in conv_row


def knn_case(informative_train: str, informative_test: str, n: int = 300, seed: int = 0):
    """Three conv layers of random features; in one layer the training images' features carry their class, in
    one (maybe another) the held-out images' features do."""
    rng = np.random.default_rng(seed)
    y_train, y_test = rng.integers(0, 3, n), rng.integers(0, 3, n)
    noise = lambda: rng.normal(size=(n, 8)).astype(np.float32)
    classy = lambda y: (np.eye(3, 8)[y] * 4 + rng.normal(size=(n, 8)) * 0.3).astype(np.float32)
    train = {layer: classy(y_train) if layer == informative_train else noise() for layer in ("conv1", "conv2", "conv3")}
    test = {layer: classy(y_test) if layer == informative_test else noise() for layer in ("conv1", "conv2", "conv3")}
    data = EvaluationData(None, None, np.arange(n), np.arange(n), y_train, y_test, True, 3, None)
    return train, test, data


def test_the_knn_layer_is_the_one_whose_neighbours_classify_the_training_images_left_out(small_params):
    train, _, data = knn_case("conv2", "conv2")
    cfg = apply_overrides(small_params, {"evaluate.knn_k": 5}).evaluate
    layer, scores = choose_knn_layer(train, data.y_train, cfg, 3)
    assert layer == "conv2" and scores["conv2"] > 0.95 and max(scores["conv1"], scores["conv3"]) < 0.6
    train["conv3"] = train["conv2"].copy()  # a tie keeps the earlier layer
    assert choose_knn_layer(train, data.y_train, cfg, 3)[0] == "conv2"


def test_the_knn_layer_is_judged_on_every_training_image(small_params):
    # each layer's score is the leave-one-out kNN over all the probe-train images, not over a held-out share
    train, _, data = knn_case("conv2", "conv2")
    cfg = apply_overrides(small_params, {"evaluate.knn_k": 5}).evaluate
    _, scores = choose_knn_layer(train, data.y_train, cfg, 3)
    for layer, x in train.items():
        assert scores[layer] == knn_leave_one_out_accuracy(x, data.y_train, k=5, temperature=cfg.knn_temperature,
                                                           n_classes=3)


def test_the_knn_layer_is_chosen_without_the_test_split(small_params):
    # the training images' neighbours are informative in conv1 only, the test images' in conv3 only: the choice
    # follows the training images, so the reported test kNN is that of conv1 (near chance), not conv3's
    train, test, data = knn_case("conv1", "conv3")
    acc, layer = conv_knn(train, test, data, small_params.evaluate)
    assert layer == "conv1" and acc < 0.6
    assert conv_knn({"fc": train["conv1"]}, {"fc": test["conv1"]}, data, small_params.evaluate) == (None, None)
