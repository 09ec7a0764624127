"""Seeds per (run, epoch, purpose), seeded subsets, the device and autocast choice, timing, progress lines and memory."""
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


def clock(seconds: float) -> str:
    """41.2s, 1m 02s, 2h 05m: a duration as a progress line shows it."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes}m {s:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


class Phase(Timer):
    """A running phase: its seconds once it ends, and `note` (e.g. "1,234 images") for its closing line."""
    note = ""


class Phases:
    """A long stage's progress on stdout: a numbered line when each phase starts and ends, with the phase's
    time and the stage's, and item lines inside a phase (progress):

        evaluate: [3/11] trained network: linear probes conv1..fc ...
        evaluate:   probe 2/6 conv2 in 4.1s, about 16.4s left
        evaluate: [3/11] trained network: linear probes conv1..fc done in 20.5s (elapsed 1m 02s)

    Each line is flushed: under DVC or a subprocess capture stdout is a pipe, which Python block-buffers,
    and the lines would arrive all at once when the stage ends.
    """

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.started = stage, total, 0
        self.start = time.perf_counter()

    def say(self, text: str) -> None:
        print(f"{self.stage}: {text}", flush=True)

    @contextlib.contextmanager
    def phase(self, title: str):
        self.started += 1
        tag = f"[{self.started}/{self.total}] {title}"
        self.say(f"{tag} ...")
        with Phase() as phase:
            yield phase
        note = f": {phase.note}," if phase.note else ""
        self.say(f"{tag}{note} done in {clock(phase.seconds)} (elapsed {clock(time.perf_counter() - self.start)})")

    def progress(self, items, total: int, what: str, name=None, every_s: float = 30.0):
        """Yield the items, saying after each tenth of them (or every_s seconds) how many are done and about how
        long the rest takes at the pace so far. With `name` (item -> str), a line names its item and the time it
        took: for a few long items (ten or fewer get a line each); without, the rate: for many short ones."""
        start = last = time.perf_counter()
        next_line = 1  # in tenths of total
        for i, item in enumerate(items, 1):
            began = time.perf_counter()
            yield item
            now = time.perf_counter()
            if i * 10 < next_line * total and now - last < every_s:
                continue
            next_line, last = i * 10 // total + 1, now
            left = f", about {clock((now - start) / i * (total - i))} left" if i < total else ""
            if name is not None:
                self.say(f"  {what} {i}/{total} {name(item)} in {clock(now - began)}{left}")
            else:
                self.say(f"  {what} {i:,}/{total:,} ({i / total:.0%}), {i / max(now - start, 1e-9):,.0f}/s{left}")


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
