"""params.yaml: reading it, dotted overrides (`cluster.k=100`), validation against stages/core/schema.py."""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path
from typing import Any

import yaml

from stages.core import schema
from stages.core.errors import StageError

PARAMS_FILE = "params.yaml"


def load_params(path: str | os.PathLike = PARAMS_FILE, overrides: dict | None = None,
                origin: str = "override") -> schema.Params:
    """Read params.yaml, apply dotted overrides such as {"cluster.k": 100} and validate the result
    against stages/core/schema.py: a frozen Params, normalised (e.g. "1e-3" -> 0.001), or a StageError that
    names every bad key and its fix. Nothing has run, nothing is deleted before this returns."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"params file {path} not found: run from the project root or pass --params")
    try:
        with open(path) as f:
            params = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise StageError(yaml_problem(path, e)) from None
    if params is None:
        raise StageError(f"{path} is empty: restore it (`git checkout {path}`)")
    return apply_overrides(params, overrides or {}, source=str(path), origin=origin)


def yaml_problem(path: str | os.PathLike, e: "yaml.YAMLError") -> str:
    """Invalid YAML, as the file, the line and how to fix it."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return (f"{where}: not valid YAML ({what}): fix that line (each key as `key: value`, indented with spaces under "
            f"its section; quote values holding ': ' or ' #'), or restore the file (`git diff {path}`)")


def apply_overrides(params: schema.Params | dict, overrides: dict, source: str = "params.yaml",
                    origin: str = "override") -> schema.Params:
    """A new Params: `params` (or a dict as read from YAML) with dotted keys set, validated against the schema:
    unknown keys are refused (with a suggestion) so typos don't pass silently, bad values named with their fix."""
    params = params.model_dump() if isinstance(params, schema.Params) else copy.deepcopy(params)
    if not isinstance(params, dict):
        schema.validate(params, source)  # says what params.yaml must be
    keys = schema.leaf_fields()
    for dotted, value in overrides.items():
        if dotted not in keys:
            raise StageError(f"unknown parameter {dotted!r} ({origin} {dotted}={value!r}): "
                             + schema.sentence(schema.suggestion(dotted)) + " " + schema.DOCS)
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})  # an older run's params may lack a section added since
            if not isinstance(node, dict):
                schema.validate(params, source)  # names the section that is not a mapping
        node[leaf] = value
    return schema.validate(params, source, overridden=dict(overrides), origin=origin)


def parse_override(text: str) -> tuple[str, Any]:
    """'cluster.k=100' -> ('cluster.k', 100); values are parsed as YAML scalars."""
    if "=" not in text:
        raise StageError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def stage_parser(doc: str, params_help: str) -> argparse.ArgumentParser:
    """A stage's command line: its module's docstring as --help, and --params."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=PARAMS_FILE, help=params_help)
    return parser


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true", help="print the parameter table (docs/params.md)")
    parser.add_argument("--check", metavar="PARAMS", help="validate a params file and say what is wrong")
    args = parser.parse_args(argv)
    if args.markdown:
        print(schema.markdown_table(), end="")
    if args.check:
        try:
            load_params(args.check)
        except StageError as e:
            raise SystemExit(f"params: {e}")
        print(f"{args.check}: valid")


if __name__ == "__main__":
    main()
