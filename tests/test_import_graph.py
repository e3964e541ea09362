"""The package's imports run one way: no module imports, even lazily, one that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "krasr_batch"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the krasr_batch modules it names in an import statement (anywhere in the file).

    ``from a import b`` counts as importing ``a.b`` when that is a module, else ``a``. A package's parent
    ``__init__`` that Python runs first is not counted: it is the package's facade, importing its own parts.
    """
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "krasr_batch.pipeline.orchestrate" in graph and graph["krasr_batch.cli"]  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_commands_never_import_the_cli_root_and_the_library_never_imports_the_cli():
    graph = import_graph()
    for name, targets in graph.items():
        if name.endswith("__main__"):  # the entry points run the root
            continue
        if name.startswith("krasr_batch.cli."):
            assert "krasr_batch.cli" not in targets, name
        elif not name.startswith("krasr_batch.cli"):
            assert not any(t.startswith("krasr_batch.cli") for t in targets), name
