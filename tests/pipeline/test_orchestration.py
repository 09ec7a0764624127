"""Production orchestration, end to end and for real: a Prefect server on loopback with the flow
served as a deployment, DVC repositories in temp directories, MLflow on SQLite, faiss and torch.

Projects are copies of a tiny template (200 training images, a 4-wide network, k = 8, 2 epochs)
prepared once; every command runs in a subprocess as a user would type it. Threads are limited to
one (OMP_NUM_THREADS=1): the build machine has 2 shared cores.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SMALL

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC, PREFECT, PY = str(BIN / "dvc"), str(BIN / "prefect"), sys.executable
TINY = {"prepare.max_train_images": 200, "prepare.max_test_images": 100, "model.width": 4, "model.fc_dim": 32,
        "pca.dim": 16, "cluster.k": 10, "run.epochs": 2, "extract.batch_size": 100, "train.batch_size": 64,
        # enough draws that `train` lasts ~1-2 s, so a test can kill the run inside it
        "train.samples_per_epoch": 3000,
        "extract.keep_features_every": 2, "train.keep_checkpoint_every": 1,
        **{k: v for k, v in SMALL.items() if k.startswith("evaluate.")}}  # a small final evaluation
K = 8  # the runs under test override cluster.k = 10 -> 8, as a user would
TIMING = ("seconds", "peak_rss_mb", "images_per_second")

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ helpers
def env_for(project: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "DVC_")) and k not in ("PYTHONPATH",)}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(project), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_HOME=str(project / ".prefect"))
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def sh(cmd: list[str], project: Path, api_url: str | None = None, check: bool = True, timeout: float = 300,
       ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=project, env=env_for(project, api_url), text=True, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def copy_project(src: Path, dst: Path) -> Path:
    # cp -a keeps mtimes, the git repository and the DVC cache; a server's state stays behind.
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    subprocess.run(["rm", "-rf", str(dst / ".prefect")], check=True)
    return dst


def set_params(project: Path, overrides: dict) -> None:
    from pipeline.apply_preset import apply_preset

    apply_preset(project / "params.yaml", overrides)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_hashes(project: Path, *rels: str) -> dict[str, str]:
    out = {}
    for rel in rels:
        p = project / rel
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        out.update({str(f.relative_to(project)): sha(f) for f in files})
    return out


def deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING)}


def read(project: Path, rel: str) -> dict:
    return json.loads((project / rel).read_text())


def dvc_status(project: Path) -> dict:
    return json.loads(sh([DVC, "status", "--json"], project).stdout.strip().splitlines()[-1])


def in_dvc_cache(project: Path, path: Path) -> bool:
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return (project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).exists()


def mlflow_rows(project: Path, query: str, *args) -> list[tuple]:
    with sqlite3.connect(project / "mlflow.db") as db:
        return db.execute(query, args).fetchall()


def run_tags(project: Path, run_id: str) -> dict[str, str]:
    return dict(mlflow_rows(project, "select key, value from tags where run_uuid = ?", run_id))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_run(a: Path, b: Path, epochs=(1, 2)) -> None:
    """Same assignments, k-means results and deterministic metrics, epoch by epoch."""
    for e in epochs:
        d = f"data/epochs/{e:04d}"
        for name in ("assignments.parquet", "clusters.npz", "pca.npz"):
            assert sha(a / d / name) == sha(b / d / name), f"{d}/{name} differs"
        assert deterministic(read(a, f"{d}/metrics.json")) == deterministic(read(b, f"{d}/metrics.json"))
    import torch

    ca = torch.load(a / "models/checkpoints/last.pt", weights_only=True)
    cb = torch.load(b / "models/checkpoints/last.pt", weights_only=True)
    assert ca["epoch"] == cb["epoch"] == epochs[-1]
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A DVC + git project with the tiny parameters and a prepared dataset."""
    p = tmp_path_factory.mktemp("orch") / "template"
    p.mkdir()
    ignore = ["--exclude=__pycache__"]
    subprocess.run(["tar", "-C", str(ROOT), *ignore, "-cf", str(p / "src.tar"), "stages", "pipeline", "dvc.yaml",
                    "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "data/.gitignore",
                    "models/.gitignore"], check=True)
    subprocess.run(["tar", "-C", str(p), "-xf", str(p / "src.tar")], check=True)
    (p / "src.tar").unlink()
    set_params(p, TINY)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                ["git", "config", "user.name", "test"]):
        sh(cmd, p)
    sh([DVC, "repro", "prepare"], p)
    # The MLflow database schema, once (copied with each project): its creation takes seconds.
    sh([PY, "-c", "import mlflow; mlflow.set_tracking_uri('sqlite:///mlflow.db'); mlflow.search_experiments()"], p)
    sh(["git", "add", "-A"], p)
    sh(["git", "commit", "-qm", "tiny DeepCluster project"], p)
    return p


@pytest.fixture(scope="module")
def served(template, tmp_path_factory):
    """`python -m pipeline.serve start` in a project: a Prefect server on loopback + the served deployment."""
    p = copy_project(template, tmp_path_factory.mktemp("deploy") / "project")
    port = free_port()
    out = sh([PY, "-m", "pipeline.serve", "start", "--port", str(port)], p, timeout=240)
    assert "ready" in out.stdout
    api = f"http://127.0.0.1:{port}/api"
    yield p, api
    pids = [int((p / ".prefect" / f"{n}.pid").read_text()) for n in ("server", "runner")]
    sh([PY, "-m", "pipeline.serve", "stop"], p, timeout=120)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="module")
def deployed(served):
    """A 2-epoch run started with `prefect deployment run`, overriding cluster.k."""
    p, api = served
    out = sh([PREFECT, "deployment", "run", "deepcluster/local", "--param", "epochs=2",
              "--param", f'overrides={{"cluster.k": {K}}}', "--watch"], p, api, timeout=300)
    return p, api, out.stdout


@pytest.fixture(scope="module")
def repro(template, served, tmp_path_factory) -> Path:
    """The same run (k = 8 in params.yaml) through the other entry point: `dvc repro`."""
    p = copy_project(template, tmp_path_factory.mktemp("repro") / "project")
    set_params(p, {"cluster.k": K})
    sh([DVC, "repro"], p, served[1])
    return p


# ------------------------------------------------------------------ tests
def test_deployment_run_completes_and_versions_everything(deployed):
    p, api, out = deployed
    assert "Completed" in out
    assert (p / "data/epochs/0002/metrics.json").exists()
    # The deployment's parameters were mapped onto params.yaml, and dvc.lock records the run.
    assert f"  k: {K} " in (p / "params.yaml").read_text()
    assert dvc_status(p) == {}
    lock = (p / "dvc.lock").read_text()
    assert "deepcluster:" in lock and "evaluate:" in lock and "publish:" in lock
    # One MLflow run, per-epoch metrics with step=epoch, final evaluation and model published.
    runs = mlflow_rows(p, "select run_uuid, status from runs")
    assert len(runs) == 1 and runs[0][1] == "FINISHED"
    steps = mlflow_rows(p, "select step from metrics where key='nmi_labels' order by step")
    assert [s for (s,) in steps] == [1, 2]
    assert mlflow_rows(p, "select count(*) from metrics where key='final.test_nmi_k_classes'")[0][0] == 1
    assert (Path(mlflow_rows(p, "select artifact_uri from runs")[0][0]) / "checkpoint/last.pt").exists()
    # Prefect artifacts of this flow run under stable keys (other tests' runs report to the same server).
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

    def artifacts(key):
        query = {"artifacts": {"key": {"any_": [key]}, "flow_run_id": {"any_": [flow_run_id]}}}
        req = urllib.request.Request(f"{api}/artifacts/filter", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps(query).encode())
        return json.load(urllib.request.urlopen(req))
    assert len(artifacts("deepcluster-epoch-summary")) == 2
    assert {a["type"] for a in artifacts("deepcluster-cluster-sizes")} == {"table"}
    assert [float(a["data"]) for a in artifacts("deepcluster-progress")] == [100.0]
    # each tool leads to the others: MLflow -> the flow run, run.json and the artifacts -> the MLflow run
    run_id = runs[0][0]
    assert run_tags(p, run_id)["prefect.flow_run_id"] == flow_run_id
    assert read(p, "data/epochs/run.json")["mlflow_run_id"] == run_id
    assert read(p, "data/epochs/run.json")["prefect_flow_run_id"] == flow_run_id
    assert all(run_id in a["description"] for a in artifacts("deepcluster-epoch-summary") + artifacts("deepcluster-progress"))


def test_dvc_repro_gives_the_same_artifacts_as_the_deployment(deployed, repro):
    assert dvc_status(repro) == {}
    assert_same_run(deployed[0], repro)
    # Both entry points record the same parameters and inputs in dvc.lock (the outputs' hashes differ
    # only through timings and the MLflow run id in data/epochs).
    import yaml

    locks = [yaml.safe_load((p / "dvc.lock").read_text())["stages"]["deepcluster"] for p in (deployed[0], repro)]
    assert locks[0]["params"] == locks[1]["params"] and locks[0]["deps"] == locks[1]["deps"]
    assert locks[0]["params"]["params.yaml"]["cluster"]["k"] == K


def test_dvc_metrics_and_plots_show_per_epoch_curves(repro):
    plots = json.loads(sh([DVC, "plots", "show", "--json"], repro).stdout)["data"]
    assert set(plots) >= {"nmi_per_epoch", "loss_per_epoch"}
    rows = plots["nmi_per_epoch"][0]["content"]["data"]["values"]
    assert sorted({r["epoch"] for r in rows}) == ["1", "2"]
    shown = json.loads(sh([DVC, "metrics", "show", "--json"], repro).stdout)[""]["data"]
    assert list(shown) == ["data/eval/headline.json"]  # one screen: the headline figures
    headline = shown["data/eval/headline.json"]["data"]
    assert {"probe.trained.best", "probe.random.best", "knn.pixels", "cluster.trained.acc"} <= set(headline)
    full = json.loads(sh([DVC, "metrics", "show", "data/eval/metrics.json", "--json"], repro).stdout)
    assert "probe.trained.conv3" in full[""]["data"]["data/eval/metrics.json"]["data"]  # the full table on request


def test_dvc_experiments_record_and_compare_the_headline_figures(repro, tmp_path):
    p = copy_project(repro, tmp_path / "project")
    sh(["git", "add", "-A"], p)
    sh(["git", "commit", "-qm", "the tiny run"], p)
    sh([DVC, "exp", "run", "-n", "knn3", "-S", "evaluate.knn_k=3"], p)  # only evaluate and publish rerun
    rows = json.loads(sh([DVC, "exp", "show", "--json"], p).stdout)
    exps = {e["name"]: e for row in rows for e in [row, *[x["revs"][0] for x in row.get("experiments") or []]]
            if e.get("name")}
    data = exps["knn3"]["data"]
    headline = data["metrics"]["data/eval/headline.json"]["data"]
    assert {"probe.trained.best", "knn.trained", "cluster.trained.acc", "cluster.pixels.nmi"} <= set(headline)
    assert data["params"]["params.yaml"]["data"]["evaluate"]["knn_k"] == 3
    assert headline["knn.trained"] == read(p, "data/eval/metrics.json")["knn.trained"]
    diff = json.loads(sh([DVC, "exp", "diff", "HEAD", "knn3", "--json"], p).stdout)
    change = diff["params"]["params.yaml"]["evaluate.knn_k"]
    assert (change["old"], change["new"]) == (20, 3)


def test_a_queued_experiment_lands_in_the_projects_mlflow_store_linked(repro, tmp_path):
    """`dvc exp run --queue` + `dvc queue start` run the experiment in a temporary copy under .dvc/tmp/exps,
    from which only git- and DVC-tracked files come back: its MLflow run and Prefect state must still land in
    the project's own stores (nothing here points PREFECT_HOME or MLFLOW_TRACKING_URI at them)."""
    p = copy_project(repro, tmp_path / "project")
    sh(["git", "add", "-A"], p)
    sh(["git", "commit", "-qm", "the tiny run"], p)
    head = sh(["git", "rev-parse", "HEAD"], p).stdout.strip()
    env = {k: v for k, v in env_for(p).items() if k != "PREFECT_HOME"}

    def dvc(*args: str, timeout: float = 300) -> str:
        proc = subprocess.run([DVC, *args], cwd=p, env=env, text=True, timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
        assert proc.returncode == 0, proc.stdout[-6000:]
        return proc.stdout

    dvc("exp", "run", "--queue", "-n", "queued-k6", "-S", "cluster.k=6")  # a new training run, not a resumed one
    dvc("queue", "start")
    try:
        deadline = time.monotonic() + 600
        while not re.search(r"queued-k6\s.*(Success|Failed)", status := dvc("queue", "status")):
            assert time.monotonic() < deadline, status
            time.sleep(5)
        assert re.search(r"queued-k6\s.*Success", status), status + dvc("queue", "logs", "queued-k6")
    finally:
        subprocess.run([DVC, "queue", "stop", "--kill"], cwd=p, env=env, capture_output=True, timeout=120)
    ids = [r for (r,) in mlflow_rows(p, "select run_uuid from tags where key = 'dvc.experiment' and value = 'queued-k6'")]
    assert len(ids) == 1, "the experiment's MLflow run is not in the project's store"
    run_id, tags = ids[0], run_tags(p, ids[0])
    assert [s for (s,) in mlflow_rows(p, "select step from metrics where run_uuid = ? and key = 'nmi_labels' order by step",
                                      run_id)] == [1, 2]
    assert tags["mlflow.source.git.commit"] == tags["dvc.baseline_rev"] == head
    assert tags["deepcluster.entry_point"] == "dvc exp run (queued-k6)"
    flow_run = tags["prefect.flow_run_id"]
    with sqlite3.connect(p / ".prefect" / "prefect.db") as db:  # the flow run is in the project's Prefect state
        assert db.execute("select count(*) from flow_run where id = ?", (flow_run,)).fetchone()[0] == 1
    assert mlflow_rows(p, "select count(*) from metrics where run_uuid = ? and key like 'final.%'", run_id)[0][0] > 0
    assert not list((p / ".dvc" / "tmp").rglob("mlflow.db"))
    # the experiment's run.json names the same MLflow run and flow run
    dvc("exp", "apply", "queued-k6")
    assert {k: read(p, "data/epochs/run.json")[k] for k in ("mlflow_run_id", "prefect_flow_run_id", "dvc_experiment")} == {
        "mlflow_run_id": run_id, "prefect_flow_run_id": flow_run, "dvc_experiment": "queued-k6"}


def test_the_documented_snippet_extracts_features_with_the_last_finished_model(repro, tmp_path):
    """docs/operations.md "The trained model", run as written in the `dvc repro` project on a folder of PNGs:
    the registry's alias is that run's model, and its features are the trained network's on the same view."""
    import numpy as np
    import torch
    from PIL import Image

    from stages.core.checkpoints import load_checkpoint, model_from_checkpoint
    from stages.core.data import load_split

    doc = (ROOT / "docs" / "operations.md").read_text()
    snippet = re.search(r"## The trained model.*?```python\n(.*?)```", doc, re.S).group(1)
    images = load_split(repro / "data/dataset", "test")
    folder = tmp_path / "images" / "any-class"
    folder.mkdir(parents=True)
    for i in range(6):  # 40 x 34 px: resized and centre-cropped as extract views an image tree
        Image.fromarray(np.asarray(images.pixels[i])[..., 0]).resize((40, 34)).save(folder / f"{i}.png")
    out = tmp_path / "features.pt"
    script = tmp_path / "snippet.py"
    script.write_text(snippet + f"\ntorch.save(features, {str(out)!r})\n")
    env = {**env_for(repro), "IMAGES": str(tmp_path / "images")}
    proc = subprocess.run([PY, str(script)], cwd=repro, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    features = torch.load(out, weights_only=True)
    assert proc.stdout.strip() == f"torch.Size([6, {TINY['model.fc_dim']}])"

    run_id = read(repro, "data/epochs/run.json")["mlflow_run_id"]
    with sqlite3.connect(repro / "mlflow.db") as db:
        aliased = db.execute("select v.run_id from registered_model_aliases a join model_versions v on "
                             "a.name = v.name and a.version = v.version where a.alias = 'last-finished'").fetchall()
    assert aliased == [(run_id,)]
    from torchvision import transforms

    view = transforms.Compose([transforms.Grayscale(), transforms.Resize(32), transforms.CenterCrop(28),
                               transforms.ToTensor()])
    batch = torch.stack([view(Image.open(folder / f"{i}.png")) for i in range(6)])
    network = model_from_checkpoint(load_checkpoint(repro / "models/checkpoints/last.pt")).eval()
    mean, std = images.meta["mean"][0], images.meta["std"][0]
    with torch.no_grad():
        torch.testing.assert_close(features, network.fc_features((batch - mean) / std), rtol=1e-4, atol=1e-4)


def test_studies_report_the_experiments_dvc_ran(repro, served, tmp_path):
    from pipeline.tools.studies import PREFIX, queue_command

    p = copy_project(repro, tmp_path / "project")
    sh(["git", "add", "-A"], p)
    sh(["git", "commit", "-qm", "the tiny run"], p)
    run_now = [a for a in queue_command("pic") if a != "--queue"]  # the queued command, run in the foreground
    sh(run_now, p, served[1], timeout=600)
    n_clusters = int(pd_last(p / "data/eval/epochs.csv", "n_clusters"))
    metrics = read(p, "data/eval/metrics.json")  # the workspace holds the last experiment's results
    sh([a for a in queue_command("pic", seed=1) if a != "--queue"], p, served[1], timeout=600)
    seeded = read(p, "data/eval/metrics.json")
    out = sh([PY, "-m", "pipeline.tools.studies", "report", "--out", str(tmp_path / "studies")], p).stdout
    row = next(line for line in out.splitlines() if line.startswith(f"| clustering | `{PREFIX}pic`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "cluster.method=pic, cluster.k=auto" and int(cells[3]) == n_clusters != K
    assert cells[5].startswith(f"{100 * metrics['probe.trained.best']:.1f} / ")
    assert read(p, "data/eval/cluster_sizes.json")["method"] == "pic"
    # no study-defaults experiment: the defaults row is the committed run (HEAD's data/eval), with its k = 8
    head_row = next(line for line in out.splitlines() if line.startswith("| clustering | `HEAD` (the committed run)"))
    assert [c.strip() for c in head_row.strip("|").split("|")][2:4] == ["defaults", str(K)]
    assert f"Not run yet: {PREFIX}raw, {PREFIX}k10" in out
    # the run with training seed 1 (study-pic-s1) in the seeds' table: its kNN margin over its random networks
    seed_row = next(line for line in out.splitlines() if line.startswith("| clustering | pic |"))
    cells = [c.strip() for c in seed_row.strip("|").split("|")]
    knn, spread = 100 * (seeded["knn.trained"] - seeded["knn.random_inits"]), 100 * seeded["knn.random_inits_std"]
    expected = f"{knn:+.1f}, {int(knn > spread)}/1 above" + (", 1 below" if knn < -spread else "")
    assert cells[3] == "1" and cells[5] == expected
    for picture in ("studies.png", "nmi_and_sizes.png"):
        assert (tmp_path / "studies" / picture).read_bytes()[:4] == b"\x89PNG"
    # the same table through `deepcluster compare`: one study, printed only; and the experiment among all experiments
    shown = sh([str(BIN / "deepcluster"), "compare", "--study", "clustering"], p).stdout
    assert row in shown and "| k |" not in shown and not (p / "docs").exists()
    shown = sh([str(BIN / "deepcluster"), "compare"], p).stdout
    assert f"| `{PREFIX}pic` | " in shown and "cluster.method=pic, cluster.k=auto" in shown


def pd_last(path: Path, column: str):
    import pandas as pd

    return pd.read_csv(path)[column].iloc[-1]


def test_epoch_fetched_through_dvc_after_deletion(repro, tmp_path):
    p = copy_project(repro, tmp_path / "project")
    sh(["git", "add", "dvc.lock", "params.yaml", "data/.gitignore", "models/.gitignore"], p)
    sh(["git", "commit", "-qm", "run k=8"], p)
    target = p / "data/epochs/0001/assignments.parquet"
    original = sha(target)
    target.unlink()
    assert "data/epochs" in sh([DVC, "status"], p).stdout  # DVC sees the deletion
    # Read through DVC at a git revision (its cache), then restore the workspace with dvc checkout.
    shown = json.loads(sh([PY, "-m", "pipeline.tools.inspect", "show", "1", "--rev", "HEAD", "--json"], p).stdout)
    assert shown["images"] == 200 and shown["clusters"] == K
    sh([DVC, "checkout", "data/epochs"], p)
    assert sha(target) == original
    assert dvc_status(p) == {}


def test_inspect_lists_and_compares_epochs(repro, capsys):
    listed = json.loads(sh([PY, "-m", "pipeline.tools.inspect", "list", "--json"], repro).stdout)
    assert [r["epoch"] for r in listed] == [1, 2]
    assert [r["features"] for r in listed] == ["-", "kept"]  # extract.keep_features_every = 2
    cmp = json.loads(sh([PY, "-m", "pipeline.tools.inspect", "compare", "1", "2", "--json"], repro).stdout)
    # NMI of the two epochs is what the labels stage measured for epoch 2.
    assert cmp["nmi"] == pytest.approx(read(repro, "data/epochs/0002/metrics.json")["nmi_previous"])
    assert cmp["images"] == 200 and 0 <= cmp["changed"] <= 200 and cmp["matching"] == "hungarian"
    assert sum(r["images"] for r in cmp["sizes_a"]) == 200
    from pipeline.tools import inspect

    inspect.main(["--repo", str(repro), "compare", "1", "2"])  # the text report, in this process
    text = capsys.readouterr().out
    assert "changed cluster" in text and "cluster sizes" in text and f"{cmp['changed']} images" in text


def test_single_stage_rerun_leaves_the_main_run_byte_identical(repro, tmp_path):
    p = copy_project(repro, tmp_path / "project")
    main_files = ("data/epochs", "models/checkpoints", "data/eval", "data/dataset", "dvc.lock", "params.yaml")
    before = tree_hashes(p, *main_files)
    mtimes = {f: (p / f).stat().st_mtime_ns for f in before}
    out = sh([PY, "-m", "pipeline.tools.ablate", "cluster", "--epoch", "2", "--set", "cluster.k=5", "--set", "pca.dim=8",
              "--name", "k5"], p).stdout
    assert tree_hashes(p, *main_files) == before
    assert {f: (p / f).stat().st_mtime_ns for f in before} == mtimes
    abl = p / "data/ablations/k5"
    assert read(p, "data/ablations/k5/0002/labels.json")["k"] == 5
    assert read(p, "data/ablations/k5/0002/pca.json")["dim"] == 8
    assert not (abl / "0002/pca_features.npy").exists()  # large intermediates are not kept
    assert (p / "data/ablations/k5.dvc").exists() and dvc_status(p) == {}
    rec = read(p, "data/ablations/k5/ablation.json")
    assert rec["overrides"] == {"cluster.k": 5, "pca.dim": 8} and 0 < rec["metrics"]["nmi_main"] < 1
    parent = mlflow_rows(p, "select t.value from runs r join tags t on t.run_uuid = r.run_uuid "
                            "where r.name = 'ablation-k5' and t.key = 'mlflow.parentRunId'")
    assert parent == [(read(p, "data/epochs/run.json")["mlflow_run_id"],)]
    assert "k5" in out
    cmp = json.loads(sh([PY, "-m", "pipeline.tools.inspect", "compare", "2", "k5:2", "--json"], p).stdout)
    assert cmp["clusters_b"] == 5 and cmp["nmi"] == pytest.approx(rec["metrics"]["nmi_main"])


def test_killed_during_train_resumes_to_the_uninterrupted_result(template, served, repro, tmp_path):
    p = copy_project(template, tmp_path / "project")
    api = served[1]
    cmd = [PY, "-m", "pipeline.flow", "--set", f"cluster.k={K}"]
    proc = subprocess.Popen(cmd, cwd=p, env=env_for(p, api), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "epoch 2: train starting" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    e1, e2 = p / "data/epochs/0001", p / "data/epochs/0002"
    assert (e2 / "labels.json").exists() and not (e2 / "train.json").exists()  # killed inside train
    assert not (p / "models/checkpoints/epoch_0002.pt").exists()
    # Epoch 1 went into DVC's cache as soon as it finished, before any dvc.lock was written.
    assert in_dvc_cache(p, e1 / "assignments.parquet") and in_dvc_cache(p, e1 / "clusters.npz")
    epoch1 = [f for f in [*e1.iterdir(), p / "models/checkpoints/epoch_0001.pt"]]
    mtimes = {f: f.stat().st_mtime_ns for f in epoch1}

    out = sh(cmd, p, api).stdout
    assert not any(f"epoch 1: {stage} starting" in out for stage in ("extract", "pca", "cluster", "labels", "train"))
    assert "epoch 2: labels already done" in out and "epoch 2: train starting" in out
    assert {f: f.stat().st_mtime_ns for f in epoch1} == mtimes  # nothing of epoch 1 recomputed
    leftovers = [f for d in ("data/epochs", "models/checkpoints") for f in (p / d).rglob("*")
                 if f.name.endswith(".tmp") or f.name.startswith(".")]
    assert leftovers == []
    assert_same_run(p, repro)
    assert dvc_status(p) == {}
    # One MLflow run, resumed: every epoch's figures exactly once.
    assert len(mlflow_rows(p, "select run_uuid from runs")) == 1
    steps = mlflow_rows(p, "select step from metrics where key='train_loss' order by step")
    assert [s for (s,) in steps] == [1, 2]


def test_second_concurrent_run_is_refused(template, served, tmp_path):
    p = copy_project(template, tmp_path / "project")
    api = served[1]
    # Two runs started together on one workspace: exactly one gets it (flock is atomic) and keeps it,
    # training for minutes; the other must stop at once, naming the holder.
    cmd = [PY, "-m", "pipeline.flow", "--no-dvc", "--set", "run.epochs=1", "--set", "train.samples_per_epoch=1000000"]
    runs = [subprocess.Popen(cmd, cwd=p, env=env_for(p, api), text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT) for _ in range(2)]
    lock = p / "data/.epochs.run-lock"
    try:
        deadline = time.monotonic() + 180
        while all(r.poll() is None for r in runs):
            assert time.monotonic() < deadline, "neither run stopped"
            time.sleep(0.2)
        refused = next(r for r in runs if r.poll() is not None)
        holder = next(r for r in runs if r is not refused)
        out = refused.stdout.read()
        assert refused.returncode == 1, out[-3000:]
        assert "already active on data/epochs" in out and f"process {holder.pid}" in out
        assert holder.poll() is None  # the run that holds the workspace was not disturbed
        assert json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        for r in runs:
            if r.poll() is None:
                r.send_signal(signal.SIGKILL)
            r.wait()
    with open(lock) as f:  # kill -9 released the lock: nothing stale to clean up by hand
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_stage_error_names_stage_and_epoch_and_is_not_retried(template, served, tmp_path):
    p = copy_project(template, tmp_path / "project")
    out = sh([PY, "-m", "pipeline.flow", "--no-dvc", "--set", "pca.dim=64"], p, served[1], check=False)
    assert out.returncode == 1
    assert "stage pca, epoch 1: pca.dim=64 must be between 1 and the feature dimension 32" in out.stdout
    assert "Retry" not in out.stdout and out.stdout.count("Task run 'pca-epoch-0001'") == 1
    assert "Traceback" not in out.stdout  # the message says what to do; the Prefect UI keeps the traceback


def test_retry_condition_retries_only_transient_faults():
    import errno

    from prefect.states import Failed

    from pipeline.flow import retry_if_transient
    from stages.core.errors import StageError, TransientError

    assert retry_if_transient(None, None, Failed(data=TransientError("stage train, epoch 3: OSError EIO")))
    assert not retry_if_transient(None, None, Failed(data=StageError("stage pca, epoch 1: bad pca.dim")))
    assert not retry_if_transient(None, None, Failed(data=ValueError("cannot reshape array")))
    assert not retry_if_transient(None, None, Failed(data=OSError(errno.ENOSPC, "No space left on device")))
