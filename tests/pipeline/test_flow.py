"""pipeline.flow end to end: the real Prefect flow (test harness server), real MLflow on SQLite, real
faiss, on 240 real Fashion-MNIST images with a tiny network. One 2-epoch run is shared by the tests.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import normalized_mutual_info_score

from pipeline.flow import deepcluster
from stages.core.errors import StageError
from stages.core.io import read_json
from stages.evaluate import run_final_evaluation

pytestmark = pytest.mark.slow

EPOCH_FILES = ["features.npy", "extract.json", "pca.npz", "pca_features.npy", "pca.json",
               "clusters.npz", "cluster.json", "assignments.parquet", "labels.json", "train.json", "metrics.json"]


class Workspace:
    def __init__(self, root: Path, params_file: Path, dataset: Path, mlflow_uri: str):
        self.root, self.params_file, self.dataset, self.mlflow_uri = root, params_file, dataset, mlflow_uri
        self.epochs = root / "data" / "epochs"
        self.checkpoints = root / "models" / "checkpoints"

    def run(self, **kwargs) -> dict:
        return deepcluster(params_file=str(self.params_file), dataset=str(self.dataset),
                           epochs_root=str(self.epochs), checkpoints=str(self.checkpoints), **kwargs)

    def copy(self, dest: Path) -> "Workspace":
        for sub in ("data", "models"):
            shutil.copytree(self.root / sub, dest / sub)
        return Workspace(dest, self.params_file, self.dataset, self.mlflow_uri)

    def mtimes(self) -> dict[str, int]:
        return {str(p.relative_to(self.root)): p.stat().st_mtime_ns
                for d in (self.epochs, self.checkpoints) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, prefect_harness, fashion_dataset, small_params, write_params):
    """A finished 2-epoch run, its MLflow store in the same temp dir."""
    root = tmp_path_factory.mktemp("flow")
    params_file = write_params(root, small_params)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "deepcluster-tests")
        ws = Workspace(root, params_file, fashion_dataset, uri)
        ws.result = ws.run()
        yield ws


@pytest.fixture
def tracked(workspace, monkeypatch):
    """Reruns log to the same MLflow store as the first run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", workspace.mlflow_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "deepcluster-tests")
    return workspace


def test_every_epoch_writes_every_artifact(workspace):
    for epoch in (1, 2):
        d = workspace.epochs / f"{epoch:04d}"
        missing = [name for name in EPOCH_FILES if not (d / name).is_file()]
        assert not missing, f"epoch {epoch} lacks {missing}"
    assert sorted(p.name for p in workspace.epochs.iterdir()) == ["0001", "0002", "run.json"]


def test_assignments_are_a_plain_parquet_table_in_manifest_order(workspace, fashion_dataset):
    ids = pd.read_parquet(fashion_dataset / "manifest.parquet").query("split == 'train'")["image_id"].tolist()
    for epoch in (1, 2):
        a = pd.read_parquet(workspace.epochs / f"{epoch:04d}" / "assignments.parquet")
        assert list(a.columns) == ["image_id", "cluster", "distance"]
        assert a["image_id"].tolist() == ids  # row i = training image i: no id lookup needed
        assert a["cluster"].between(0, 9).all()  # cluster.k = 10
        assert (a["distance"] >= 0).all()


def test_checkpoints_for_every_epoch_and_last(workspace):
    names = {p.name for p in workspace.checkpoints.iterdir()}
    assert {"epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"} <= names
    last = torch.load(workspace.checkpoints / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    assert (workspace.checkpoints / "last.pt").read_bytes() == (workspace.checkpoints / "epoch_0002.pt").read_bytes()
    labels = read_json(workspace.epochs / "0002" / "labels.json")
    assert len(last["cluster_ids"]) == labels["n_clusters"]  # the head covers the non-empty clusters only


def test_no_temporary_files_are_left_behind(workspace):
    leftovers = [str(p.relative_to(workspace.root)) for d in (workspace.epochs, workspace.checkpoints)
                 for p in d.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []


def test_nmi_with_the_previous_epoch(workspace, fashion_dataset):
    m1 = read_json(workspace.epochs / "0001" / "metrics.json")
    m2 = read_json(workspace.epochs / "0002" / "metrics.json")
    assert m1["nmi_previous"] is None  # epoch 1 has no predecessor
    # recomputed independently from the two assignment files, matched by image_id
    a1 = pd.read_parquet(workspace.epochs / "0001" / "assignments.parquet").set_index("image_id")["cluster"]
    a2 = pd.read_parquet(workspace.epochs / "0002" / "assignments.parquet").set_index("image_id")["cluster"]
    expected = normalized_mutual_info_score(a2, a1.reindex(a2.index), average_method="geometric")
    assert m2["nmi_previous"] == pytest.approx(expected, rel=1e-9)
    # and with the true Fashion-MNIST labels
    truth = pd.read_parquet(fashion_dataset / "manifest.parquet").set_index("image_id")["label"]
    expected_labels = normalized_mutual_info_score(truth.reindex(a2.index).astype(int), a2,
                                                   average_method="geometric")
    assert m2["nmi_labels"] == pytest.approx(expected_labels, rel=1e-9)
    assert workspace.result == m2  # the flow returns the last epoch's metrics


def test_epoch_metrics_gather_the_stage_reports(workspace):
    d = workspace.epochs / "0002"
    m, lab, tr = (read_json(d / f"{s}.json") for s in ("metrics", "labels", "train"))
    assert m["epoch"] == 2 and m["train_loss"] == tr["loss"]
    assert m["n_clusters"] + m["empty_clusters"] == 10 == lab["k"]
    assert m["seconds_stages"] == pytest.approx(sum(read_json(d / f"{s}.json")["seconds"]
                                                    for s in ("extract", "pca", "cluster", "labels", "train")))
    assert read_json(d / "cluster.json")["seed"] != read_json(workspace.epochs / "0001" / "cluster.json")["seed"]


def test_mlflow_holds_the_per_epoch_figures(workspace):
    client = MlflowClient(tracking_uri=workspace.mlflow_uri)
    run_id = read_json(workspace.epochs / "run.json")["mlflow_run_id"]
    history = client.get_metric_history(run_id, "nmi_previous")
    m2 = read_json(workspace.epochs / "0002" / "metrics.json")
    assert [(h.step, h.value) for h in history] == [(2, pytest.approx(m2["nmi_previous"]))]
    assert sorted(h.step for h in client.get_metric_history(run_id, "train_loss")) == [1, 2]
    run = client.get_run(run_id)
    assert run.data.params["cluster.k"] == "10" and run.data.params["model.fc_dim"] == "32"
    assert run.info.status == "FINISHED"


def test_prefect_recorded_the_flow_and_its_stage_tasks(workspace):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_runs = [r for r in client.read_flow_runs() if r.name and r.state_name == "Completed"]
        task_runs = client.read_task_runs()
    assert flow_runs
    names = {t.name for t in task_runs if t.state_name == "Completed"}
    expected = {f"{stage}-epoch-{epoch:04d}" for stage in ("extract", "pca", "cluster", "labels", "train")
                for epoch in (1, 2)}
    assert expected <= names


def test_rerun_does_not_recompute_finished_epochs(tracked):
    before = tracked.mtimes()
    run_json = read_json(tracked.epochs / "run.json")
    metrics = tracked.run()
    assert tracked.mtimes() == before
    assert metrics == read_json(tracked.epochs / "0002" / "metrics.json")
    assert read_json(tracked.epochs / "run.json") == run_json  # same run, same MLflow run id
    client = MlflowClient(tracking_uri=tracked.mlflow_uri)
    assert len(client.get_metric_history(run_json["mlflow_run_id"], "nmi_previous")) == 1  # nothing relogged


def test_rerun_asking_for_fewer_epochs_is_refused_and_keeps_the_newest_network(tracked, tmp_path):
    ws = tracked.copy(tmp_path)
    before = ws.mtimes()
    with pytest.raises(StageError, match="2 finished epochs, more than run.epochs=1.*--fresh"):
        ws.run(epochs=1)
    assert torch.load(ws.checkpoints / "last.pt", weights_only=True)["epoch"] == 2
    assert ws.mtimes() == before


def test_rerun_with_other_params_is_refused(tracked):
    before = tracked.mtimes()
    with pytest.raises(StageError, match="cannot be resumed: its parameters differ.*cluster.k.*--fresh"):
        tracked.run(overrides={"cluster.k": 5})
    assert tracked.mtimes() == before


def test_resume_continues_after_the_last_finished_stage(tracked, tmp_path):
    ws = tracked.copy(tmp_path)
    e2 = ws.epochs / "0002"
    for name in ("train.json", "metrics.json"):  # as if killed during epoch 2's training
        (e2 / name).unlink()
    (ws.checkpoints / "epoch_0002.pt").unlink()
    before = ws.mtimes()
    ws.run(epochs=3)  # run.epochs is not part of the fingerprint: a run can be extended
    after = ws.mtimes()
    for name in ("features.npy", "pca_features.npy", "clusters.npz", "assignments.parquet", "labels.json"):
        key = f"data/epochs/0002/{name}"
        assert after[key] == before[key], f"{key} was recomputed"
    assert all(after[k] == v for k, v in before.items() if "/0001/" in k)
    assert (e2 / "train.json").exists() and (e2 / "metrics.json").exists()
    assert read_json(ws.epochs / "0003" / "metrics.json")["epoch"] == 3
    assert torch.load(ws.checkpoints / "last.pt", weights_only=True)["epoch"] == 3


def test_fresh_discards_the_old_run(tracked, tmp_path):
    ws = tracked.copy(tmp_path)
    old = read_json(ws.epochs / "run.json")
    ws.run(overrides={"cluster.k": 5}, epochs=1, fresh=True)
    assert sorted(p.name for p in ws.epochs.iterdir()) == ["0001", "run.json"]
    new = read_json(ws.epochs / "run.json")
    assert new["fingerprint"] != old["fingerprint"] and new["mlflow_run_id"] != old["mlflow_run_id"]
    assert new["params"]["cluster"]["k"] == 5
    assert read_json(ws.epochs / "0001" / "labels.json")["k"] == 5
    assert not (ws.checkpoints / "epoch_0002.pt").exists()


def test_rerun_with_other_evaluate_settings_resumes_without_recomputing(tracked, tmp_path):
    """evaluate.* plays no part in the epochs: changing it used to make a finished run "not resumable"."""
    ws = tracked.copy(tmp_path)
    before = ws.mtimes()
    ws.run(overrides={"evaluate.knn_k": 7, "evaluate.pictures": False})
    after = ws.mtimes()
    assert after.pop("data/epochs/run.json") and {k: v for k, v in before.items() if k != "data/epochs/run.json"} == after
    assert read_json(ws.epochs / "run.json")["params"]["evaluate"]["knn_k"] == 7  # the run records what it ran with


def test_crop_size_mismatch_is_a_stage_error_naming_both_settings(prefect_harness, mlflow_uri, fashion_dataset,
                                                                  small_params, write_params, tmp_path):
    params_file = write_params(tmp_path, small_params, {"extract.crop_size": 24})
    ws = Workspace(tmp_path, params_file, fashion_dataset, mlflow_uri)
    # a StageError (a user error) is never retried; before, a shape error inside the network was, twice
    with pytest.raises(StageError, match=r"stage extract, epoch 1: extract.crop_size=24.*28 px.*train.crop_size"):
        ws.run()
    assert not (ws.epochs / "0001" / "features.npy").exists()


def test_final_evaluation_of_the_run(workspace, small_params, tmp_path):
    summary = run_final_evaluation(small_params, workspace.dataset, workspace.epochs,
                                   workspace.checkpoints / "last.pt", tmp_path / "eval")
    curves = pd.read_csv(tmp_path / "eval" / "epochs.csv")
    assert curves["epoch"].tolist() == [1, 2]
    assert curves["nmi_previous"].iloc[1] == pytest.approx(read_json(workspace.epochs / "0002" / "metrics.json")
                                                           ["nmi_previous"])
    assert summary["epochs"] == 2 and summary["checkpoint_epoch"] == 2
    assert read_json(tmp_path / "eval" / "metrics.json") == summary


def test_bad_k_stops_the_flow_with_the_stage_message(prefect_harness, mlflow_uri, fashion_dataset, small_params,
                                                     write_params, tmp_path):
    params_file = write_params(tmp_path, small_params, {"cluster.k": 1000})
    ws = Workspace(tmp_path, params_file, fashion_dataset, mlflow_uri)
    with pytest.raises(StageError, match=r"cluster.k=1000 is larger than the number of images \(240\)"):
        ws.run()
    e1 = ws.epochs / "0001"
    assert (e1 / "pca.json").exists() and not (e1 / "cluster.json").exists() and not (e1 / "metrics.json").exists()


def test_resume_after_a_kill_between_metrics_and_last_checkpoint(tracked, tmp_path):
    ws = tracked.copy(tmp_path)
    # The state a kill right after `write_json(metrics_file, ...)` of epoch 2 leaves behind:
    (ws.checkpoints / "last.pt").unlink()
    shutil.copy(ws.checkpoints / "epoch_0001.pt", ws.checkpoints / "last.pt")
    ws.run()
    assert torch.load(ws.checkpoints / "last.pt", weights_only=True)["epoch"] == 2


# ------------------------------------------------------------------ damaged files, deleted epochs, killed flows
def cut(path: Path) -> None:
    """Truncate in place (a hard link such as last.pt is cut too), as a full disk or a bad copy leaves a file."""
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def same_network(a: Path, b: Path) -> bool:
    ka, kb = (torch.load(p, weights_only=True) for p in (a, b))
    return ka["epoch"] == kb["epoch"] and all(torch.equal(ka["model"][k], kb["model"][k]) for k in ka["model"])


def test_deleting_a_middle_epoch_redoes_it_and_last_pt_never_moves_back(tracked, tmp_path):
    ws = tracked.copy(tmp_path)
    original = pd.read_parquet(ws.epochs / "0001" / "assignments.parquet")
    shutil.rmtree(ws.epochs / "0001")
    metrics = ws.run()
    assert torch.load(ws.checkpoints / "last.pt", weights_only=True)["epoch"] == 2  # before: back to epoch 1
    assert same_network(ws.checkpoints / "last.pt", tracked.checkpoints / "epoch_0002.pt")
    pd.testing.assert_frame_equal(pd.read_parquet(ws.epochs / "0001" / "assignments.parquet"), original)
    assert metrics == read_json(ws.epochs / "0002" / "metrics.json")  # the newest epoch's figures


def test_half_written_last_checkpoint_is_recomputed_by_the_next_run(tracked, tmp_path):
    ws = tracked.copy(tmp_path)
    cut(ws.checkpoints / "epoch_0002.pt")  # last.pt is a hard link to it: both are damaged
    before = {k: v for k, v in ws.mtimes().items() if "0001" in k or k.endswith(("0002/labels.json",))}
    ws.run()
    assert same_network(ws.checkpoints / "last.pt", tracked.checkpoints / "epoch_0002.pt")
    assert same_network(ws.checkpoints / "epoch_0002.pt", tracked.checkpoints / "epoch_0002.pt")
    after = ws.mtimes()
    assert all(after[k] == v for k, v in before.items())  # only epoch 2's train reran
    assert read_json(ws.epochs / "0002" / "metrics.json")["train_loss"] == read_json(
        tracked.epochs / "0002" / "metrics.json")["train_loss"]


def test_damaged_file_of_an_unfinished_epoch_is_recomputed_by_the_flow(tracked, tmp_path):
    ws = tracked.copy(tmp_path)
    e2 = ws.epochs / "0002"
    for name in ("train.json", "metrics.json"):  # killed during epoch 2's train ...
        (e2 / name).unlink()
    (ws.checkpoints / "epoch_0002.pt").unlink()
    cut(e2 / "clusters.npz")  # ... with a damaged clustering: before, a raw zipfile error, retried twice
    ws.run()
    for name in ("clusters.npz", "assignments.parquet"):
        assert (e2 / name).read_bytes() == (tracked.epochs / "0002" / name).read_bytes()
    assert same_network(ws.checkpoints / "last.pt", tracked.checkpoints / "epoch_0002.pt")


def test_checkpoint_of_another_network_swapped_in_is_not_trained_on(tracked, tmp_path, small_params):
    from stages.core.checkpoints import init_checkpoint
    from stages.core.params import apply_overrides

    ws = tracked.copy(tmp_path)
    e2 = ws.epochs / "0002"
    for name in ("extract.json", "pca.json", "cluster.json", "labels.json", "train.json", "metrics.json"):
        (e2 / name).unlink()
    (ws.checkpoints / "epoch_0001.pt").unlink()  # epoch 1 is the last finished one; its network is replaced
    init_checkpoint(apply_overrides(small_params, {"model.width": 8}), ws.dataset, ws.checkpoints / "epoch_0001.pt")
    ws.run()  # refused as epoch 1's network, and recomputed from epoch 0's
    assert same_network(ws.checkpoints / "epoch_0001.pt", tracked.checkpoints / "epoch_0001.pt")
    assert same_network(ws.checkpoints / "last.pt", tracked.checkpoints / "epoch_0002.pt")
    assert (e2 / "assignments.parquet").read_bytes() == (tracked.epochs / "0002" / "assignments.parquet").read_bytes()


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_flow_leaves_no_process_behind(fashion_dataset, small_params, write_params, tmp_path):
    """Without a server, the flow runs Prefect's temporary one (a uvicorn child, ~200 MB): it must die too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    write_params(tmp_path, small_params, {"train.samples_per_epoch": 100000})
    shutil.copytree(fashion_dataset, tmp_path / "data" / "dataset")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / ".prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.flow", "--no-dvc"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "epoch 1: train starting" in line:
            break
    children = descendants(proc.pid)
    assert any("uvicorn" in Path(f"/proc/{c}/cmdline").read_text() for c in children if alive(c)), "".join(seen)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    survivors = [c for c in children if alive(c)]
    for pid in survivors:  # this test's own processes: don't leave them to the machine
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "processes of the killed flow still run"


def test_full_disk_during_extract_stops_clearly_and_the_run_resumes_to_the_same_result(tracked, tmp_path):
    """data/epochs on a real small disk (a tmpfs mounted by the test; needs root), filled to 16 kB free."""
    import os
    import subprocess

    ws = tracked.copy(tmp_path)
    shutil.rmtree(ws.epochs / "0002")  # killed at the start of epoch 2
    (ws.checkpoints / "epoch_0002.pt").unlink()
    (ws.checkpoints / "last.pt").unlink()
    (ws.checkpoints / "last.pt").hardlink_to(ws.checkpoints / "epoch_0001.pt")
    saved = tmp_path / "epochs-saved"
    ws.epochs.rename(saved)
    ws.epochs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(ws.epochs)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        subprocess.run(["cp", "-a", f"{saved}/.", str(ws.epochs)], check=True)
        filler = ws.epochs / "filler"  # everything but 16 kB: less than the 30,848 bytes of the features
        with open(filler, "wb") as f:
            f.write(bytes(shutil.disk_usage(ws.epochs).free - 16384))
            os.fsync(f.fileno())
        with pytest.raises(StageError, match=r"stage extract, epoch 2: not enough disk space to write .*0002/features.npy"
                                             r": 30,848 bytes needed, [\d,]+ bytes free on its disk"):
            ws.run()
        filler.unlink()  # "free some space"
        ws.run()
        for name in ("clusters.npz", "assignments.parquet"):
            assert (ws.epochs / "0002" / name).read_bytes() == (tracked.epochs / "0002" / name).read_bytes()
        assert same_network(ws.checkpoints / "last.pt", tracked.checkpoints / "epoch_0002.pt")
    finally:
        subprocess.run(["umount", str(ws.epochs)], check=True)


def test_a_pic_run_trains_a_head_sized_to_each_epochs_clusters(prefect_harness, mlflow_uri, fashion_dataset,
                                                                small_params, write_params, tmp_path):
    from stages.core.checkpoints import load_checkpoint

    params_file = write_params(tmp_path, small_params, {"cluster.method": "pic", "cluster.k": "auto"})
    ws = Workspace(tmp_path, params_file, fashion_dataset, mlflow_uri)
    ws.run()
    for e in (1, 2):
        epoch = ws.epochs / f"{e:04d}"
        clusters = pd.read_parquet(epoch / "assignments.parquet")["cluster"]
        n_clusters = clusters.nunique()
        assert 2 <= n_clusters < 240 and clusters.value_counts().min() >= 2  # found, not given; no singleton
        assert read_json(epoch / "cluster.json")["method"] == "pic"
        assert read_json(epoch / "train.json")["n_clusters"] == n_clusters
        assert load_checkpoint(ws.checkpoints / f"epoch_{e:04d}.pt")["top_layer"]["weight"].shape[0] == n_clusters
        metrics = read_json(epoch / "metrics.json")
        assert metrics["n_clusters"] == n_clusters and metrics["singleton_clusters"] == 0
        assert "kmeans_loss" not in MlflowClient(mlflow_uri).get_run(read_json(ws.epochs / "run.json")["mlflow_run_id"]).data.metrics


def test_deployment_overrides_and_presets_are_validated_by_the_same_schema(prefect_harness, mlflow_uri, fashion_dataset,
                                                                           small_params, write_params, tmp_path):
    from pipeline.apply_preset import apply_preset
    from stages.core.params import load_params

    params_file = write_params(tmp_path, small_params)
    ws = Workspace(tmp_path, params_file, fashion_dataset, mlflow_uri)
    (ws.epochs / "0001").mkdir(parents=True)
    (ws.epochs / "0001" / "metrics.json").write_text("{}")  # a run that --fresh would discard
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    bad = {"train.batch_size": 0}
    with pytest.raises(StageError) as deployment:  # what `--param overrides='{"train.batch_size": 0}'` calls
        ws.run(overrides=bad, fresh=True)
    with pytest.raises(StageError) as preset:
        apply_preset(params_file, bad)
    with pytest.raises(StageError) as cli:
        load_params(params_file, bad, origin="--set")
    assert str(deployment.value).startswith("flow override train.batch_size=0 is not allowed")
    assert str(preset.value).startswith("preset train.batch_size=0 is not allowed")
    why = {str(e.value).split(" is not allowed: ", 1)[1] for e in (deployment, preset, cli)}
    assert why == {"train.batch_size must be int ≥ 1; set it to an allowed value. Every key, its allowed values and "
                   "its meaning: `python -m stages.core.params --markdown` (docs/params.md)"}
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing deleted or edited


def test_a_damaged_input_of_an_unfinished_epoch_is_recomputed_once_not_retried(prefect_harness, mlflow_uri,
                                                                               fashion_dataset, small_params,
                                                                               write_params, tmp_path, caplog):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    params_file = write_params(tmp_path, small_params, {"run.epochs": 1})
    ws = Workspace(tmp_path, params_file, fashion_dataset, mlflow_uri)
    d = ws.epochs / "0001"  # an unfinished epoch whose pca finished, then its output was truncated
    d.mkdir(parents=True)
    for stage in ("extract", "pca"):
        (d / f"{stage}.json").write_text('{"seconds": 0}')
    np.save(d / "pca_features.npy", np.zeros((240, 16), np.float32))
    (d / "pca_features.npy").write_bytes((d / "pca_features.npy").read_bytes()[:1000])
    # before: a raw ValueError in cluster, retried twice; then (issue 9a) a StageError naming the file
    ws.run()
    assert "pca.npz not found; rerunning pca" in caplog.text and "features.npy not found; rerunning extract" in caplog.text
    assert np.load(d / "pca_features.npy").shape == (240, 16) and (d / "metrics.json").exists()
    with get_client(sync_client=True) as client:
        [run] = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["cluster-epoch-0001"])),
                                      sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=1)
    assert run.state.is_completed() and run.run_count == 1


def test_the_epoch_line_shows_the_runs_elapsed_time_and_time_left():
    from pipeline.flow import RunClock, epoch_line

    clock = RunClock(10, [100.0, 110.0])  # two epochs finished before a resume
    for seconds in (120.0, 130.0, 140.0, 150.0):
        clock.add(seconds)
    assert clock.left() == (110 + 120 + 130 + 140 + 150) / 5 * 4  # the last five epochs' mean, four epochs to go
    metrics = {"train_loss": 2.5, "nmi_previous": None, "nmi_labels": 0.41, "n_clusters": 12, "empty_clusters": 1,
               "singleton_clusters": 0, "seconds_epoch": 150.0, "seconds_overhead": 0.25}
    line = epoch_line(metrics, 6, 10, clock)
    assert line.startswith("epoch 6/10: loss 2.500, NMI prev n/a, NMI labels 0.410, 12 clusters (1 empty")
    assert line.endswith("; run 12m 30s elapsed, about 8m 40s left")
    assert RunClock(3, []).summary() == "run 0.0s elapsed, time left unknown"
    assert RunClock(2, [5.0, 5.0]).left() == 0.0  # finished: nothing left
