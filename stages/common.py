"""What every stage shares: params, atomic writes, seeds, seeded subsets, device choice."""
from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml

PARAMS_FILE = "params.yaml"
_UMASK = os.umask(0)
os.umask(_UMASK)


class StageError(RuntimeError):
    """A problem with a stage's input that the user must fix; the message says what and how."""


class TransientError(RuntimeError):
    """A fault that may pass on its own (an I/O error, out of memory, a GPU fault); worth a retry."""


# ---------------------------------------------------------------- failures: transient or not
# OSErrors that another try may not meet: a flaky disk or network file system, an interrupted call.
# A full disk (ENOSPC), a missing file or a permission is not among them: it stays until the user acts.
TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ESTALE, errno.ENOMEM,
                    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ENETDOWN,
                    errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EREMOTEIO}
# What the user does about an OSError that is not transient.
ERRNO_FIXES = {errno.ENOSPC: "the disk is full: free space on it (or point the run elsewhere) and rerun",
               errno.EDQUOT: "the disk quota is exhausted: free space and rerun",
               errno.EACCES: "permission denied: make the path writable/readable for this user and rerun",
               errno.EPERM: "operation not permitted: check the path's owner and permissions and rerun",
               errno.ENOENT: "the file does not exist: rerun the stage that writes it (or fix the path)",
               errno.EROFS: "the file system is read-only: point the run at a writable directory",
               errno.EMFILE: "too many open files: raise `ulimit -n` or lower num_workers, and rerun",
               errno.EFBIG: "a file size limit was hit (`ulimit -f`): raise it and rerun"}


def _transient_itself(exc: BaseException) -> bool:
    if isinstance(exc, (TransientError, MemoryError, TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in TRANSIENT_ERRNOS
    if type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError"):  # torch's, without importing torch
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc)
        # CUDA/cuDNN/cuBLAS runtime faults (torch, faiss-gpu), and a DataLoader worker killed by the
        # OOM killer; a device-side assert is a bug in the inputs or code and fails again.
        gpu = any(s in text for s in ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error",
                                      "CUDNN_STATUS", "NCCL error", "cudaMalloc", "cudaSuccess"))
        return (gpu and "device-side assert" not in text) or "DataLoader worker" in text
    return False


def is_transient(exc: BaseException) -> bool:
    """Whether another try may succeed: an I/O error, out of memory or a GPU fault, itself or as the
    cause of a wrapper. A StageError (bad input or parameters) never is, nor any other error: a retry
    would fail the same way, later."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, StageError):
            return False
        if _transient_itself(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__
    return False


def failure_message(exc: BaseException, damaged: str | None = None) -> str:
    """An error that is not a StageError, as one line a user can act on: what, which file, the fix.
    damaged: what to do if an input file is damaged, where the caller knows the inputs."""
    if isinstance(exc, (StageError, TransientError)):
        return str(exc)
    what = f"{type(exc).__name__}: {exc}"
    files = [f for f in (getattr(exc, "filename", None), getattr(exc, "filename2", None)) if f]
    if files and not any(str(f) in what for f in files):
        what += f" ({', '.join(map(str, files))})"
    if is_transient(exc):
        return (f"{what}. A transient fault (I/O error, out of memory or GPU fault): check the disk, memory or "
                "GPU and rerun; the run resumes after its last finished stage")
    if isinstance(exc, OSError) and exc.errno in ERRNO_FIXES:
        return f"{what}. {ERRNO_FIXES[exc.errno]}"
    damaged = damaged or ("If it names a file of the run, that file is damaged or from another run: delete it "
                          "and rerun the stage that wrote it")
    return (f"unexpected {what}. Not retried: it is not a transient fault. {damaged}; otherwise report it with the "
            "traceback (rerun with DEEPCLUSTER_TRACEBACK=1)")


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """A command line entry point's failures as one message and exit status 1, never a raw traceback
    (DEEPCLUSTER_TRACEBACK=1 lets unexpected errors through with theirs)."""
    try:
        yield
    except StageError as e:
        sys.exit(f"{prog}: {e}")
    except Exception as e:
        if os.environ.get("DEEPCLUSTER_TRACEBACK") and not isinstance(e, TransientError):
            raise
        sys.exit(f"{prog}: {failure_message(e)}")


class DamagedArtifact(StageError):
    """A file a stage reads is incomplete, corrupt or another run's; `path` names it."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str | None = None):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path} cannot be used: {problem}; "
                         + (fix or "delete it and rerun the stage that wrote it (the flow reruns it by itself "
                                   "in an unfinished epoch), or restore it from DVC with `dvc checkout`"))


def what_is_wrong(error: StageError) -> str:
    """The message without the way back: for a log line saying the run takes that way itself."""
    return f"{error.path} cannot be used: {error.problem}" if isinstance(error, DamagedArtifact) else str(error)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (Arrow and torch append pages of context)."""
    return str(error).strip().split("\n")[0]


# ---------------------------------------------------------------- params
def load_params(path: str | os.PathLike = PARAMS_FILE, overrides: dict | None = None,
                origin: str = "override") -> dict:
    """Read params.yaml, apply dotted overrides such as {"cluster.k": 100} and validate the result
    against stages/schema.py: plain dicts, normalised (e.g. "1e-3" -> 0.001), or a StageError that
    names every bad key and its fix. Nothing has run, nothing is deleted before this returns."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"params file {path} not found: run from the project root or pass --params")
    try:
        with open(path) as f:
            params = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise StageError(yaml_problem(path, e)) from None
    if params is None:
        raise StageError(f"{path} is empty: restore it (`git checkout {path}`)")
    return apply_overrides(params, overrides or {}, source=str(path), origin=origin)


def yaml_problem(path: str | os.PathLike, e: "yaml.YAMLError") -> str:
    """Invalid YAML, as the file, the line and how to fix it."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return (f"{where}: not valid YAML ({what}): fix that line (each key as `key: value`, indented with spaces under "
            f"its section; quote values holding ': ' or ' #'), or restore the file (`git diff {path}`)")


def apply_overrides(params: dict, overrides: dict, source: str = "params.yaml", origin: str = "override") -> dict:
    """Return a copy of params with dotted keys set, validated against stages/schema.py: unknown keys
    are refused (with a suggestion) so typos don't pass silently, bad values are named with their fix."""
    from stages import schema  # here, not at the top: schema imports StageError from this module

    if not isinstance(params, dict):
        schema.validate(params, source)  # says what params.yaml must be
    params = copy.deepcopy(params)
    keys = schema.leaf_fields()
    for dotted, value in overrides.items():
        if dotted not in keys:
            raise StageError(f"unknown parameter {dotted!r} ({origin} {dotted}={value!r}): "
                             + schema.sentence(schema.suggestion(dotted)) + " " + schema.DOCS)
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})  # an older run's params may lack a section added since
            if not isinstance(node, dict):
                schema.validate(params, source)  # names the section that is not a mapping
        node[leaf] = value
    return schema.validate(params, source, overridden=dict(overrides), origin=origin)


def parse_override(text: str) -> tuple[str, Any]:
    """'cluster.k=100' -> ('cluster.k', 100); values are parsed as YAML scalars."""
    if "=" not in text:
        raise StageError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------- atomic I/O
# A write refused for want of room: a full disk, a quota, a file-size limit (RLIMIT_FSIZE).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk `path` is (or will be) written to: its nearest existing folder's."""
    folder = Path(path).parent.absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def write_refused(path: str | os.PathLike, error: BaseException, needed: int | None = None) -> StageError:
    """The error for a write the disk refused half-way; the temp file is gone, the final name untouched."""
    return StageError(f"could not write {path} ({type(error).__name__}: {first_line(error)}): "
                      + (f"{needed:,} bytes needed, " if needed else "")
                      + f"{free_bytes(path):,} bytes free on its disk (a full disk, a quota or a file-size limit). "
                      "Free some space and rerun: the run resumes at this stage")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    A killed process leaves at most a hidden temp file (`.<name>.<random><suffix>`), never a half-written
    artifact under the final name.
    The data is fsynced before the rename and the directory after it, so after a power cut or reboot
    a file that exists under its final name is complete, and a stage report (written last) never
    survives without the artifacts written before it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or (path.suffix + ".tmp"))
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise write_refused(path, e) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError, or bytes that are not text at all
        raise DamagedArtifact(path, f"not valid JSON ({e})") from e


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


# ---------------------------------------------------------------- seeds, devices
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


def pick_device(requested: str = "auto") -> "torch.device":
    import torch

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
