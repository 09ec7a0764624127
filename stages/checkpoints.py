"""Checkpoints hold every stateful object; written atomically, loaded with weights_only=True."""
from __future__ import annotations

from pathlib import Path

import torch

from stages.common import StageError, atomic_path
from stages.models import DeepClusterNet, build_model


def save_checkpoint(path: str | Path, *, model: DeepClusterNet, epoch: int, model_params: dict,
                    in_channels: int, image_size: int, optimizer: torch.optim.Optimizer | None = None,
                    top_optimizer: torch.optim.Optimizer | None = None,
                    cluster_ids: torch.Tensor | None = None) -> None:
    state = {
        "epoch": epoch,
        "model_params": dict(model_params),
        "in_channels": in_channels,
        "image_size": image_size,
        # The body and its momentum buffers carry over between epochs; the head and its optimizer
        # are rebuilt every epoch but kept so a checkpoint fully describes the finished epoch.
        "model": {k: v for k, v in model.state_dict().items() if not k.startswith("top_layer.")},
        "top_layer": model.top_layer.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "top_optimizer": top_optimizer.state_dict() if top_optimizer is not None else None,
        "cluster_ids": cluster_ids,  # head output j <-> cluster_ids[j] of this epoch's k-means
        "rng_cpu": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise StageError(f"checkpoint {path} not found: run the previous epoch's train stage (or `train --init`) first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise StageError(f"checkpoint {path} is unreadable ({e}); delete it and rerun the epoch that wrote it") from e


def check_input_size(ckpt: dict, crop_size: int, setting: str) -> None:
    """The fc layers of a network are sized for one input size: refuse another before any compute."""
    if int(crop_size) != int(ckpt["image_size"]):
        raise StageError(f"{setting}={crop_size}, but the network (epoch {ckpt['epoch']}) was built for "
                         f"{ckpt['image_size']} px inputs (train.crop_size when the run started): set extract.crop_size "
                         "and train.crop_size to the same value, and start the run over (--fresh) if you changed it")


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> DeepClusterNet:
    model = build_model(ckpt["model_params"], ckpt["in_channels"], ckpt["image_size"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any(not k.startswith("top_layer.") for k in missing):
        raise StageError(f"checkpoint does not match model {ckpt['model_params']}: missing {missing}, unexpected {unexpected}")
    return model.to(device)
