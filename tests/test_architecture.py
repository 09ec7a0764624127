"""The layout's rules, read off the source (AST, lazy imports included): no import cycle, stages never
import pipeline, the epoch chain's stage names written out once, no module changes os.environ on import."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stages.epoch import EPOCH_STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "pipeline")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file, at the top or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from stages import cluster` imports the module stages.cluster
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import stages.core.io` -> stages.core.io; a symbol -> its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), i.e. every import cycle."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from stages.core import io\n    import stages.core.errors\n")
    assert imported_modules("stages.m", f, {"stages.core", "stages.core.io", "stages.core.errors"}) == {
        "stages.core.io", "stages.core.errors"}


def test_no_import_cycle_anywhere():
    assert cycles(import_graph()) == []


def test_stages_never_import_pipeline():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == "pipeline")
                 for name, targets in import_graph().items() if name.split(".")[0] == "stages"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_shared_code_never_imports_a_stage_cli():
    graph = import_graph()
    stage_clis = {f"stages.{n}" for n in ("prepare", "evaluate", *EPOCH_STAGES)}
    offenders = {name: sorted(graph[name] & stage_clis) for name in graph if name.startswith("stages.core")}
    assert {k: v for k, v in offenders.items() if v} == {}


def literal_stage_lists(path: Path) -> list[int]:
    """Lines of tuples, lists, sets and dict keys naming three or more of the epoch chain's stages."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        names = {e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        if len(names & set(EPOCH_STAGES)) >= 3:
            lines.append(node.lineno)
    return lines


# Seed streams are numbered purposes, not the chain: their numbers seed every run and must never change,
# and three of the purposes happen to share a stage's name.
NOT_THE_CHAIN = {"stages.core.runtime": "STREAMS"}


def test_the_epoch_chain_is_written_out_in_one_module_only():
    from stages import epoch

    found = {name: lines for name, path in modules().items() if (lines := literal_stage_lists(path))}
    runtime = ast.parse(modules()["stages.core.runtime"].read_text())
    streams = next(n for n in runtime.body if isinstance(n, ast.Assign) and n.targets[0].id == NOT_THE_CHAIN[
        "stages.core.runtime"])
    assert found.pop("stages.core.runtime", None) == [streams.lineno]
    assert found == {}, "the stage names belong in stages/epoch.py's EPOCH_CHAIN records only"
    records = [n for n in ast.walk(ast.parse(Path(epoch.__file__).read_text()))
               if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "EpochStage"]
    assert [r.args[0].value for r in records] == list(EPOCH_STAGES) == [s.name for s in epoch.EPOCH_CHAIN]


def environ_changes_at_import(path: Path) -> list[int]:
    """Lines outside any function that change os.environ (assignments, setdefault/update/pop, putenv)."""
    tree = ast.parse(path.read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
              for n in ast.walk(f) if n is not f}
    lines = []
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        text = ast.unparse(node) if isinstance(node, (ast.Assign, ast.AugAssign, ast.Call, ast.Delete)) else ""
        if (isinstance(node, ast.Call) and any(s in text.split("(")[0] for s in (
                "os.environ.setdefault", "os.environ.update", "os.environ.pop", "os.putenv", "os.environ.clear"))) \
                or (isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)) and "os.environ[" in text.split("=")[0]):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("source, changes", [
    ("import os\nos.environ.setdefault('A', '1')\n", True),
    ("import os\nos.environ['A'] = '1'\n", True),
    ("import os\nif True:\n    os.environ.update(A='1')\n", True),
    ("import os\ndef main():\n    os.environ.setdefault('A', '1')\n", False),
    ("import os\nx = os.environ.get('A')\n", False),
])
def test_the_environ_scan_tells_import_time_changes_from_calls_in_functions(tmp_path, source, changes):
    (tmp_path / "m.py").write_text(source)
    assert bool(environ_changes_at_import(tmp_path / "m.py")) is changes


def test_no_module_changes_the_environment_when_imported():
    found = {name: lines for name, path in modules().items() if (lines := environ_changes_at_import(path))}
    assert found == {}, "set the environment in a command line's main(), not at import"
