"""RemoteBackend against scripted servers: small starlette apps on loopback that misbehave on
purpose (Mercury-style diffusing states, errors mid-stream, missing [DONE], retries, timeouts)."""

from __future__ import annotations

import email.utils
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import dg_stream
from dg_stream import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    Chunk,
    GenerationError,
    InvalidRequestError,
    OverloadedError,
    RemoteBackend,
    RemoteTimeout,
    StreamInterruptedError,
    Usage,
)
from dg_stream._backends._remote_transport import parse_retry_after

sys.path.insert(0, str(Path(__file__).parent))
from _servers import ServerThread

pytestmark = pytest.mark.anyio

Handler = Callable[[Request, dict[str, Any]], Any]


class Drop(Exception):
    """Raised inside a streaming body: uvicorn aborts the connection mid-response."""


class Script:
    """A catch-all app whose behaviour each test sets; it records every request it gets."""

    def __init__(self) -> None:
        self.handler: Handler = lambda request, body: JSONResponse({}, status_code=404)
        self.requests: list[tuple[str, str, dict[str, Any], dict[str, str]]] = []
        self.closed_streams = 0
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])])
        self.app = app

    async def _endpoint(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        self.requests.append((request.method, request.url.path, body, dict(request.headers)))
        result = self.handler(request, body)
        if isinstance(result, list):
            return self.sse(result)
        assert isinstance(result, Response)
        return result

    def sse(self, frames: list[Any]) -> StreamingResponse:
        """Frames: bytes/str to send, a float to sleep, ``Drop`` to cut the connection."""

        async def body() -> AsyncIterator[bytes]:
            try:
                for frame in frames:
                    if isinstance(frame, float):
                        await anyio.sleep(frame)
                    elif frame is Drop:
                        raise Drop("connection cut on purpose")
                    else:
                        yield frame.encode() if isinstance(frame, str) else frame
            finally:
                self.closed_streams += 1

        return StreamingResponse(body(), media_type="text/event-stream")

    @property
    def posts(self) -> list[tuple[str, dict[str, Any]]]:
        return [(path, body) for method, path, body, _ in self.requests if method == "POST"]


@pytest.fixture(scope="module")
def script() -> Any:
    s = Script()
    with ServerThread(s.app) as server:
        s.url = server.url  # type: ignore[attr-defined]
        yield s


@pytest.fixture(autouse=True)
def reset(request: pytest.FixtureRequest) -> None:
    if "script" in request.fixturenames:
        s = request.getfixturevalue("script")
        s.requests.clear()
        s.closed_streams = 0
        s.handler = lambda request, body: JSONResponse({}, status_code=404)


def data(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def text_chunk(text: str, finish: str | None = None) -> str:
    return data(
        {
            "id": "c",
            "object": "text_completion",
            "choices": [{"index": 0, "text": text, "finish_reason": finish}],
        }
    )


def chat_chunk(content: str | None, finish: str | None = None, role: str | None = None) -> str:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return data(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


USAGE = data(
    {
        "id": "c",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
)
DONE = "data: [DONE]\n\n"


def backend(script: Any, **options: Any) -> RemoteBackend:
    options.setdefault("api", "openai")
    options.setdefault("model", "m")
    options.setdefault("retry_backoff", 0.01)
    return RemoteBackend(script.url, **options)


async def chunks_of(b: RemoteBackend, prompt: Any = "hi", **options: Any) -> list[Chunk]:
    out = []
    async with dg_stream.generate(prompt, backend=b, **options) as stream:
        async for chunk in stream:
            out.append(chunk)
    return out


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the OpenAI protocol --------------------------------------------------------------------------


async def test_completions_stream_text_finish_and_usage(script: Any) -> None:
    script.handler = lambda r, b: [
        ": keep-alive\n\n",
        text_chunk("Hel"),
        text_chunk("lo ✓"),
        text_chunk("", "length"),
        USAGE,
        DONE,
    ]
    async with backend(script) as b:
        stream = dg_stream.generate(
            "say hi", backend=b, max_new_tokens=3, temperature=0.5, top_p=0.9, seed=7, stop=["\n"]
        )
        completion = await stream.collect()
    assert completion.text == "Hello ✓"
    assert completion.finish_reason == "length"
    assert completion.usage == Usage(prompt_tokens=5, completion_tokens=3)
    [(path, body)] = script.posts
    assert path == "/v1/completions"
    assert body == {
        "model": "m",
        "prompt": "say hi",
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_chat_messages_go_to_chat_completions(script: Any) -> None:
    script.handler = lambda r, b: [
        chat_chunk("", role="assistant"),
        chat_chunk("Hi"),
        chat_chunk(" there"),
        chat_chunk(None, "stop"),
        DONE,
    ]
    async with backend(script) as b:
        chunks = await chunks_of(b, [{"role": "user", "content": "hello"}])
    assert "".join(c.text for c in chunks) == "Hi there"
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage is None  # the server sent none
    [(path, body)] = script.posts
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "hello"}]


async def test_chat_option_wraps_text_prompts(script: Any) -> None:
    script.handler = lambda r, b: [chat_chunk("ok", "stop"), DONE]
    async with backend(script, chat=True) as b:
        assert "".join(c.text for c in await chunks_of(b, "question")) == "ok"
        with pytest.raises(InvalidRequestError):
            await chunks_of(b, [1, 2, 3])
    assert script.posts[0][1]["messages"] == [{"role": "user", "content": "question"}]


async def test_model_none_asks_the_server(script: Any) -> None:
    def handler(request: Request, body: dict[str, Any]) -> Any:
        if request.url.path == "/v1/models":
            return JSONResponse({"object": "list", "data": [{"id": "served-model"}]})
        return [text_chunk("x", "stop"), DONE]

    script.handler = handler
    async with RemoteBackend(script.url + "/v1/", api="auto") as b:
        await chunks_of(b)
        await chunks_of(b)
    paths = [path for _, path, _, _ in script.requests]
    # /v1/dg/info is not offered (404): OpenAI protocol; the model list is asked once.
    assert paths == ["/v1/dg/info", "/v1/models", "/v1/completions", "/v1/completions"]
    assert script.posts[0][1]["model"] == "served-model"


async def test_usage_only_chunk_and_empty_choices(script: Any) -> None:
    script.handler = lambda r, b: [
        data({"choices": []}),
        text_chunk("a"),
        text_chunk("b", "stop"),
        USAGE,
        DONE,
    ]
    async with backend(script) as b:
        chunks = await chunks_of(b)
    assert [c.text for c in chunks] == ["a", "b", ""]
    assert chunks[-1].usage == Usage(prompt_tokens=5, completion_tokens=3)


async def test_missing_done_after_finish_reason_is_accepted(script: Any) -> None:
    script.handler = lambda r, b: [text_chunk("abc"), text_chunk("", "stop")]
    async with backend(script) as b:
        chunks = await chunks_of(b)
    assert "".join(c.text for c in chunks) == "abc"
    assert chunks[-1].finish_reason == "stop"


async def test_end_without_finish_or_done_is_an_interruption(script: Any) -> None:
    script.handler = lambda r, b: [text_chunk("partial "), text_chunk("text")]
    async with backend(script) as b:
        with pytest.raises(StreamInterruptedError) as info:
            await chunks_of(b)
    assert info.value.text == "partial text"
    assert len(script.posts) == 1  # output had started: never retried


async def test_server_ignoring_stream_true_still_works(script: Any) -> None:
    script.handler = lambda r, b: JSONResponse(
        {
            "id": "x",
            "object": "text_completion",
            "choices": [{"index": 0, "text": "whole answer", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 2},
        }
    )
    async with backend(script) as b:
        chunks = await chunks_of(b)
    assert [c.text for c in chunks] == ["whole answer", ""]
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == Usage(prompt_tokens=2, completion_tokens=2)


# -- Mercury-style diffusing ----------------------------------------------------------------------

MERCURY_STATES = ["d?f ?dd(a, b)", "def add(a, b):\n    ret?rn", "def add(a, b):\n    return a + b"]


def mercury(request: Request, body: dict[str, Any]) -> list[Any]:
    assert body.get("diffusing") is True
    frames: list[Any] = [chat_chunk("", role="assistant")]
    frames += [chat_chunk(state) for state in MERCURY_STATES[:-1]]
    frames += [chat_chunk(MERCURY_STATES[-1], "stop"), USAGE, DONE]
    return frames


async def test_diffusing_states_become_drafts_and_the_last_is_committed(script: Any) -> None:
    script.handler = mercury
    async with backend(script, diffusing=True) as b:
        chunks = await chunks_of(b, [{"role": "user", "content": "add"}], draft_preview=True)
    assert [c.draft for c in chunks[:-1]] == MERCURY_STATES[:-1]
    assert all(c.text == "" for c in chunks[:-1])  # refining states are never committed
    assert chunks[-1].text == MERCURY_STATES[-1]
    assert chunks[-1].draft == ""
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].usage == Usage(prompt_tokens=5, completion_tokens=3)


async def test_diffusing_without_previews_yields_only_the_final_text(script: Any) -> None:
    script.handler = mercury
    async with backend(script, diffusing=True, chat=True) as b:
        chunks = await chunks_of(b, "add")
    assert [(c.text, c.draft) for c in chunks] == [(MERCURY_STATES[-1], "")]


async def test_diffusing_needs_the_openai_protocol(script: Any) -> None:
    async with RemoteBackend(script.url, api="dg", diffusing=True) as b:
        with pytest.raises(InvalidRequestError):
            await chunks_of(b)


# -- errors in the stream -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        'event: error\ndata: {"error": {"message": "GPU on fire", "type": "server_error"}}\n\n',
        'data: {"error": {"message": "GPU on fire", "type": "server_error"}}\n\n',
    ],
)
async def test_error_mid_stream_carries_the_text(script: Any, frame: str) -> None:
    script.handler = lambda r, b: [text_chunk("so "), text_chunk("far"), frame]
    async with backend(script) as b:
        with pytest.raises(StreamInterruptedError, match="GPU on fire") as info:
            await chunks_of(b)
    assert info.value.text == "so far"


async def test_error_event_before_output(script: Any) -> None:
    script.handler = lambda r, b: [
        'event: error\ndata: {"error": {"message": "bad stop", "type": '
        '"invalid_request_error", "param": "stop"}}\n\n'
    ]
    async with backend(script) as b:
        with pytest.raises(InvalidRequestError, match="bad stop") as info:
            await chunks_of(b)
        assert info.value.param == "stop"
        assert info.value.code is None  # the server sent none
        script.handler = lambda r, b: [
            data(
                {
                    "error": {
                        "message": "too long",
                        "type": "invalid_request_error",
                        "param": "max_tokens",
                        "code": "context_length_exceeded",
                    }
                }
            )
        ]
        with pytest.raises(InvalidRequestError, match="too long") as coded:
            await chunks_of(b)
        assert (coded.value.param, coded.value.code) == ("max_tokens", "context_length_exceeded")
        script.handler = lambda r, b: [data({"error": {"message": "oom"}})]
        with pytest.raises(GenerationError, match="oom") as failed:
            await chunks_of(b)
        assert not isinstance(failed.value, StreamInterruptedError)


async def test_connection_cut_after_output(script: Any) -> None:
    script.handler = lambda r, b: [text_chunk("abc"), 0.05, Drop]
    async with backend(script) as b:
        with pytest.raises(StreamInterruptedError) as info:
            await chunks_of(b)
    assert info.value.text == "abc"
    assert len(script.posts) == 1


async def test_garbage_is_a_protocol_error_not_a_crash(script: Any) -> None:
    script.handler = lambda r, b: ["data: {not json\n\n"]
    async with backend(script) as b:
        with pytest.raises(APIConnectionError, match="protocol"):
            await chunks_of(b)


# -- retries --------------------------------------------------------------------------------------


def failing_then_ok(statuses: list[int], headers: dict[str, str] | None = None) -> Handler:
    remaining = list(statuses)

    def handler(request: Request, body: dict[str, Any]) -> Any:
        if remaining:
            return JSONResponse(
                {"error": {"message": "busy", "type": "overloaded_error"}},
                status_code=remaining.pop(0),
                headers=headers,
            )
        return [text_chunk("fine", "stop"), DONE]

    return handler


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
async def test_retryable_statuses_are_retried(script: Any, status: int) -> None:
    script.handler = failing_then_ok([status, status])
    async with backend(script, max_retries=2) as b:
        assert "".join(c.text for c in await chunks_of(b)) == "fine"
    assert len(script.posts) == 3


async def test_retry_after_is_honoured(script: Any) -> None:
    script.handler = failing_then_ok([429], {"retry-after": "0.4"})
    async with backend(script, retry_backoff=5.0) as b:  # the header, not the backoff, decides
        started = time.monotonic()
        await chunks_of(b)
        elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 3.0


async def test_retries_exhausted_raise_overloaded_with_advice(script: Any) -> None:
    script.handler = failing_then_ok([503] * 5, {"retry-after": "0"})
    async with backend(script, max_retries=2) as b:
        with pytest.raises(OverloadedError) as info:
            await chunks_of(b)
    assert info.value.status_code == 503
    assert info.value.retry_after == 0
    assert info.value.body == {"error": {"message": "busy", "type": "overloaded_error"}}
    assert len(script.posts) == 3


async def test_too_long_retry_after_is_not_waited_for(script: Any) -> None:
    script.handler = failing_then_ok([503], {"retry-after": "3600"})
    async with backend(script, max_retries=2) as b:
        with pytest.raises(OverloadedError) as info:
            await chunks_of(b)
    assert info.value.retry_after == 3600
    assert len(script.posts) == 1


async def test_client_errors_are_not_retried(script: Any) -> None:
    script.handler = lambda r, b: JSONResponse(
        {
            "error": {
                "message": "max_tokens is too large",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": None,
            }
        },
        status_code=400,
    )
    async with backend(script) as b:
        with pytest.raises(BadRequestError) as info:
            await chunks_of(b)
        assert info.value.param == "max_tokens"
        assert info.value.code is None
        assert isinstance(info.value, InvalidRequestError)  # one except for local and remote
        script.handler = lambda r, b: JSONResponse(
            {
                "error": {
                    "message": "the prompt is too long",
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            },
            status_code=400,
        )
        with pytest.raises(BadRequestError) as coded:
            await chunks_of(b)
        assert (coded.value.param, coded.value.code) == ("messages", "context_length_exceeded")
        script.handler = lambda r, b: Response("nope", status_code=404)
        with pytest.raises(APIStatusError) as missing:
            await chunks_of(b)
        assert missing.value.status_code == 404
        assert "nope" in str(missing.value)
    assert len(script.posts) == 3


async def test_connection_cut_before_output_is_retried(script: Any) -> None:
    attempts = []

    def handler(request: Request, body: dict[str, Any]) -> Any:
        attempts.append(1)
        if len(attempts) == 1:
            return [chat_chunk("", role="assistant"), Drop]  # no text yet: safe to retry
        return [text_chunk("second time", "stop"), DONE]

    script.handler = handler
    async with backend(script) as b:
        assert "".join(c.text for c in await chunks_of(b)) == "second time"
    assert len(attempts) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_connection_refused_is_a_typed_error_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    b = RemoteBackend(url, api="openai", model="m", max_retries=2, retry_backoff=0.01)
    async with b:
        with pytest.raises(APIConnectionError) as info:
            await chunks_of(b)
    assert f"({url}/v1/completions)" in str(info.value)  # the URL that failed
    assert not isinstance(info.value.__cause__, type(None))
    assert isinstance(info.value.__cause__, httpx.ConnectError)  # kept as the cause only


def test_retry_after_header_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "3"})) == 3
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (parse_retry_after(httpx.Headers({"retry-after": future})) or 0) <= 31
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None


# -- timeouts -------------------------------------------------------------------------------------


async def test_first_chunk_timeout(script: Any) -> None:
    script.handler = lambda r, b: [1.5, text_chunk("late", "stop"), DONE]
    timeout = RemoteTimeout(connect=5, first_chunk=0.3, idle=5)
    async with backend(script, timeout=timeout) as b:
        started = time.monotonic()
        with pytest.raises(APITimeoutError, match="first chunk"):
            await chunks_of(b)
    assert time.monotonic() - started < 1.2
    assert len(script.posts) == 1


async def test_idle_timeout_after_output(script: Any) -> None:
    script.handler = lambda r, b: [text_chunk("early"), 1.5, text_chunk("late", "stop"), DONE]
    async with backend(script, timeout=RemoteTimeout(first_chunk=5, idle=0.3)) as b:
        with pytest.raises(StreamInterruptedError, match="idle") as info:
            await chunks_of(b)
    assert info.value.text == "early"
    assert isinstance(info.value.__cause__, APITimeoutError)


async def test_keepalive_comments_keep_an_idle_stream_alive(script: Any) -> None:
    frames: list[Any] = [text_chunk("a")]
    for _ in range(6):
        frames += [0.1, ": keep-alive\n\n"]
    script.handler = lambda r, b: [*frames, text_chunk("b", "stop"), DONE]
    async with backend(script, timeout=RemoteTimeout(first_chunk=5, idle=0.35)) as b:
        assert "".join(c.text for c in await chunks_of(b)) == "ab"


async def test_total_timeout(script: Any) -> None:
    frames: list[Any] = []
    for _ in range(20):
        frames += [text_chunk("x"), 0.1]
    script.handler = lambda r, b: [*frames, DONE]
    async with backend(script, timeout=RemoteTimeout(first_chunk=5, idle=5, total=0.5)) as b:
        started = time.monotonic()
        with pytest.raises(StreamInterruptedError, match="total") as info:
            await chunks_of(b)
    assert time.monotonic() - started < 1.5
    assert 1 <= len(info.value.text) < 20


# -- resources ------------------------------------------------------------------------------------


async def test_early_close_releases_connections(script: Any) -> None:
    endless: list[Any] = []
    for _ in range(200):
        endless += [text_chunk("tick "), 0.02]
    script.handler = lambda r, b: endless
    # Four connections at most: a leaked response would block the fifth stream until timeout.
    b = backend(script, max_connections=4, timeout=RemoteTimeout(first_chunk=5, idle=5))
    async with b:
        for _ in range(24):
            async with dg_stream.generate("go", backend=b) as stream:
                first = await stream.__anext__()
                assert first.text == "tick "
            assert stream.closed
    with anyio.fail_after(10):
        while script.closed_streams < 24:  # the server saw every response end
            await anyio.sleep(0.02)


async def test_breaking_out_of_the_loop_closes_the_response(script: Any) -> None:
    endless: list[Any] = []
    for _ in range(200):
        endless += [text_chunk("tick "), 0.02]
    script.handler = lambda r, b: endless
    async with backend(script) as b:
        async for chunk in dg_stream.generate("go", backend=b):
            assert chunk.text == "tick "
            break
        with anyio.fail_after(5):
            while script.closed_streams < 1:
                await anyio.sleep(0.02)


def test_invalid_configuration() -> None:
    with pytest.raises(InvalidRequestError):
        RemoteBackend("ftp://example.com")
    with pytest.raises(InvalidRequestError):
        RemoteBackend("http://127.0.0.1:1", api="grpc")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        RemoteBackend("http://127.0.0.1:1", timeout=-1)
    with pytest.raises(InvalidRequestError):
        RemoteBackend("http://127.0.0.1:1", max_retries=-1)


def test_api_key_from_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DG_STREAM_API_KEY", "from-env")
    assert RemoteBackend("http://h")._headers["authorization"] == "Bearer from-env"
    assert RemoteBackend("http://h", api_key="arg")._headers["authorization"] == "Bearer arg"


def test_import_does_not_need_torch() -> None:
    import subprocess

    code = (
        "import sys, dg_stream; b = dg_stream.RemoteBackend('http://127.0.0.1:1'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
