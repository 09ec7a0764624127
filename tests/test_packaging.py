"""pyproject.toml: the dependencies whose internals the orchestration uses are bounded, and the suite runs on
versions inside those bounds (so the bounds are the releases the tests cover)."""
from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
INTERNALS_USED = {"dvc", "dvc-data", "prefect", "mlflow"}


def requirements() -> dict[str, Requirement]:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return {r.name: r for r in map(Requirement, deps)}


def test_tools_whose_internals_we_use_have_an_upper_bound():
    reqs = requirements()
    assert INTERNALS_USED <= set(reqs)
    for name in INTERNALS_USED:
        assert any(s.operator in ("<", "<=", "==", "~=") for s in reqs[name].specifier), f"{name} has no upper bound"


def test_the_installed_versions_are_inside_the_bounds():
    for name, req in requirements().items():
        assert req.specifier.contains(version(name), prereleases=True), f"{name} {version(name)} is outside {req}"
