"""``dg-stream serve`` end to end: a real uvicorn server on loopback over the tiny models, driven
by the official ``openai`` client, by ``RemoteBackend`` (both protocols) and by raw httpx."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest

import dg_stream
from dg_stream import (
    Chunk,
    GenerationError,
    GenerationRequest,
    InvalidRequestError,
    LocalBackend,
    OverloadedError,
    RemoteBackend,
    RemoteTimeout,
    StreamInterruptedError,
)
from dg_stream.server import create_app
from dg_stream.server.app import STATIC_DIR, public_model_name

sys.path.insert(0, str(Path(__file__).parent))
from _servers import ServerThread

pytestmark = pytest.mark.anyio

MODEL = "tiny"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class PacedBackend:
    """The real tiny backend, with each step taking at least ``delay`` seconds (a stand-in for a
    big model); counts the steps it pulled and notes when each generation's work ended."""

    def __init__(self, inner: LocalBackend, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.steps = 0
        self.ended = threading.Event()
        self.fail_after: int | None = None  # raise GenerationError after this many chunks
        self.context_length = inner.context_length
        self.tokenizer = inner.tokenizer
        self.model_name = inner.model_name

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        source = self.inner.stream(request)
        try:
            sent = 0
            async for chunk in source:  # type: ignore[attr-defined]
                self.steps += 1
                await anyio.sleep(self.delay)
                if self.fail_after is not None and sent >= self.fail_after:
                    raise GenerationError("the model crashed on purpose")
                yield chunk
                sent += 1
        finally:
            await source.aclose()  # type: ignore[attr-defined]
            self.ended.set()

    async def aclose(self) -> None:
        return None


@pytest.fixture(scope="module")
def local(tiny_verifier: Any, tiny_drafter: Any, tiny_tok: Any) -> LocalBackend:
    return LocalBackend(tiny_verifier, tiny_drafter, tokenizer=tiny_tok, block_size=4)


@pytest.fixture(scope="module")
def server(local: LocalBackend) -> Any:
    with ServerThread(create_app(local, model_name=MODEL, max_concurrent=48)) as s:
        s.app_state = s.server.config.app.state.server  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def paced(local: LocalBackend) -> Any:
    backend = PacedBackend(local, delay=0.05)
    app = create_app(
        backend, model_name=MODEL, max_concurrent=2, keepalive_seconds=0.1, retry_after_seconds=2
    )
    with ServerThread(app) as s:
        s.backend = backend  # type: ignore[attr-defined]
        yield s


@pytest.fixture
def paced_backend(paced: Any) -> PacedBackend:
    backend: PacedBackend = paced.backend
    backend.delay, backend.fail_after, backend.steps = 0.05, None, 0
    backend.ended.clear()
    return backend


async def local_text(local: LocalBackend, prompt: Any, n: int, **options: Any) -> str:
    return (
        await dg_stream.generate(prompt, backend=local, max_new_tokens=n, **options).collect()
    ).text


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def sse_events(raw: str) -> list[str]:
    return [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]


# -- the official openai client -------------------------------------------------------------------


async def test_openai_completions(server: Any, local: LocalBackend) -> None:
    expected = await local_text(local, "def add(a, b):", 12)
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused") as client:
        whole = await client.completions.create(
            model=MODEL, prompt="def add(a, b):", max_tokens=12, temperature=0
        )
        assert whole.choices[0].text == expected
        assert whole.choices[0].finish_reason in ("length", "stop")
        assert whole.usage is not None and whole.usage.completion_tokens <= 12

        stream = await client.completions.create(
            model=MODEL,
            prompt="def add(a, b):",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, finishes, usage = [], [], None
        async for event in stream:
            if event.choices:
                pieces.append(event.choices[0].text)
                finishes.append(event.choices[0].finish_reason)
            else:
                usage = event.usage
        assert "".join(pieces) == expected
        assert finishes[-1] in ("length", "stop") and all(f is None for f in finishes[:-1])
        assert usage is not None
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_openai_chat(server: Any, local: LocalBackend) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = await local_text(local, messages, 10, stop=["\n\nUser:"])
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused") as client:
        whole = await client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=10,
            temperature=0,
        )
        assert whole.choices[0].message.content == expected
        assert whole.choices[0].message.role == "assistant"

        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_completion_tokens=10,
            temperature=0,
            stream=True,
        )
        events = [event async for event in stream]
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == expected
    assert events[-1].choices[0].finish_reason in ("length", "stop")
    assert all(e.usage is None for e in events)  # include_usage was not asked for


async def test_openai_client_sees_typed_errors(server: Any) -> None:
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0
    ) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=4, n=2)
        assert info.value.body == {
            "message": "n > 1 is not supported; send separate requests",
            "type": "invalid_request_error",
            "param": "n",
            "code": "unsupported_parameter",
        }
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]


# -- RemoteBackend against the real server --------------------------------------------------------


async def test_remote_native_matches_local_chunk_for_chunk(
    server: Any, local: LocalBackend
) -> None:
    prompt, n = "class Stack:", 16
    options: dict[str, Any] = {"draft_preview": True, "block_size": 3}
    expected = [
        c async for c in dg_stream.generate(prompt, backend=local, max_new_tokens=n, **options)
    ]
    async with RemoteBackend(server.url) as remote:  # api="auto" finds the native protocol
        got = [
            c async for c in dg_stream.generate(prompt, backend=remote, max_new_tokens=n, **options)
        ]
        assert remote.server_info is not None and remote.server_info.model == MODEL

    def shape(c: Chunk) -> tuple[Any, ...]:  # everything but wall-clock timings
        step = c.step and (c.step.drafted, c.step.accepted, c.step.committed)
        return (c.text, c.token_ids, c.draft, c.finish_reason, step, c.usage)

    assert [shape(c) for c in got] == [shape(c) for c in expected]
    assert any(c.draft for c in got)  # previews crossed the wire
    final = got[-1].stats
    assert final is not None and final.verifier_calls == len(got)
    assert final.committed_tokens == sum(len(c.token_ids) for c in got)


async def test_remote_openai_protocol(server: Any, local: LocalBackend) -> None:
    expected = await local_text(local, "print(", 12, seed=3)
    async with RemoteBackend(server.url + "/v1", api="openai") as remote:
        got = await dg_stream.generate(
            "print(", backend=remote, max_new_tokens=12, seed=3
        ).collect()
        chat = await dg_stream.generate(
            [{"role": "user", "content": "hey"}], backend=remote, max_new_tokens=6
        ).collect()
    assert got.text == expected
    assert got.usage is not None and got.usage.completion_tokens <= 12
    assert chat.finish_reason in ("stop", "length")
    assert chat.text == await local_text(
        local, [{"role": "user", "content": "hey"}], 6, stop=["\n\nUser:"]
    )


@pytest.mark.parametrize("api", ["auto", "dg", "openai"])
async def test_remote_backend_learns_the_servers_context_length_and_model(
    server: Any, local: LocalBackend, api: Any
) -> None:
    assert local.context_length == local.verifier.max_length == 512
    async with RemoteBackend(server.url, api=api) as remote:
        assert isinstance(remote, dg_stream.Backend) and isinstance(local, dg_stream.Backend)
        assert (remote.context_length, remote.model_name, remote.tokenizer) == (None, None, None)
        await dg_stream.generate("x", backend=remote, max_new_tokens=2).collect()
        assert (remote.context_length, remote.model_name) == (local.context_length, MODEL)
        assert remote.tokenizer is None  # the server tokenizes
        # A server in front of the remote backend reports what it learned.
        with ServerThread(create_app(remote)) as proxy:
            async with httpx.AsyncClient(base_url=proxy.url) as client:
                card = (await client.get("/v1/models")).json()["data"][0]
                info = (await client.get("/v1/dg/info")).json()
        assert (card["id"], card["max_model_len"]) == (MODEL, 512)
        assert info["max_context"] == 512
    async with RemoteBackend(server.url, "named-by-me", api="openai") as remote:
        assert remote.model_name == "named-by-me"  # the model asked for, not looked up


async def test_32_concurrent_streams_each_get_their_own_text(
    server: Any, local: LocalBackend
) -> None:
    prompts = [f"def f{i}(x):" if i % 2 else f"print('{i}')" for i in range(16)]
    expected = {p: await local_text(local, p, 8) for p in prompts}
    assert len(set(expected.values())) >= 8  # the texts differ, so a mix-up would show
    results: dict[int, str] = {}
    before = httpx.get(server.url + "/metrics").text
    started = time.monotonic()
    async with (
        RemoteBackend(server.url, api="dg") as native,
        RemoteBackend(server.url, api="openai") as compatible,
    ):

        async def one(i: int) -> None:
            backend = native if i % 2 else compatible
            stream = dg_stream.generate(prompts[i % 16], backend=backend, max_new_tokens=8)
            results[i] = (await stream.collect()).text

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(32):
                    tg.start_soon(one, i)
    assert len(results) == 32
    for i, text in results.items():
        assert text == expected[prompts[i % 16]], f"stream {i}"
    print(f"32 concurrent streams in {time.monotonic() - started:.2f}s")
    health = httpx.get(server.url + "/health").json()
    assert health["active_generations"] == 0
    # They ran in shared rounds: many generations per verifier forward pass.
    after = httpx.get(server.url + "/metrics").text
    steps = [metric(t, "dg_stream_verifier_calls_total") for t in (before, after)]
    rounds = [metric(t, "dg_stream_rounds_total") for t in (before, after)]
    assert (steps[1] - steps[0]) / max(1.0, rounds[1] - rounds[0]) > 4


async def test_remote_under_trio(server: Any, local: LocalBackend) -> None:
    expected = await local_text(local, "def add(a, b):", 8)

    async def main() -> str:
        async with RemoteBackend(server.url) as remote:
            return (
                await dg_stream.generate(
                    "def add(a, b):", backend=remote, max_new_tokens=8
                ).collect()
            ).text

    assert await anyio.to_thread.run_sync(lambda: anyio.run(main, backend="trio")) == expected


async def test_many_early_closed_streams_leak_nothing(server: Any) -> None:
    async with RemoteBackend(
        server.url, max_connections=3, timeout=RemoteTimeout(first_chunk=20, idle=20)
    ) as remote:
        for _i in range(20):
            async with dg_stream.generate(
                "def add(a, b):", backend=remote, max_new_tokens=200
            ) as stream:
                await stream.__anext__()
        # The pool of three would be exhausted by the fourth leaked response.
        assert (await dg_stream.generate("x", backend=remote, max_new_tokens=2).collect()).text
    with anyio.fail_after(20):
        while httpx.get(server.url + "/health").json()["active_generations"]:
            await anyio.sleep(0.05)


# -- disconnects, overload, keep-alive ------------------------------------------------------------


async def test_client_disconnect_stops_generation_within_a_step(
    paced: Any, paced_backend: PacedBackend
) -> None:
    body = {"prompt": "def add(a, b):", "max_new_tokens": 300}
    received = 0
    async with httpx.AsyncClient(base_url=paced.url, timeout=10) as client:
        async with client.stream("POST", "/v1/dg/generate", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    received += 1
                    if received == 3:
                        break
        closed_at = paced_backend.steps
    # The model work ends within one step of the disconnect, far from the 300 tokens asked.
    assert await anyio.to_thread.run_sync(paced_backend.ended.wait, 5)
    assert paced_backend.steps <= closed_at + 1
    assert paced_backend.steps < 100  # (the server may have run ahead into socket buffers)
    text = httpx.get(paced.url + "/metrics").text
    assert metric(text, "dg_stream_generations_active") == 0
    assert metric(text, "dg_stream_client_disconnects_total") >= 1
    # ... and the server keeps serving.
    async with RemoteBackend(paced.url) as remote:
        assert (
            await dg_stream.generate("x", backend=remote, max_new_tokens=3).collect()
        ).finish_reason in ("stop", "length")


async def test_openai_client_closing_a_stream_stops_generation(
    paced: Any, paced_backend: PacedBackend
) -> None:
    async with openai.AsyncOpenAI(base_url=paced.url + "/v1", api_key="unused") as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=300, stream=True
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        closed_at = paced_backend.steps
    assert await anyio.to_thread.run_sync(paced_backend.ended.wait, 5)
    assert paced_backend.steps <= closed_at + 1
    assert paced_backend.steps < 100  # far from the 300 tokens asked


async def test_overload_is_refused_with_retry_after(
    paced: Any, paced_backend: PacedBackend
) -> None:
    body = {"prompt": "def add(a, b):", "max_new_tokens": 300}
    async with (
        httpx.AsyncClient(base_url=paced.url, timeout=10) as client,
        client.stream("POST", "/v1/dg/generate", json=body) as one,
        client.stream("POST", "/v1/dg/generate", json=body) as two,
    ):
        assert one.status_code == two.status_code == 200
        refused = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["type"] == "overloaded_error"
        async with RemoteBackend(paced.url, max_retries=0) as remote:
            with pytest.raises(OverloadedError) as info:
                await dg_stream.generate("x", backend=remote, max_new_tokens=2).collect()
            assert info.value.retry_after == 2
    with anyio.fail_after(10):
        while httpx.get(paced.url + "/health").json()["active_generations"]:
            await anyio.sleep(0.05)
    assert metric(httpx.get(paced.url + "/metrics").text, "dg_stream_rejected_overload_total") >= 2
    async with RemoteBackend(paced.url, max_retries=0) as remote:
        assert await dg_stream.generate("x", backend=remote, max_new_tokens=2).collect()


async def test_keepalive_comments_during_long_pauses(
    paced: Any, paced_backend: PacedBackend
) -> None:
    paced_backend.delay = 0.35  # slower than the 0.1 s keep-alive interval
    async with httpx.AsyncClient(base_url=paced.url, timeout=10) as client:
        response = await client.post(
            "/v1/dg/generate", json={"prompt": "def add(a, b):", "max_new_tokens": 3}
        )
    assert response.status_code == 200
    assert response.text.count(": keep-alive\n\n") >= 2
    events = [json.loads(e) for e in sse_events(response.text)]
    assert events[-1]["chunk"]["finish_reason"] in ("stop", "length")
    # RemoteBackend reads through them, with an idle limit shorter than the pauses.
    async with RemoteBackend(paced.url, timeout=RemoteTimeout(first_chunk=10, idle=0.3)) as remote:
        completion = await dg_stream.generate(
            "def add(a, b):", backend=remote, max_new_tokens=3
        ).collect()
    assert completion.finish_reason in ("stop", "length")


async def test_error_mid_stream(paced: Any, paced_backend: PacedBackend) -> None:
    paced_backend.fail_after = 2
    async with RemoteBackend(paced.url) as remote:
        stream = dg_stream.generate("def add(a, b):", backend=remote, max_new_tokens=50)
        with pytest.raises(StreamInterruptedError, match="crashed on purpose") as info:
            await stream.collect()
    assert info.value.text == stream.text and len(stream.text) > 0
    paced_backend.fail_after = 2
    async with openai.AsyncOpenAI(base_url=paced.url + "/v1", api_key="unused") as client:
        # Greedy: OpenAI's default temperature 1 could end the text before the failure.
        chunks = await client.completions.create(
            model=MODEL, prompt="def add(a, b):", max_tokens=50, stream=True, temperature=0
        )
        with pytest.raises(openai.APIError, match="crashed on purpose"):
            async for _ in chunks:
                pass


# -- bad requests ---------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/dg/generate", b'{"prompt": "x", ', None, "invalid_json"),
    ("/v1/dg/generate", b"", None, "invalid_json"),
    ("/v1/dg/generate", b'["x"]', None, "invalid_type"),
    ("/v1/dg/generate", b'{"prompt": "x", "colour": 1}', "colour", "unknown_field"),
    (
        "/v1/dg/generate",
        b'{"prompt": "x", "sampling": {"tempreature": 1}}',
        "sampling.tempreature",
        "unknown_field",
    ),
    (
        "/v1/dg/generate",
        b'{"prompt": "x", "max_new_tokens": "ten"}',
        "max_new_tokens",
        "invalid_type",
    ),
    ("/v1/dg/generate", b'{"prompt": "x", "max_new_tokens": 0}', "max_new_tokens", "invalid_value"),
    (
        "/v1/dg/generate",
        b'{"prompt": "x", "max_new_tokens": 100000}',
        "max_new_tokens",
        "context_length_exceeded",
    ),
    (
        "/v1/dg/generate",
        b'{"prompt": "x", "sampling": {"temperature": -1}}',
        "sampling.temperature",
        "invalid_value",
    ),
    ("/v1/dg/generate", b'{"prompt": [99999]}', "prompt", "invalid_value"),
    ("/v1/dg/generate", b'{"max_new_tokens": 3}', "prompt", "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "max_tokens", "invalid_value"),
    (
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": 100000}',
        "max_tokens",
        "context_length_exceeded",
    ),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1.5}', "max_tokens", "invalid_type"),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', "temperature", "invalid_type"),
    ("/v1/completions", b'{"prompt": "x", "n": 3}', "n", "unsupported_parameter"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 2}', "logprobs", "unsupported_parameter"),
    (
        "/v1/completions",
        b'{"prompt": "x", "presence_penalty": 1}',
        "presence_penalty",
        "unsupported_parameter",
    ),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', "prompt", "unsupported_parameter"),
    ("/v1/completions", b'{"prompt": ""}', "prompt", "invalid_value"),
    ("/v1/completions", b'{"max_tokens": 3}', "prompt", "missing_field"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', "top_p", "invalid_value"),
    ("/v1/completions", b'{"prompt": "x", "stop": [""]}', "stop", "invalid_value"),
    ("/v1/chat/completions", b'{"messages": []}', "messages", "invalid_value"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"content": "hi"}]}',
        "messages[0].role",
        "missing_field",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
        "messages[0].content",
        "unsupported_parameter",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{}]}',
        "tools[0]",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
        b'"function": {"name": "f"}}], "tool_choice": {"type": "function", "function": '
        b'{"name": "g"}}}',
        "tool_choice",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
        b'"function": {"name": "f"}}]}',
        "tool_choice",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]}',
        "functions",
        "unsupported_parameter",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -2}',
        "max_completion_tokens",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]}',
        "messages[1].role",
        "invalid_value",
    ),
    (
        "/v1/dg/generate",
        b'{"messages": [{"role": "wizard", "content": "y"}]}',
        "messages[0]",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi\\ud800"}]}',
        None,
        "invalid_json",
    ),
]


@pytest.mark.parametrize(("path", "body", "param", "code"), BAD_REQUESTS)
async def test_bad_requests_are_400_with_an_error_body(
    server: Any, path: str, body: bytes, param: str | None, code: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        for stream in (False, True):
            content = body
            if stream and path != "/v1/dg/generate" and body.startswith(b"{"):
                content = body.replace(b"{", b'{"stream": true, ', 1)
            response = await client.post(
                path, content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code in (400, 422), response.text
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert (error["param"], error["code"]) == (param, code), error
            assert error["message"] and "Traceback" not in error["message"]
            if param and param.startswith("max_"):  # the endpoint's own name in the message
                assert re.search(rf"\b{param}\b", error["message"]), error
            if path != "/v1/dg/generate":
                assert "max_new_tokens" not in error["message"], error


@pytest.mark.parametrize(
    ("content", "escape"),
    [(b"hi\\ud800", "\\ud800"), (b"\\udc00!", "\\udc00"), (b"\\ud83d\\u0041", "\\ud83d")],
)
async def test_an_unpaired_surrogate_is_named_as_such(
    server: Any, content: bytes, escape: str
) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + content + b'"}]}'
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert f"{escape} at byte" in message and "unpaired UTF-16 surrogate" in message, message
    assert "truncated" not in message


class Refusing:
    """A backend that refuses every request with ``error`` before any output (as a backend
    does for a request it cannot run)."""

    context_length = None
    tokenizer = None
    model_name = "refusing"

    def __init__(self) -> None:
        self.error: Exception = InvalidRequestError("unset")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        raise self.error
        yield Chunk()  # pragma: no cover - an async generator that fails when first read

    async def aclose(self) -> None:
        return None


async def test_error_code_is_the_errors_own_not_read_from_its_message() -> None:
    backend = Refusing()
    cases = [
        # Mentions "context" but is no context-length error: only a code says that.
        (
            InvalidRequestError("the context of this stop string is wrong", param="stop"),
            "stop",
            "invalid_value",
        ),
        (
            InvalidRequestError(
                "too long for the context", param="max_new_tokens", code="context_length_exceeded"
            ),
            "max_tokens",
            "context_length_exceeded",
        ),
        (
            InvalidRequestError("no such thing", param="max_new_tokens", code="custom_code"),
            "max_tokens",
            "custom_code",
        ),
    ]
    with ServerThread(create_app(backend)) as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            for error, param, code in cases:
                backend.error = error
                for stream in (False, True):
                    response = await client.post(
                        "/v1/completions", json={"prompt": "x", "max_tokens": 4, "stream": stream}
                    )
                    assert response.status_code == 400, response.text
                    body = response.json()["error"]
                    assert (body["param"], body["code"]) == (param, code), body
                native = await client.post("/v1/dg/generate", json={"prompt": "x"})
                assert native.status_code == 400, native.text
                assert native.json()["error"]["code"] == code


async def test_other_http_errors_are_json_too(server: Any) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        missing = await client.get("/v2/nothing")
        wrong_method = await client.get("/v1/completions")
        wrong_model = await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
        huge = await client.post(
            "/v1/dg/generate", content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}'
        )
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "http_404"
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    assert wrong_model.status_code == 404
    assert wrong_model.json()["error"]["code"] == "model_not_found"
    assert huge.status_code == 413


async def test_api_key(local: LocalBackend) -> None:
    with ServerThread(create_app(local, model_name=MODEL, api_key="sesame")) as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            refused = await client.post("/v1/completions", json={"prompt": "x"})
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "authentication_error"
            assert (await client.get("/health")).status_code == 200  # probes need no key
        async with RemoteBackend(s.url, api_key="sesame") as remote:
            assert await dg_stream.generate("x", backend=remote, max_new_tokens=2).collect()


# -- operations -----------------------------------------------------------------------------------


async def test_health_models_metrics_and_index(server: Any) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        health = (await client.get("/health")).json()
        models = (await client.get("/v1/models")).json()
        one = await client.get(f"/v1/models/{MODEL}")
        await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4})
        metrics = await client.get("/metrics")
        index = await client.get("/")
        favicon = await client.get("/favicon.ico")
    assert favicon.status_code == 204  # not a 404 in the browser's console
    assert health["status"] == "ok" and health["model"] == MODEL
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 512
    assert one.json()["id"] == MODEL
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+", line)
    calls = metric(text, "dg_stream_verifier_calls_total")
    accepted = metric(text, "dg_stream_accepted_tokens_total")
    assert calls > 0
    assert metric(text, "dg_stream_mean_accepted_per_call") == pytest.approx(accepted / calls)
    assert metric(text, "dg_stream_completion_tokens_total") >= 4
    assert 'dg_stream_http_requests_total{endpoint="/v1/completions",status="200"}' in text
    # Every outcome counted is one the HELP line explains.
    help_line = next(
        line for line in text.splitlines() if line.startswith("# HELP dg_stream_generations_total")
    )
    for outcome in re.findall(r'dg_stream_generations_total\{[^}]*outcome="(\w+)"', text):
        assert re.search(rf"\b{outcome}\b", help_line), outcome
    for outcome in ("stop", "length", "cancelled", "error", "rejected", "disconnected"):
        assert re.search(rf"\b{outcome}\b", help_line), outcome
    assert index.status_code == 200
    if (STATIC_DIR / "index.html").is_file():
        assert index.headers["content-type"].startswith("text/html")
    else:
        assert "/v1/chat/completions" in index.json()["endpoints"]


async def test_the_chat_page_has_a_field_for_the_api_key(local: LocalBackend) -> None:
    """Without one, a server started with --api-key answers every message of the page 401.
    (tests/test_chat_page.py drives it in a browser where one is installed.)"""
    with ServerThread(create_app(local, api_key="sesame")) as keyed:
        async with httpx.AsyncClient(base_url=keyed.url) as client:
            page = (await client.get("/")).text
    assert re.search(r'<input type="password" id="api-key"', page)
    assert "sessionStorage" in page and "localStorage" not in page  # this tab only
    assert "authorization: `Bearer ${key}`" in page
    assert page.count("...authHeaders()") + page.count("headers: authHeaders()") == 2


async def test_the_model_id_is_the_folder_name_not_the_servers_path(
    tmp_path: Path, tiny_verifier: Any, tiny_tok: Any
) -> None:
    folder = tmp_path / "models" / "my-coder"
    tiny_verifier.save_pretrained(folder)
    tiny_tok.save_pretrained(folder)
    backend = LocalBackend(str(folder), None)
    assert public_model_name(backend) == "my-coder"
    with ServerThread(create_app(backend)) as s:
        async with httpx.AsyncClient(base_url=s.url) as client:
            answers = [
                await client.get("/v1/models"),
                await client.get("/health"),
                await client.get("/v1/dg/info"),
                await client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}),
                await client.get("/"),
            ]
    assert answers[0].json()["data"][0]["id"] == "my-coder"
    assert answers[1].json()["model"] == "my-coder"
    assert "'my-coder'" in answers[3].json()["error"]["message"]
    for answer in answers:
        assert str(tmp_path) not in answer.text and "/models/" not in answer.text
