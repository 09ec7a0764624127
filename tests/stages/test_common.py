"""stages.common: params overrides, per-epoch seeds, atomic writes."""
from __future__ import annotations

import errno
import json

import numpy as np
import pytest

from stages.core.errors import StageError, cli_errors, failure_message, is_transient
from stages.core.io import atomic_path, write_json
from stages.core.params import apply_overrides, load_params, parse_override
from stages.core.runtime import seed_for, seeded_subset


def test_apply_overrides_sets_dotted_keys_and_leaves_the_input_untouched(repo_params):
    out = apply_overrides(repo_params, {"cluster.k": 7, "model.sobel": False})
    assert out["cluster"]["k"] == 7 and out["model"]["sobel"] is False
    assert repo_params["cluster"]["k"] != 7  # a copy, not an in-place edit


@pytest.mark.parametrize("key", ["cluster.kk", "clusterr.k", "cluster.k.x"])
def test_apply_overrides_refuses_unknown_keys(repo_params, key):
    with pytest.raises(StageError, match="unknown parameter"):
        apply_overrides(repo_params, {key: 1})


def test_parse_override_reads_yaml_scalars():
    assert parse_override("cluster.k=50") == ("cluster.k", 50)
    assert parse_override("model.sobel=false") == ("model.sobel", False)
    assert parse_override("train.samples_per_epoch=null") == ("train.samples_per_epoch", None)
    with pytest.raises(StageError, match="section.key=value"):
        parse_override("cluster.k")


def test_load_params_missing_file_names_it(tmp_path):
    with pytest.raises(StageError, match=str(tmp_path / "nope.yaml")):
        load_params(tmp_path / "nope.yaml")


def test_seed_for_differs_across_epochs_and_streams_and_is_reproducible():
    seeds = [seed_for(0, epoch, "cluster") for epoch in range(1, 51)]
    assert len(set(seeds)) == 50  # k-means must start from different centroids every epoch
    assert seeds == [seed_for(0, epoch, "cluster") for epoch in range(1, 51)]
    assert seed_for(0, 3, "cluster") != seed_for(0, 3, "train")
    assert seed_for(0, 3, "cluster") != seed_for(1, 3, "cluster")
    assert all(0 <= s < 2**31 for s in seeds)  # faiss and torch take 31-bit seeds


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}  # the old artifact survives
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # and no temp file is left

    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text('{"v": 2}')
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_seeded_subset_is_seeded_sorted_and_complete_without_a_limit():
    a = seeded_subset(1000, 50, seed=3)
    assert len(a) == 50 and len(set(a)) == 50 and list(a) == sorted(a) and a.max() < 1000
    np.testing.assert_array_equal(a, seeded_subset(1000, 50, seed=3))
    assert not np.array_equal(a, seeded_subset(1000, 50, seed=4))
    np.testing.assert_array_equal(seeded_subset(7, None, 0), np.arange(7))
    np.testing.assert_array_equal(seeded_subset(7, 100, 0), np.arange(7))


def test_a_write_refused_for_want_of_room_is_a_stage_error_and_keeps_the_old_file(tmp_path):
    """RLIMIT_FSIZE (in a subprocess) refuses the write half-way, as a full disk does (EFBIG instead of ENOSPC)."""
    import subprocess
    import sys

    target = tmp_path / "report.json"
    target.write_text('{"old": true}\n')
    code = ("import resource, sys\n"
            "from stages.core.errors import StageError\n"
            "from stages.core.io import write_json\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "try:\n"
            f"    write_json({str(target)!r}, {{'x': list(range(10000))}})\n"
            "except StageError as e:\n"
            "    sys.exit(str(e))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"could not write {target} (OSError: [Errno 27] File too large): ")
    assert "bytes free on its disk" in proc.stderr and "the run resumes at this stage" in proc.stderr
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


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
