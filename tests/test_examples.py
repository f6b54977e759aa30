"""Every program in examples/ runs, against tiny models and with small limits.

Local examples run in this process (``runpy``, as ``__main__``); the server examples run as
real processes against a real ``dg-stream serve``.
"""

from __future__ import annotations

import io
import os
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import dg_stream

sys.path.insert(0, str(Path(__file__).parent))
from _saved_models import save_tiny_pair

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LIMIT = "12"


@pytest.fixture(scope="module")
def model_env(
    tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any, tiny_verifier: Any, tiny_drafter: Any
) -> dict[str, str]:
    verifier, drafter = save_tiny_pair(
        tmp_path_factory.mktemp("example-models"), tiny_tok, tiny_verifier, tiny_drafter
    )
    return {
        "DG_STREAM_VERIFIER": str(verifier),
        "DG_STREAM_DRAFTER": str(drafter),
        "DG_STREAM_MAX_NEW_TOKENS": LIMIT,
    }


def run_example(
    name: str,
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *argv: str,
) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out


def test_every_example_is_tested() -> None:
    tested = {
        "quickstart.py",
        "operators.py",
        "chatbot.py",
        "client_serve.py",
        "openai_client.py",
        "asgi_app.py",
        "langchain_chat.py",
        "gradio_chat.py",
        "vllm_sglang_client.py",  # against replayed vLLM and SGLang: tests/test_remote_engines.py
    }
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_every_example_is_in_the_readmes_table() -> None:
    readme = (EXAMPLES.parent / "README.md").read_text()
    table = readme[readme.index("## Examples") : readme.index("\n## ", readme.index("## Examples"))]
    listed = set(re.findall(r"^\| `examples/([^`]+)` \|", table, re.MULTILINE))
    assert listed == {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".md")}


def test_quickstart(
    model_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_backend: Any,
) -> None:
    out = run_example("quickstart.py", model_env, monkeypatch, capsys, "class Stack:")

    async def expected() -> str:
        return (
            await dg_stream.generate(
                "class Stack:", backend=tiny_backend, max_new_tokens=int(LIMIT)
            ).collect()
        ).text

    assert out.startswith("class Stack:" + anyio.run(expected) + "\n")
    assert f"[{LIMIT} tokens, finish=length" in out


def test_operators(
    model_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_example("operators.py", model_env, monkeypatch, capsys)
    for heading in (
        "-- lines until a blank line",
        "-- words, with time limits",
        "-- until three lines",
        "-- tee: one generation, two consumers",
    ):
        assert heading in out
    assert f"(the counter saw {LIMIT} tokens; the printer saw {LIMIT})" in out


def test_chatbot(
    model_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\n"))
    out = run_example("chatbot.py", model_env, monkeypatch, capsys)
    assert out.count("bot> ") == 2
    assert out.rstrip().endswith("(2 turns kept in the history, 0 trimmed)")


def _reply(backend: Any, messages: list[dict[str, str]]) -> str:
    async def main() -> str:
        return (
            await dg_stream.generate(messages, backend=backend, max_new_tokens=int(LIMIT)).collect()
        ).text

    return anyio.run(main)


def test_langchain_chat(
    model_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_backend: Any,
) -> None:
    pytest.importorskip("langchain_core")
    out = run_example("langchain_chat.py", model_env, monkeypatch, capsys, "Reverse a list.")
    expected = _reply(
        tiny_backend,
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Reverse a list."},
        ],
    )
    assert out.startswith(expected + "\n")
    assert re.search(
        rf"\[{LIMIT} tokens, finish=length, \d+\.\d\d drafts accepted per "
        r"verifier call, model verifier\]$",
        out.rstrip(),
    ), out


def test_gradio_chat(
    model_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_backend: Any
) -> None:
    """The app is built as ``python examples/gradio_chat.py`` builds it, and its handler (what
    Gradio calls for each message) is driven directly: no server is launched."""
    gr = pytest.importorskip("gradio")
    for key, value in {**model_env, "GRADIO_ANALYTICS_ENABLED": "False"}.items():
        monkeypatch.setenv(key, value)
    example = runpy.run_path(str(EXAMPLES / "gradio_chat.py"), run_name="gradio_chat")
    # History as Gradio 6 passes it: content as a string or as a list of text blocks.
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
    ]

    async def main() -> list[str]:
        # Built inside a running loop, as under Gradio's server: outside one, Gradio makes
        # event loops of its own (for its locks) and leaves them open.
        demo = example["build"]()
        assert isinstance(demo, gr.ChatInterface)
        return [shown async for shown in demo.fn("and again", history)]

    shown = anyio.run(main)
    expected = _reply(
        tiny_backend,
        [
            {"role": "system", "content": example["SYSTEM"]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and again"},
        ],
    )
    assert shown[-1] == expected  # the final message: committed text only
    drafts = [s for s in shown if "<em>" in s]
    assert drafts, "the tiny drafter's previews should show"
    for s in shown:  # each update: committed text so far, then at most a draft preview
        committed = s.split('<span style="color: #999">', 1)[0]
        assert expected.startswith(committed)


# -- examples that need a server ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], env: dict[str, str], url: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0]
            raise AssertionError(f"{cmd} did not come up:\n{out}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[str], codes: tuple[int, ...] = (0,)) -> str:
    proc.send_signal(signal.SIGINT)  # a clean shutdown, as Ctrl-C would do
    try:
        out = proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode in codes, out
    return out


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


@pytest.fixture(scope="module")
def served(model_env: dict[str, str]) -> Iterator[str]:
    """``dg-stream serve`` (the real command) over the tiny models."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(
        [
            sys.executable,
            "-m",
            "dg_stream.cli",
            "serve",
            "--port",
            str(port),
            "--verifier",
            model_env["DG_STREAM_VERIFIER"],
            "--drafter",
            model_env["DG_STREAM_DRAFTER"],
        ],
        _env({}),
        url + "/health",
    )
    yield url
    _stop(proc)


@pytest.mark.parametrize("name", ["client_serve.py", "openai_client.py"])
def test_client_examples_against_serve(name: str, served: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env({"DG_STREAM_URL": served, "DG_STREAM_MAX_NEW_TOKENS": LIMIT}),
    )
    assert result.returncode == 0, result.stderr
    if name == "client_serve.py":
        count = re.search(r"\[(\d+) tokens;", result.stdout)
        assert count is not None and 1 <= int(count.group(1)) <= int(LIMIT)
        assert "first line:" in result.stdout
        assert "history has 2 messages" in result.stdout
    else:
        assert "model: " in result.stdout
        # A random tiny model may end its sequence early: at most LIMIT tokens, at least one.
        count = re.search(r"completion \((\d+) tokens\)", result.stdout)
        assert count is not None and 1 <= int(count.group(1)) <= int(LIMIT)


def test_client_serve_shows_a_first_line_with_the_embedded_pair() -> None:
    """The example's output, as a new user sees it: the embedded pair behind the server."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(
        [sys.executable, "-m", "dg_stream.cli", "serve", "--port", str(port)],
        _env({}),
        url + "/health",
    )
    try:
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "client_serve.py")],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env({"DG_STREAM_URL": url, "DG_STREAM_MAX_NEW_TOKENS": "24"}),
        )
    finally:
        _stop(proc)
    assert result.returncode == 0, result.stderr
    first = re.search(r"^first line: '(.*)' \((\w+)\)$", result.stdout, re.MULTILINE)
    assert first is not None and first.group(1).strip() and first.group(2) == "stop", result.stdout


def test_asgi_app(model_env: dict[str, str], tiny_backend: Any) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(
        [sys.executable, str(EXAMPLES / "asgi_app.py")],
        _env({**model_env, "PORT": str(port)}),
        url + "/",
    )
    try:
        pieces: list[str] = []
        with httpx.stream("GET", url + "/story", params={"topic": "cats"}, timeout=60) as r:
            assert r.status_code == 200
            pieces.extend(r.iter_text())
        models = httpx.get(url + "/llm/v1/models", timeout=10)
        page = httpx.get(url + "/llm/", timeout=10)
    finally:
        # Plain uvicorn.run re-raises Ctrl-C after a graceful shutdown: 130 (or -SIGINT).
        _stop(proc, (0, 130, -signal.SIGINT))

    async def expected() -> str:
        return (
            await dg_stream.generate(
                "A short story about cats.\n\n", backend=tiny_backend, max_new_tokens=int(LIMIT)
            ).collect()
        ).text

    assert "".join(pieces) == anyio.run(expected)
    assert models.status_code == 200 and models.json()["data"]
    assert page.status_code == 200 and "v1/dg/generate" in page.text
