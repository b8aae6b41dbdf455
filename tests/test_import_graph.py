"""The tltune package's modules import each other without a circle, counting the imports
inside functions too (they only hide a circle from Python's import machinery)."""

import ast

from conftest import ROOT

PACKAGE = ROOT / "tltune"


def module_name(path, root) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package=PACKAGE) -> dict[str, set[str]]:
    """module -> the tltune modules it imports anywhere in its file. ``from tltune.x import y``
    counts as an import of ``tltune.x.y`` when that is a module, else of ``tltune.x``. A module
    does not count as importing the packages above it (Python runs their ``__init__`` first,
    whoever imports what)."""
    modules = {module_name(path, package.parent): path for path in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module for alias in node.names)
        graph[name] = {m for m in imported if m in modules and not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None."""
    state = {}  # module -> "visiting" (on the current path) or "done"

    def visit(module, path):
        state[module] = "visiting"
        for target in sorted(graph[module]):
            if state.get(target) == "visiting":
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "tltune.train" in graph["tltune.features"], "the graph sees imports (features uses train's Runtime)"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_names_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
