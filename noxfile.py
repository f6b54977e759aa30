"""Developer tasks: ``nox -s tests``, ``nox -s lint``, ``nox -s bench -- --quick``."""

from __future__ import annotations

import os
import shutil
import sys

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = "torch==2.13.0"
INSTALL = [TORCH, "-e", ".[dev]"]

# nox -s floors: every extra a user installs, each direct dependency at its lowest allowed version.
FLOOR_EXTRAS = "local,server,train,bench,langchain"
# The test tools the subset needs, at the dev extra's floors (check_floors.py holds them to it).
FLOOR_TOOLS = [
    "pytest>=8",
    "pytest-timeout>=2.3.1",
    "hypothesis>=6.100",
    "trio>=0.32",
    "scipy>=1.11.1",
    "openai>=1.45",
]
# A fast subset that touches every dependency: transformers, tokenizers, safetensors and jinja2
# (the lossless checks, the shipped pair, detokenizing), wcwidth, torch.load(weights_only=True),
# the declared extras, anyio (streams, operators, on trio too), httpx, msgspec, starlette,
# uvicorn and prometheus-client (server and remote), langchain-core and pydantic (the LangChain
# example), tqdm and tokenizers (tokenizer and drafter training), matplotlib (the quick bench).
# Not tests/test_batching.py: it calls models with cache=, a keyword transformers takes from 5.24
# only (the library itself asks the model which name it takes).
FLOOR_TESTS = [
    "tests/test_greedy_lossless.py",
    "tests/test_default_model.py",
    "tests/test_detokenize.py",
    "tests/test_terminal_width.py",
    "tests/test_checkpoints.py",
    "tests/test_dependencies.py",
    "tests/test_stream.py",
    "tests/test_operators.py",
    "tests/test_server.py",
    "tests/test_remote.py",
    "tests/test_examples.py::test_langchain_chat",
    "tests/test_bench.py",
    "tests/test_train.py::test_train_tokenizer_and_verifier_commands",
    "tests/test_train.py::test_drafter_training_resumes",
]
# Warnings old releases give beside newer packages they do not pin, harmless at run time (the
# suite turns every warning into an error).
FLOOR_WARNINGS = [
    # asyncio_default_fixture_loop_scope, for pytest-asyncio (from langchain-tests, which needs
    # a newer httpx and is left out).
    "ignore:Unknown config option:pytest.PytestConfigWarning",
    # uvicorn 0.30 imports websockets' deprecated legacy server when websockets is installed
    # (langsmith brings it); dg-stream serve has no websocket routes.
    "ignore:websockets.:DeprecationWarning",
    # matplotlib 3.8 calls pyparsing's camelCase names, deprecated in pyparsing 3.3.
    "ignore::pyparsing.warnings.PyparsingDeprecationWarning",
]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The test suite (run in the current environment: torch wheels are large)."""
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff (lint and formatting), mypy, and vermin for Python 3.10 (requires-python; only 3.11
    runs here): syntax and standard-library names per version, which ruff does not check."""
    paths = ["src", "tests", "benchmarks", "examples", "scripts"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)
    session.run("mypy")
    session.run(
        "vermin", "-q", "-t=3.10-", "--violations", "--eval-annotations", "--no-tips", *paths
    )


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


@nox.session(python=False)
def floors(session: nox.Session) -> None:
    """The lowest allowed versions: a fresh virtual environment (.nox/floors, or
    $DG_STREAM_FLOORS_VENV) where uv resolves every direct dependency of the user-facing extras
    to its floor (--resolution lowest-direct; torch stays at 2.13.0), then checks that each one
    landed on its declared floor, runs a fast subset of the tests and the README's command.
    About 2 minutes on 2 cores once uv's cache is warm."""
    venv = os.environ.get("DG_STREAM_FLOORS_VENV") or os.path.join(".nox", "floors")
    shutil.rmtree(venv, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", venv)
    python = os.path.join(venv, "bin", "python")
    # torch by pip (which finds the local CPU build), without its dependencies: uv resolves
    # those with everything else.
    session.run(python, "-m", "pip", "install", "-q", "--no-deps", TORCH)
    uv = shutil.which("uv", path=os.path.dirname(sys.executable)) or "uv"  # the dev extra's
    session.run(
        uv, "pip", "install", "-q", "--python", python, "--resolution", "lowest-direct",
        "-e", f".[{FLOOR_EXTRAS}]", TORCH, *FLOOR_TOOLS,
    )  # fmt: skip
    tools = [tool.split(">")[0].split("<")[0] for tool in FLOOR_TOOLS]
    session.run(
        python, "scripts/check_floors.py", FLOOR_EXTRAS, "--pinned", "torch", "--tools", *tools
    )
    warnings = [arg for rule in FLOOR_WARNINGS for arg in ("-W", rule)]
    session.run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *warnings, *FLOOR_TESTS)
    session.run(
        os.path.join(venv, "bin", "dg-stream"), "generate", "def fibonacci(n):", "--stats",
        "--max-new-tokens", "32",
    )  # fmt: skip
