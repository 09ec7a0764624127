"""Orchestration: the Prefect flow that loops DeepCluster's stages and everything around it.

flow (the epoch loop), workspace (run lock, run identity, resume), versioning (DVC), tracking
(MLflow, Prefect artifacts, the `publish` stage), serve (local Prefect server + deployment), inspect
(per-epoch assignments), ablate (single-stage reruns), apply_preset (params.yaml presets),
benchmark (the measurements behind the defaults).

Importing this package sets the offline-safe environment (OFFLINE_ENV) before Prefect or MLflow are
imported: no telemetry or analytics (there is no internet), Prefect state inside the project,
MLflow on a SQLite file in the project. Anything already set in the environment wins.
"""
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

# Commands run from the project root (as dvc does), so state lands beside params.yaml.
PROJECT_ROOT = Path.cwd()

OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# Prefect waits 20 s for its temporary server by default; on a small machine busy with other jobs
# the server's start (imports, database migrations) takes longer, and the run would fail before it began.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def prefect_state_dir() -> Path:
    return Path(os.environ["PREFECT_HOME"])


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def alive(pid: int | None, marker: str) -> bool:
    """pid is running and is the process we started (its command line names `marker`), not a reused pid."""
    try:
        return bool(pid) and marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def project_server_url() -> str | None:
    """The API URL of this project's Prefect server (`make serve`) if it is up, else None.

    `pipeline.serve start` records it in .prefect/server.json; a flow started from the CLI or `dvc
    repro` while the server is up reports to it, so the run shows in its UI.
    """
    try:
        info = json.loads((prefect_state_dir() / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return info["url"] if alive(info.get("pid"), "prefect") and healthy(info["url"]) else None
