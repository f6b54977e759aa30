"""The dg-stream command: output modes, stdin, errors and exit codes, the chat loop."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

import dg_stream
from dg_stream import ChatSession, Chunk, GenerationRequest, cli

sys.path.insert(0, str(Path(__file__).parent))
from _saved_models import save_tiny_pair

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def model_args(
    tmp_path_factory: pytest.TempPathFactory, tiny_tok: Any, tiny_verifier: Any, tiny_drafter: Any
) -> list[str]:
    verifier, drafter = save_tiny_pair(
        tmp_path_factory.mktemp("cli-models"), tiny_tok, tiny_verifier, tiny_drafter
    )
    return ["--verifier", str(verifier), "--drafter", str(drafter), "--block-size", "4"]


@pytest.fixture(scope="module")
def expected(tiny_backend: Any) -> Any:
    """What the library itself generates for PROMPT (greedy, 24 tokens)."""

    async def main() -> Any:
        return await dg_stream.generate(PROMPT, backend=tiny_backend, max_new_tokens=24).collect()

    return anyio.run(main)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def render_terminal(raw: str) -> str:
    """Apply what a terminal does with backspace, erase-line and colour codes (one line)."""
    screen: list[str] = []
    col = 0
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del screen[col:]
            i += 3
            continue
        m = re.match(r"\x1b\[[0-9;]*m", raw[i:])
        if m:
            i += m.end()
            continue
        ch = raw[i]
        if ch == "\b":
            col = max(col - 1, 0)
        else:
            if col < len(screen):
                screen[col] = ch
            else:
                screen.append(ch)
            col += 1
        i += 1
    return "".join(screen)


def test_generate_streams_the_librarys_text(
    model_args: list[str], expected: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["generate", PROMPT, "--max-new-tokens", "24", *model_args], capsys)
    assert code == 0, err
    assert out == expected.text  # not a terminal: exactly the text, no added newline
    assert err == ""


def test_generate_reads_the_prompt_from_stdin(
    model_args: list[str],
    expected: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    code, out, _ = run_cli(["generate", "-", "--max-new-tokens", "24", *model_args], capsys)
    assert (code, out) == (0, expected.text)
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    code, out, err = run_cli(["generate", "-", *model_args], capsys)
    assert code == 2 and "empty" in err and out == ""


def test_invalid_utf8_is_replaced_with_a_warning(
    model_args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python hands the bytes b"abc\xff" of argv over as "abc\udcff" (surrogateescape).
    options = ["--max-new-tokens", "4", *model_args]
    code, out, err = run_cli(["generate", "abc\udcff", "--stop", "\udcff", *options], capsys)
    assert code == 0 and out, err
    assert err.count("not valid UTF-8; invalid bytes were replaced with U+FFFD") == 2
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\xff")))
    code, out, err = run_cli(["generate", "-", *options], capsys)
    assert code == 0 and out, err
    assert err.startswith("dg-stream: warning: the prompt is not valid UTF-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi \udcff\n"))
    code, out, err = run_cli(["chat", *options], capsys)
    assert code == 0 and out, err
    assert "the input is not valid UTF-8" in err and "error" not in err


def test_json_events_and_stats(
    model_args: list[str], expected: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        ["generate", PROMPT, "--max-new-tokens", "24", "--json", "--stats", *model_args], capsys
    )
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    chunks = [e for e in events if e["event"] == "chunk"]
    assert "".join(c["text"] for c in chunks) == expected.text
    assert [t for c in chunks for t in c["token_ids"]] == list(expected.token_ids)
    assert chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 24
    summary = events[-1]
    assert summary["event"] == "summary" and summary["tokens"] == 24
    assert summary["verifier_calls"] == expected.stats.verifier_calls
    assert summary["tokens_per_second"] > 0


def test_preview_draws_and_erases_the_draft(
    model_args: list[str],
    expected: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_cli(
        [
            "generate",
            "class Stack",
            "--max-new-tokens",
            "16",
            "--preview",
            "--stop",
            "\n",
            *model_args,
        ],
        capsys,
    )
    assert code == 0
    assert "\x1b[2m" in out and "\b" in out  # a dim draft was drawn and later taken back
    monkeypatch.delenv("FORCE_COLOR")  # the same request without --preview: the final screen
    code2, text, _ = run_cli(
        ["generate", "class Stack", "--max-new-tokens", "16", "--stop", "\n", *model_args], capsys
    )
    assert code2 == 0
    assert render_terminal(out) == text


def test_compare_reports_speedup_and_identical_output(
    model_args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        ["generate", PROMPT, "--max-new-tokens", "12", "--compare", *model_args], capsys
    )
    assert code == 0 and out
    assert re.search(r"12 tokens in [\d.]+ s: [\d.]+ tokens/s", err)
    assert re.search(r"speed-up [\d.]+x; identical output", err)


def test_errors_are_one_line_with_conventional_codes(
    model_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["generate", "x", "--verifier", str(tmp_path / "missing")], capsys)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("dg-stream: error: verifier path")
    code, out, err = run_cli(["generate", "x", "--device", "cuda:99", *model_args], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert re.match(r"dg-stream: error: (CUDA is not available|no device cuda:99)", err)
    code, _, err = run_cli(["generate", "x", "--max-new-tokens", "9999", *model_args], capsys)
    assert code == 2 and err.count("\n") == 1 and "invalid request" in err
    code, _, err = run_cli(["generate", "x", "--temperature", "-1", *model_args], capsys)
    assert code == 2 and "temperature" in err
    code, _, err = run_cli(["generate"], capsys)
    assert code == 2 and "PROMPT" in err
    code, _, err = run_cli(["generate", "x", "--max-new-tokens", "0"], capsys)
    assert code == 2 and "must be >= 1" in err
    code, _, err = run_cli(["generate", "x", "--remote", "http://127.0.0.1:9", "--compare"], capsys)
    assert code == 2 and "--compare needs local models" in err
    code, _, err = run_cli(
        ["generate", "x", "--remote", "http://127.0.0.1:9", "--timeout", "2"], capsys
    )
    assert code == 1 and err.count("\n") == 1 and err.startswith("dg-stream: error:")
    assert "(http://127.0.0.1:9/" in err  # the URL that failed
    code, _, err = run_cli(["nonsense"], capsys)
    assert code == 2


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["generate", "x", "--temperature", "-1"], "temperature must be"),
        (["generate", "x", "--top-p", "2"], "top_p must be"),
        (["generate", "x", "--block-size", "100000"], "block_size must be"),
        (["generate", "x", "--repetition-penalty", "0"], "repetition_penalty must be"),
        (["generate", "x", "--confidence", "1.5", "--system", "s"], "confidence must be"),
        (["chat", "--top-p", "0"], "top_p must be"),
        (["serve", "--block-size", "65"], "block_size must be"),
    ],
)
def test_options_are_checked_before_any_model_loads(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The verifier does not exist: had it been loaded first, that would be the error (exit 1).
    code, out, err = run_cli([*argv, "--verifier", str(tmp_path / "missing")], capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("dg-stream: error: invalid request: " + says)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["generate"], "dg-stream generate: error: the following arguments are required: PROMPT"),
        (
            ["generate", "x", "--max-new-tokens", "many"],
            "dg-stream generate: error: argument --max-new-tokens: expected an integer >= 1, not "
            "'many'",
        ),
        (["chat", "--top-k", "0"], "dg-stream chat: error: argument --top-k: must be >= 1, got 0"),
        (["nonsense"], "dg-stream: error: argument COMMAND: invalid choice: 'nonsense'"),
        (["bench", "--no-such-option"], "dg-stream bench: error: unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(argv, capsys)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith(says), err
    assert err.rstrip().endswith("--help')") and "usage:" not in err and "_positive" not in err


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["serve"], ["train"]])
def test_help_is_complete(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli([*command, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: dg-stream")
    if command in (["generate"], ["chat"]):
        for option in (
            "--remote",
            "--verifier",
            "--drafter",
            "--max-new-tokens",
            "--preview",
            "--stats",
            "--temperature",
            "--block-size",
        ):
            assert option in out
    if command == ["generate"]:
        for option in ("--compare", "--json", "'-' reads it from stdin", "examples:"):
            assert option in out
    if command == []:
        for name in ("generate", "chat", "serve", "bench", "train"):
            assert name in out


def test_bench_delegates_or_explains(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["bench", "--help"], capsys)  # bench's own options
    assert code == 0 and out.startswith("usage: dg-stream bench") and "--quick" in out
    # An installation without dg_stream.bench says so in one line.
    script = (
        "import sys; sys.modules['dg_stream.bench'] = None\n"
        "from dg_stream import cli; sys.exit(cli.main(['bench', '--quick']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        "dg-stream: error: benchmarks are not available in this installation "
        "(dg_stream.bench is missing)\n"
    )


# -- chat -----------------------------------------------------------------------------------------


def test_chat_from_piped_stdin(
    model_args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tiny_backend: Any,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\n/reset\nhello\n"))
    code, out, err = run_cli(
        ["chat", "--max-new-tokens", "8", "--system", "sys", *model_args], capsys
    )
    assert code == 0, err
    assert "conversation forgotten" in err

    async def expected() -> str:
        chat = ChatSession(tiny_backend, system="sys", max_new_tokens=8)
        return await chat.ask("hello")

    reply = anyio.run(expected)
    # /reset made the second "hello" start afresh: the same reply twice, each on its own line.
    line = reply if reply.endswith("\n") else reply + "\n"
    assert out == line * 2


class SlowBackend:
    """The tiny backend, slowed down so that a reply is still streaming when Ctrl-C comes."""

    def __init__(self, inner: Any, first_chunk: threading.Event) -> None:
        self.inner = inner
        self.tokenizer = inner.tokenizer
        self.context_length = inner.context_length
        self.model_name = inner.model_name
        self.first_chunk = first_chunk
        self.finished_streams = 0

    async def _run(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        agen = self.inner.stream(request)
        try:
            async for chunk in agen:
                yield chunk
                self.first_chunk.set()
                await anyio.sleep(0.05)
        finally:
            await agen.aclose()
            self.finished_streams += 1

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        return self._run(request)

    async def aclose(self) -> None:
        return None


class LineFeed(io.TextIOBase):
    """A stdin whose lines the test hands over one at a time."""

    def __init__(self) -> None:
        self.lines: queue.Queue[str] = queue.Queue()

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        return self.lines.get(timeout=30)

    def isatty(self) -> bool:
        return False


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's own SIGINT handler in the main thread",
)
def test_ctrl_c_stops_the_reply_not_the_chat(tiny_backend: Any) -> None:
    started = threading.Event()
    backend = SlowBackend(tiny_backend, started)
    session = ChatSession(backend, max_new_tokens=200)
    stdin, stdout, stderr = LineFeed(), io.StringIO(), io.StringIO()
    loop = cli.ChatLoop(session, stdin=stdin, stdout=stdout, stderr=stderr)
    main_thread = threading.main_thread().ident
    assert main_thread is not None

    def user() -> None:
        stdin.lines.put("tell me a long story")
        assert started.wait(20)
        signal.pthread_kill(main_thread, signal.SIGINT)  # Ctrl-C while the reply streams
        stdin.lines.put("")  # Ctrl-D

    helper = threading.Thread(target=user)
    helper.start()
    with start_blocking_portal() as portal:
        code = loop.run(portal)
    helper.join()
    assert code == 0
    assert "[reply stopped]" in stderr.getvalue()
    assert session.history == ()  # the stopped reply was not added
    assert backend.finished_streams == 1  # and its model work ended
    assert len(stdout.getvalue()) > 0


def test_console_script_runs_and_fails_cleanly(model_args: list[str], tmp_path: Path) -> None:
    """The installed entry point: real process, real exit codes, no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = [sys.executable, "-m", "dg_stream.cli"]
    ok = subprocess.run(
        [*exe, "generate", PROMPT, "--max-new-tokens", "6", *model_args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout
    bad = subprocess.run(
        [*exe, "chat", "--verifier", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_serve_command_passes_key_capacity_and_name_to_a_real_server() -> None:
    """`dg-stream serve` in a subprocess on a free loopback port, the embedded verifier."""
    import socket
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DG_STREAM_API_KEY": "sesame"}
    command = [
        sys.executable,
        "-m",
        "dg_stream.cli",
        "serve",
        "--port",
        str(port),
        "--drafter",
        "none",
        "--max-concurrent",
        "3",
        "--served-model-name",
        "demo",
    ]
    url = f"http://127.0.0.1:{port}"
    with subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as proc:
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    health = httpx.get(url + "/health", timeout=2).json()
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not start in 60 s"
                    time.sleep(0.2)
            assert health["model"] == "demo" and health["max_concurrent"] == 3
            assert httpx.get(url + "/v1/models").status_code == 401  # key from the environment
            models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sesame"})
            assert models.status_code == 200 and models.json()["data"][0]["id"] == "demo"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0  # Ctrl-C is a normal stop for a server


def test_adaptive_can_be_turned_off_against_a_checkpoint_recommendation() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["generate", "x", "--no-adaptive"]).adaptive is False
    assert parser.parse_args(["serve", "--adaptive"]).adaptive is True
    assert parser.parse_args(["generate", "x"]).adaptive is None  # the backend's default


def test_serve_passes_batching_limits_to_the_local_backend() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(
        ["serve", "--drafter", "none", "--max-batch", "3", "--max-cached-tokens", "5000"]
    )
    backend = cli._make_backend(args)
    assert backend.limits.max_batch == 3 and backend.limits.max_cached_tokens == 5000
    assert parser.parse_args(["serve"]).max_batch == 32
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-batch", "0"])


def test_generate_with_a_json_schema_prints_json_that_follows_it(
    model_args: list[str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"],
    }
    path = tmp_path / "reply.json"
    path.write_text(json.dumps(schema))
    argv = ["generate", PROMPT, "--max-new-tokens", "60", "--json-schema", str(path)]
    code, out, err = run_cli([*argv, *model_args], capsys)
    assert code == 0, err
    jsonschema.validate(json.loads(out), schema)
    path.write_text("[1, 2]")  # JSON, but no schema: refused before any model loads
    code, _, err = run_cli([*argv, *model_args], capsys)
    assert code == 2 and "not a schema" in err
