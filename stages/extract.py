"""Stage `extract`: pre-ReLU fc features of every training image -> features.npy, row i = dataset row i.

Centre view (stages.core.data.extract_batches: resize + centre crop, as the paper), no augmentation, eval()
mode (dropout off, BatchNorm running statistics), as the official implementation clusters. Features
stream into a .npy memmap batch by batch, so memory is bounded by one batch plus the page cache, never
N x D in RAM.

Under torchrun each process computes a contiguous block of rows into the same file (stages/core/distributed.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.core.artifacts import allocate_npy, check_architecture
from stages.core.checkpoints import check_input_size, load_checkpoint, model_from_checkpoint
from stages.core.data import ImageSet, extract_batches, load_split
from stages.core.distributed import (World, backend_for, barrier, broadcast, check_world, process_group, shard,
                                     stage_device, world_from_env)
from stages.core.errors import StageError, cli_errors
from stages.core.io import atomic_path, write_json
from stages.core.layout import FEATURES, report
from stages.core.params import load_params, stage_parser
from stages.core.runtime import Timer, autocast, peak_rss_mb
from stages.core.schema import Params


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: ImageSet, out: np.ndarray, *, crop_size: int,
                     batch_size: int, device: torch.device, amp: bool | str = "auto", num_workers: int | str = 0,
                     decode: str = "cpu", progress: bool = True, rows: np.ndarray | None = None) -> None:
    """Fill `out` (len(rows) x D, e.g. a memmap) with the features of the images at `rows` (default: all, in
    dataset order)."""
    model.eval()
    order = np.arange(len(images)) if rows is None else rows
    start = 0
    bar = tqdm(total=len(order), desc="extract", unit="img", disable=not progress or None, leave=False)
    for x in extract_batches(images, order, crop_size, batch_size, device, num_workers, decode):
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            feats = model.fc_features(x)
        out[start : start + len(x)] = feats.float().flatten(1).cpu().numpy()
        start += len(x)
        bar.update(len(x))
    bar.close()


def run_extract(params: Params, dataset: str | Path, checkpoint: str | Path, out: str | Path,
                world: World | None = None) -> dict:
    """world: this process's place under torchrun (default: from the environment; one process without)."""
    out_dir = Path(out)
    section = params.extract
    world = world_from_env() if world is None else world
    with Timer() as t:
        images = load_split(dataset, "train")
        check_world(world.size, n_images=len(images), device=section.device, backend=params.run.dist_backend,
                    section="extract", local_size=world.local_size)
        device = stage_device(section.device, world)
        ckpt = load_checkpoint(checkpoint, device)
        check_input_size(ckpt, section.crop_size, "extract.crop_size")
        check_architecture(ckpt, params.model, images.channels, checkpoint)
        model = model_from_checkpoint(ckpt, device).to(memory_format=torch.channels_last)
        shape = (len(images), model.feature_dim)
        with process_group(world, backend_for(params.run.dist_backend, device), device), \
                (atomic_path(out_dir / FEATURES) if world.main else contextlib.nullcontext()) as tmp:
            if world.main:  # one file, allocated once; every rank writes its block of rows into it
                allocate_npy(tmp, shape, np.float32, out_dir / FEATURES).flush()
            feats = np.load(broadcast(tmp), mmap_mode="r+")  # the broadcast waits for the allocation
            block = shard(len(images), world)
            extract_features(model, images, feats[block], crop_size=section.crop_size,
                             batch_size=section.batch_size, device=device, amp=section.amp,
                             num_workers=section.num_workers, decode=section.decode, progress=world.main,
                             rows=np.arange(block.start, block.stop))
            feats.flush()
            del feats
            barrier()  # every block written before rank 0 checks, fsyncs and renames the file
            if world.main and not np.isfinite(np.load(tmp, mmap_mode="r")).all():
                raise StageError(f"non-finite features from {checkpoint}: the network diverged; lower train.lr")
    stats = {"n_images": len(images), "feature_dim": model.feature_dim, "checkpoint_epoch": ckpt["epoch"],
             "device": device.type, "processes": world.size, "seconds": t.seconds, "peak_rss_mb": peak_rss_mb()}
    if world.main:
        write_json(out_dir / report("extract"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "params file; this stage reads its `extract` section")
    parser.add_argument("--dataset", default="data/dataset", help="canonical dataset written by prepare")
    parser.add_argument("--checkpoint", required=True, help="network to extract with (the previous epoch's)")
    parser.add_argument("--out", required=True, help="epoch directory, e.g. data/epochs/0003")
    args = parser.parse_args(argv)
    with cli_errors("extract"):
        stats = run_extract(load_params(args.params), args.dataset, args.checkpoint, args.out)
    if world_from_env().main:
        print(f"extract: {stats['n_images']} x {stats['feature_dim']} features in {stats['seconds']:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
