"""Shared fixtures: small real data, small params, and real Prefect / MLflow back ends in temp dirs.

The environment is pinned before torch, faiss, Prefect or MLflow are imported: one thread (the suite
must run on 2 CPU cores), no telemetry, and Prefect/MLflow state in a temp directory so a test run
never writes into the repository (no .prefect/, no mlflow.db, no data/ or models/).
"""
from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
_STATE = Path(tempfile.mkdtemp(prefix="deepcluster-tests-"))
atexit.register(shutil.rmtree, _STATE, ignore_errors=True)
os.environ["PREFECT_HOME"] = str(_STATE / "prefect")
# A safety net: tests that track runs point MLflow at their own tmp_path; nothing may reach ./mlflow.db.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_STATE / 'mlflow.db'}"
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline import offline_environment  # noqa: E402

offline_environment()  # the rest of the offline environment, as every entry point's main() sets it

torch.set_num_threads(1)

from stages.core.checkpoints import init_checkpoint  # noqa: E402
from stages.core.io import write_json
from stages.core.layout import METRICS, RunLayout  # noqa: E402
from stages.core.params import apply_overrides, load_params  # noqa: E402
from stages.core.schema import Params  # noqa: E402
from stages.epoch import EPOCH_STAGES, epoch_metrics, run_stage  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_PARAMS = REPO_ROOT / "params.yaml"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# A model and data small enough for seconds-long stages on one CPU thread.
SMALL = {
    "run.epochs": 2,
    "prepare.source": "fashion-mnist",
    "prepare.path": str(FASHION_MNIST),
    "prepare.max_train_images": 240,
    "prepare.max_test_images": 40,
    "prepare.image_size": 32,
    "prepare.num_workers": 2,
    "model.width": 4,
    "model.fc_dim": 32,
    "extract.batch_size": 256,
    "extract.device": "cpu",
    "pca.dim": 16,
    "cluster.k": 10,
    "train.batch_size": 64,
    "train.device": "cpu",
    "train.samples_per_epoch": None,
    "train.min_samples_per_epoch": 0,  # one draw per image: the tiny runs stay tiny
    "extract.keep_features_every": 1,
    "train.keep_checkpoint_every": 1,
    # the final evaluation, small: one k-means seed, short gradient ascent, few pictures
    "evaluate.train_images": 200,
    "evaluate.probe_iters": 10,
    "evaluate.kmeans_runs": 1,
    "evaluate.ascent_steps": 5,
    "evaluate.picture_filters": 3,
    "evaluate.picture_queries": 3,
    "evaluate.picture_neighbours": 4,
    "evaluate.picture_clusters": 3,
    "evaluate.picture_cluster_images": 4,
}


@pytest.fixture(scope="session")
def repo_params() -> Params:
    return load_params(REPO_PARAMS)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The Debian package dataset-fashion-mnist's gzipped IDX files (`make test` installs it)."""
    return FASHION_MNIST


@pytest.fixture(scope="session")
def small_params(repo_params) -> Params:
    """The repository's params.yaml with the small-model, small-data overrides above."""
    return apply_overrides(repo_params, SMALL)


def _write_params(directory: Path, params: Params, overrides: dict | None = None) -> Path:
    path = Path(directory) / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(params, overrides or {}).model_dump(), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def write_params():
    """write_params(directory, params, overrides=None) -> a params.yaml in `directory` (never the repo's)."""
    return _write_params


@pytest.fixture
def params_file(tmp_path, small_params) -> Path:
    return _write_params(tmp_path, small_params)


@pytest.fixture(scope="session")
def fashion_dataset(tmp_path_factory, small_params) -> Path:
    """240 train + 40 test real Fashion-MNIST images in the canonical layout (read-only for tests)."""
    from stages.prepare import prepare

    out = tmp_path_factory.mktemp("fashion") / "dataset"
    prepare("fashion-mnist", FASHION_MNIST, out, small_params.prepare, seed=small_params.run.seed)
    return out


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 real 8x8 digits: 64-d float32 features and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


@pytest.fixture(scope="session")
def run_cli():
    """run_cli("pca", "--features", ..., cwd=dir) runs `python -m stages.pca ...` as a user would."""

    def run(stage: str, *args, cwd: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", f"stages.{stage}", *map(str, args)], cwd=cwd,
                              capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect server and database for the whole session (started on first use)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """Real MLflow on a SQLite file in tmp_path, picked up by pipeline.tracking through the environment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "deepcluster-tests")
    return uri


def run_epochs(params: Params, layout: RunLayout, epochs) -> RunLayout:
    """DeepCluster epochs through the same stage chain the flow runs (stages.epoch), without Prefect;
    last.pt is a copy of the newest checkpoint."""
    if not layout.checkpoint(0).exists():
        init_checkpoint(params, layout.dataset, layout.checkpoint(0))
    for e in epochs:
        for name in EPOCH_STAGES:
            run_stage(name, params, layout, e)
        write_json(layout.epoch(e) / METRICS, epoch_metrics(layout.epoch(e), e))
        shutil.copy(layout.checkpoint(e), layout.last_checkpoint)
    return layout


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_params, fashion_dataset) -> RunLayout:
    """Two real DeepCluster epochs on the small Fashion-MNIST set (read-only for tests: copy to change)."""
    root = tmp_path_factory.mktemp("tiny-run")
    return run_epochs(small_params, RunLayout(fashion_dataset, root / "epochs", root / "checkpoints"), (1, 2))


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory, small_params, tiny_run) -> tuple[Path, dict]:
    """The final evaluation of tiny_run: its output directory and figures (read-only for tests)."""
    from stages.evaluate import run_final_evaluation

    out = tmp_path_factory.mktemp("tiny-eval") / "eval"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        metrics = run_final_evaluation(small_params, tiny_run.dataset, tiny_run.epochs_root, tiny_run.last_checkpoint,
                                       out)
    (out.parent / "stdout.txt").write_text(stdout.getvalue())  # its progress lines, for tests/stages/test_evaluate.py
    return out, metrics


CLOCK = r"(?:[0-9]+\.[0-9]s|[0-9]+[hm] [0-9]{2}[ms])"  # stages.core.runtime.clock: 41.2s, 1m 02s, 2h 05m


def phases_printed(stdout: str, stage: str) -> list[tuple[str, str]]:
    """(title, note) of every phase a stage printed (stages.core.runtime.Phases), in order, after checking that
    each opened and closed with its number, 1..n of n."""
    lines = [line for line in stdout.splitlines() if line.startswith(f"{stage}: [")]
    opened, closed = lines[0::2], lines[1::2]
    assert len(opened) == len(closed), lines
    found = []
    for i, (start, end) in enumerate(zip(opened, closed), 1):
        title = re.fullmatch(rf"{stage}: \[{i}/{len(opened)}\] (.+) \.\.\.", start)
        assert title, start
        done = re.fullmatch(rf"(?:: (.+),)? done in {CLOCK} \(elapsed {CLOCK}\)", end.removeprefix(start[:-4]))
        assert end.startswith(start[:-4]) and done, end
        found.append((title[1], done[1] or ""))
    return found
