"""Data flows one way: no module of the converter or of the runtimes imports (even lazily) a module that imports it
back, and the runtimes never import the converter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {  # package → the folder that holds it
    "bonsai_convert": ROOT,
    "bonsai_common": ROOT / "runtime",
    "bonsai_cuda": ROOT / "runtime",
    "bonsai_mlx": ROOT / "runtime",
}
RUNTIMES = ("bonsai_common", "bonsai_cuda", "bonsai_mlx")


def module_imports(path: Path, name: str, package: str) -> set[str]:
    """Every module a file imports anywhere in its body (function-level imports included), relative ones resolved."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            if node.module:
                deps.add(".".join([*base, node.module]))
            deps.update(".".join([*base, *([node.module] if node.module else []), alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            deps.add(node.module)
            deps.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
    return deps


def import_graph() -> dict[str, set[str]]:
    """module → the modules of our packages it imports (a package's __init__ is the package's name)."""
    modules = {}
    for top, folder in PACKAGES.items():
        for path in (folder / top).rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = name if parts[-1] == "__init__" else name.rsplit(".", 1)[0]
            modules[name] = module_imports(path, name, package)
    return {name: {d for d in deps if d in modules and d != name} for name, deps in modules.items()}


GRAPH = import_graph()


def cycles_of(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(a, b) for every import a → b from which a is reached again."""

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

    return sorted((a, b) for a, deps in graph.items() for b in deps if reaches(b, a))


def test_the_graph_covers_every_package():
    tops = {name.split(".")[0] for name in GRAPH}
    assert tops == set(PACKAGES)
    assert "bonsai_cuda.pipeline" in GRAPH["bonsai_cuda.interpreted_run"]  # imports are seen


@pytest.mark.parametrize("top", sorted(PACKAGES))
def test_no_import_cycles(top: str):
    cycles = [(a, b) for a, b in cycles_of(GRAPH) if a.split(".")[0] == top]
    assert not cycles, f"import cycles (module → module that leads back): {cycles}"


def test_the_cycle_check_finds_a_cycle():
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b"), ("b", "c"), ("c", "a")]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtimes_never_import_the_converter(runtime: str):
    offenders = sorted(
        (name, dep) for name, deps in GRAPH.items() if name.split(".")[0] == runtime for dep in deps
        if dep.split(".")[0] == "bonsai_convert"
    )  # fmt: skip
    assert not offenders, offenders


def test_the_mlx_runtime_needs_no_torch():
    for path in (PACKAGES["bonsai_mlx"] / "bonsai_mlx").rglob("*.py"):
        imported = module_imports(path, "", "bonsai_mlx")
        assert not {d for d in imported if d.split(".")[0] == "torch"}, path


def test_the_layout_is_decided_below_plan_pack_and_manifest():
    for low in ("bonsai_convert.layout", "bonsai_convert.description", "bonsai_convert.sources"):
        assert not GRAPH[low] & {"bonsai_convert.plan", "bonsai_convert.pack", "bonsai_convert.manifest"}, low
