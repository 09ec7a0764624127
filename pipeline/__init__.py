"""Orchestration: the Prefect flow that loops DeepCluster's stages (flow) and everything around it.

Importing it changes nothing: a command line's main() calls offline_environment() first, before Prefect
or MLflow is imported (both read the environment when imported).
"""
import json
import os
import urllib.error
import urllib.request
from pathlib import Path


def project_root() -> Path:
    """Where params.yaml and dvc.yaml are: the current directory, when asked (DVC runs commands there)."""
    return Path.cwd()


def store_root() -> Path:
    """Where the project's run records live (mlflow.db, mlartifacts/, .prefect/), whichever copy runs.

    `dvc exp run --queue` and `--temp` run an experiment in a temporary copy under .dvc/tmp/exps/ and
    bring back only what git or DVC tracks, so records kept in that copy would be lost with it. DVC
    names the project the copy came from in DVC_ROOT (for a `dvc repro` in place, the project itself).
    """
    return Path(os.environ.get("DVC_ROOT") or project_root())


def offline_environment() -> None:
    """A command line's offline-safe defaults (anything already set wins): no telemetry or analytics (there
    is no internet), Prefect's state in the project's .prefect/ (MLflow's store, the project's mlflow.db, is
    pipeline.tracking.tracking_uri; both under store_root()). Call it first in main(): Prefect and MLflow read these when imported."""
    defaults = {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_HOME": str(store_root() / ".prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        # Prefect waits 20 s for its temporary server by default; on a small machine busy with other jobs the
        # server's start (imports, database migrations) takes longer, and the run would fail before it began.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def prefect_state_dir() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or store_root() / ".prefect")


def healthy(url: str, path: str = "/health", timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as r:
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
    """The API URL of this project's Prefect server (`deepcluster serve start`) if it is up, else None.

    `serve start` records it in .prefect/server.json; a flow started from the CLI or `dvc repro` while
    the server is up reports to it, so the run shows in its UI.
    """
    try:
        info = json.loads((prefect_state_dir() / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return info["url"] if alive(info.get("pid"), "prefect") and healthy(info["url"]) else None
