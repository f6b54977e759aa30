"""Stopping ``dg-stream serve`` with streams in flight: each ends with an error event that the
clients understand, generations that finish in time end normally, and the server exits cleanly
(no cancelled tasks, no traceback). Real servers on loopback, real clients."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

from dg_stream import Chunk, GenerationRequest, RemoteBackend, StreamInterruptedError, cli
from dg_stream.server import create_server

pytestmark = pytest.mark.anyio

SRC = str(Path(cli.__file__).resolve().parents[2])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Endless:
    """A backend whose generations never end on their own: a chunk every ``pause`` seconds,
    until ``finish`` is set (then a last chunk with ``finish_reason="length"``)."""

    tokenizer = None
    context_length = None
    model_name = "endless"

    def __init__(self, pause: float = 0.02) -> None:
        self.pause = pause
        self.finish = threading.Event()
        self.closed = 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        try:
            while not self.finish.is_set():
                yield Chunk(text="x", token_ids=(5,))
                await anyio.sleep(self.pause)
            yield Chunk(text="!", token_ids=(6,), finish_reason="length")
        finally:
            self.closed += 1

    async def aclose(self) -> None:
        return None


class Running:
    """``create_server`` in a thread: what ``serve`` runs, stopped as Ctrl-C stops it."""

    def __init__(self, backend: Any, shutdown_timeout: float) -> None:
        self.server = create_server(
            backend,
            port=0,
            log_level="info",
            log_config=None,  # records reach pytest's caplog
            shutdown_timeout=shutdown_timeout,
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True  # what uvicorn's SIGINT and SIGTERM handlers do

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.thread.join(timeout=60)


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_streams_in_flight_end_with_an_error_event_the_clients_understand(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    backend = Endless()
    outcomes: dict[str, Any] = {}
    with Running(backend, shutdown_timeout=0) as running:
        started = anyio.Event()
        reading: set[str] = set()

        def one_chunk_read(reader: str) -> None:
            reading.add(reader)
            if len(reading) == 3:  # every client is past its first chunk: stop the server
                started.set()

        async def via_openai() -> None:
            async with openai.AsyncOpenAI(
                base_url=running.url + "/v1", api_key="-", max_retries=0
            ) as client:
                stream = await client.completions.create(
                    model="endless", prompt="x", max_tokens=1500, stream=True
                )
                try:
                    async for _ in stream:
                        one_chunk_read("openai")
                except openai.APIError as exc:
                    outcomes["openai"] = exc

        async def via_remote_backend() -> None:
            async with RemoteBackend(running.url, max_retries=0) as remote:
                stream = remote.stream(GenerationRequest(prompt="x", max_new_tokens=1500))
                try:
                    async for _ in stream:  # type: ignore[attr-defined]
                        one_chunk_read("remote")
                except StreamInterruptedError as exc:
                    outcomes["remote"] = exc

        async def raw() -> None:
            body = {"model": "endless", "prompt": "x", "max_tokens": 1500, "stream": True}
            async with (
                httpx.AsyncClient(base_url=running.url, timeout=60) as client,
                client.stream("POST", "/v1/completions", json=body) as response,
            ):
                lines = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    one_chunk_read("raw")
                outcomes["raw"] = lines

        async with anyio.create_task_group() as tg:
            for reader in (via_openai, via_remote_backend, raw):
                tg.start_soon(reader)
            await started.wait()
            running.stop()
        running.thread.join(timeout=60)
        assert not running.thread.is_alive(), "the server did not exit"

    assert "shutting down" in str(outcomes["openai"])
    assert "shutting down" in str(outcomes["remote"]) and outcomes["remote"].text.startswith("x")
    raw_lines = [line for line in outcomes["raw"] if line]
    assert raw_lines[-2] == "event: error"
    error = json.loads(raw_lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    assert backend.closed == 3  # every generation's work was closed
    assert problems(caplog) == []  # no cancelled tasks, no "Exception in ASGI application"


async def test_generations_that_finish_in_the_grace_time_end_normally(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    backend = Endless()
    with Running(backend, shutdown_timeout=120) as running:
        app_server = running.server.config.app.state.server
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            idle = httpx.AsyncClient(base_url=running.url, timeout=60)
            assert (await idle.get("/health")).status_code == 200  # a kept-alive connection
            body = {"model": "endless", "prompt": "x", "max_tokens": 1500, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                lines = response.aiter_lines()
                assert (await lines.__anext__()).startswith("data: ")
                running.stop()
                while not app_server.stopping:
                    await anyio.sleep(0.01)
                # While draining, new generations are refused, politely.
                refused = await idle.post("/v1/completions", json={**body, "stream": False})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "server_shutting_down"
                assert refused.headers["retry-after"]
                await idle.aclose()
                backend.finish.set()  # the generation now ends by itself
                rest = [line async for line in lines if line]
        running.thread.join(timeout=60)
        assert not running.thread.is_alive()
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]
    assert problems(caplog) == []


SCRIPT = textwrap.dedent(
    """
    import contextlib, sys
    sys.path.insert(0, {tests!r})
    from test_shutdown import Endless
    from dg_stream.server import serve

    with contextlib.suppress(KeyboardInterrupt):  # as dg-stream serve does
        serve(Endless(), port={port}, shutdown_timeout=0, log_level="info")
    """
)


def test_ctrl_c_on_a_real_process_is_a_clean_exit(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = SCRIPT.format(tests=str(Path(__file__).parent), port=port)
    env = {**os.environ, "PYTHONPATH": SRC}
    url = f"http://127.0.0.1:{port}"
    with subprocess.Popen(
        [sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None
                try:
                    httpx.get(url + "/health", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the server did not start"
                    time.sleep(0.1)
            body = {"model": "endless", "prompt": "x", "max_tokens": 1500, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGINT)
                rest = [line for line in lines if line]
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert rest[-2:] == [
        "event: error",
        'data: {"error":{"message":"the server is shutting down: retry the request later or '
        'elsewhere","type":"server_error","param":null,"code":"server_shutting_down"}}',
    ]
    assert proc.returncode == 0
    assert "Traceback" not in stderr and "ERROR" not in stderr, stderr
    assert "Cancel" not in stderr, stderr


def test_the_drain_time_is_an_option_of_dg_stream_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    import dg_stream.server

    seen: dict[str, Any] = {}
    monkeypatch.setattr(dg_stream.server, "serve", lambda backend, **kw: seen.update(kw))
    monkeypatch.setattr(cli._serve, "make_backend", lambda args: Endless())
    assert cli.main(["serve", "--shutdown-timeout", "0.5"]) == 0
    assert seen["shutdown_timeout"] == 0.5
    assert cli.main(["serve"]) == 0
    assert seen["shutdown_timeout"] == 5.0
    assert cli.main(["serve", "--shutdown-timeout", "-1"]) == 2
