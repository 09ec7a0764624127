"""stages.train: uniform-over-clusters sampling, head reset, checkpoints and the body's momentum."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.core.assignments import write_assignments
from stages.core.checkpoints import init_checkpoint, load_checkpoint, save_checkpoint
from stages.core.data import load_split
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.core.models import build_model
from stages.core.params import apply_overrides
from stages.core.runtime import seed_for
from stages.core.schema import Params
from stages.train import contiguous_targets, draws_per_epoch, epoch_lr, run_train, uniform_cluster_sample

# ---------------------------------------------------------------- the sampler
SKEWED = {0: 5, 2: 50, 5: 500, 7: 5000, 11: 20}  # cluster id -> size; ids 1, 3, 4, 6, 8-10 are empty


@pytest.fixture(scope="module")
def skewed_labels() -> np.ndarray:
    labels = np.repeat(list(SKEWED), list(SKEWED.values()))
    return np.random.default_rng(0).permutation(labels)


def test_sampler_draws_equally_from_every_cluster_whatever_its_size(skewed_labels):
    n = 5000  # divisible by the 5 non-empty clusters: exactly 1000 draws each
    picked = uniform_cluster_sample(skewed_labels, n, np.random.default_rng(1))
    assert picked.shape == (n,) and picked.min() >= 0 and picked.max() < len(skewed_labels)
    counts = np.bincount(skewed_labels[picked], minlength=12)
    assert {c: counts[c] for c in SKEWED} == {c: 1000 for c in SKEWED}
    # Sampling images instead (the official code's bug) would give cluster 7 about 90% of the draws.
    assert counts[7] / n == pytest.approx(0.2)


def test_sampler_never_draws_an_empty_cluster_id(skewed_labels):
    picked = uniform_cluster_sample(skewed_labels, 3000, np.random.default_rng(2))
    assert set(np.unique(skewed_labels[picked])) == set(SKEWED)


def test_sampler_counts_stay_within_the_rounding_when_n_is_not_divisible(skewed_labels):
    # ceil(4998 / 5) = 1000 draws per cluster, then the shuffled 5000 are cut to 4998: every cluster
    # loses at most the 2 surplus draws, so counts lie in [998, 1000].
    picked = uniform_cluster_sample(skewed_labels, 4998, np.random.default_rng(3))
    counts = np.bincount(skewed_labels[picked])[list(SKEWED)]
    assert len(picked) == 4998 and counts.sum() == 4998
    assert counts.min() >= 998 and counts.max() <= 1000


def test_small_clusters_are_drawn_with_replacement_and_large_ones_without(skewed_labels):
    picked = uniform_cluster_sample(skewed_labels, 5000, np.random.default_rng(4))
    from_small = picked[skewed_labels[picked] == 0]  # 5 images, 1000 draws
    assert len(from_small) == 1000
    assert set(from_small) == set(np.flatnonzero(skewed_labels == 0))  # all 5 members, each many times
    from_large = picked[skewed_labels[picked] == 7]  # 5000 images, 1000 draws
    assert len(np.unique(from_large)) == 1000  # no image drawn twice


def test_sampler_is_shuffled_and_reproducible(skewed_labels):
    a = uniform_cluster_sample(skewed_labels, 5000, np.random.default_rng(5))
    b = uniform_cluster_sample(skewed_labels, 5000, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    # shuffled across clusters, so a batch is not one cluster: the first 50 draws span >= 4 clusters
    assert len(np.unique(skewed_labels[a[:50]])) >= 4


def test_sampler_without_clusters_is_a_stage_error():
    with pytest.raises(StageError, match="no cluster"):
        uniform_cluster_sample(np.array([], dtype=np.int64), 10, np.random.default_rng(0))


def test_contiguous_targets_maps_non_empty_cluster_ids_to_head_outputs():
    targets, ids = contiguous_targets(np.array([7, 3, 3, 12, 7]))
    assert targets.tolist() == [1, 0, 0, 2, 1] and targets.dtype == np.int64
    assert ids.tolist() == [3, 7, 12]


@pytest.mark.parametrize("samples, floor, n_images, draws", [
    (None, 20000, 5000, 20000),    # a small data set: the floor
    (None, 20000, 60000, 60000),   # a large one: one draw per image (paper)
    (None, 0, 5000, 5000),         # no floor: one draw per image
    (3000, 20000, 5000, 3000),     # a set samples_per_epoch is taken as it is
])
def test_draws_per_epoch_are_one_per_image_above_the_floor_unless_set(small_params, samples, floor, n_images, draws):
    p = apply_overrides(small_params, {"train.samples_per_epoch": samples, "train.min_samples_per_epoch": floor})
    assert draws_per_epoch(p.train, n_images) == draws


def test_an_epoch_on_a_small_data_set_draws_the_floor(fashion_dataset, small_params, tmp_path):
    p = apply_overrides(small_params, {"train.min_samples_per_epoch": 500, "train.batch_size": 100})
    train = load_split(fashion_dataset, "train")
    assert len(train) < 500
    write_assignments(tmp_path / "a.parquet", train.ids, np.arange(len(train)) % 4, np.zeros(len(train), np.float32))
    init_checkpoint(p, fashion_dataset, tmp_path / "epoch_0000.pt")
    stats = run_train(p, fashion_dataset, tmp_path / "a.parquet", tmp_path / "epoch_0000.pt", tmp_path / "epoch_0001.pt",
                      epoch=1)
    assert stats["n_samples"] == 500


def test_constant_schedule_keeps_the_learning_rate(small_params):
    p = apply_overrides(small_params, {"train.lr": 0.1, "train.lr_schedule": "constant"}).train
    assert [epoch_lr(p, e, 32) for e in (1, 16, 32)] == [0.1, 0.1, 0.1]


def test_cosine_schedule_starts_at_lr_halves_midway_and_ends_near_zero(small_params):
    p = apply_overrides(small_params, {"train.lr": 0.1, "train.lr_schedule": "cosine"}).train
    lrs = [epoch_lr(p, e, 10) for e in range(1, 11)]
    assert lrs[0] == 0.1 and abs(lrs[5] - 0.05) < 1e-12  # epoch 6 of 10: half way through, cos(pi / 2) = 0
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and 0 < lrs[-1] < 0.003  # 0.1 * (1 + cos(0.9 pi)) / 2


def test_the_epochs_learning_rate_reaches_both_optimizers(fashion_dataset, train_params, tmp_path):
    p = apply_overrides(train_params, {"run.epochs": 4, "train.lr_schedule": "cosine"})
    train = load_split(fashion_dataset, "train")
    write_assignments(tmp_path / "a.parquet", train.ids, np.arange(len(train)) % 3, np.zeros(len(train), np.float32))
    init_checkpoint(p, fashion_dataset, tmp_path / "0.pt")
    run_train(p, fashion_dataset, tmp_path / "a.parquet", tmp_path / "0.pt", tmp_path / "1.pt", epoch=1)
    stats = run_train(p, fashion_dataset, tmp_path / "a.parquet", tmp_path / "1.pt", tmp_path / "2.pt", epoch=2)
    ckpt = torch.load(tmp_path / "2.pt", map_location="cpu", weights_only=True)
    expected = 0.5 * p.train.lr * (1 + np.cos(np.pi / 4))  # epoch 2 of 4
    assert stats["lr"] == pytest.approx(expected)
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)  # not epoch 1's stored lr
    assert ckpt["top_optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)


# ---------------------------------------------------------------- run_train on real images
CLUSTER_IDS = [3, 7, 12]  # k-means with k = 20 that left 17 clusters empty


@pytest.fixture(scope="module")
def train_params(small_params) -> Params:
    # One step of 64 images per epoch: fast, and the momentum arithmetic below stays exact.
    p = apply_overrides(small_params, {"train.samples_per_epoch": 64, "train.batch_size": 64})
    return p


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, fashion_dataset, train_params):
    """Epoch 0 (random network) and epoch 1 trained on pseudo-labels with gaps in the cluster ids."""
    root = tmp_path_factory.mktemp("train")
    train = load_split(fashion_dataset, "train")
    clusters = np.array(CLUSTER_IDS)[np.arange(len(train)) % 3]
    write_assignments(root / "assignments.parquet", train.ids, clusters, np.zeros(len(train), np.float32))
    init_checkpoint(train_params, fashion_dataset, root / "epoch_0000.pt")
    stats = run_train(train_params, fashion_dataset, root / "assignments.parquet", root / "epoch_0000.pt",
                      root / "epoch_0001.pt", epoch=1, stats_out=root / "train.json")
    return root, stats


def test_checkpoint_loads_with_weights_only_and_holds_every_stateful_object(workspace, train_params):
    root, _ = workspace
    ckpt = torch.load(root / "epoch_0001.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "top_optimizer", "top_layer", "cluster_ids", "epoch"} <= set(ckpt)
    assert ckpt["epoch"] == 1
    model = build_model(train_params.model.model_dump(), 1, 28)
    body_names = [n for n, _ in model.named_parameters() if not n.startswith("top_layer.")]
    assert set(body_names) <= set(ckpt["model"]) and not any(k.startswith("top_layer.") for k in ckpt["model"])
    # the body optimizer's momentum buffers, one per body parameter, shaped like it
    state = ckpt["optimizer"]["state"]
    assert len(state) == len(body_names)
    for i, name in enumerate(body_names):
        assert state[i]["momentum_buffer"].shape == ckpt["model"][name].shape
    assert ckpt["optimizer"]["param_groups"][0]["momentum"] == train_params.train.momentum
    assert ckpt["top_optimizer"]["param_groups"][0]["momentum"] == 0  # the head's SGD has no momentum
    assert [k.startswith("sobel.") for k in ckpt["model"]].count(True) == 2  # fixed filters travel as buffers


def test_head_has_one_output_per_non_empty_cluster(workspace, train_params):
    root, stats = workspace
    ckpt = load_checkpoint(root / "epoch_0001.pt")
    assert ckpt["cluster_ids"].tolist() == CLUSTER_IDS
    assert ckpt["top_layer"]["weight"].shape == (3, train_params.model.fc_dim)
    assert ckpt["top_layer"]["bias"].shape == (3,)
    assert stats["n_clusters"] == 3 and stats["n_samples"] == 64 and np.isfinite(stats["loss"])
    assert read_json(root / "train.json")["n_clusters"] == 3


def test_checkpoint_is_written_atomically(workspace, train_params, tmp_path):
    root, _ = workspace
    target = tmp_path / "epoch_0001.pt"
    target.write_bytes((root / "epoch_0001.pt").read_bytes())
    before = target.read_bytes()
    model = build_model(train_params.model.model_dump(), 1, 28)
    with pytest.raises(Exception):  # a lambda cannot be pickled: the save fails half-way
        save_checkpoint(target, model=model, epoch=9, model_params={"broken": lambda: 0}, in_channels=1, image_size=28)
    assert target.read_bytes() == before  # the previous checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0001.pt"]  # and no temp file is left
    assert sorted(p.name for p in root.iterdir()) == ["assignments.parquet", "epoch_0000.pt", "epoch_0001.pt",
                                                      "train.json"]


def test_body_momentum_carries_across_epochs(workspace, fashion_dataset, train_params, tmp_path):
    """Epoch 2 from epoch 1's checkpoint vs from the same checkpoint without optimizer state.

    Same seed, same weights, same batch: both take the same gradient g on their single SGD step.
    With the momentum buffer m1 carried over: m2 = 0.9 m1 + g and w2 = w1 - lr m2; without: m2 = g.
    So the two runs differ by exactly -lr * 0.9 * m1 in the weights and 0.9 * m1 in the buffers.
    """
    root, _ = workspace
    ckpt1 = torch.load(root / "epoch_0001.pt", weights_only=True)
    stripped = dict(ckpt1, optimizer=None)
    torch.save(stripped, tmp_path / "stripped.pt")
    run_train(train_params, fashion_dataset, root / "assignments.parquet", root / "epoch_0001.pt",
              tmp_path / "carried.pt", epoch=2)
    run_train(train_params, fashion_dataset, root / "assignments.parquet", tmp_path / "stripped.pt",
              tmp_path / "fresh.pt", epoch=2)
    carried = torch.load(tmp_path / "carried.pt", weights_only=True)
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)

    lr, mom = train_params.train.lr, train_params.train.momentum
    model = build_model(train_params.model.model_dump(), 1, 28)
    body_names = [n for n, _ in model.named_parameters() if not n.startswith("top_layer.")]
    largest_step = 0.0
    for i, name in enumerate(body_names):
        m1 = ckpt1["optimizer"]["state"][i]["momentum_buffer"]
        # buffers are ~1e-5..1e-3 here (the fresh head is N(0, 0.01)), so the tolerances are absolute
        # and tight: 1 float32 ulp of the weights (|w| <= ~2) is 2.4e-7.
        torch.testing.assert_close(carried["optimizer"]["state"][i]["momentum_buffer"]
                                   - fresh["optimizer"]["state"][i]["momentum_buffer"], mom * m1,
                                   rtol=1e-3, atol=1e-9)
        torch.testing.assert_close(carried["model"][name] - fresh["model"][name], -lr * mom * m1,
                                   rtol=0, atol=5e-7)
        largest_step = max(largest_step, float((lr * mom * m1).abs().max()))
    assert largest_step > 2e-5  # > 40x the tolerance: dropping the momentum would fail the check above


def test_epoch_two_gets_a_new_head_and_its_own_seed(workspace, fashion_dataset, train_params, tmp_path):
    root, _ = workspace
    run_train(train_params, fashion_dataset, root / "assignments.parquet", root / "epoch_0001.pt",
              tmp_path / "epoch_0002.pt", epoch=2)
    c1, c2 = load_checkpoint(root / "epoch_0001.pt"), load_checkpoint(tmp_path / "epoch_0002.pt")
    assert c2["epoch"] == 2 and c2["cluster_ids"].tolist() == CLUSTER_IDS
    # Reset, then one step: the epoch-2 head is a fresh draw, unrelated to epoch 1's head. Kept, it
    # would correlate ~1 after one small step; independent draws of 96 weights: |r| ~ 0.1.
    w1, w2 = c1["top_layer"]["weight"].flatten(), c2["top_layer"]["weight"].flatten()
    assert abs(torch.corrcoef(torch.stack([w1, w2]))[0, 1].item()) < 0.5
    assert seed_for(0, 1, "train") != seed_for(0, 2, "train")


def test_mismatched_checkpoint_epoch_is_refused(workspace, fashion_dataset, train_params, tmp_path):
    root, _ = workspace
    with pytest.raises(StageError, match="is from epoch 1, but epoch 3 must start from epoch 2's checkpoint"):
        run_train(train_params, fashion_dataset, root / "assignments.parquet", root / "epoch_0001.pt",
                  tmp_path / "epoch_0003.pt", epoch=3)
    assert not (tmp_path / "epoch_0003.pt").exists()


def test_assignments_of_other_images_or_order_are_refused(workspace, fashion_dataset, train_params, tmp_path):
    root, _ = workspace
    ids = load_split(fashion_dataset, "train").ids
    for name, listed in (("other", np.array([ids[0], "not-in-dataset"])), ("order", ids[::-1].copy())):
        write_assignments(tmp_path / f"{name}.parquet", listed, np.arange(len(listed)) % 2,
                          np.zeros(len(listed), np.float32))
        with pytest.raises(StageError, match="lists .*(2 images, but the dataset has 240 training images|the images in "
                                             "another order than the dataset's training images)"):
            run_train(train_params, fashion_dataset, tmp_path / f"{name}.parquet", root / "epoch_0000.pt",
                      tmp_path / "epoch_0001.pt", epoch=1)
    assert not (tmp_path / "epoch_0001.pt").exists()


def test_train_crop_size_other_than_the_networks_input_is_refused(workspace, fashion_dataset, train_params, tmp_path):
    root, _ = workspace
    params = apply_overrides(train_params, {"train.crop_size": 24})
    with pytest.raises(StageError, match=r"train.crop_size=24, but the network .* 28 px"):
        run_train(params, fashion_dataset, root / "assignments.parquet", root / "epoch_0000.pt",
                  tmp_path / "epoch_0001.pt", epoch=1)
    assert not (tmp_path / "epoch_0001.pt").exists()


def test_missing_or_corrupt_checkpoint_is_a_stage_error(tmp_path):
    with pytest.raises(StageError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match="bad.pt cannot be used: not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_init_checkpoint_is_seeded_by_the_run_seed(fashion_dataset, train_params, tmp_path):
    init_checkpoint(train_params, fashion_dataset, tmp_path / "a.pt")
    init_checkpoint(train_params, fashion_dataset, tmp_path / "b.pt")
    other = apply_overrides(train_params, {"run.seed": 1})
    init_checkpoint(other, fashion_dataset, tmp_path / "c.pt")
    a, b, c = (load_checkpoint(tmp_path / f"{x}.pt") for x in "abc")
    assert a["epoch"] == 0 and a["optimizer"] is None
    w = "features.0.weight"
    assert torch.equal(a["model"][w], b["model"][w])
    assert not torch.equal(a["model"][w], c["model"][w])


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_write_is_a_clear_error_and_the_rerun_gives_the_same_network(tiny_run,
                                                                                                 params_file,
                                                                                                 tmp_path):
    import re
    import resource
    import subprocess
    import sys

    out = tmp_path / "epoch_0001.pt"
    cmd = [sys.executable, "-m", "stages.train", "--params", str(params_file), "--dataset", str(tiny_run.dataset),
           "--assignments", str(tiny_run.epoch(1) / "assignments.parquet"), "--checkpoint-in",
           str(tiny_run.checkpoint(0)), "--checkpoint-out", str(out), "--epoch", "1", "--stats-out",
           str(tmp_path / "train.json")]
    size = tiny_run.checkpoint(1).stat().st_size
    # the write stops half-way, as on a full disk; before, torch's raw "enforce fail ... file write failed"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))  # noqa: E731
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr
    assert re.search(rf"train: could not write {out} \(RuntimeError: .*\): [\d,]+ bytes needed, [\d,]+ bytes free "
                     r"on its disk \(a full disk, a quota or a file-size limit\)\. Free some space and rerun",
                     proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no half checkpoint, no temp, no report
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    a, b = load_checkpoint(out), load_checkpoint(tiny_run.checkpoint(1))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# ---------------------------------------------------------------- image trees
def test_an_epoch_on_an_image_tree_is_the_same_with_any_number_of_workers(tmp_path, small_params):
    """Crops are drawn per image in the DataLoader workers from (the epoch's seed, the image's position in
    the epoch's sample), so two workers train the same network as none."""
    from PIL import Image
    from skimage import data as skdata

    from stages.core.data import ImageSet
    from stages.train import body_optimizer, head_optimizer, train_one_epoch

    paths = []
    for i, img in enumerate([skdata.chelsea(), skdata.coffee(), skdata.astronaut()[::4, ::4], skdata.rocket()]):
        paths.append(str(tmp_path / f"{i}.jpg"))
        Image.fromarray(img).save(paths[-1])
    meta = {"kind": "files", "channels": 3, "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    images = ImageSet(tmp_path, meta, np.array(["a", "b", "c", "d"]), np.full(4, -1), None, paths)
    rows = np.array([0, 1, 2, 3, 3, 2, 1, 0, 2, 2])
    settings = {"train.lr": 0.05, "train.momentum": 0.9, "train.weight_decay": 1e-5, "train.batch_size": 4,
                "train.crop_size": 32, "train.crop_scale": [0.08, 1.0], "train.hflip": True, "train.amp": False,
                "train.intensity_jitter": 0.0, "train.decode": "cpu"}

    def epoch(workers: int) -> dict:
        p = apply_overrides(small_params, {**settings, "train.num_workers": workers}).train
        torch.manual_seed(0)
        model = build_model({"arch": "small_alexnet", "sobel": True, "width": 2, "fc_dim": 8, "dropout": 0.5}, 3, 32)
        model.reset_top_layer(2)
        stats = train_one_epoch(model, images, rows, rows % 2, body_optimizer(model, p, p.lr), head_optimizer(model, p, p.lr),
                                p, torch.device("cpu"), torch.Generator().manual_seed(5),
                                progress=False)
        return {"stats": stats, **{k: v.clone() for k, v in model.state_dict().items()}}

    none, two = epoch(0), epoch(2)
    assert none["stats"] == two["stats"] and none["stats"]["n_samples"] == 10
    assert all(torch.equal(none[k], two[k]) for k in none if k != "stats")
