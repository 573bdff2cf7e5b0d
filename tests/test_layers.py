"""The package's layering, read from the source with `ast`: stages are not libraries for each other.

A stage module (estimate, decompose, train, merge, evaluate) imports no other stage; `compare`, which runs
stages, imports only their public names; nothing imports the CLI; and the module graph has no cycle. Imports
inside functions count. The plug-in packages (inits, methods, tasks) are one node each; `adapter`, `merge` and
`inspect` import no method's implementation module (a method's layer variant reaches them through its
declaration).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorasb_cli

PACKAGE = Path(lorasb_cli.__file__).parent
STAGES = {"estimate", "decompose", "train", "merge", "evaluate", "compare"}


def _node(path: Path) -> str:
    """`estimate` for lorasb_cli/estimate.py, `methods` for anything under lorasb_cli/methods/."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported node, names taken from it) for every import in the file that stays inside lorasb_cli."""
    return [(module[0], names) for module, names in _imported_modules(path)]


def _imported_modules(path: Path) -> list[tuple[tuple[str, ...], list[str]]]:
    """(imported module path inside lorasb_cli, e.g. ("methods", "dora"), names taken from it) for every import in
    the file that stays inside lorasb_cli; `from . import a` at the top level gives (("a",), [])."""
    package = path.relative_to(PACKAGE).parent.parts  # () for a top-level module
    found = []
    for statement in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(statement, ast.Import):
            for alias in statement.names:
                parts = alias.name.split(".")
                if parts[0] == "lorasb_cli" and len(parts) > 1:
                    found.append((tuple(parts[1:]), []))
        elif isinstance(statement, ast.ImportFrom):
            if statement.level == 0:
                parts = (statement.module or "").split(".")
                if parts[0] != "lorasb_cli":
                    continue
                parts = parts[1:]
            else:
                parts = list(package[: len(package) - (statement.level - 1)]) + (statement.module or "").split(".")
                parts = [p for p in parts if p]
            names = [alias.name for alias in statement.names]
            if parts:
                found.append((tuple(parts), names))
            else:  # `from . import a, b` at the top level: each name is a module
                found += [
                    ((name,), []) for name in names if (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()
                ]
    return found


def _graph() -> dict[str, dict[str, list[str]]]:
    """{node: {imported node: names}} over the package, self-imports left out."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _node(path)
        edges = graph.setdefault(source, {})
        for target, names in _imports(path):
            if target != source:
                edges.setdefault(target, []).extend(names)
    return graph


def test_no_stage_imports_another():
    graph = _graph()
    sideways = [f"{s} → {t}" for s in STAGES - {"compare"} for t in graph[s] if t in STAGES]
    assert sideways == []
    private = [
        f"compare → {t}.{n}" for t, names in graph["compare"].items() if t in STAGES for n in names if n.startswith("_")
    ]
    assert private == []
    assert [s for s, edges in graph.items() if "cli" in edges and s != "__main__"] == []


def test_the_module_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in graph.get(node, {}):
            if state.get(target) == "open":
                cycles.append(" → ".join(trail[trail.index(target) :] + [target]))
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_graph_reader_sees_real_edges():
    """The checks above are only as good as the reader: it must see top-level, nested and relative imports."""
    graph = _graph()
    assert "loss" in graph["estimate"] and "artifacts" in graph["decompose"]
    assert "models" in graph["methods"] and "registry" in graph["tasks"]
    assert {"estimate", "decompose", "train", "evaluate"} <= set(graph["compare"])
    assert set(graph["cli"]) >= STAGES - {"compare"}


def test_adapter_merge_and_inspect_import_no_method_module():
    """They call a method's layer variant (DoRA's) and never name the method: at most the declarations package
    `lorasb_cli.methods` (methods.layer_variant), never a module that implements a method."""
    implementations = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__"}
    assert {"dora", "peft_lora", "lorasb"} <= implementations  # the reader looks where the methods are
    found = []
    for name in ("adapter", "merge", "inspect"):
        for module, names in _imported_modules(PACKAGE / f"{name}.py"):
            if module[0] == "methods" and (module[1:] or set(names) & implementations):
                found.append(f"{name} → {'.'.join(module)} {names}")
    assert found == []
    # The check sees such an import where there is one: methods/peft_lora.py imports methods/dora.py.
    assert any(module == ("methods", "dora") for module, _ in _imported_modules(PACKAGE / "methods" / "peft_lora.py"))
