"""``dg-stream train`` as a new user meets it: defaults that exist, one-line errors for a
missing checkpoint or a missing torch, and never a model hub."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _models import TEXT

from dg_stream import cli
from dg_stream._backends.local import default_model_dir

SRC = Path(cli.__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every outgoing connection fails, and is recorded."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def test_the_default_verifier_is_the_embedded_one_and_help_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = cli.build_parser().parse_args(["train", "drafter"])
    assert Path(args.verifier) == default_model_dir() / "verifier"
    assert (Path(args.verifier) / "config.json").is_file()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "drafter", "--help"])
    assert "embedded verifier" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("verifier", ["./nope", "runs/verifier", "someone/some-model", "ABS"])
def test_a_missing_verifier_is_the_one_line_error_generate_gives(
    verifier: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_network: list[Any],
) -> None:
    monkeypatch.chdir(tmp_path)
    if verifier == "ABS":
        verifier = str(tmp_path / "nope")
    code = cli.main(["train", "drafter", "--verifier", verifier, "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 1
    assert error_lines(err) == [
        f"dg-stream: error: verifier path does not exist: {Path(verifier)} (dg_stream loads "
        "local checkpoints only; download models beforehand)"
    ]
    assert cli.main(["generate", "x", "--verifier", verifier]) == 1  # the same words
    assert error_lines(capsys.readouterr().err) == error_lines(err)
    assert no_network == []


def test_missing_tokenizer_and_warm_start_are_refused_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_network: list[Any]
) -> None:
    missing = str(tmp_path / "nope")
    assert cli.main(["train", "verifier", "--tokenizer", missing, "--steps", "1"]) == 1
    assert "tokenizer path does not exist" in capsys.readouterr().err
    assert cli.main(["train", "drafter", "--init-from", missing, "--steps", "1"]) == 1
    assert "drafter path does not exist" in capsys.readouterr().err
    assert no_network == []


def test_train_drafter_runs_with_its_defaults_and_no_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_network: list[Any]
) -> None:
    corpus = tmp_path / "code.py"
    corpus.write_text(TEXT * 30)
    tiny = ["--hidden-size", "32", "--layers", "1", "--window", "8", "--threads", "1"]
    small = ["--sequences", "8", "--generation-batch", "8", "--continuation-tokens", "20"]
    paths = ["--corpus", str(corpus), "--out", str(tmp_path / "drafter")]
    short = ["--steps", "1", "--batch-size", "8", "--eval-prompts", "0"]
    code = cli.main(["train", "drafter", *paths, *short, *tiny, *small])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "drafter" / "config.json").is_file()
    assert no_network == []


@pytest.mark.parametrize("command", ["drafter", "verifier", "tokenizer"])
def test_training_without_torch_names_the_extra(command: str) -> None:
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from dg_stream import cli\n"
        f"sys.exit(cli.main(['train', {command!r}, '--steps', '1']))\n"
        if command != "tokenizer"
        else "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from dg_stream import cli\n"
        "sys.exit(cli.main(['train', 'tokenizer']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 1
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("dg-stream: error: training needs torch: ")
    assert "pip install '.[train]'" in lines[0] and "internal error" not in lines[0]


def test_every_from_pretrained_in_dg_stream_is_local_only() -> None:
    """transformers takes a path that does not exist for a hub id: dg_stream never lets it."""
    calls = 0
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                calls += 1
                local = [k for k in node.keywords if k.arg == "local_files_only"]
                assert local and isinstance(local[0].value, ast.Constant), (
                    f"{path.relative_to(SRC)}:{node.lineno} may reach a model hub"
                )
                assert local[0].value.value is True
    assert calls >= 5
