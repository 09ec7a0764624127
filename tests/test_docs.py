"""The README and docs/ stay honest: links resolve, the README stays short, its commands run, and
docs/params.md is the schema's table.

A README command is checked without running it: `deepcluster ...`, `python -m ...` and `.venv/bin/<tool>`
lines run with `--help` appended (argparse checks every argument before it, then exits 0); `make` lines
need their target in the Makefile; `dvc`, `prefect`, `mlflow` and `torchrun` lines need the executable
in the virtual environment.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from stages.core import schema

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
BIN = Path(sys.executable).parent  # the virtual environment's bin/, where `deepcluster` is installed
MAX_README_LINES = 250

VENV_TOOLS = {"dvc", "prefect", "mlflow", "torchrun"}  # checked to exist, not run
NOT_CHECKED = {"source", "git", "export", "cd", "sed", "rm", "pip"}  # shell and git lines: nothing of ours


# ---------------------------------------------------------------- markdown
FENCE = re.compile(r"^(\s*)(```|~~~)(.*)$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (code blocks hold neither links nor headings)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and fence is None:
            fence = m.group(2)
        elif m and line.strip() == fence:
            fence = None
        elif fence is None:
            out.append(line)
    return out


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(info string, lines) of every fenced code block, in order."""
    blocks, fence, info, lines = [], None, "", []
    for line in text.splitlines():
        m = FENCE.match(line)
        if m and fence is None:
            fence, info, lines = m.group(2), m.group(3).strip(), []
        elif m and line.strip() == fence:
            blocks.append((info, lines))
            fence = None
        elif fence is not None:
            lines.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the text as rendered (links and code marks dropped), lower case,
    punctuation removed, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose_lines(path.read_text()):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def links(path: Path) -> list[str]:
    return [m.group(2) for line in prose_lines(path.read_text()) for m in LINK.finditer(INLINE_CODE.sub("", line))]


def test_slugs_are_githubs():
    assert slug("DVC: every epoch versioned, resumable `dvc repro`") == "dvc-every-epoch-versioned-resumable-dvc-repro"
    assert slug("Clustering on GPUs: `cluster.device`") == "clustering-on-gpus-clusterdevice"
    assert slug("The paper's studies: k-means vs PIC") == "the-papers-studies-k-means-vs-pic"
    assert slug("Installing faiss for GPUs: `make run FAISS=gpu`") == "installing-faiss-for-gpus-make-run-faissgpu"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...: not ours to check
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_listed_in_the_readme():
    listed = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    missing = [p.relative_to(REPO) for p in sorted(DOCS.glob("*.md")) if p.resolve() not in listed]
    assert not missing, f"README.md does not link {missing}"


def test_the_readme_is_short_and_opens_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES, "README.md is a door, not a diary: move detail to docs/"
    first = "\n".join(code_blocks(text)[0][1])
    assert "make run" in first and "make test" in first  # .ci/run calls `make test`


def test_the_readme_map_names_every_module():
    """Every module of stages/, stages/core/, pipeline/ and pipeline/tools/ appears on the README's map,
    alone (`stages/epoch.py`) or in a group (`stages/core/{data,crops}.py`)."""
    named = set()
    for m in re.finditer(r"`([\w/]+)/(?:\{([\w,]+)\}|(\w+))\.py`", README.read_text()):
        named |= {f"{m.group(1)}/{stem}.py" for stem in (m.group(2) or m.group(3)).split(",")}
    modules = {str(p.relative_to(REPO)) for d in ("stages", "stages/core", "pipeline", "pipeline/tools")
               for p in (REPO / d).glob("*.py") if p.name != "__init__.py"}
    assert not modules - named, f"README.md's map misses {sorted(modules - named)}"


# ---------------------------------------------------------------- README commands
def shell_commands(lines: list[str]) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at
    `&&`, `||`, `;` and `|`; redirections (`> file`) dropped."""
    joined, pending = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    commands = []
    for line in joined:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lexer.whitespace_split, lexer.commenters = True, "#"
        current, skip_next = [], False
        for token in lexer:
            if skip_next:
                skip_next = False
            elif token in {"&&", "||", ";", "|", "&"}:
                commands.append(current)
                current = []
            elif token in {">", ">>", "<", "2>"}:
                skip_next = True
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def readme_commands() -> list[list[str]]:
    out = []
    for info, lines in code_blocks(README.read_text()):
        if info == "bash":
            out += [c for c in shell_commands(lines) if c not in out]
    return out


def makefile_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M)}


def help_argv(command: list[str]) -> list[str] | None:
    """The command with `--help` appended, as an argv to run; None for a command checked otherwise."""
    head, *rest = command
    if head == "deepcluster":
        return [str(BIN / "deepcluster"), *rest, "--help"]
    if head in {"python", "python3"} and rest[:1] == ["-m"]:
        return [sys.executable, *rest, "--help"]
    if head.startswith(".venv/bin/"):
        tool = head.removeprefix(".venv/bin/")
        return [sys.executable if tool.startswith("python") else str(BIN / tool), *rest, "--help"]
    return None


def test_the_readme_has_commands_to_check():
    heads = {c[0] for c in readme_commands()}
    assert {"make", "deepcluster"} <= heads


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: " ".join(c)[:60])
def test_a_readme_command_is_runnable(command):
    head = command[0]
    argv = help_argv(command)
    if argv is not None:
        if not Path(argv[0]).exists():
            pytest.fail(f"{argv[0]} is not installed: `{head}` must be a console script of pyproject.toml "
                        "([project.scripts]); `make install` installs it")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, f"`{shlex.join(command)} --help` exited {out.returncode}:\n{out.stderr[-3000:]}"
    elif head == "make":
        targets = [a for a in command[1:] if "=" not in a and not a.startswith("-")]
        assert targets, f"`{shlex.join(command)}`: name the target"
        assert set(targets) <= makefile_targets(), f"`{shlex.join(command)}`: no such target in the Makefile"
    elif head in VENV_TOOLS:
        assert (BIN / head).exists(), f"`{head}` is not installed in {BIN}"
    else:
        assert head in NOT_CHECKED, (f"README runs `{head}`, which this test does not know how to check: "
                                     "use a `deepcluster` command, or extend tests/test_docs.py")


# ---------------------------------------------------------------- docs/params.md
def test_docs_params_md_is_the_schema_rendered():
    rendered = subprocess.run([sys.executable, "-m", "stages.core.params", "--markdown"], capture_output=True,
                              text=True, check=True, cwd=REPO).stdout
    assert rendered == schema.markdown_table()
    assert len(rendered.splitlines()) == len(schema.leaf_fields()) + 2
    parts = re.split(r"^<!-- generated.*-->\n", (DOCS / "params.md").read_text(), maxsplit=1, flags=re.M)
    assert len(parts) == 2, "docs/params.md lost its `<!-- generated ... -->` line"
    table = parts[1]
    assert table == rendered, ("docs/params.md's table is stale: regenerate it with the command at the top of "
                               "docs/params.md (`python -m stages.core.params --markdown` below the marker line)")
