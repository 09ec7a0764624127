"""stages.core.errors: transient or not, one-line messages with the fix."""
from __future__ import annotations

import errno

import pytest

from stages.core.errors import StageError, cli_errors, failure_message, is_transient


@pytest.mark.parametrize("exc, transient", [
    (OSError(errno.EIO, "Input/output error"), True),
    (OSError(errno.ESTALE, "Stale file handle"), True),
    (TimeoutError("read timed out"), True),
    (MemoryError(), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed."), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),  # stays full until the user frees space
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "features.npy"), False),
    (PermissionError(errno.EACCES, "Permission denied", "data/epochs"), False),
    (ValueError("cannot reshape array of size 10 into shape (4,4)"), False),
    (EOFError("Ran out of input"), False),
    (KeyError("labels"), False),
    (RuntimeError("CUDA error: device-side assert triggered"), False),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (64x9216 and 4096x10)"), False),
    (StageError("cluster.k=1000 is larger than the number of images"), False),
])
def test_only_transient_faults_are_transient(exc, transient):
    assert is_transient(exc) is transient
    wrapped = RuntimeError("stage extract, epoch 3")  # a wrapper keeps the verdict of its cause
    wrapped.__cause__ = exc
    assert is_transient(wrapped) is transient


def test_a_stage_error_caused_by_an_io_error_is_not_transient():
    e = StageError("checkpoint epoch_0003.pt is unreadable: delete it and rerun")
    e.__cause__ = OSError(errno.EIO, "Input/output error")
    assert not is_transient(e)


def test_failure_message_names_the_file_and_the_fix():
    msg = failure_message(OSError(errno.ENOSPC, "No space left on device", "data/epochs/0003/features.npy"))
    assert "data/epochs/0003/features.npy" in msg and "free space" in msg
    msg = failure_message(ValueError("cannot reshape array"))
    assert msg.startswith("unexpected ValueError: cannot reshape array") and "Not retried" in msg
    assert "transient" in failure_message(OSError(errno.EIO, "Input/output error", "x.npy"))


def test_cli_errors_exit_with_the_message_and_no_traceback(monkeypatch):
    monkeypatch.delenv("DEEPCLUSTER_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as e:
        with cli_errors("pca"):
            raise StageError("pca.dim=0: use at least 1")
    assert e.value.code == "pca: pca.dim=0: use at least 1"
    with pytest.raises(SystemExit) as e:
        with cli_errors("train"):
            raise ValueError("bad shape")
    assert e.value.code.startswith("train: unexpected ValueError: bad shape. Not retried")
    monkeypatch.setenv("DEEPCLUSTER_TRACEBACK", "1")
    with pytest.raises(ValueError):
        with cli_errors("train"):
            raise ValueError("bad shape")
