"""Atomic writes (a killed process never leaves a half-written artifact) and JSON files."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from stages.core.errors import DamagedArtifact, StageError, first_line

_UMASK = os.umask(0)


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")
