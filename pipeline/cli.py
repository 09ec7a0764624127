"""deepcluster: every command line of the project under one name, e.g. `deepcluster run --set cluster.k=50`.

Each command hands the rest of the command line to its module's main(): its options and `--help` are
the module's own (`deepcluster stage cluster --help`), and `python -m <module>` stays the same command.
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
    "learn-check": ("pipeline.tools.learn_check", "before a release: trained vs random networks on small data"),
    "compare": ("pipeline.tools.compare", "runs side by side: experiments, studies, ablations, screens"),
    "serve": ("pipeline.serve", "the local Prefect server and deployment: start, stop, status"),
    "gpu-check": ("pipeline.tools.gpu_check", "run the GPU code paths here and print a table"),
    "benchmark": ("pipeline.tools.benchmark", "the measurements behind the defaults"),
    "preset": ("pipeline.apply_preset", "apply pipeline/presets/<name>.yaml to params.yaml"),
    "params": ("stages.core.params", "the parameter table (--markdown) or validate a file (--check)"),
}


def stage_clis() -> tuple[str, ...]:
    from stages.epoch import EPOCH_STAGES  # the stages (torch): only for `stage`

    return ("prepare", *EPOCH_STAGES, "evaluate")


def choose(prog: str, what: str, choices, argv: list[str], help: str | None = None, **kw) -> str:
    """The first argument, one of `choices` (else argparse's error, naming them); `--help` shows them."""
    parser = argparse.ArgumentParser(prog=prog, usage=f"{prog} [-h] <{what}> [its options]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    parser.add_argument(what, choices=choices, metavar=f"<{what}>", help=help or ", ".join(choices))
    return getattr(parser.parse_args(argv[:1]), what)  # the rest is the module's: its own parser reads it


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = "\n".join(f"  {name:<12} {what}" for name, (_, what) in COMMANDS.items())  # one line each
    command = choose("deepcluster", "command", tuple(COMMANDS), argv, "one of the commands below",
                     description=__doc__, epilog=f"commands:\n{commands}")
    module, rest = COMMANDS[command][0], argv[1:]
    if command == "stage":
        command = f"stage {choose('deepcluster stage', 'stage', stage_clis(), rest)}"
        module, rest = f"stages.{rest[0]}", rest[1:]
    if module == "pipeline.flow":
        offline_environment()  # the flow module makes its Prefect flow when imported, and Prefect reads it then
    if command in {"inspect", "compare", "params"}:  # read-only, often piped into `head`: end quietly when it closes
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.argv = [f"deepcluster {command}", *rest]  # as `python -m` sets it: usage lines name the command typed
    sys.exit(importlib.import_module(module).main(rest))


if __name__ == "__main__":
    main()
