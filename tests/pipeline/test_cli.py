"""The `deepcluster` command as installed (the console script beside this Python), and the environment every
entry point sets before Prefect or MLflow is imported, each run in a subprocess as a user would."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import COMMANDS, stage_clis

REPO = Path(__file__).resolve().parents[2]
DEEPCLUSTER = Path(sys.executable).parent / "deepcluster"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any Prefect or MLflow setting, as a user's shell has it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def deepcluster(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEEPCLUSTER), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def docstring_first_line(module: str) -> str:
    return ast.get_docstring(ast.parse(Path(importlib.util.find_spec(module).origin).read_text())).splitlines()[0]


def test_help_names_every_command_with_what_it_is_for():
    out = deepcluster("--help")
    assert out.returncode == 0, out.stderr
    for name, (_, what) in COMMANDS.items():
        assert any(line.split() == [name, *what.split()] for line in out.stdout.splitlines()), name


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "stage"] + [f"stage {s}" for s in stage_clis()])
def test_each_command_shows_its_modules_own_help(command):
    module = f"stages.{command.split()[1]}" if command.startswith("stage ") else COMMANDS[command][0]
    out = deepcluster(*command.split(), "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: deepcluster {command} ")
    assert docstring_first_line(module) in out.stdout


def test_an_unknown_command_or_stage_is_refused_with_the_valid_names():
    out = deepcluster("trian")
    assert out.returncode == 2 and "invalid choice: 'trian'" in out.stderr
    assert all(f"'{name}'" in out.stderr for name in COMMANDS)
    out = deepcluster("stage", "kmeans")
    assert out.returncode == 2 and all(f"'{name}'" in out.stderr for name in stage_clis())


def test_params_check_validates_a_file():
    out = deepcluster("params", "--check", "params.yaml")
    assert out.returncode == 0 and out.stdout.strip() == "params.yaml: valid", out.stderr


def test_the_arguments_after_the_command_are_the_modules_own(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump({"cluster": {"k": -3}}))
    out = deepcluster("params", "--check", str(bad))
    assert out.returncode == 1 and out.stderr.startswith("params: ") and "cluster.k" in out.stderr


# ------------------------------------------------------------------ the environment
# Records the environment at the moment Prefect or MLflow is first imported, then runs a module as `python -m`.
PROBE = """
import json, os, runpy, sys
seen = {}
def hook(event, args):
    if event == "import" and args[0] in ("prefect", "mlflow") and args[0] not in seen:
        seen[args[0]] = {k: os.environ.get(k) for k in ("PREFECT_HOME", "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY")}
sys.addaudithook(hook)
sys.argv = sys.argv[1:]  # [module, its arguments]: run_module puts the module's file first, as `python -m`
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    seen["exit"] = e.code
print("SEEN " + json.dumps(seen))
"""


def imported_with(module: str, *args: str, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, module, *args], cwd=cwd, env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("SEEN "))[5:])


def test_importing_the_orchestration_changes_no_environment_variable(tmp_path):
    code = ("import os; before = dict(os.environ); import pipeline, pipeline.cli, pipeline.flow, pipeline.serve, "
            "pipeline.tracking, pipeline.tools.ablate, pipeline.tools.compare; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.parametrize("entry", [["pipeline.flow", "--help"], ["pipeline.cli", "run", "--help"]])
def test_prefect_is_imported_with_the_projects_offline_environment(tmp_path, entry):
    (tmp_path / "params.yaml").write_text("{}\n")
    seen = imported_with(*entry, cwd=tmp_path)
    assert seen.get("exit") in (0, None) and seen["prefect"] == {"PREFECT_HOME": str(tmp_path / ".prefect"), "DO_NOT_TRACK": "1",
                               "MLFLOW_DISABLE_TELEMETRY": "true"}
    assert "mlflow" not in seen or seen["mlflow"] == seen["prefect"]


def test_serve_keeps_prefect_state_in_the_project(tmp_path):
    out = deepcluster("serve", "status", cwd=tmp_path, env=clean_env())
    assert out.returncode == 1 and f"state and logs: {tmp_path / '.prefect'}" in out.stdout  # nothing runs here


@pytest.mark.slow
@pytest.mark.parametrize("copy", [None, ".dvc/tmp/exps/tmpab12cd"], ids=["in place", "in a DVC experiment's temp copy"])
def test_publish_writes_into_the_projects_mlflow_store(tmp_path, tiny_run, small_params, copy):
    """`dvc exp run --queue/--temp` run in a copy under .dvc/tmp/exps/ (DVC_ROOT names the project): the
    records must land in the project, not in the copy that is deleted afterwards."""
    import shutil

    work = tmp_path / copy if copy else tmp_path
    (work / "data" / "epochs").mkdir(parents=True)
    (work / "data" / "eval").mkdir()
    state = {"fingerprint": "f", "mlflow_run_id": None, "params": small_params.model_dump()}
    (work / "data" / "epochs" / "run.json").write_text(json.dumps(state))
    (work / "data" / "eval" / "metrics.json").write_text(json.dumps({"epochs": 2, "knn.trained": 0.5}))
    shutil.copytree(tiny_run.checkpoints, work / "models" / "checkpoints")
    shutil.copytree(tiny_run.dataset, work / "data" / "dataset")
    env = clean_env(HOME=str(tmp_path / "home"), **({"DVC_ROOT": str(tmp_path)} if copy else {}))
    out = subprocess.run([sys.executable, "-m", "pipeline.tracking", "publish"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in out.stdout
    assert (tmp_path / "mlflow.db").exists() and list((tmp_path / "mlartifacts").rglob("last.pt"))
    assert list((tmp_path / "mlartifacts").rglob("model.pt2"))  # the registered model beside them
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "home").exists()
    assert not copy or not list((tmp_path / copy).rglob("mlflow.db"))
