"""Developer tasks: ``nox -s tests``, ``nox -s lint``, ``nox -s bench -- --quick``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
INSTALL = ["torch==2.13.0", "-e", ".[dev]"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The test suite (run in the current environment: torch wheels are large)."""
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff (lint and formatting) and mypy."""
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "scripts")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "scripts")
    session.run("mypy")


@nox.session(python=False)
def bench(session: nox.Session) -> None:
    """The benchmark harness: ``nox -s bench -- --quick`` (under 3 minutes on 2 cores), or
    ``nox -s bench`` for the full grid; any ``dg-stream bench`` option passes through.
    Results go to a fresh folder under runs/bench/ (JSON, PNG; ``-- --out benchmarks/results``
    updates the results kept in the repository) and a Markdown table to stdout."""
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session
def install(session: nox.Session) -> None:
    """A clean virtual environment with everything, as CI builds it."""
    session.install(*INSTALL)
    session.run("python", "-m", "pytest", "-q", *session.posargs)
