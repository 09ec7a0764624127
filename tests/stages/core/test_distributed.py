"""stages.core.distributed: extract and train on several processes give one process's results.

The multi-process tests run two real gloo processes on 127.0.0.1 (torch.multiprocessing.spawn),
once for the module, on 240 real Fashion-MNIST images; the settings' checks are pure functions.
"""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from stages.core.assignments import write_assignments
from stages.core.checkpoints import init_checkpoint, load_checkpoint
from stages.core.data import center_crop, load_split
from stages.core.distributed import (SINGLE, World, backend_for, check_launch, check_world, launch_error, shard,
                                     split_sample, torchrun_command, world_from_env)
from stages.core.errors import StageError, TransientError
from stages.core.io import read_json
from stages.core.params import apply_overrides
from stages.extract import run_extract
from stages.train import run_train, uniform_cluster_sample


# ---------------------------------------------------------------- who does what
@pytest.mark.parametrize("n, size", [(240, 2), (241, 2), (10, 3), (7, 7), (1000, 8)])
def test_extract_shards_tile_the_rows_in_rank_order(n, size):
    blocks = [shard(n, World(rank=r, size=size)) for r in range(size)]
    assert np.array_equal(np.concatenate([np.arange(n)[b] for b in blocks]), np.arange(n))
    assert max(b.stop - b.start for b in blocks) - min(b.stop - b.start for b in blocks) <= 1


@pytest.mark.parametrize("n, batch, size", [(240, 64, 2), (241, 64, 2), (1000, 64, 8), (70, 8, 4), (5, 4, 4),
                                            (64, 64, 2)])
def test_every_image_of_the_sample_is_used_once_across_ranks_in_one_process_batches(n, batch, size):
    labels = np.random.default_rng(0).integers(0, 7, 300)
    sample = uniform_cluster_sample(labels, n, np.random.default_rng(1))  # with repeats: small clusters
    parts = [split_sample(sample, batch, World(rank=r, size=size)) for r in range(size)]
    kept = n - n % size  # cut to a multiple of the world size, fewer than `size` draws
    # every position of the sample is used once: the parts, interleaved batch by batch, are the sample
    local = batch // size
    steps = [[p[i : i + local] for i in range(0, len(p), local)] for p in parts]
    assert len({len(s) for s in steps}) == 1  # every rank runs the same number of steps ...
    for i in range(len(steps[0])):
        assert len({len(s[i]) for s in steps}) == 1  # ... on equal shares
        np.testing.assert_array_equal(np.concatenate([s[i] for s in steps]), sample[i * batch : (i + 1) * batch][
                                      : sum(len(s[i]) for s in steps)])
    assert np.array_equal(np.concatenate([np.concatenate(s) for s in zip(*steps)]), sample[:kept])


def test_one_process_keeps_the_whole_sample():
    sample = np.arange(241)
    assert np.array_equal(split_sample(sample, 64, SINGLE), sample)


def test_world_comes_from_torchruns_environment():
    assert world_from_env({}) == SINGLE
    w = world_from_env({"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"})
    assert (w.rank, w.local_rank, w.size, w.local_size, w.main) == (9, 1, 16, 8, False)


# ---------------------------------------------------------------- bad settings stop before any work
def test_more_processes_than_images_is_refused():
    with pytest.raises(StageError, match=r"8 processes but only 5 images.*run.nproc_per_node"):
        check_world(8, n_images=5, device="cpu", gpus=0)


def test_a_gpu_requested_where_there_is_none_is_refused():
    with pytest.raises(StageError, match=r"train.device: cuda requested but torch sees no CUDA GPU"):
        check_world(2, device="cuda", gpus=0)


def test_nccl_on_the_cpu_is_refused():
    with pytest.raises(StageError, match=r"nccl needs GPUs.*set run.dist_backend to auto or gloo"):
        check_world(2, device="auto", backend="nccl", gpus=0)
    with pytest.raises(StageError, match="nccl needs GPUs"):
        backend_for("nccl", "cpu")
    assert backend_for("auto", "cpu") == "gloo" and backend_for("auto", "cuda:3") == "nccl"


def test_a_batch_size_not_divisible_by_the_processes_is_refused():
    with pytest.raises(StageError, match=r"train.batch_size=100 is not divisible by the 8 processes.*e.g. 96"):
        check_world(8, batch_size=100, device="cpu", gpus=0)
    check_world(8, batch_size=64, n_images=1000, device="cpu", gpus=0)  # fine


def test_one_named_gpu_for_several_processes_and_more_processes_than_gpus_are_refused():
    with pytest.raises(StageError, match=r"cuda:1 names one GPU.*cuda:LOCAL_RANK"):
        check_world(2, device="cuda:1", gpus=2, local_size=2)
    with pytest.raises(StageError, match=r"8 processes on this machine but torch sees 4 GPU"):
        check_world(8, device="auto", gpus=4, local_size=8)


def test_node_rank_must_be_below_nnodes(small_params):
    with pytest.raises(StageError, match=r"run.node_rank=2 but run.nnodes=2"):
        check_launch(apply_overrides(small_params, {"run.node_rank": 2, "run.nnodes": 2}).run)


def test_schema_refuses_a_bad_endpoint_and_backend(small_params):
    with pytest.raises(StageError, match=r"run.rdzv_endpoint must be host:port"):
        apply_overrides(small_params, {"run.rdzv_endpoint": "node0"})
    with pytest.raises(StageError, match=r"run.dist_backend must be auto \| gloo \| nccl"):
        apply_overrides(small_params, {"run.dist_backend": "mpi"})


def test_global_batchnorm_keeps_the_parameters_the_optimizer_holds_and_the_checkpoint_keys(small_params):
    from stages.core.distributed import GlobalBatchNorm2d, global_batchnorm
    from stages.core.models import build_model

    model = build_model(small_params.model.model_dump(), 1, 28)
    before = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    converted = global_batchnorm(model, torch.device("cpu"))
    assert converted is model and list(model.state_dict()) == keys
    assert all(p is before[name] for name, p in model.named_parameters())
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(type(m) is GlobalBatchNorm2d for m in bns)
    # one process: plain BatchNorm
    x = torch.randn(8, 1, 28, 28)
    ref = build_model(small_params.model.model_dump(), 1, 28)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.train().conv_activations(x)[-1], ref.train().conv_activations(x)[-1])


# ---------------------------------------------------------------- launching
def test_torchrun_command_one_node_and_several():
    cmd = torchrun_command("stages.train", ["--epoch", 3], nproc_per_node=8)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone"]
    assert cmd[-4:] == ["-m", "stages.train", "--epoch", "3"]
    cmd = torchrun_command("stages.extract", [], 8, nnodes=4, node_rank=2, rdzv_endpoint="gpu-node-0:29500")
    assert "--standalone" not in cmd
    assert {"--nnodes=4", "--node_rank=2", "--master_addr=gpu-node-0", "--master_port=29500"} <= set(cmd)


def test_the_flow_checks_the_settings_before_starting_any_process(fashion_dataset, small_params, tmp_path):
    from stages.core.layout import RunLayout
    from stages.epoch import run_stage

    layout = RunLayout(fashion_dataset, tmp_path / "epochs", tmp_path / "ckpt")
    with pytest.raises(StageError, match="train.batch_size=64 is not divisible by the 3 processes"):
        run_stage("train", apply_overrides(small_params, {"run.nproc_per_node": 3}), layout, 1)
    with pytest.raises(StageError, match="500 processes but only 240 images"):
        run_stage("extract", apply_overrides(small_params, {"run.nproc_per_node": 250, "run.nnodes": 2}), layout, 1)
    with pytest.raises(StageError, match="run.node_rank=3 but run.nnodes=2"):
        run_stage("extract", apply_overrides(small_params, {"run.nnodes": 2, "run.node_rank": 3}), layout, 1)
    assert not layout.epochs_root.exists() or not list(layout.epochs_root.rglob("*.yaml"))


def test_a_failed_launch_is_the_stages_own_message():
    out = "noise\ntrain: train.lr is too high\ntrain: train.lr is too high\n[torchrun] ChildFailedError ...\n"
    e = launch_error("train", out, 1)
    assert isinstance(e, StageError) and str(e) == "train.lr is too high"
    e = launch_error("extract", "extract: OSError: x. A transient fault (I/O error, out of memory or GPU fault): ...", 1)
    assert isinstance(e, TransientError)
    e = launch_error("train", "  exitcode  : -9 (pid: 12)\n", 1)
    assert isinstance(e, TransientError) and "killed" in str(e)


# ---------------------------------------------------------------- two real processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _identity_crop(x, size, scale=None, ratio=None, hflip=True, generator=None):
    return center_crop(x, size)


def _worker(rank: int, size: int, port: int, params: dict, root, dataset) -> None:
    import os

    import stages.core.data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # Even at crop_scale [1, 1] the crop's aspect ratio is drawn at random; the comparison wants
    # deterministic inputs, so that the batch split is the one difference from one process.
    stages.core.data.random_resized_crop_flip = _identity_crop
    world = World(rank=rank, size=size, local_rank=rank, local_size=size)
    run_extract(params, dataset, root / "epoch_0000.pt", root / f"extract{size}", world=world)
    run_train(params, dataset, root / "assignments.parquet", root / "epoch_0000.pt", root / f"train{size}.pt", 1,
              root / f"train{size}.json", world=world)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_params, fashion_dataset):
    """The same extract and train on one process and on two (gloo): their output directory."""
    params = apply_overrides(small_params, {"model.dropout": 0.0, "train.crop_scale": [1.0, 1.0],
                                            "train.hflip": False, "train.intensity_jitter": 0.0,
                                            "train.sync_batchnorm": True,
                                            "train.samples_per_epoch": 200})  # 64, 64, 64, 8: a short last batch
    root = tmp_path_factory.mktemp("ddp")
    init_checkpoint(params, fashion_dataset, root / "epoch_0000.pt")
    n = len(load_split(fashion_dataset))
    write_assignments(root / "assignments.parquet", load_split(fashion_dataset).ids, np.arange(n) % 10,
                      np.zeros(n, np.float32))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("stages.core.data.random_resized_crop_flip", _identity_crop)
        world = SINGLE
        run_extract(params, fashion_dataset, root / "epoch_0000.pt", root / "extract1", world=world)
        run_train(params, fashion_dataset, root / "assignments.parquet", root / "epoch_0000.pt", root / "train1.pt", 1,
                  root / "train1.json", world=world)
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), params, root, fashion_dataset), nprocs=2)
    return root


def test_two_process_features_equal_one_process_features_row_for_row(runs):
    one, two = np.load(runs / "extract1" / "features.npy"), np.load(runs / "extract2" / "features.npy")
    assert one.shape == two.shape
    # Each row is the same network on the same image; only the batch it is computed in differs (240
    # vs 120 rows), which may change the order of a few float sums inside oneDNN's kernels: equal to
    # float32 rounding, bit-equal in practice.
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    assert read_json(runs / "extract2" / "extract.json")["processes"] == 2
    assert sorted(p.name for p in (runs / "extract2").iterdir()) == ["extract.json", "features.npy"]  # no temp file


def test_two_process_training_with_global_batchnorm_is_one_process_training(runs):
    one, two = load_checkpoint(runs / "train1.pt"), load_checkpoint(runs / "train2.pt")
    # 4 SGD steps (momentum 0.9, lr 0.1) on the same global batches; each rank's share of a batch goes
    # through BatchNorm with the global batch's statistics and DDP averages the gradients, so the
    # two runs differ only in the order of float sums: equal to a tolerance a few float32 roundings allow.
    start = load_checkpoint(runs / "epoch_0000.pt")
    moved = max((one["model"][k].float() - start["model"][k].float()).abs().max().item() for k in one["model"])
    assert moved > 1e-3  # the weights did move
    for key in one["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    for key in one["top_layer"]:
        torch.testing.assert_close(two["top_layer"][key], one["top_layer"][key], rtol=1e-4, atol=1e-5)
    for i, state in one["optimizer"]["state"].items():
        torch.testing.assert_close(two["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=1e-4, atol=1e-5)
    s1, s2 = read_json(runs / "train1.json"), read_json(runs / "train2.json")
    assert s2["n_samples"] == s1["n_samples"] == 200 and s2["processes"] == 2
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-5)
    assert s2["pseudo_label_accuracy"] == pytest.approx(s1["pseudo_label_accuracy"])


# ---------------------------------------------------------------- the flow, and several nodes (slow)
@pytest.mark.slow
def test_the_flow_runs_extract_and_train_under_torchrun(prefect_harness, mlflow_uri, fashion_dataset, small_params,
                                                        write_params, tmp_path):
    from pipeline.flow import deepcluster

    params_file = write_params(tmp_path, small_params, {"run.epochs": 1, "run.nproc_per_node": 2})
    metrics = deepcluster(params_file=str(params_file), dataset=str(fashion_dataset),
                          epochs_root=str(tmp_path / "epochs"), checkpoints=str(tmp_path / "ckpt"), dvc=False)
    epoch = tmp_path / "epochs" / "0001"
    assert read_json(epoch / "extract.json")["processes"] == 2 and read_json(epoch / "train.json")["processes"] == 2
    assert metrics["epoch"] == 1 and np.isfinite(metrics["train_loss"])
    assert load_checkpoint(tmp_path / "ckpt" / "epoch_0001.pt")["epoch"] == 1
    assert not [p.name for p in epoch.iterdir() if p.name.startswith(".")]  # the params file for torchrun is gone


@pytest.mark.slow
def test_two_nodes_meet_at_the_endpoint_and_write_one_features_file(fashion_dataset, small_params, tmp_path):
    """Two "nodes" on this machine: node 0 runs the stage as the flow does, node 1 follows its announcement."""
    import subprocess
    import sys

    import yaml

    from stages.core.layout import RunLayout
    from stages.epoch import run_stage

    params = apply_overrides(small_params, {"run.nnodes": 2, "run.rdzv_endpoint": f"127.0.0.1:{_free_port()}",
                                            "run.epochs": 1})
    layout = RunLayout(fashion_dataset, tmp_path / "epochs", tmp_path / "ckpt")
    init_checkpoint(params, fashion_dataset, layout.checkpoint(0))
    layout.epochs_root.mkdir(parents=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump()))
    follower = subprocess.Popen([sys.executable, "-m", "stages.core.distributed", "follow", "--params", "params.yaml",
                                 "--node-rank", "1", "--epochs-root", layout.epochs_root], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        stats = run_stage("extract", params, layout, 1)
    finally:
        follower.kill()
        out = follower.communicate()[0]
    assert "follow: extract of epoch 1" in out
    assert stats["processes"] == 2
    feats = np.load(layout.epoch(1) / "features.npy")
    assert feats.shape[0] == len(load_split(fashion_dataset)) and np.isfinite(feats).all() and (feats != 0).any(1).all()
    assert not (layout.epochs_root / ".torchrun.json").exists()
