"""The modules of ``src/dg_stream`` import one another without a circle.

Read statically (``ast``, nothing imported): every ``import`` and ``from ... import`` of a
dg_stream module counts, at module level or inside a function, since a deferred import still
ties the two modules together. Imports under ``if TYPE_CHECKING:`` are left out (they never
run), and so is a module reached only through ``importlib`` by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, except in the body of ``if TYPE_CHECKING:``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [node]
    if isinstance(node, ast.If) and _type_checking_only(node):
        children: list[ast.AST] = list(node.orelse)
    else:
        children = list(ast.iter_child_nodes(node))
    return [found for child in children for found in _imports(child)]


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Each dg_stream module and the dg_stream modules it imports."""
    files = {_module_name(p, root): p for p in sorted((root / "dg_stream").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in files:  # a submodule
                    edges.add(f"{base}.{alias.name}")
                elif base in files:  # a name defined in (or re-exported by) that module
                    edges.add(base)
        edges.discard(name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_src_has_no_import_circle() -> None:
    graph = import_graph()
    assert "dg_stream.train.dflash" in graph and graph["dg_stream._backends.local"]
    assert circles(graph) == []


def test_a_circle_through_a_deferred_import_is_found(tmp_path: Path) -> None:
    package = tmp_path / "dg_stream"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("def x():\n    from .a import y\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import y\n"
    )
    (package / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path)
    assert graph["dg_stream.c"] == set() and graph["dg_stream.d"] == {"dg_stream.c"}
    assert circles(graph) == [["dg_stream.a", "dg_stream.b"]]
