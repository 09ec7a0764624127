"""Checkpoints hold every stateful object; written atomically, loaded with weights_only=True."""
from __future__ import annotations

from pathlib import Path

import torch

from stages.core.artifacts import check_architecture, nbytes, require_free_space
from stages.core.data import load_split
from stages.core.errors import DamagedArtifact, StageError, first_line
from stages.core.io import atomic_path, write_refused
from stages.core.models import DeepClusterNet, build_model
from stages.core.runtime import seed_for
from stages.core.schema import Model, Params


def save_checkpoint(path: str | Path, *, model: DeepClusterNet, epoch: int, model_params: dict,
                    in_channels: int, image_size: int, optimizer: torch.optim.Optimizer | None = None,
                    top_optimizer: torch.optim.Optimizer | None = None,
                    cluster_ids: torch.Tensor | None = None) -> None:
    state = {"epoch": epoch, "model_params": dict(model_params), "in_channels": in_channels, "image_size": image_size,
             # The body and its momentum buffers carry over between epochs; the head and its optimizer
             # are rebuilt every epoch but kept so a checkpoint fully describes the finished epoch.
             "model": {k: v for k, v in model.state_dict().items() if not k.startswith("top_layer.")},
             "top_layer": model.top_layer.state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "top_optimizer": top_optimizer.state_dict() if top_optimizer is not None else None,
             "cluster_ids": cluster_ids,  # head output j <-> cluster_ids[j] of this epoch's k-means
             "rng_cpu": torch.get_rng_state()}
    needed = nbytes(state) + (1 << 20)  # the tensors, plus the archive's own records
    require_free_space(path, needed)
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except (RuntimeError, OSError) as e:  # torch reports a refused write as "enforce fail ... file write failed"
            raise write_refused(path, e, needed) from e


# A kept checkpoint is never rewritten in place, so the way back is the epoch before's.
RECOVER_CHECKPOINT = ("rerun the flow: it recomputes an epoch's checkpoint from the epoch before's, which is kept "
                      "until the next epoch is done; if that one is gone too, restore the checkpoints with "
                      "`dvc checkout models/checkpoints`, or start over with --fresh")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise StageError(f"checkpoint {path} not found: run the previous epoch's train stage (or `train --init`) first")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise DamagedArtifact(path, f"not a readable checkpoint ({type(e).__name__}: {first_line(e)})",
                              RECOVER_CHECKPOINT) from e
    missing = [k for k in ("epoch", "model_params", "in_channels", "image_size", "model") if k not in (
        ckpt if isinstance(ckpt, dict) else {})]
    if missing:
        raise DamagedArtifact(path, f"not a DeepCluster checkpoint (it lacks {missing})", RECOVER_CHECKPOINT)
    return ckpt


def verify_checkpoint(path: str | Path, model: Model, in_channels: int, epoch: int) -> dict:
    """`epoch`'s checkpoint, complete and of this run's network."""
    ckpt = load_checkpoint(path)
    check_architecture(ckpt, model, in_channels, path)
    if ckpt["epoch"] != epoch:
        raise DamagedArtifact(path, f"holds epoch {ckpt['epoch']}'s network, not epoch {epoch}'s", RECOVER_CHECKPOINT)
    return ckpt


def check_input_size(ckpt: dict, crop_size: int, setting: str) -> None:
    """The fc layers of a network are sized for one input size: refuse another before any compute."""
    if int(crop_size) != int(ckpt["image_size"]):
        raise StageError(f"{setting}={crop_size}, but the network (epoch {ckpt['epoch']}) was built for "
                         f"{ckpt['image_size']} px inputs (train.crop_size when the run started): set extract.crop_size "
                         "and train.crop_size to the same value, and start the run over (--fresh) if you changed it")


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> DeepClusterNet:
    model = build_model(ckpt["model_params"], ckpt["in_channels"], ckpt["image_size"])
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # a layer of another size: another network under the same settings
        raise StageError(f"checkpoint does not match model {ckpt['model_params']}: {first_line(e)}") from e
    if unexpected or any(not k.startswith("top_layer.") for k in missing):
        raise StageError(f"checkpoint does not match model {ckpt['model_params']}: missing {missing}, unexpected {unexpected}")
    return model.to(device)


class FeatureExtractor(torch.nn.Module):
    """Images in [0, 1] (B x C x H x W, the centre view) -> the features DeepCluster clusters (the last fc
    layer, before its ReLU). The data set's normalisation is built in, so that the network exported to
    MLflow (pipeline.tracking.log_model) needs neither this project's code nor its dataset.json."""

    def __init__(self, network: DeepClusterNet, mean: list[float], std: list[float]):
        super().__init__()
        self.network = network.eval()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.fc_features((images - self.mean) / self.std)


def init_checkpoint(params: Params, dataset: str | Path, path: str | Path) -> None:
    """Epoch 0: the seeded random network that the first clustering runs on."""
    images = load_split(dataset, "train")
    torch.manual_seed(seed_for(params.run.seed, 0, "init"))
    model = build_model(params.model.model_dump(), images.channels, params.train.crop_size)
    save_checkpoint(path, model=model, epoch=0, model_params=params.model.model_dump(), in_channels=images.channels,
                    image_size=params.train.crop_size)
