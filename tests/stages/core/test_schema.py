"""stages.core.schema: every bad parameter stops before anything runs, with the key, the value and the fix.

The bounds below are written out on purpose, not read back from the schema: the test states what
the ranges must be, and the coverage checks make a key added to the schema without a case here fail.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from stages.core import schema
from stages.core.errors import StageError
from stages.core.params import apply_overrides, load_params, parse_override

REPO = Path(__file__).resolve().parents[3]

# key: (values at the edge of the range that must be accepted, values just outside it that must be refused)
NUMERIC = {
    "run.seed": ([0], [-1, 1.5]),
    "run.epochs": ([1], [0, -3]),
    "run.nproc_per_node": ([1, 8], [0, 1.5]),
    "run.nnodes": ([1], [0]),
    "run.node_rank": ([0], [-1]),
    "prepare.max_train_images": ([1, None], [0]),
    "prepare.max_test_images": ([1, None], [0]),
    "prepare.image_size": ([1], [0]),
    "prepare.num_workers": ([0], [-1]),
    "model.width": ([1], [0]),
    "model.fc_dim": ([1], [0]),
    "model.dropout": ([0.0, 0.99], [-0.1, 1.0]),
    "extract.crop_size": ([1], [0]),
    "extract.batch_size": ([1], [0]),
    "extract.num_workers": ([0, "auto"], [-1, "all"]),
    "extract.keep_features_every": ([0], [-1]),
    "pca.dim": ([1], [0]),
    "pca.eps": ([1e-12], [0.0, -1e-5]),
    "pca.max_fit_rows": ([2], [1]),
    "cluster.k": ([2, "auto"], [1, 0, 10.5, True]),
    "cluster.images_per_cluster": ([1], [0]),
    "cluster.niter": ([1], [0]),
    "cluster.refill_below": ([0, 0.999], [-0.1, 1.0]),
    "cluster.pic.neighbours": ([1], [0]),
    "cluster.pic.sigma": ([1e-6], [0.0, -0.2]),
    "cluster.pic.alpha": ([1e-6, 0.999], [0.0, 1.0]),
    "cluster.pic.iterations": ([1], [0]),
    "train.lr": ([1e-9], [0.0, -0.1]),
    "train.momentum": ([0.0, 0.99], [-0.1, 1.0]),
    "train.weight_decay": ([0.0], [-1e-5]),
    "train.batch_size": ([1], [0]),
    "train.crop_size": ([1], [0]),
    "train.crop_scale": ([[0.01, 1.0], [1.0, 1.0]], [[0.0, 1.0], [0.5, 1.5], [0.9, 0.5], [0.5]]),
    "train.intensity_jitter": ([0.0, 0.99], [-0.1, 1.0]),
    "train.samples_per_epoch": ([1, None], [0]),
    "train.min_samples_per_epoch": ([0, 20000], [-1, None]),
    "train.num_workers": ([0, "auto"], [-1, "all"]),
    "train.keep_checkpoint_every": ([0], [-1]),
    "evaluate.train_images": ([1, None], [0]),
    "evaluate.test_images": ([1, None], [0]),
    "evaluate.probe_dim": ([1], [0]),
    "evaluate.probe_weight_decays": ([[1e-9]], [[], [0.0], [0.001, -0.01]]),
    "evaluate.probe_iters": ([1], [0]),
    "evaluate.probe_val_fraction": ([0.01, 0.99], [0.0, 1.0]),
    "evaluate.knn_k": ([1], [0]),
    "evaluate.knn_temperature": ([1e-6], [0.0]),
    "evaluate.kmeans_runs": ([1], [0]),
    "evaluate.random_inits": ([1, 3], [0]),
    "evaluate.picture_filters": ([1], [0]),
    "evaluate.ascent_steps": ([0], [-1]),
    "evaluate.ascent_lr": ([1e-6], [0.0]),
    "evaluate.picture_queries": ([1], [0]),
    "evaluate.picture_neighbours": ([1], [0]),
    "evaluate.picture_clusters": ([1], [0]),
    "evaluate.picture_cluster_images": ([1], [0]),
}
# The other keys: values that must be accepted, values that must be refused.
OTHER = {
    "prepare.source": (["fashion-mnist", "imagefolder", "folder"], ["mnist", "", None]),
    "prepare.path": (["/data/x"], ["", 3, None]),
    "model.arch": (["small_alexnet", "alexnet", "vgg16"], ["resnet50", "AlexNet"]),
    "model.sobel": ([True, False], ["yes please", 1]),
    "extract.amp": (["auto", True, False], ["bf16", 1]),
    "extract.device": (["auto", "cpu", "cuda", "cuda:1"], ["gpu", "cuda:x", ""]),
    "extract.decode": (["cpu", "gpu"], ["nvjpeg", "auto", True]),
    "cluster.method": (["kmeans", "pic"], ["spectral", "KMeans"]),
    "cluster.device": (["auto", "cpu", "gpu"], ["cuda", "GPU", ""]),
    "cluster.pic.graph": (["exact", "ivf"], ["hnsw", "approximate"]),
    "train.hflip": ([True, False], ["sometimes"]),
    "train.lr_schedule": (["constant", "cosine"], ["step", "Cosine"]),
    "train.sync_batchnorm": ([True, False], ["yes", 1]),
    "run.rdzv_endpoint": (["127.0.0.1:29500", "gpu-node-0.cluster:1234"], ["node0", "127.0.0.1:", ":29500", 29500]),
    "run.dist_backend": (["auto", "gloo", "nccl"], ["mpi", "NCCL"]),
    "train.amp": (["auto", True, False], ["fp16"]),
    "train.decode": (["cpu", "gpu"], ["GPU"]),
    "train.device": (["cpu", "cuda:0"], ["tpu"]),
    "evaluate.probe_layers": (["all", ["conv3", "fc"]], ["al", [], [3]]),
    "evaluate.pictures": ([True, False], ["no way"]),
    "evaluate.picture_layers": ([["conv1"], []], ["conv1", [1]]),
}


def test_every_key_of_the_schema_has_cases_here():
    assert set(NUMERIC) == set(schema.numeric_keys()), "a numeric key without its range test (or a stale one)"
    assert set(NUMERIC) | set(OTHER) == set(schema.leaf_fields())


def test_the_repository_params_are_valid_and_come_back_as_a_frozen_model():
    params = load_params(REPO / "params.yaml")
    assert params.model_dump() == yaml.safe_load((REPO / "params.yaml").read_text())  # nothing to normalise
    assert type(params) is schema.Params and type(params.cluster.pic) is schema.Pic
    with pytest.raises(ValidationError, match="frozen"):
        params.cluster.k = 3  # the stages share one Params: a changed copy goes through apply_overrides


def _cases(table, which):
    return [(key, value) for key, values in table.items() for value in values[which]]


@pytest.mark.parametrize("key, value", _cases(NUMERIC, 0) + _cases(OTHER, 0))
def test_values_in_range_are_accepted(repo_params, key, value):
    got = apply_overrides(repo_params, {key: value})
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value


@pytest.mark.parametrize("key, value", _cases(NUMERIC, 1) + _cases(OTHER, 1))
def test_values_out_of_range_are_refused_naming_key_value_and_fix(repo_params, key, value):
    with pytest.raises(StageError) as e:
        apply_overrides(repo_params, {key: value}, origin="--set")
    msg = str(e.value)
    assert f"--set {key}={value!r} is not allowed: {key} must be {schema.allowed(key)}" in msg
    assert "set it to an allowed value" in msg and "python -m stages.core.params --markdown" in msg


@pytest.mark.parametrize("key, value", _cases(NUMERIC, 1)[:6] + _cases(OTHER, 1)[:3])
def test_a_bad_value_in_the_file_names_the_file(tmp_path, repo_params, key, value):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    node = params
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(StageError, match=re.escape(f"{key}: {value!r} in {path} is not allowed: {key} must be")):
        load_params(path)


def test_numbers_written_like_1e_3_are_floats(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as the string "1e-3"; the schema reads it as the number it is
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("  lr: 0.1 ", "  lr: 1e-3 "))
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-3"
    params = load_params(path)
    assert params.train.lr == 0.001 and type(params.train.lr) is float
    assert load_params(REPO / "params.yaml", {"pca.eps": "2e-5"}).pca.eps == 2e-5


def test_counts_are_whole_numbers_and_an_int_is_a_float():
    assert load_params(REPO / "params.yaml", {"train.lr": 1}).train.lr == 1.0
    # 1e4 (a string to YAML 1.1) and 10000.0 are the whole number 10000: the paper's ImageNet k
    for k in ("1e4", 10000.0):
        got = load_params(REPO / "params.yaml", {"cluster.k": k}).cluster.k
        assert got == 10000 and type(got) is int
    with pytest.raises(StageError, match="cluster.k=10.5 is not allowed: cluster.k must be int ≥ 2, or auto"):
        load_params(REPO / "params.yaml", {"cluster.k": 10.5})
    with pytest.raises(StageError, match="run.epochs=True is not allowed"):  # YAML's true is not 1
        load_params(REPO / "params.yaml", {"run.epochs": True})


# ------------------------------------------------------------------ params.yaml edited as a user would
def _edit(old: str, new: str, count: int = 1):
    def apply(text: str) -> str:
        assert text.count(old) >= 1, old
        return text.replace(old, new, count)
    return apply


def _drop_section(name: str):
    def apply(text: str) -> str:
        return re.sub(rf"(?ms)^{name}:.*?(?=^\S|\Z)", "", text)
    return apply


# name: (edit of the project's params.yaml, --set overrides, patterns the message must hold)
BAD_FILES = {
    "unknown section": (_edit("\ncluster:\n", "\nclusterr:\n  k: 3\ncluster:\n"), [],
                        ["unknown section 'clusterr' in {path}: did you mean 'cluster'?"]),
    "unknown key": (_edit("  niter: 20\n", "  niter: 20\n  kk: 3\n"), [],
                    ["unknown key 'cluster.kk' in {path}: did you mean 'cluster.k'?"]),
    "k 10.5": (_edit("  k: auto ", "  k: 10.5 "), [], ["cluster.k: 10.5 in {path} is not allowed",
                                                       "must be int ≥ 2, or auto"]),
    "k abc": (_edit("  k: auto ", "  k: abc "), [], ["cluster.k: 'abc' in {path} is not allowed"]),
    "negative lr": (_edit("  lr: 0.1 ", "  lr: -0.1 "), [], ["train.lr: -0.1 in {path} is not allowed",
                                                            "must be float > 0"]),
    "batch 0": (_edit("  batch_size: 64 ", "  batch_size: 0 "), [], ["train.batch_size: 0 in {path} is not allowed",
                                                                     "must be int ≥ 1"]),
    "renamed section": (_edit("\ncluster:\n", "\nclustering:\n"), [],
                        ["unknown section 'clustering' in {path}: did you mean 'cluster'? (cluster is missing: "
                         "rename it)"]),
    "missing section": (_drop_section("pca"), [], ["{path} has no section 'pca': add it"]),
    "missing key": (_edit("  niter: 20\n", ""), [], ["{path} has no key 'cluster.niter': add it"]),
    "missing last section": (_drop_section("evaluate"), [], ["{path} has no section 'evaluate'"]),
    "empty section": (lambda text: _drop_section("pca")(text) + "pca:\n", [],
                      ["section 'pca' in {path} must hold the keys dim, eps, max_fit_rows, not None"]),
    "invalid YAML": (_edit("  lr: 0.1 ", "  lr 0.1 "), [], ["{path}, line ", ": not valid YAML (", "fix that line"]),
    "tab indentation": (_edit("  niter: 20", "\tniter: 20"), [], ["{path}, line ", ": not valid YAML ("]),
    "bad --set": (None, ["--set", "cluster.k=abc"], ["--set cluster.k='abc' is not allowed"]),
    "unknown --set": (None, ["--set", "cluster.kk=3"], ["unknown parameter 'cluster.kk' (--set cluster.kk=3): "
                                                       "did you mean 'cluster.k'?"]),
    "unknown --set section": (None, ["--set", "foo=1"], ["unknown parameter 'foo' (--set foo=1): the known ones are "
                                                         "run, prepare, model, extract, pca, cluster, train, evaluate"]),
    "--fresh with a bad --set": (None, ["--fresh", "--set", "cluster.k=abc"], ["--set cluster.k='abc' is not allowed"]),
    "--fresh with a bad file": (_edit("  lr: 0.1 ", "  lr: -0.1 "), ["--fresh"], ["train.lr: -0.1 in {path}"]),
    # each value is allowed alone; together they would fail in the cluster stage, after extract and pca
    "pic with a fixed k": (_edit("  method: kmeans ", "  method: pic "), ["--set", "cluster.k=10"],
                           ["--set cluster.k=10 with cluster.method: pic is not allowed", "set cluster.k: auto"]),
    "pic with a fixed k in the file": (_edit("  k: auto ", "  k: 10 "), ["--set", "cluster.method=pic"],
                                       ["cluster.k: 10 in {path} with cluster.method: pic is not allowed"]),
    "pic with refilled clusters": (_edit("  method: kmeans ", "  method: pic "), ["--set", "cluster.refill_below=0.25"],
                                   ["--set cluster.refill_below=0.25 with cluster.method: pic is not allowed",
                                    "set cluster.refill_below: 0"]),
}


def _params_file(tmp_path: Path, edit) -> Path:
    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    path.write_text(edit(text) if edit else text)
    return path


def _overrides(args: list[str]) -> dict:
    return dict(parse_override(value) for flag, value in zip(args, args[1:]) if flag == "--set")


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_params_are_refused_with_key_and_fix(tmp_path, case):
    edit, args, patterns = BAD_FILES[case]
    path = _params_file(tmp_path, edit)
    with pytest.raises(StageError) as e:
        load_params(path, _overrides(args), origin="--set")
    for pattern in patterns:
        assert pattern.format(path=path) in str(e.value), str(e.value)


def test_invalid_yaml_names_the_line(tmp_path):
    text = (REPO / "params.yaml").read_text()
    line = text[:text.index("  niter: 20")].count("\n") + 1
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  niter: 20", "  niter: [20"))  # an unclosed list
    with pytest.raises(StageError, match=rf"{re.escape(str(path))}, line {line + 1}, column \d+: not valid YAML"):
        load_params(path)
    path.write_text(text.replace("  niter: 20", "\tniter: 20"))  # a tab
    with pytest.raises(StageError, match=rf"line {line}, column 1: not valid YAML"):
        load_params(path)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_the_flow_cli_stops_before_anything_runs_and_changes_nothing(tmp_path, tiny_run, case):
    """As a user runs it: `python -m pipeline.flow ...` on a workspace holding a finished run."""
    edit, args, patterns = BAD_FILES[case]
    path = _params_file(tmp_path, edit)
    shutil.copytree(tiny_run.epochs_root, tmp_path / "data" / "epochs")
    shutil.copytree(tiny_run.checkpoints, tmp_path / "models" / "checkpoints")
    before = _snapshot(tmp_path)
    out = subprocess.run([sys.executable, "-m", "pipeline.flow", "--no-dvc", "--params", str(path), "--dataset",
                          str(tiny_run.dataset), "--epochs-root", "data/epochs", "--checkpoints", "models/checkpoints",
                          *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith("deepcluster: ") and "Traceback" not in out.stderr, out.stderr
    for pattern in patterns:
        assert pattern.format(path=path) in out.stderr, out.stderr
    assert _snapshot(tmp_path) == before  # nothing deleted (--fresh), no lock, no epoch, no params.yaml edit


def test_a_stage_cli_refuses_bad_params_without_a_traceback(tmp_path, run_cli):
    path = _params_file(tmp_path, _edit("  dim: 32 ", "  dim: 0 "))
    before = _snapshot(tmp_path)
    out = run_cli("pca", "--params", path, "--features", tmp_path / "features.npy", "--out", tmp_path / "0001",
                  "--epoch", 1, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"pca: pca.dim: 0 in {path} is not allowed: pca.dim must be int ≥ 1")
    assert _snapshot(tmp_path) == before
