"""Data flows one way: no module of the converter imports (even lazily) a module that imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bonsai_convert"


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports anywhere in its body (function-level imports included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                if node.module:
                    deps.add(".".join([*base, node.module]))
                else:
                    deps.update(".".join([*base, alias.name]) for alias in node.names)
        modules[name] = deps
    return {name: {d for d in deps if d in modules and d != name} for name, deps in modules.items()}


def test_no_import_cycles():
    graph = import_graph()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    cycles = sorted((a, b) for a, deps in graph.items() for b in deps if reaches(b, a))
    assert not cycles, f"import cycles (module → module that leads back): {cycles}"


def test_the_layout_is_decided_below_plan_pack_and_manifest():
    graph = import_graph()
    for low in ("bonsai_convert.layout", "bonsai_convert.description", "bonsai_convert.sources"):
        assert not graph[low] & {"bonsai_convert.plan", "bonsai_convert.pack", "bonsai_convert.manifest"}, low
