"""Orchestration: the Prefect flow that loops DeepCluster's stages, and its MLflow tracking.

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
