"""Stage `train`: one DeepCluster epoch on this epoch's pseudo-labels.

- images are drawn uniformly over the non-empty clusters (paper Sec. 3.4), so a giant cluster cannot
  dominate; the official sampler's index bug (it sampled images, not clusters) is not repeated;
- the top layer is new every epoch (cluster ids mean nothing across epochs): N(0, 0.01) weights,
  sized to the non-empty clusters, trained by its own momentum-free SGD;
- the body's SGD (momentum 0.9) keeps its state across epochs through the checkpoint;
- random resized crop + horizontal flip (of the original image for image trees: stages.core.data.train_batches),
  contrast/brightness jitter (stages.core.data.intensity_jitter), dropout; channels_last; bf16 autocast on GPU.

`--init` writes the epoch-0 checkpoint (the seeded random network that epoch 1 clusters with).

Under torchrun (stages/core/distributed.py) every rank draws the same sample and takes its share of each
batch; the step count and global batch stay one process's. Augmentation and dropout draw from each
rank's own seeded stream, seed_for(seed, epoch, "train") + rank (rank 0's is one process's), so the
ranks do not crop their shares alike.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core.artifacts import check_architecture, check_assignments
from stages.core.checkpoints import (check_input_size, init_checkpoint, load_checkpoint, model_from_checkpoint,
                                     save_checkpoint)
from stages.core.data import ImageSet, intensity_jitter, load_split, train_batches
from stages.core.distributed import (World, all_sum, backend_for, check_world, global_batchnorm, process_group,
                                     split_sample, stage_device, world_from_env)
from stages.core.errors import StageError, cli_errors
from stages.core.io import write_json
from stages.core.layout import report
from stages.core.models import DeepClusterNet
from stages.core.params import load_params, stage_parser
from stages.core.runtime import Timer, autocast, peak_rss_mb, seed_for
from stages.core.schema import Params, Train


def draws_per_epoch(section: Train, n_images: int) -> int:
    """Images drawn per epoch: samples_per_epoch when set, else N but at least min_samples_per_epoch.

    The head is new each epoch, so an epoch of few SGD steps spends most of them re-learning it: one draw
    per image gives a 5,000-image data set 78 steps of 64 per clustering, and its features stay at random
    init (docs/results.md "The learn check"). The floor leaves data sets of min_samples_per_epoch images
    and more at the paper's one draw per image."""
    return section.samples_per_epoch or max(n_images, section.min_samples_per_epoch)


def uniform_cluster_sample(labels: np.ndarray, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into `labels`, about n_samples / n_clusters from each non-empty cluster, shuffled.

    Small clusters are drawn with replacement, large ones without, as the paper's sampler.
    """
    clusters = np.unique(labels)
    if len(clusters) == 0:
        raise StageError("no cluster has any image: nothing to train on")
    per_cluster = math.ceil(n_samples / len(clusters))
    members = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels)[clusters])[:-1])
    draws = [rng.choice(m, per_cluster, replace=len(m) < per_cluster) for m in members]
    picked = np.concatenate(draws)
    rng.shuffle(picked)
    return picked[:n_samples]


def contiguous_targets(clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids -> 0..C-1 over the non-empty clusters (the head's outputs), and the id of each output."""
    ids, targets = np.unique(clusters, return_inverse=True)
    return targets.astype(np.int64), ids


def epoch_lr(p: Train, epoch: int, epochs: int) -> float:
    """The learning rate of `epoch` (1..epochs): train.lr throughout (paper), or cosine-decayed from train.lr
    towards 0 over the run's epochs (run.epochs: a run resumed with more epochs decays from then on more slowly)."""
    if p.lr_schedule == "constant":
        return p.lr
    return p.lr * 0.5 * (1 + math.cos(math.pi * min(epoch - 1, epochs) / epochs))


def body_optimizer(model: DeepClusterNet, p: Train, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.body_parameters(), lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)


def head_optimizer(model: DeepClusterNet, p: Train, lr: float) -> torch.optim.SGD:
    # No momentum: the head is new each epoch and momentum from an old head would be meaningless.
    return torch.optim.SGD(model.top_layer.parameters(), lr=lr, weight_decay=p.weight_decay)


def train_one_epoch(model: DeepClusterNet, images: ImageSet, rows: np.ndarray, targets: np.ndarray,
                    optimizer: torch.optim.Optimizer, top_optimizer: torch.optim.Optimizer, p: Train,
                    device: torch.device, generator: torch.Generator, progress: bool = True) -> dict:
    """One pass over `rows` (dataset rows, already sampled) with pseudo-labels `targets` (same length)."""
    model.train()
    criterion = torch.nn.CrossEntropyLoss()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(total=len(rows), desc="train", unit="img", disable=not progress or None, leave=False)
    bs = p.batch_size
    batches = train_batches(images, rows, bs, crop_size=p.crop_size, scale=p.crop_scale, hflip=p.hflip,
                            device=device, generator=generator, num_workers=p.num_workers, decode=p.decode)
    for i, x in enumerate(batches):
        y = torch.from_numpy(targets[i * bs : i * bs + len(x)]).to(device)
        x = intensity_jitter(x, p.intensity_jitter, generator)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, p.amp):
            logits = model(x)
            loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        top_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        top_optimizer.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.update(len(y))
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    bar.close()
    if not math.isfinite(total_loss):
        raise StageError("training loss is not finite: the network diverged; lower train.lr")
    return {"loss": total_loss / seen, "pseudo_label_accuracy": correct / seen, "n_samples": seen}


def run_train(params: Params, dataset: str | Path, assignments: str | Path, checkpoint_in: str | Path,
              checkpoint_out: str | Path, epoch: int, stats_out: str | Path | None = None,
              world: World | None = None) -> dict:
    """world: this process's place under torchrun (default: from the environment; one process without)."""
    p = params.train
    world = world_from_env() if world is None else world
    with Timer() as t:
        images = load_split(dataset, "train")
        n_samples = draws_per_epoch(p, len(images))
        check_world(world.size, n_images=n_samples, device=p.device, backend=params.run.dist_backend,
                    local_size=world.local_size, batch_size=p.batch_size)
        device = stage_device(p.device, world)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed = seed_for(params.run.seed, epoch, "train")
        torch.manual_seed(seed)  # the same on every rank: the same fresh head
        generator = torch.Generator().manual_seed(seed + world.rank)
        assign = check_assignments(assignments, images.ids, fix="rerun the epoch's labels stage (the dataset changed "
                                                                "since clustering: rerun the epoch from extract)")
        targets, cluster_ids = contiguous_targets(assign["cluster"].to_numpy())

        ckpt = load_checkpoint(checkpoint_in, device)
        check_input_size(ckpt, p.crop_size, "train.crop_size")
        check_architecture(ckpt, params.model, images.channels, checkpoint_in)
        if ckpt["epoch"] != epoch - 1:
            raise StageError(f"{checkpoint_in} is from epoch {ckpt['epoch']}, but epoch {epoch} must start from "
                             f"epoch {epoch - 1}'s checkpoint")
        model = model_from_checkpoint(ckpt, device)
        if world.size > 1 and p.sync_batchnorm:
            model = global_batchnorm(model, device)
        lr = epoch_lr(p, epoch, params.run.epochs)
        optimizer = body_optimizer(model, p, lr)
        if ckpt["optimizer"] is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
            for group in optimizer.param_groups:  # params.yaml wins over the stored hyper-parameters
                group.update(lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)
        model.reset_top_layer(len(cluster_ids))
        top_optimizer = head_optimizer(model, p, lr)
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPUs and GPUs alike
        if world.size > 1:
            torch.manual_seed(seed + world.rank)  # dropout masks: each rank its own (the head is drawn already)

        rows = uniform_cluster_sample(targets, n_samples, np.random.default_rng(seed))  # the same on every rank
        with process_group(world, backend_for(params.run.dist_backend, device), device):
            net = model
            if world.size > 1:
                rows = split_sample(rows, p.batch_size, world)
                net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                                else None)
            share = p.model_copy(update={"batch_size": p.batch_size // world.size})
            stats = train_one_epoch(net, images, rows, targets[rows], optimizer, top_optimizer, share, device,
                                    generator, progress=world.main)
            if world.size > 1:  # train.json is the epoch's, not rank 0's share: sums over the ranks
                n = stats["n_samples"]
                loss, correct, seen = all_sum([stats["loss"] * n, stats["pseudo_label_accuracy"] * n, n], device)
                stats = {"loss": loss / seen, "pseudo_label_accuracy": correct / seen, "n_samples": int(round(seen))}
        if world.main:  # every rank holds the same weights and optimizer state; one writes them
            save_checkpoint(checkpoint_out, model=model, epoch=epoch, model_params=ckpt["model_params"],
                            in_channels=ckpt["in_channels"], image_size=ckpt["image_size"], optimizer=optimizer,
                            top_optimizer=top_optimizer, cluster_ids=torch.from_numpy(cluster_ids))
    stats.update(epoch=epoch, lr=lr, n_clusters=len(cluster_ids), device=device.type, processes=world.size, seconds=t.seconds,
                 images_per_second=stats["n_samples"] / t.seconds, peak_rss_mb=peak_rss_mb())
    if stats_out is not None and world.main:
        write_json(stats_out, stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "params file; this stage reads `train` and `model`")
    parser.add_argument("--dataset", default="data/dataset", help="canonical dataset written by prepare")
    parser.add_argument("--init", action="store_true", help="only write the epoch-0 (random) checkpoint to --checkpoint-out")
    parser.add_argument("--assignments", help="this epoch's assignments.parquet")
    parser.add_argument("--checkpoint-in", help="the previous epoch's checkpoint")
    parser.add_argument("--checkpoint-out", required=True, help="where to write this epoch's checkpoint")
    parser.add_argument("--epoch", type=int, help="epoch number (seeds sampling and augmentation)")
    parser.add_argument("--stats-out", help="train.json to write (default: beside --assignments)")
    args = parser.parse_args(argv)
    with cli_errors("train"):
        params = load_params(args.params)
        if args.init:
            init_checkpoint(params, args.dataset, args.checkpoint_out)
            print(f"train: random epoch-0 network -> {args.checkpoint_out}")
            return
        if not (args.assignments and args.checkpoint_in and args.epoch):
            parser.error("--assignments, --checkpoint-in and --epoch are required unless --init")
        stats_out = args.stats_out or Path(args.assignments).with_name(report("train"))
        s = run_train(params, args.dataset, args.assignments, args.checkpoint_in, args.checkpoint_out, args.epoch, stats_out)
    if world_from_env().main:
        print(f"train: epoch {s['epoch']} loss {s['loss']:.3f}, {s['images_per_second']:.0f} img/s, {s['seconds']:.1f}s")


if __name__ == "__main__":
    main()
