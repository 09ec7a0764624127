"""pipeline.tools.gpu_check on a CPU: it skips cleanly without a GPU, and `--device cpu --tiny` runs every check's
code end to end (the stages in-process, k-means, AlexNet, a JPEG tree) without Prefect, DVC, MLflow,
scikit-learn or matplotlib importable."""
from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline.tools import gpu_check
from stages.prepare import read_idx
from tests.conftest import FASHION_MNIST, REPO_ROOT


def test_without_a_gpu_the_check_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    assert "gpu-check: skipped: torch" in capsys.readouterr().out and "sees no CUDA GPU" in gpu_check.skip_reason("auto")
    assert gpu_check.skip_reason("cpu") is None


def test_extract_and_train_run_under_torchrun_with_one_process_per_gpu():
    cmd = gpu_check.stage_command("train", ["--epoch", "1"], 4)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone", "-m", "stages.train",
                       "--epoch", "1"]
    assert gpu_check.stage_command("pca", ["--epoch", "1"], None)[1:] == ["-m", "stages.pca", "--epoch", "1"]


def test_a_failing_stage_raises_with_its_message(tmp_path):
    with pytest.raises(gpu_check.CheckFailed, match="not found"):
        gpu_check.run_stage("pca", ["--params", str(tmp_path / "nope.yaml"), "--features", "x", "--out", str(tmp_path)])


def test_synthetic_idx_files_are_read_back_by_prepare(tmp_path):
    out = gpu_check.write_synthetic(tmp_path, 30, 10)
    images, labels = read_idx(out / "train-images-idx3-ubyte.gz"), read_idx(out / "train-labels-idx1-ubyte.gz")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8 and labels.shape == (30,) and labels.max() < 10
    path, what = gpu_check.fashion_mnist(None, tmp_path, gpu_check.Sizes.tiny())
    assert path in (gpu_check.SUBSET, gpu_check.DEBIAN) or what.startswith("synthetic")


@pytest.mark.skipif(not FASHION_MNIST.exists(), reason="needs the Debian Fashion-MNIST package")
def test_the_bundled_subset_is_a_seeded_subset_of_fashion_mnist(tmp_path):
    out = gpu_check.write_subset(FASHION_MNIST, tmp_path, train=50, test=20)
    sub = read_idx(out / "train-images-idx3-ubyte.gz")
    full = read_idx(FASHION_MNIST / "train-images-idx3-ubyte.gz")
    assert sub.shape == (50, 28, 28) and any(np.array_equal(sub[0], full[i]) for i in range(len(full)))
    with gzip.open(out / "t10k-labels-idx1-ubyte.gz") as f:
        assert f.read(4) == b"\x00\x00\x08\x01"


BLOCKED = ("prefect", "dvc", "mlflow", "sklearn", "matplotlib")


def test_the_tiny_check_runs_every_row_on_the_cpu_without_the_orchestration_packages(tmp_path):
    # None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec("x") is None,
    # as for a package that is not installed
    code = textwrap.dedent(f"""
        import sys
        sys.modules.update(dict.fromkeys({BLOCKED!r}))
        from pipeline.tools import gpu_check
        sys.exit(gpu_check.main(["--device", "cpu", "--tiny", "--out", {str(tmp_path)!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for row in ("environment", "clustering plan", "k-means, 2,000 x 32", "epoch 1: 256 images", "epoch 2: 256 images",
                "AlexNet 224 px, synthetic tensors", "JPEG tree (16 x 256 px"):
        assert row in out
    assert "FAILED" not in out and "0 failed" in out
