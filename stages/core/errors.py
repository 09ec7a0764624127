"""Errors a user can act on: StageError (bad input or params, with the fix), transient faults worth a
retry, damaged artifacts, and the one-line messages command lines print."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Iterator


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
