"""One DeepCluster run per workspace: the run lock, the run's identity and whether it can be
resumed, leftovers of killed runs.

The lock is an `fcntl.flock` beside the epochs directory: the kernel releases it however the holder
dies, so a crashed run never leaves a stale lock; the file's content only serves the refusal message.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from stages.core.errors import StageError
from stages.core.io import read_json, write_json
from stages.core.layout import RunLayout
from stages.core.params import flatten
from stages.core.schema import Params
from stages.epoch import EPOCH_CHAIN

# The modules whose code decides the numbers a run produces (dvc.yaml's deepcluster stage lists the
# same files as deps; tests/pipeline/test_workspace.py checks). A run resumed after any of them
# changed would mix two versions of the method, so the run records their hash (see run_identity).
CODE_MODULES = ("core/*.py", "epoch.py", *(stage.module.split(".")[-1] + ".py" for stage in EPOCH_CHAIN))
# The params.yaml sections the epochs read (dvc.yaml's deepcluster stage lists the same, with `run`);
# `prepare` is covered by the dataset's hash, `evaluate` plays no part in the epochs.
EPOCH_SECTIONS = tuple(dict.fromkeys(p for stage in EPOCH_CHAIN for p in stage.reads_params if "." not in p))
# Parameters that do not change any result: a run can be resumed with other values.
RESULT_NEUTRAL = ("extract.keep_features_every", "train.keep_checkpoint_every", "extract.batch_size",
                  "extract.num_workers", "extract.device", "train.num_workers", "train.device")


@contextlib.contextmanager
def workspace_lock(epochs_root: str | Path, description: str = "") -> Iterator[Path]:
    """Hold the run lock of `epochs_root` for the block; refuse at once if another process holds it."""
    # Beside, not inside, data/epochs: the epochs directory is a DVC output and is hashed as a whole.
    path = Path(epochs_root).parent / f".{Path(epochs_root).name}.run-lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(_busy_message(path, epochs_root)) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv), "description": description}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield path
        finally:
            # The file stays: deleting it would let a third process lock a new inode while a second
            # one still waits on the old one. Emptying it keeps the message of the next refusal honest.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the flock


def _busy_message(path: Path, epochs_root: str | Path) -> str:
    try:
        holder = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        holder = None
    who = "another process"
    if holder:
        who = f"process {holder['pid']} on {holder['host']} (started {holder['started']}"
        who += f", {holder['description']})" if holder.get("description") else f": {holder['command']})"
    return (f"a DeepCluster run is already active on {epochs_root}: {who} holds {path}. Two runs on one "
            "workspace would overwrite each other's epochs. Wait for it to finish, or stop it (Ctrl-C, "
            "`kill <pid>`, or `make stop` for a served run) and start again: the run resumes where it stopped.")


# ------------------------------------------------------------------ identity of a run
def code_version() -> str:
    """Hash of the method's code (CODE_MODULES), so a run is never resumed on different code."""
    import stages

    root = Path(stages.__file__).parent
    h = hashlib.sha256()
    for pattern in CODE_MODULES:
        for path in sorted(root.glob(pattern)):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def dataset_version(dataset: str | Path) -> str | None:
    """Hash of the dataset's description and manifest (which images, which order); None if absent.

    The pixels are not hashed (GBs for big sets): `prepare` derives them from the manifest.
    """
    dataset = Path(dataset)
    files = [dataset / "dataset.json", dataset / "manifest.parquet"]
    if not all(f.exists() for f in files):
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())  # read whole: a manifest holds a few dozen bytes per image
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ leftovers of a killed run
def remove_stale_temp_files(*dirs: str | Path) -> list[Path]:
    """Delete temp files that a killed writer left in the run's directories.

    Only safe while holding the workspace lock: then no live process can be writing them. No artifact
    of a run is a hidden file. Features temp files can be as large as the features themselves
    (21 GB on ImageNet), so they must go.
    """
    # stages.core.io.atomic_path's temp files: `.<name>.<random><suffix>` (`*.tmp`, or `*.npz` for numpy)
    removed = [path for d in dirs for path in Path(d).rglob("*")
               if path.is_file() and (path.name.endswith(".tmp") or path.name.startswith("."))]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


# ------------------------------------------------------------------ can this run be resumed?
def epoch_params(params: dict) -> dict[str, object]:
    """The flat parameters (as run.json records them) that decide the epochs' results: run.epochs is left
    out so a run can be extended, and RESULT_NEUTRAL so e.g. the retention policy can change during a long run."""
    flat = flatten({s: params.get(s, {}) for s in EPOCH_SECTIONS})
    return {**{k: v for k, v in flat.items() if k not in RESULT_NEUTRAL}, "run.seed": params["run"]["seed"]}


def run_fingerprint(params: Params) -> str:
    return hashlib.sha256(json.dumps(epoch_params(params.model_dump()), sort_keys=True).encode()).hexdigest()[:16]


def run_identity(params: Params, layout: RunLayout) -> dict:
    return {"fingerprint": run_fingerprint(params), "code_version": code_version(),
            "dataset_version": dataset_version(layout.dataset)}


def resume_problems(state: dict, identity: dict, params: Params, layout: RunLayout) -> list[str]:
    """Why the run recorded in `state` cannot be continued with `params` (empty: it can)."""
    problems = []
    if state.get("fingerprint") != identity["fingerprint"]:
        a, b = epoch_params(state.get("params") or {"run": {"seed": None}}), epoch_params(params.model_dump())
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        problems.append("its parameters differ" + (f" ({', '.join(diff)})" if diff else ""))
    for key, what in (("code_version", "the method's code (stages/*.py)"), ("dataset_version", "the dataset")):
        if state.get(key) and identity.get(key) and state[key] != identity[key]:
            problems.append(f"{what} changed since it started")
    finished = layout.completed_epochs()
    if finished and finished[-1] > params.run.epochs:
        problems.append(f"it has {finished[-1]} finished epochs, more than run.epochs={params.run.epochs}")
    return problems


def refuse_resume(layout: RunLayout, problems: list[str]) -> None:
    if problems:
        raise StageError(f"{layout.epochs_root} holds a run that cannot be resumed: {'; '.join(problems)}. Restore "
                         "what changed to resume it, or start over with --fresh (a deployment run: --param fresh=true)")


def discard_run(layout: RunLayout, identity: dict) -> None:
    """Delete the workspace's run, once nothing the new run needs is missing (the params were validated
    before): a --fresh that would then fail must not cost the old run."""
    if identity.get("dataset_version") is None and (layout.epochs_root.exists() or layout.checkpoints.exists()):
        raise StageError(f"no dataset at {layout.dataset} for the new run: run `python -m stages.prepare` (or "
                         f"`dvc repro prepare`) first; the run in {layout.epochs_root} was left as it is")
    shutil.rmtree(layout.epochs_root, ignore_errors=True)
    shutil.rmtree(layout.checkpoints, ignore_errors=True)


def claim_workspace(params: Params, layout: RunLayout, fresh: bool, on_mismatch: str = "refuse", log=print) -> dict:
    """Start or resume the run in this workspace; refuse (or, under dvc repro, replace) a different run."""
    identity = run_identity(params, layout)
    if fresh:
        discard_run(layout, identity)
    if layout.run_file.exists():
        state = read_json(layout.run_file)
        problems = resume_problems(state, identity, params, layout)
        if not problems:
            updated = {**state, **{k: v for k, v in identity.items() if not state.get(k)}, "params": params.model_dump()}
            if updated != state:  # run.epochs may have grown; an unchanged run leaves the file alone
                write_json(layout.run_file, updated)
            return updated
        if on_mismatch != "fresh":
            refuse_resume(layout, problems)
        log(f"{layout.epochs_root} holds another run ({'; '.join(problems)}): starting over, as DVC reruns a changed stage")
        discard_run(layout, identity)
    state = {**identity, "mlflow_run_id": None, "params": params.model_dump()}
    write_json(layout.run_file, state)
    return state
