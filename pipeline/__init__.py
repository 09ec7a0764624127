"""Orchestration: the Prefect flow that loops DeepCluster's stages and everything around it.

flow (the epoch loop), serve (local Prefect server + deployment), workspace (run lock, run
identity), versioning (DVC), tracking (MLflow, Prefect artifacts), inspect (per-epoch assignments),
ablate (single-stage reruns), apply_preset (params.yaml presets).

Importing this package sets offline-safe defaults before Prefect or MLflow are imported: no
telemetry or analytics (there is no internet), Prefect state inside the project, MLflow on a
SQLite file in the project. Anything already set in the environment wins.
"""
import os
from pathlib import Path

# Commands run from the project root (as dvc does), so state lands beside params.yaml.
PROJECT_ROOT = Path.cwd()

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(PROJECT_ROOT / ".prefect"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
