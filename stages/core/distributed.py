"""extract and train on several processes: torch.distributed under torchrun, one process per GPU.

A stage started by torchrun (by the flow when run.nproc_per_node * run.nnodes > 1, or by hand:
`torchrun --nproc_per_node 2 -m stages.extract ...`) finds its place in the environment torchrun
sets (WORLD_SIZE, RANK, LOCAL_RANK); without it a stage is one process, as it always was. What
each stage does with several processes:

- extract: rank r computes a contiguous block of rows (`shard`) into the one features.npy, which
  rank 0 allocates beforehand and renames afterwards; the features equal one process's row for row.
- train: the epoch's sample is drawn once from the seed (identical on every rank) and each global
  batch of train.batch_size images is cut into world-size equal parts (`split_sample`), so every image
  of the sample is used once and the SGD steps are one process's steps; the body and head are
  DistributedDataParallel, BatchNorm optionally global (train.sync_batchnorm), and rank 0 alone writes
  the checkpoint and train.json (loss and accuracy summed over ranks).

Nothing here imports pipeline/: `launch` is how the epoch chain (stages/epoch.py) starts a distributed stage.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stages.core.errors import StageError, TransientError, cli_errors
from stages.core.io import read_json, write_json
from stages.core.params import load_params, stage_parser
from stages.core.runtime import pick_device
from stages.core.schema import Run


# ---------------------------------------------------------------- where this process stands
@dataclass(frozen=True)
class World:
    """This process's place among the stage's processes (torchrun's numbering)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files and reports."""
        return self.rank == 0


SINGLE = World()


def world_from_env(env: dict | None = None) -> World:
    """The World torchrun describes in the environment; one process without it."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return SINGLE
    size = int(env["WORLD_SIZE"])
    return World(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)), size=size,
                 local_size=int(env.get("LOCAL_WORLD_SIZE", size)))


def processes(run: Run) -> int:
    """How many processes the run's settings ask extract and train for (all nodes)."""
    return run.nproc_per_node * run.nnodes


# ---------------------------------------------------------------- settings, refused before any work
def backend_for(setting: str, device: torch.device | str) -> str:
    """run.dist_backend resolved: nccl on GPUs (the fast one there), gloo on CPUs (nccl has no CPU tensors)."""
    kind = torch.device(device).type
    if setting == "auto":
        return "nccl" if kind == "cuda" else "gloo"
    if setting == "nccl" and kind != "cuda":
        raise StageError("run.dist_backend: nccl needs GPUs, but this stage runs on the CPU: set run.dist_backend "
                         "to auto or gloo (or the stage's device to cuda on a machine with GPUs)")
    return setting


def check_world(world_size: int, *, n_images: int | None = None, device: str = "auto", backend: str = "auto",
                section: str = "train", gpus: int | None = None, local_size: int = 1,
                batch_size: int | None = None) -> None:
    """Refuse settings that cannot work on `world_size` processes, before any process starts or any work.

    device: the stage's device setting (<section>.device); gpus: CUDA GPUs on this machine (default: as torch
    sees them); local_size: processes on this machine; batch_size: train.batch_size (train only).
    """
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if device.startswith("cuda") and gpus == 0:
        raise StageError(f"{section}.device: {device} requested but torch sees no CUDA GPU on this machine: set "
                         f"{section}.device to auto or cpu")
    on_gpu = device.startswith("cuda") or (device == "auto" and gpus > 0)
    if backend == "nccl" and not on_gpu:
        raise StageError(f"run.dist_backend: nccl needs GPUs, but {section} runs on the CPU ({section}.device: {device}"
                         f"{', and torch sees no GPU' if gpus == 0 else ''}): set run.dist_backend to auto or gloo")
    if world_size == 1:
        return
    if on_gpu and re.fullmatch(r"cuda:\d+", device):
        raise StageError(f"{section}.device: {device} names one GPU, but {world_size} processes run: set it to cuda "
                         "(or auto); each process takes the GPU of its local rank, cuda:LOCAL_RANK")
    if on_gpu and local_size > gpus:
        raise StageError(f"{local_size} processes on this machine but torch sees {gpus} GPU(s): one process per GPU, "
                         f"so set run.nproc_per_node to at most {gpus}")
    if n_images is not None and world_size > n_images:
        raise StageError(f"{world_size} processes but only {n_images} images: some processes would have nothing to "
                         "do; lower run.nproc_per_node (or run.nnodes)")
    if batch_size is not None and batch_size % world_size:
        lower = batch_size - batch_size % world_size
        raise StageError(f"train.batch_size={batch_size} is not divisible by the {world_size} processes: each process "
                         f"takes batch_size / {world_size} images of every batch; set train.batch_size to a multiple "
                         f"of {world_size} (e.g. {lower or world_size}), or change run.nproc_per_node")


def check_launch(run: Run) -> None:
    """The run section's multi-node settings agree with each other."""
    if run.node_rank >= run.nnodes:
        raise StageError(f"run.node_rank={run.node_rank} but run.nnodes={run.nnodes}: node ranks are "
                         f"0..{run.nnodes - 1}; give every node its own")


def stage_device(setting: str, world: World) -> torch.device:
    """The device of this process: the stage's setting, and with several processes on GPUs the GPU of
    its local rank."""
    device = pick_device(setting)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


# ---------------------------------------------------------------- who does what
def shard(n: int, world: World) -> slice:
    """Rank r's contiguous block of rows 0..n-1; the blocks tile 0..n-1 in rank order, sizes differ by at most 1."""
    return slice(n * world.rank // world.size, n * (world.rank + 1) // world.size)


def split_sample(rows: np.ndarray, batch_size: int, world: World) -> np.ndarray:
    """This rank's part of the epoch's sample `rows` (identical on every rank), in order.

    Global batch i is rows[i * batch_size : (i + 1) * batch_size]; each rank takes its contiguous
    batch_size / world.size of it, so step i of every rank together is step i of one process, and
    iterating this rank's rows in batches of batch_size / world.size meets the steps in order. The
    sample is first cut to a multiple of the world size (at most world.size - 1 draws of a shuffled
    sample), so that the last, short batch splits equally too: every rank runs the same number of
    steps on equal shares, and DDP's mean of the ranks' mean losses is the global batch's mean.
    """
    if batch_size % world.size:
        check_world(world.size, batch_size=batch_size, device="cpu")
    rows = rows[: len(rows) - len(rows) % world.size]
    parts = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        share = len(batch) // world.size  # batch_size / world.size, except in the last batch
        parts.append(batch[world.rank * share : (world.rank + 1) * share])
    return np.concatenate(parts) if parts else rows[:0]


# ---------------------------------------------------------------- the process group
@contextlib.contextmanager
def process_group(world: World, backend: str, device: torch.device) -> Iterator[None]:
    """torch.distributed set up for the block when there are several processes (env:// from torchrun);
    torn down after, so a stage can run again in the same process (the tests). One process: nothing."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (a temp file's name, say)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sums over the ranks (float64: a loss summed over a million images keeps its digits)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------- BatchNorm over the global batch
class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every rank's loss depends on every rank's sum, so the gradient of
    the sum is the sum of the ranks' gradients: the same all_reduce (torch.distributed.nn's is deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    backward = forward


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch, on any device.

    torch's SyncBatchNorm (used on GPUs) refuses CPU tensors; this is the same computation in plain
    autograd ops: the per-channel sums are all-reduced (backward all-reduces their gradients, so each
    rank's loss reaches every rank's inputs), in two passes (mean, then squared deviations) for the
    variance. Same parameters and buffers as BatchNorm2d, so checkpoints are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = (0, 2, 3)
        per_channel = x.numel() // x.shape[1]
        summed = _SumOverRanks.apply(torch.cat([x.sum(dims), x.new_full((1,), float(per_channel))]))
        n = summed[-1]
        mean = summed[:-1] / n
        centred = x - mean.view(1, -1, 1, 1)
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y


def global_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `model` computing global-batch statistics, sharing its parameters and
    buffers (an optimizer built before keeps working): torch's SyncBatchNorm on GPUs, GlobalBatchNorm2d else."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            bn._parameters, bn._buffers = child._parameters, child._buffers
            bn.train(child.training)
            setattr(model, name, bn)
        else:
            global_batchnorm(child, device)
    return model


# ---------------------------------------------------------------- launching a stage under torchrun
def torchrun_command(module: str, args: list, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str = "") -> list[str]:
    """`python -m torch.distributed.run ... -m <module> <args>` for this node (run.nproc_per_node, ...).

    One node: --standalone (torchrun picks a free local port, so two runs on one machine never meet).
    Several: a static rendezvous at rdzv_endpoint (node 0's host:port) with this node's node_rank, so
    global ranks are node_rank * nproc_per_node + local_rank and rank 0 (who writes) is on node 0.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if int(nnodes) == 1:
        cmd.append("--standalone")
    else:
        host, port = rdzv_endpoint.rsplit(":", 1)
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={host}", f"--master_port={port}"]
    return cmd + ["-m", module, *map(str, args)]


def node_command(run: Run, stage: str, args: list) -> list[str]:
    """torchrun_command for stage `stage` with the run section's settings of this node."""
    return torchrun_command(f"stages.{stage}", args, run.nproc_per_node, run.nnodes, run.node_rank, run.rdzv_endpoint)


def launch(run: Run, stage: str, args: list[str]) -> None:
    """Run `python -m stages.<stage> <args>` on the run's processes; its output passes through. A failure
    is the stage's own one-line message: a StageError, or a TransientError when the stage called it
    transient or a process was killed (the OOM killer, a lost node), which the flow retries."""
    check_launch(run)
    tail: deque[bytes] = deque(maxlen=256)
    with subprocess.Popen(node_command(run, stage, args), stderr=subprocess.PIPE) as proc:
        for chunk in iter(lambda: proc.stderr.read1(65536), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)
    if proc.returncode:
        raise launch_error(stage, b"".join(tail).decode(errors="replace"), proc.returncode)


def launch_error(stage: str, stderr: str, returncode: int) -> StageError | TransientError:
    """The error of a failed torchrun launch, from what its processes wrote (pure, for the tests)."""
    messages = [line[len(stage) + 2:] for line in stderr.splitlines() if line.startswith(f"{stage}: ")]
    if messages:
        first = messages[0]
        return TransientError(first) if "transient fault" in first else StageError(first)
    last = "\n".join(stderr.strip().splitlines()[-15:])
    if re.search(r"exitcode\s*:\s*-\d+|Signal \d+", stderr):
        return TransientError(f"a process of the {stage} stage was killed (out of memory, or a lost node?); torchrun "
                              f"said:\n{last}")
    return StageError(f"torchrun exited with status {returncode} without a message from the {stage} stage; its "
                      f"last lines:\n{last}")


# ---------------------------------------------------------------- several nodes
# Node 0's flow runs every stage; for extract and train it starts torchrun for its own GPUs and writes
# this announcement (in the run's epochs directory, on the file system the nodes share) for the other
# nodes, whose `follow` starts the same stage for theirs. Removed when node 0's launch ends.
ANNOUNCEMENT = ".torchrun.json"


@contextlib.contextmanager
def announced(epochs_root: str | Path, stage: str, epoch: int, args: list[str]) -> Iterator[None]:
    """Announce stage `stage` of `epoch` (its command line, as node 0 launches it) for the block."""
    path = Path(epochs_root) / ANNOUNCEMENT
    write_json(path, {"id": uuid.uuid4().hex, "stage": stage, "epoch": epoch, "args": [str(a) for a in args],
                      "cwd": os.getcwd()})
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def follow(run: Run, epochs_root: str | Path, poll_s: float = 0.5, log=print) -> None:
    """On nodes 1..nnodes-1: start each extract and train that node 0 announces, with this node's
    run.node_rank, until node 0 announces the train stage of epoch run.epochs and it ends."""
    check_launch(run)
    if run.node_rank == 0 or run.nnodes == 1:
        raise StageError("follow is for nodes 1..run.nnodes-1: node 0 runs the flow itself (python -m pipeline.flow)")
    path, seen = Path(epochs_root) / ANNOUNCEMENT, None
    log(f"follow: node {run.node_rank} of {run.nnodes}, waiting for node 0's announcements in {path}")
    while True:
        try:
            job = read_json(path)
        except (StageError, OSError):  # none yet, or being replaced
            job = None
        if job and job["id"] != seen:
            seen = job["id"]
            log(f"follow: {job['stage']} of epoch {job['epoch']}")
            status = subprocess.run(node_command(run, job["stage"], job["args"]), cwd=job["cwd"]).returncode
            if status:
                log(f"follow: {job['stage']} of epoch {job['epoch']} failed (status {status}); node 0's flow says "
                    "why and retries or stops")
            if job["stage"] == "train" and job["epoch"] >= run.epochs:
                return
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "params file (its run section: nnodes, endpoint)")
    parser.add_argument("command", choices=["follow"], help="follow: take part in node 0's extract and train stages")
    parser.add_argument("--node-rank", type=int, help="this node's run.node_rank (default: the params file's)")
    parser.add_argument("--epochs-root", default="data/epochs", help="the run's epochs directory (shared with node 0)")
    args = parser.parse_args(argv)
    with cli_errors("distributed"):
        overrides = {} if args.node_rank is None else {"run.node_rank": args.node_rank}
        follow(load_params(args.params, overrides, origin="--node-rank").run, args.epochs_root)


if __name__ == "__main__":
    main()
