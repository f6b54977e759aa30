"""RemoteBackend as the client of vLLM and SGLang: their streams, replayed over real HTTP.

Each engine is a small app on loopback that answers as that engine's OpenAI-compatible server
does: ``/v1/models`` with its fields (``max_model_len``), 404 for routes it lacks (so
``api="auto"`` settles on the OpenAI protocol), and recorded ``text/event-stream`` answers in
its own chunk format: ``usage: null`` on every chunk or no ``usage`` key at all, vLLM's
``stop_reason`` and SGLang's ``matched_stop``, several tokens per chunk (a speculative engine
commits a block per step), a usage-only chunk with ``choices: []`` before ``data: [DONE]``
(``stream_options: {"include_usage": true}``), SGLang's ``reasoning_content`` deltas, an error
object in the middle of a stream and as its first event, SGLang's ``abort``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _servers import ServerThread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import dg_stream
from dg_stream import GenerationError, RemoteBackend, StreamInterruptedError, Usage

ROOT = Path(__file__).resolve().parent.parent
MODEL = "Qwen/Qwen3-8B"
CREATED = 1767225600


def sse(obj: Any) -> str:
    # Both engines write compact JSON, one event per ``data:`` line.
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


DONE = "data: [DONE]\n\n"


# -- vLLM ----------------------------------------------------------------------------------------


def vllm_text(text: str, finish: str | None = None, stop_reason: Any = None) -> str:
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": stop_reason,
    }
    return sse(
        {
            "id": "cmpl-9d3c2a51e0b74f6c",
            "object": "text_completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [choice],
            "usage": None,
        }
    )


def vllm_chat(delta: dict[str, Any], finish: str | None = None, usage: Any = "absent") -> str:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if finish is not None:
        choice["stop_reason"] = None
    body: dict[str, Any] = {
        "id": "chatcmpl-4e1f0b8a7c6d4b21",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [choice],
    }
    if usage != "absent":
        body["usage"] = usage
    return sse(body)


def vllm_usage(obj: str, prompt: int, completion: int) -> str:
    return sse(
        {
            "id": "cmpl-9d3c2a51e0b74f6c",
            "object": obj,
            "created": CREATED,
            "model": MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "total_tokens": prompt + completion,
                "completion_tokens": completion,
            },
        }
    )


def running(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }


def vllm_error(message: str, kind: str, code: int) -> str:
    # ErrorResponse(error=ErrorInfo(...)).model_dump(): the error object, then [DONE].
    return sse({"error": {"message": message, "type": kind, "param": None, "code": code}})


VLLM = {
    "models": {
        "object": "list",
        "data": [
            {
                "id": MODEL,
                "object": "model",
                "created": CREATED,
                "owned_by": "vllm",
                "root": MODEL,
                "parent": None,
                "max_model_len": 40960,
                "permission": [{"id": "modelperm-1", "object": "model_permission"}],
            }
        ],
    },
    # max_tokens 12: a block of tokens per step, the last chunk carries "length".
    "completion": [
        vllm_text("\n    if n < 2:"),
        vllm_text("\n        return n\n"),
        vllm_text("    return fib", "length"),
        vllm_usage("text_completion", 5, 12),
        DONE,
    ],
    "chat": [
        vllm_chat({"role": "assistant", "content": ""}),
        vllm_chat({"content": "Merge sort\nQuick"}),
        vllm_chat({"content": "sort\nHeapsort"}),
        vllm_chat({"content": ""}, "stop"),
        vllm_usage("chat.completion.chunk", 21, 9),
        DONE,
    ],
    "error_mid_stream": [
        vllm_text("\n    if n < 2:"),
        vllm_error("Internal server error", "InternalServerError", 500),
        DONE,
    ],
    "error_first": [
        vllm_error("This model's maximum context length is 40960 tokens.", "BadRequestError", 400),
        DONE,
    ],
    # stream_options.continuous_usage_stats: every chunk carries the usage so far.
    "continuous_usage": [
        vllm_chat({"role": "assistant", "content": ""}, usage=running(8, 0)),
        vllm_chat({"content": "Yes."}, usage=running(8, 2)),
        vllm_chat({"content": ""}, "stop", usage=running(8, 3)),
        vllm_usage("chat.completion.chunk", 8, 3),
        DONE,
    ],
}


# -- SGLang --------------------------------------------------------------------------------------


def sglang_text(text: str, finish: str | None = None, matched: Any = None) -> str:
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
        "matched_stop": matched,
    }
    return sse(
        {
            "id": "6f2b0c9d81e54a7f9b3c2d1e0a4f5b6c",
            "object": "text_completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [choice],
            "usage": None,
        }
    )


def sglang_chat(
    content: str | None,
    finish: str | None = None,
    *,
    role: str | None = None,
    reasoning: str | None = None,
) -> str:
    delta = {"role": role, "content": content, "reasoning_content": reasoning, "tool_calls": None}
    return sse(
        {
            "id": "0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                    "matched_stop": None if finish != "stop" else 151645,
                }
            ],
            "usage": None,
        }
    )


def sglang_usage(obj: str, prompt: int, completion: int) -> str:
    return sse(
        {
            "id": "6f2b0c9d81e54a7f9b3c2d1e0a4f5b6c",
            "object": obj,
            "created": CREATED,
            "model": MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": prompt,
                "total_tokens": prompt + completion,
                "completion_tokens": completion,
                "prompt_tokens_details": None,
            },
        }
    )


def sglang_error(message: str) -> str:
    # create_streaming_error_response: {"error": ErrorResponse(...).model_dump()}.
    return sse(
        {
            "error": {
                "object": "error",
                "message": message,
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        }
    )


SGLANG = {
    "models": {
        "object": "list",
        "data": [
            {
                "id": MODEL,
                "object": "model",
                "created": CREATED,
                "owned_by": "sglang",
                "root": MODEL,
                "max_model_len": 40960,
            }
        ],
    },
    # A stop string: SGLang names it in matched_stop; the text stops before it.
    "completion": [
        sglang_text("\n    if n < 2:"),
        sglang_text("\n        return n\n"),
        sglang_text("    return fib", "stop", "\n\n"),
        sglang_usage("text_completion", 5, 12),
        DONE,
    ],
    # With a reasoning parser the thinking comes as reasoning_content, the answer as content.
    "chat": [
        sglang_chat("", role="assistant"),
        sglang_chat(None, reasoning="The user wants three names."),
        sglang_chat("Merge sort\nQuick"),
        sglang_chat("sort\nHeapsort", "length"),
        sglang_usage("chat.completion.chunk", 21, 9),
        DONE,
    ],
    "error_mid_stream": [
        sglang_text("\n    if n < 2:"),
        sglang_error("The request was aborted: out of memory."),
        DONE,
    ],
    "error_first": [sglang_error("Input length (50000 tokens) exceeds the maximum allowed."), DONE],
    "abort": [
        sglang_chat("", role="assistant"),
        sglang_chat("Merge", "abort"),
        sglang_usage("chat.completion.chunk", 21, 1),
        DONE,
    ],
}

ENGINES = {"vllm": VLLM, "sglang": SGLANG}


class Replay:
    """One engine's server: ``/v1/models`` as it answers, recorded streams for completions and
    chat (the scenario set by the test), FastAPI's 404 for every other route."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.recorded = ENGINES[name]
        self.scenario = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.app = Starlette(routes=[Route("/{path:path}", self._route, methods=["GET", "POST"])])
        self.url = ""

    def play(self, scenario: str, path: str | None = None) -> None:
        for p in [path] if path else list(self.scenario):
            self.scenario[p] = scenario

    async def _route(self, request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw) if raw else {}
        path = request.url.path
        self.requests.append((request.method, path, body))
        if request.method == "GET" and path == "/v1/models":
            return JSONResponse(self.recorded["models"])
        if request.method == "POST" and path in self.scenario:
            frames = self.recorded[self.scenario[path]]

            async def stream() -> AsyncIterator[bytes]:
                for frame in frames:
                    yield frame.encode()

            return StreamingResponse(stream(), media_type="text/event-stream")
        return JSONResponse({"detail": "Not Found"}, status_code=404)

    @property
    def posts(self) -> list[tuple[str, dict[str, Any]]]:
        return [(path, body) for method, path, body in self.requests if method == "POST"]


def _serve(name: str) -> Iterator[Replay]:
    replay = Replay(name)
    with ServerThread(replay.app) as server:
        replay.url = server.url
        yield replay


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request: pytest.FixtureRequest) -> Iterator[Replay]:
    yield from _serve(request.param)


@pytest.fixture(scope="module")
def vllm() -> Iterator[Replay]:
    yield from _serve("vllm")


@pytest.fixture(scope="module")
def sglang() -> Iterator[Replay]:
    yield from _serve("sglang")


@pytest.fixture(autouse=True)
def _reset(request: pytest.FixtureRequest) -> None:
    for name in ("engine", "vllm", "sglang"):
        if name in request.fixturenames:
            replay = request.getfixturevalue(name)
            replay.requests.clear()
            replay.play("completion", "/v1/completions")
            replay.play("chat", "/v1/chat/completions")


async def complete(backend: RemoteBackend, prompt: Any, **options: Any) -> Any:
    """(the stream after its end, the chunks)."""
    chunks = []
    stream = dg_stream.generate(prompt, backend=backend, **options)
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
    return stream, chunks


def run(replay: Replay, prompt: Any, chat: bool | None = None, **options: Any) -> Any:
    """``complete`` against ``replay`` through an OpenAI-protocol backend of MODEL."""

    async def main() -> Any:
        extra = {} if chat is None else {"chat": chat}
        async with RemoteBackend(replay.url, MODEL, api="openai", **extra) as backend:
            return await complete(backend, prompt, **options)

    return anyio.run(main)


# -- text, finish reason, usage ------------------------------------------------------------------


def test_completion_stream(engine: Replay) -> None:
    async def main() -> Any:
        async with RemoteBackend(engine.url) as backend:  # api="auto", model from /v1/models
            stream, chunks = await complete(backend, "def fibonacci(n):", max_new_tokens=12)
            return stream, chunks, backend.model_name, backend.context_length

    stream, chunks, model, context = anyio.run(main)
    assert stream.text == "\n    if n < 2:\n        return n\n    return fib"
    assert [c.text for c in chunks[:3]] == [
        "\n    if n < 2:",
        "\n        return n\n",
        "    return fib",
    ]
    assert stream.finish_reason == ("length" if engine.name == "vllm" else "stop")
    assert stream.usage == Usage(prompt_tokens=5, completion_tokens=12)
    assert chunks[-1].finish_reason == stream.finish_reason and chunks[-1].usage == stream.usage
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert (model, context) == (MODEL, 40960)
    # Asked once: the native protocol (404 here), the model list, then the stream.
    gets = [path for method, path, _ in engine.requests if method == "GET"]
    assert gets == ["/v1/dg/info", "/v1/models"]
    [(path, body)] = engine.posts
    assert path == "/v1/completions"
    assert body["model"] == MODEL and body["prompt"] == "def fibonacci(n):"
    assert body["max_tokens"] == 12 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_chat_stream(engine: Replay) -> None:
    messages = [{"role": "user", "content": "Name three sorting algorithms, one per line."}]

    stream, _ = run(engine, messages, max_new_tokens=9, temperature=0.6, seed=1)
    # SGLang's reasoning_content is the model's thinking, not its answer: never in the text.
    assert stream.text == "Merge sort\nQuicksort\nHeapsort"
    assert stream.finish_reason == ("stop" if engine.name == "vllm" else "length")
    assert stream.usage == Usage(prompt_tokens=21, completion_tokens=9)
    [(path, body)] = engine.posts
    assert path == "/v1/chat/completions"
    assert body["messages"] == messages
    assert body["temperature"] == 0.6 and body["seed"] == 1
    assert body["stream_options"] == {"include_usage": True}


def test_continuous_usage_keeps_the_last(vllm: Replay) -> None:
    """vLLM's ``stream_options.continuous_usage_stats``: usage so far on every chunk."""
    vllm.play("continuous_usage")

    stream, _ = run(vllm, "Is 7 prime?", chat=True, max_new_tokens=3)
    assert stream.text == "Yes." and stream.finish_reason == "stop"
    assert stream.usage == Usage(prompt_tokens=8, completion_tokens=3)


def test_an_aborted_request_ends_cancelled(sglang: Replay) -> None:
    """SGLang's ``finish_reason: "abort"`` (the request was aborted on the server)."""
    sglang.play("abort")

    stream, _ = run(sglang, "Name a sort.", chat=True, max_new_tokens=9)
    assert stream.text == "Merge" and stream.finish_reason == "cancelled"
    assert stream.usage == Usage(prompt_tokens=21, completion_tokens=1)


# -- errors --------------------------------------------------------------------------------------


def test_an_error_mid_stream_keeps_the_text_so_far(engine: Replay) -> None:
    engine.play("error_mid_stream")

    with pytest.raises(StreamInterruptedError) as caught:
        run(engine, "def fibonacci(n):", max_new_tokens=12)
    assert caught.value.text == "\n    if n < 2:"
    expected = "Internal server error" if engine.name == "vllm" else "out of memory"
    assert expected in str(caught.value)
    assert len(engine.posts) == 1  # never retried once output had started


def test_an_error_as_the_first_event(engine: Replay) -> None:
    engine.play("error_first")

    with pytest.raises(GenerationError) as caught:
        run(engine, "x" * 100, max_new_tokens=12)
    assert not isinstance(caught.value, StreamInterruptedError)
    assert re.search(r"maximum (context length|allowed)", str(caught.value))
    assert len(engine.posts) == 1  # an error the server reported is not retried


# -- LangChain and the example -------------------------------------------------------------------


def test_langchain_over_the_engine(engine: Replay) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.prompts import ChatPromptTemplate

    from dg_stream.integrations.langchain import ChatDGStream

    async def main() -> Any:
        async with RemoteBackend(engine.url, api="openai") as backend:
            model = ChatDGStream(backend=backend, max_tokens=9)
            chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | model
            reply = None
            async for piece in chain.astream({"question": "Three sorts?"}):
                reply = piece if reply is None else reply + piece
            return reply

    reply = anyio.run(main)
    assert reply.content == "Merge sort\nQuicksort\nHeapsort"
    assert reply.usage_metadata["input_tokens"] == 21
    assert reply.usage_metadata["output_tokens"] == 9
    assert reply.response_metadata["model_name"] == MODEL
    [(path, body)] = engine.posts
    assert path == "/v1/chat/completions"
    assert body["messages"] == [{"role": "user", "content": "Three sorts?"}]


def test_the_example_against_the_engine(engine: Replay) -> None:
    pytest.importorskip("langchain_core")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "vllm_sglang_client.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "DG_STREAM_URL": engine.url,
            "DG_STREAM_MAX_NEW_TOKENS": "12",
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        },
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    finish = "length" if engine.name == "vllm" else "stop"
    assert out.startswith("\n    if n < 2:\n        return n\n    return fib\n")
    assert f"[model {MODEL}, context 40960, 12 tokens, finish={finish}]" in out
    assert "first line: 'Merge sort' (stop)" in out
    assert "Merge sort\nQuicksort\nHeapsort\n[langchain: 9 tokens, finish=" in out
    paths = [path for path, _ in engine.posts]
    assert paths == ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions"]
