"""Seeds per (run, epoch, purpose), seeded subsets, the device and autocast choice, timing and memory."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from stages.core.errors import StageError

STREAMS = {"init": 0, "cluster": 1, "train": 2, "evaluate": 3, "pca": 4}


def seed_for(run_seed: int, epoch: int, stream: str) -> int:
    """A distinct, reproducible 31-bit seed per (run seed, epoch, purpose).

    k-means must start from different centroids every epoch (else assignments freeze); deriving the
    seed keeps a rerun of any single epoch bit-for-bit reproducible.
    """
    return int(np.random.SeedSequence([run_seed, epoch, STREAMS[stream]]).generate_state(1)[0] >> 1)


def seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """A seeded random subset of `limit` of the rows 0..n-1 (all of them if limit is None), in order."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {requested!r} requested but torch sees no CUDA GPU: set device: auto or cpu")
    return torch.device(requested)


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def autocast(device: torch.device, amp: bool | str):
    """bf16 autocast when amp is true, or "auto" on a GPU.

    "auto" keeps fp32 on the CPU, where bf16 autocast is slower than fp32 for these networks
    (`python -m pipeline.tools.benchmark --only model` measures it).
    """
    if amp is False or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
