"""Apply a documented override set (pipeline/presets/<name>.yaml) to params.yaml in one command.

    python -m pipeline.apply_preset imagenet --path /data/imagenet/train
    dvc repro

params.yaml is edited in place with its comments kept (ruamel.yaml round-trip), so `git diff
params.yaml` shows exactly what the preset changed and `git checkout params.yaml` undoes it.
"""
from __future__ import annotations

import argparse
import functools
import operator
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from stages.core.errors import StageError, cli_errors
from stages.core.io import atomic_path
from stages.core.params import flatten, load_params, yaml_problem

PRESETS = Path(__file__).parent / "presets"


def load_preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise StageError(f"no preset {name!r}: known presets are {known}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise StageError(yaml_problem(path, e)) from None


def apply_preset(params_file: str | Path, overrides: dict, origin: str = "preset") -> None:
    """Set dotted keys in params.yaml, comments kept; refused (file untouched) unless the result is valid."""
    rt = YAML()  # round-trip: keeps comments and key order
    # ruamel writes None as an empty value; keep the file's `null`, so `git diff params.yaml` shows only real edits
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    # The schema refuses bad keys and values first, and normalises the rest (e.g. "1e-3" -> 0.001).
    valid = flatten(load_params(params_file, overrides, origin=origin).model_dump())
    with open(params_file) as f:
        doc = rt.load(f)
    for dotted in overrides:
        *parents, leaf = dotted.split(".")
        functools.reduce(operator.getitem, parents, doc)[leaf] = valid[dotted]  # doc[a][b]...[leaf]
    with atomic_path(params_file) as tmp, open(tmp, "w") as f:
        rt.dump(doc, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="preset name, e.g. imagenet")
    parser.add_argument("--path", help="sets prepare.path: where the preset's dataset lives")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    with cli_errors("apply_preset"):
        overrides = load_preset(args.preset)
        if args.path:
            overrides["prepare.path"] = args.path
        apply_preset(args.params, overrides)
    print(f"{args.params}: applied {len(overrides)} settings of preset {args.preset!r}; `git diff {args.params}` shows them")


if __name__ == "__main__":
    main()
