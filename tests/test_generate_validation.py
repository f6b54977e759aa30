"""``generate()`` refuses at the call what it can know before any model work: the backend's
type, token ids past the vocabulary, prompts too long for the context, unknown chat roles."""

from __future__ import annotations

from typing import Any

import pytest
from _drafters import CountingDrafter

import dg_stream
from dg_stream import ChatSession, InvalidRequestError, LocalBackend, generate
from dg_stream._drafters import DiffusionDrafter


@pytest.fixture(scope="module")
def counting(
    tiny_verifier: Any, tiny_drafter: Any, tiny_tok: Any
) -> tuple[LocalBackend, CountingDrafter]:
    drafter = CountingDrafter(DiffusionDrafter(tiny_drafter, mask_token_id=tiny_tok.mask_token_id))
    return LocalBackend(tiny_verifier, drafter, tokenizer=tiny_tok, block_size=3), drafter


@pytest.mark.parametrize("backend", ["local", 42, object()])
def test_a_backend_that_is_not_one_is_refused_at_the_call(backend: Any) -> None:
    with pytest.raises(InvalidRequestError, match="backend must be a dg_stream backend") as info:
        generate("x", backend=backend)
    assert info.value.param == "backend"


@pytest.mark.parametrize(
    ("prompt", "options", "param", "code", "message"),
    [
        ("x", {"max_new_tokens": 10**9}, "max_new_tokens", "context_length_exceeded", "context"),
        ([5], {"max_new_tokens": 10_000}, "max_new_tokens", "context_length_exceeded", "1 token"),
        ([10**9], {}, "prompt", None, "vocabulary"),
        ([5, 300], {}, "prompt", None, "token id 300 is outside the model's vocabulary of 300"),
        (
            [{"role": "user", "content": "hi"}],
            {"max_new_tokens": 10**9},
            "max_new_tokens",
            "context_length_exceeded",
            "context",
        ),
        ([{"role": "wizard", "content": "hi"}], {}, "messages", None, "'wizard'"),
        ([{"role": "User", "content": "hi"}], {}, "messages", None, "one of 'system', 'user'"),
    ],
)
def test_what_the_backend_can_tell_is_checked_at_the_call(
    counting: tuple[LocalBackend, CountingDrafter],
    prompt: Any,
    options: dict[str, Any],
    param: str,
    code: str | None,
    message: str,
) -> None:
    backend, drafter = counting
    with pytest.raises(InvalidRequestError, match=message) as info:
        generate(prompt, backend=backend, **options)  # never iterated
    assert (info.value.param, info.value.code) == (param, code)
    assert drafter.calls == 0


def test_the_context_check_counts_the_rendered_prompt(
    counting: tuple[LocalBackend, CountingDrafter],
) -> None:
    backend, _ = counting
    limit = backend.context_length
    assert limit is not None
    n = len(backend.tokenizer("def add")["input_ids"])
    generate("def add", backend=backend, max_new_tokens=limit - n)  # exactly fits
    with pytest.raises(InvalidRequestError, match=rf"the prompt \({n} tokens\)"):
        generate("def add", backend=backend, max_new_tokens=limit - n + 1)


class NoTokenizer:
    """A backend that tells its context length but has no tokenizer (as a remote one)."""

    tokenizer = None
    context_length = 64
    model_name = "none"

    def stream(self, request: Any) -> Any:
        raise AssertionError("no stream should start")

    async def aclose(self) -> None:
        return None


def test_without_a_tokenizer_token_ids_are_still_counted() -> None:
    with pytest.raises(InvalidRequestError, match="context") as info:
        generate([1] * 60, backend=NoTokenizer(), max_new_tokens=5)
    assert info.value.code == "context_length_exceeded"
    generate("a text prompt is the server's to count", backend=NoTokenizer(), max_new_tokens=63)


def test_chat_session_refuses_an_unknown_role_in_its_own_messages(
    counting: tuple[LocalBackend, CountingDrafter],
) -> None:
    with pytest.raises(InvalidRequestError, match="role"):
        dg_stream.Message("wizard", "hi")
    chat = ChatSession(counting[0], max_new_tokens=4)
    with pytest.raises(InvalidRequestError, match="context"):
        chat.send("hi", max_new_tokens=10**9)
