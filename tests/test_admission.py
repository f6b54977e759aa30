"""One admission authority: a local backend's engine decides whether a request fits, once,
with one error, on every surface (``generate()``, ``backend.stream``, the server); the prompt
is tokenized once per request."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from _servers import ServerThread

import dg_stream
import dg_stream._engine
import dg_stream._prompt
from dg_stream import GenerationRequest, InvalidRequestError, LocalBackend
from dg_stream.server import create_app

MODEL = "tiny"
CONTEXT = 48  # max_cached_tokens: the backend's context_length


@pytest.fixture(scope="module")
def backend(tiny_verifier: Any, tiny_tok: Any) -> LocalBackend:
    return LocalBackend(
        tiny_verifier, "ngram", tokenizer=tiny_tok, block_size=4, max_cached_tokens=CONTEXT
    )


@pytest.fixture
def encodings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every tokenization of a prompt, wherever it happens."""
    calls: list[int] = []
    original = dg_stream._prompt.encode_prompt

    def counted(*args: Any, **kwargs: Any) -> list[int]:
        ids = original(*args, **kwargs)
        calls.append(len(ids))
        return ids

    for module in (dg_stream._prompt, dg_stream._engine):
        monkeypatch.setattr(module, "encode_prompt", counted)
    import dg_stream.server.app as app_module

    if hasattr(app_module, "encode_prompt"):
        monkeypatch.setattr(app_module, "encode_prompt", counted)
    return calls


def long_prompt(tok: Any, tokens: int) -> str:
    text = "def f(x):\n    return x\n" * 40
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    return str(tok.decode(ids))


def test_generate_tokenizes_a_prompt_once(backend: LocalBackend, encodings: list[int]) -> None:
    async def main() -> str:
        stream = dg_stream.generate("def add(a, b):", backend=backend, max_new_tokens=4)
        return (await stream.collect()).text

    anyio.run(main)
    assert len(encodings) == 1


def test_the_same_over_long_request_gets_the_same_error_everywhere(
    backend: LocalBackend, tiny_tok: Any
) -> None:
    prompt = long_prompt(tiny_tok, 40)
    request = GenerationRequest(prompt=prompt, max_new_tokens=20)
    errors = []
    with pytest.raises(InvalidRequestError) as by_generate:
        dg_stream.generate(prompt, backend=backend, max_new_tokens=20)
    errors.append(by_generate.value)
    with pytest.raises(InvalidRequestError) as by_admit:
        backend.admit(request)
    errors.append(by_admit.value)

    async def stream() -> None:
        async for _ in backend.stream(request):
            pass

    with pytest.raises(InvalidRequestError) as by_stream:
        anyio.run(stream)
    errors.append(by_stream.value)
    assert len({(e.message, e.param, e.code) for e in errors}) == 1
    error = errors[0]
    assert error.code == "context_length_exceeded" and error.param == "max_new_tokens"
    assert f"context of {CONTEXT} tokens" in error.message

    with ServerThread(create_app(backend, model_name=MODEL)) as server:
        reply = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 20},
            timeout=30,
        )
    assert reply.status_code == 400
    body = reply.json()["error"]
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_tokens"
    assert body["message"] == error.message.replace("max_new_tokens", "max_tokens")


def test_a_chat_without_max_tokens_gets_what_fits_from_one_tokenization(
    backend: LocalBackend, tiny_tok: Any, encodings: list[int]
) -> None:
    with ServerThread(create_app(backend, model_name=MODEL)) as server:
        content = long_prompt(tiny_tok, 20)
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": content}]},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        # OpenAI's default for chat is what fits: the rest of the context after the prompt.
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= CONTEXT
        assert len(encodings) == 1
        full = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": long_prompt(tiny_tok, 60)}],
            },
            timeout=30,
        )
    assert full.status_code == 400
    error = full.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "fills this backend's context" in error["message"]


def test_fitting_shrinks_max_new_tokens_to_the_room_left(backend: LocalBackend) -> None:
    ids = list(range(3, 33))  # 30 tokens
    session = backend.admit(
        GenerationRequest(prompt=ids, max_new_tokens=100, fit_max_new_tokens=True)
    )
    assert session.request.max_new_tokens == CONTEXT - 30
    fits = backend.admit(GenerationRequest(prompt=ids, max_new_tokens=5, fit_max_new_tokens=True))
    assert fits.request.max_new_tokens == 5
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        backend.admit(GenerationRequest(prompt=ids, max_new_tokens=100))
