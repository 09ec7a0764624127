"""deepcluster: every command line of the project under one name.

    deepcluster run --set cluster.k=50      # train: the Prefect flow over all epochs
    deepcluster stage cluster --help        # one stage's own command line
    deepcluster compare                     # runs side by side

Each subcommand hands the rest of the command line to that module's main(), so its options and
`--help` are the module's own, and `python -m <module>` stays the same command.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys

from pipeline import offline_environment

# subcommand -> (module, what it is for); `stage` picks the module from its first argument
COMMANDS = {
    "run": ("pipeline.flow", "train: the Prefect flow over all epochs (what dvc repro runs)"),
    "stage": (None, "one stage's own command line: stage <name> [options]"),
    "inspect": ("pipeline.tools.inspect", "per-epoch cluster assignments: list, show, compare epochs"),
    "ablate": ("pipeline.tools.ablate", "rerun one stage of a finished epoch with other parameters"),
    "studies": ("pipeline.tools.studies", "queue the paper's studies as DVC experiments, report them"),
    "screen": ("pipeline.tools.screen", "score a recipe change after a few epochs, in-process"),
    "compare": ("pipeline.tools.compare", "runs side by side: experiments, studies, ablations, screens"),
    "serve": ("pipeline.serve", "the local Prefect server and deployment: start, stop, status"),
    "gpu-check": ("pipeline.tools.gpu_check", "run the GPU code paths here and print a table"),
    "benchmark": ("pipeline.tools.benchmark", "the measurements behind the defaults"),
    "preset": ("pipeline.apply_preset", "apply pipeline/presets/<name>.yaml to params.yaml"),
    "params": ("stages.core.params", "the parameter table (--markdown) or validate a file (--check)"),
}
# Read-only commands whose output is often piped into `head`: end quietly when the pipe closes.
PIPED = {"inspect", "compare", "params"}


def stage_clis() -> tuple[str, ...]:
    from stages.epoch import EPOCH_STAGES  # the stages (torch): only for `stage`

    return ("prepare", *EPOCH_STAGES, "evaluate")


def stage_module(argv: list[str]) -> tuple[str, list[str]]:
    """`stage <name> ...`: the stage's module and the arguments that are its own."""
    parser = argparse.ArgumentParser(prog="deepcluster stage", description="Run one stage's command line; "
                                     "`deepcluster stage <name> --help` shows its options.")
    parser.add_argument("name", choices=stage_clis(), metavar="<stage>", help=", ".join(stage_clis()))
    parser.parse_args(argv[:1])
    return f"stages.{argv[0]}", argv[1:]


def parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<10} {what}" for name, (_, what) in COMMANDS.items())  # one line each
    top = argparse.ArgumentParser(prog="deepcluster", usage="deepcluster [-h] <command> [its options]",
                                  description=__doc__, epilog=f"commands:\n{commands}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="<command>", required=True, help=argparse.SUPPRESS)
    for name in COMMANDS:
        sub.add_parser(name, add_help=False)
    return top


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = parser().parse_args(argv[:1]).command  # the rest is the module's: its own parser reads it
    module, rest = COMMANDS[command][0], argv[1:]
    if command == "stage":
        module, rest = stage_module(rest)
        command = f"stage {argv[1]}"
    if module == "pipeline.flow":
        offline_environment()  # the flow module makes its Prefect flow when imported, and Prefect reads it then
    if command in PIPED:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.argv = [f"deepcluster {command}", *rest]  # as `python -m` sets it: usage lines name the command typed
    sys.exit(importlib.import_module(module).main(rest))


if __name__ == "__main__":
    main()
