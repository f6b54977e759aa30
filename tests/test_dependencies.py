"""Nothing undeclared, nothing idle: every third-party import in src/ and benchmarks/ is declared
in pyproject.toml by the extra that needs it, and every declared runtime dependency is imported.

Areas: the modules ``import dg_stream``, the CLI and the remote backend load are the core (no
extra); train/, bench/, server/ and integrations/langchain.py belong to their extras, and
benchmarks/ to ``bench``; the rest of the package is ``local``. A module-level import must be
declared by the core or the file's extra (with the extras it includes); an import inside a
function (how the core reaches an extra lazily) must be declared by some extra.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the check needs to run on one only

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dg_stream"
RUNTIME_EXTRAS = ("local", "server", "train", "bench", "langchain")
# Libraries dg_stream is measured against, imported inside a function only where installed and
# never required (xgrammar pulls in triton: hundreds of MB).
COMPARED = {"xgrammar": "bench structured: its mask cost beside llguidance's"}
AREAS = (  # (path prefix, extra), first match wins; the core is found by importing it
    ("src/dg_stream/train/", "train"),
    ("src/dg_stream/bench/", "bench"),
    ("src/dg_stream/server/", "server"),
    ("src/dg_stream/integrations/langchain.py", "langchain"),
    ("benchmarks/", "bench"),
    ("src/dg_stream/", "local"),
)


def _declared() -> dict[str, set[str]]:
    """Extra ("" for the core) -> the distributions it declares directly, and the extras it
    includes as ``dg-stream[...]`` under the key ``"+extra"``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    table = {"": project["dependencies"], **project["optional-dependencies"]}
    out: dict[str, set[str]] = {}
    for extra, lines in table.items():
        for line in lines:
            req = Requirement(line)
            if canonicalize_name(req.name) == "dg-stream":
                out.setdefault("+" + extra, set()).update(req.extras)
            else:
                out.setdefault(extra, set()).add(canonicalize_name(req.name))
    return out


def _closure(declared: dict[str, set[str]], extra: str) -> set[str]:
    names, todo, seen = set(declared[""]), [extra], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        names |= declared.get(current, set())
        todo.extend(declared.get("+" + current, set()))
    return names


def _core_files() -> set[str]:
    code = (
        "import sys, dg_stream, dg_stream.cli, dg_stream._backends.remote\n"
        "for name, module in sorted(sys.modules.items()):\n"
        "    if name.startswith('dg_stream') and getattr(module, '__file__', None):\n"
        "        print(module.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return {Path(line).resolve().relative_to(ROOT).as_posix() for line in out.split()}


def _first_party() -> set[str]:
    local = {p.stem for folder in ("tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    return local | {"dg_stream", "benchmarks"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level) for each absolute import."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], not nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], not nested))
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _third_party_imports() -> list[tuple[str, str, str, bool]]:
    """(file, module, distribution, at module level) for every third-party import."""
    skip = set(sys.stdlib_module_names) | _first_party() | {"__future__"}
    owners = metadata.packages_distributions()
    files = sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
    rows = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for module, top in _imports(path):
            if module not in skip:
                dist = canonicalize_name(owners.get(module, [module])[0])
                rows.append((rel, module, dist, top))
    return rows


def _area(rel: str, core: set[str]) -> str:
    if rel in core:
        return ""
    return next(extra for prefix, extra in AREAS if rel.startswith(prefix))


def test_every_import_is_declared_by_the_extra_that_needs_it() -> None:
    declared = _declared()
    anywhere = set().union(*(_closure(declared, extra) for extra in RUNTIME_EXTRAS))
    core = _core_files()
    assert "src/dg_stream/cli/_main.py" in core and "src/dg_stream/_verifier.py" not in core
    wrong = []
    for rel, module, dist, top in _third_party_imports():
        area = _area(rel, core)
        allowed = _closure(declared, area) if top else anywhere | set(COMPARED)
        if dist not in allowed:
            where = f"the {area!r} extra" if area else "the core dependencies"
            needed = where if top else "any extra"
            wrong.append(f"{rel} imports {module} ({dist}), not declared in {needed}")
    assert not wrong, "\n".join(wrong)


def test_every_declared_runtime_dependency_is_imported_where_it_is_declared() -> None:
    declared = _declared()
    core = _core_files()
    used: dict[str, set[str]] = {}  # area -> distributions its files import
    lazy_in_core: set[str] = set()  # what the core reaches lazily serves any extra
    for rel, _module, dist, top in _third_party_imports():
        area = _area(rel, core)
        used.setdefault(area, set()).add(dist)
        if not area and not top:
            lazy_in_core.add(dist)
    everywhere = set().union(*used.values())
    idle = [f"{dist} (core)" for dist in sorted(declared[""] - everywhere)]
    for extra in RUNTIME_EXTRAS:
        # An extra's own dependencies are imported by its own files (tokenizers, which only
        # training imports, belongs to train and not to local, which train includes).
        imported = lazy_in_core | used.get(extra, set())
        idle += [f"{dist} ({extra})" for dist in sorted(declared.get(extra, set()) - imported)]
    assert not idle, "declared but never imported: " + ", ".join(idle)


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text("import numpy\n\ndef f():\n    import tqdm\n    from . import x\n")
    assert _imports(source) == [("numpy", True), ("tqdm", False)]
