"""Stage `extract`: pre-ReLU fc features of every training image -> features.npy, row i = dataset row i.

Centre view (stages.data.extract_batches: resize + centre crop, as the paper), no augmentation, eval()
mode (dropout off, BatchNorm running statistics), as the official implementation clusters. Features
stream into a .npy memmap batch by batch, so memory is bounded by one batch plus the page cache, never
N x D in RAM.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from stages.artifacts import allocate_npy, check_architecture
from stages.checkpoints import check_input_size, load_checkpoint, model_from_checkpoint
from stages.common import StageError, Timer, atomic_path, cli_errors, load_params, peak_rss_mb, pick_device, write_json
from stages.data import ImageSet, extract_batches, load_split
from stages.layout import FEATURES, report


def autocast(device: torch.device, amp: bool | str):
    """bf16 autocast when amp is true, or "auto" on a GPU.

    "auto" keeps fp32 on the CPU, where bf16 autocast is slower than fp32 for these networks
    (`python -m pipeline.benchmark --only model` measures it).
    """
    if amp is False or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: ImageSet, out: np.ndarray, *, crop_size: int,
                     batch_size: int, device: torch.device, amp: bool | str = "auto", num_workers: int | str = 0,
                     decode: str = "cpu", layer: str = "fc", progress: bool = True) -> None:
    """Fill `out` (N x D, e.g. a memmap) with the features of images in dataset order."""
    model.eval()
    order = np.arange(len(images))
    start = 0
    bar = tqdm(total=len(images), desc="extract", unit="img", disable=not progress or None, leave=False)
    for x in extract_batches(images, order, crop_size, batch_size, device, num_workers, decode):
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            feats = model.fc_features(x) if layer == "fc" else model.conv_activations(x)[int(layer)]
        out[start : start + len(x)] = feats.float().flatten(1).cpu().numpy()
        start += len(x)
        bar.update(len(x))
    bar.close()


def run_extract(params: dict, dataset: str | Path, checkpoint: str | Path, out_dir: str | Path) -> dict:
    section = params["extract"]
    out_dir = Path(out_dir)
    with Timer() as t:
        device = pick_device(section.get("device", "auto"))
        images = load_split(dataset, "train")
        ckpt = load_checkpoint(checkpoint, device)
        check_input_size(ckpt, section["crop_size"], "extract.crop_size")
        check_architecture(ckpt, params["model"], images.channels, checkpoint)
        model = model_from_checkpoint(ckpt, device).to(memory_format=torch.channels_last)
        with atomic_path(out_dir / FEATURES) as tmp:
            feats = allocate_npy(tmp, (len(images), model.feature_dim), np.float32, out_dir / FEATURES)
            extract_features(model, images, feats, crop_size=section["crop_size"], batch_size=section["batch_size"],
                             device=device, amp=section["amp"], num_workers=section["num_workers"],
                             decode=section["decode"])
            if not np.isfinite(feats).all():
                raise StageError(f"non-finite features from {checkpoint}: the network diverged; lower train.lr")
            feats.flush()
            del feats
    stats = {"n_images": len(images), "feature_dim": model.feature_dim, "checkpoint_epoch": ckpt["epoch"],
             "device": device.type, "seconds": t.seconds, "peak_rss_mb": peak_rss_mb()}
    write_json(out_dir / report("extract"), stats)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file; this stage reads its `extract` section")
    parser.add_argument("--dataset", default="data/dataset", help="canonical dataset written by prepare")
    parser.add_argument("--checkpoint", required=True, help="network to extract with (the previous epoch's)")
    parser.add_argument("--out", required=True, help="epoch directory, e.g. data/epochs/0003")
    args = parser.parse_args(argv)
    with cli_errors("extract"):
        stats = run_extract(load_params(args.params), args.dataset, args.checkpoint, args.out)
    print(f"extract: {stats['n_images']} x {stats['feature_dim']} features in {stats['seconds']:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
