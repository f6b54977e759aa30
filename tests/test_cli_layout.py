"""The ``dg-stream`` command is a package split the way ``dg_stream.bench`` is: small modules, one
per command, so a reader finds a command's behaviour in one room; ``dg_stream.cli.main`` (the
entry point) and ``python -m dg_stream.cli`` keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dg_stream import cli

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dg_stream" / "cli"
MOST_LINES = 350


def test_the_cli_is_a_package_of_small_modules() -> None:
    assert hasattr(cli, "__path__"), "dg_stream.cli is one module, not a package"
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 6
    long = {
        path.name: n
        for path in modules
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MOST_LINES
    }
    assert not long, f"modules over {MOST_LINES} lines: {long}"


def test_each_command_handler_lives_in_its_own_module() -> None:
    parser = cli.build_parser()
    handlers = {
        command: parser.parse_args(argv).func
        for command, argv in {
            "generate": ["generate", "x"],
            "chat": ["chat"],
            "serve": ["serve"],
        }.items()
    }
    modules = {command: func.__module__ for command, func in handlers.items()}
    assert all(module.startswith("dg_stream.cli._") for module in modules.values()), modules
    assert len(set(modules.values())) == len(modules), modules
    shared = {cli.build_parser.__module__, cli.main.__module__}
    assert not shared & set(modules.values()), (shared, modules)


def test_python_dash_m_runs_the_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dg_stream.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dg-stream ")
