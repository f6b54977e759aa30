"""Install hints a new user can act on: dg_stream is not on PyPI, so every hint, in errors
and in the docs, is the one ``install_hint`` writes: ``pip install '.[extras]'`` in a checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dg_stream._errors import install_hint

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "examples").iterdir()),
    *sorted(p for p in (ROOT / "src" / "dg_stream").rglob("*.py") if p.name != "_errors.py"),
    *sorted((ROOT / "src" / "dg_stream").rglob("*.md")),
    *sorted((ROOT / "src" / "dg_stream" / "server" / "static").iterdir()),
]


def test_the_hint_installs_extras_from_a_checkout() -> None:
    assert install_hint("local") == "pip install '.[local]' in a dg_stream checkout"
    assert install_hint("local", "server").startswith("pip install '.[local,server]'")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_or_message_names_the_package_for_pip(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"dg[-_]stream\[", text), f"{path}: extras by package name"
    for command in re.findall(r"pip install [^\n`#&)]*", text):
        if "[" in command:  # extras: from the checkout, written as install_hint writes them
            assert re.search(r"(^|\s)(-e )?'\.\[[a-z,]+\]'", command), f"{path}: {command}"


def test_the_server_walkthrough_installs_what_serving_the_embedded_pair_needs() -> None:
    walkthrough = (ROOT / "examples" / "server_and_client.md").read_text()
    assert "pip install '.[local,server]'" in walkthrough


def run_without(modules: list[str], code: str) -> str:
    """stderr + stdout of ``code`` in a fresh interpreter where ``modules`` cannot import."""
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; {block}\n{code}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    ("missing", "code", "expected"),
    [
        (
            ["torch", "transformers"],
            "import dg_stream\ntry:\n    dg_stream.LocalBackend('x')\n"
            "except dg_stream.MissingDependencyError as e:\n    print(e)",
            f"the local backend needs torch: {install_hint('local')}",
        ),
        (
            ["starlette"],
            "try:\n    import dg_stream.server\nexcept ImportError as e:\n    print(e)",
            f"the server needs starlette: {install_hint('server')}",
        ),
        (
            ["langchain_core"],
            "try:\n    import dg_stream.integrations.langchain\n"
            "except ImportError as e:\n    print(e)",
            f"the LangChain chat model needs langchain_core: {install_hint('langchain')}",
        ),
        (
            ["starlette"],
            "from dg_stream import cli; sys.exit(cli.main(['serve']))",
            f"dg-stream: error: dg-stream serve needs starlette: {install_hint('local', 'server')}",
        ),
        (
            ["torch"],
            "from dg_stream import cli; sys.exit(cli.main(['bench', '--quick']))",
            f"dg-stream: error: dg-stream bench needs torch: {install_hint('bench')}",
        ),
        (
            ["matplotlib"],
            "from dg_stream import cli; sys.exit(cli.main(['bench', '--quick']))",
            "dg-stream: error: dg-stream bench's plots (or --no-plots) needs matplotlib: "
            + install_hint("bench"),
        ),
    ],
)
def test_every_missing_dependency_error_gives_the_hint(
    missing: list[str], code: str, expected: str
) -> None:
    out = run_without(missing, code)
    assert out.strip() == expected, out
