"""Turning a request's prompt or messages into token ids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ._config import GenerationRequest, Message
from ._errors import InvalidRequestError

__all__ = [
    "PLAIN_CHAT_STOP",
    "admit_length",
    "check_against_backend",
    "encode_prompt",
    "plain_chat_stops",
    "render_chat",
    "render_plain_chat",
]

#: Where a reply in the plain chat format ends: the model would otherwise go on to write the
#: user's next turn itself.
PLAIN_CHAT_STOP = "\n\nUser:"


def render_plain_chat(
    messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None
) -> str:
    """The fallback for tokenizers without a chat template.

    Each message becomes ``"{Role}: {content}\\n\\n"`` and the prompt ends with ``"Assistant:"``;
    stop at ``PLAIN_CHAT_STOP`` to end a reply before the model writes the next user turn.
    Tools come first, one JSON line each; an assistant's tool calls follow its content as
    JSON, and a tool's reply is ``"Tool ({name}): ..."``.
    """
    turns = []
    if tools:
        listed = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        turns.append(f"Tools:\n{listed}")
    for m in messages:
        role = m.role.capitalize() if m.name is None else f"{m.role.capitalize()} ({m.name})"
        content = m.content
        if m.tool_calls:
            calls = json.dumps(m.template_dict()["tool_calls"], ensure_ascii=False)
            content = f"{content}\n{calls}" if content else calls
        turns.append(f"{role}: {content}")
    return "\n\n".join([*turns, "Assistant:"])


def render_chat(tokenizer: Any, request: GenerationRequest) -> str:
    """The prompt text of a chat request through the tokenizer's chat template (its tools
    too), ending where the assistant's reply begins."""
    assert request.messages is not None
    options: dict[str, Any] = {"tools": request.tools} if request.tools else {}
    return str(
        tokenizer.apply_chat_template(
            [m.template_dict() for m in request.messages],
            tokenize=False,
            add_generation_prompt=True,
            **options,
        )
    )


def plain_chat_stops(tokenizer: Any) -> tuple[str, ...]:
    """The stop strings a chat reply needs with ``tokenizer``: ``PLAIN_CHAT_STOP`` when it has
    no chat template (the messages are then rendered by ``render_plain_chat``), else none.
    ``None`` (no local tokenizer: a remote backend, whose server renders) needs none."""
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        return (PLAIN_CHAT_STOP,)
    return ()


def encode_prompt(tokenizer: Any, request: GenerationRequest, vocab_size: int) -> list[int]:
    """Token ids for the request; raises InvalidRequestError for what cannot be encoded."""
    if isinstance(request.prompt, list):
        ids = list(request.prompt)
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the model's vocabulary of {vocab_size}",
                param="prompt",
            )
        return ids
    if tokenizer is None:
        raise InvalidRequestError(
            "this backend has no tokenizer: pass the prompt as token ids", param="prompt"
        )
    if request.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            ids = list(
                tokenizer(render_chat(tokenizer, request), add_special_tokens=False)["input_ids"]
            )
        else:
            text = render_plain_chat(request.messages, request.tools)
            ids = list(tokenizer(text)["input_ids"])
    else:
        assert isinstance(request.prompt, str)
        ids = list(tokenizer(request.prompt)["input_ids"])
    if not ids:
        raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
    return ids


def _is_template_error(exc: BaseException) -> bool:
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - jinja2 ships with transformers
        return False
    return isinstance(exc, TemplateError)


def check_against_backend(backend: Any, request: GenerationRequest) -> None:
    """What can be checked before any model work with what every backend tells (its
    ``tokenizer`` and ``context_length``): token ids within the tokenizer's vocabulary,
    messages the chat template accepts, and the prompt plus ``max_new_tokens`` within the
    context. Raises InvalidRequestError; what a backend does not tell is left to it (a
    remote backend has no tokenizer: its server checks text prompts).
    """
    tokenizer = getattr(backend, "tokenizer", None)
    limit = getattr(backend, "context_length", None)
    if tokenizer is not None:
        try:
            size = len(tokenizer)
        except TypeError:  # not a Hugging Face tokenizer: no vocabulary to check against
            size = 1 << 62
        try:
            prompt_tokens = len(encode_prompt(tokenizer, request, size))
        except InvalidRequestError:
            raise
        except Exception as exc:
            if _is_template_error(exc):
                raise InvalidRequestError(
                    f"the chat template rejected the messages: {exc}",
                    param="messages",
                    code="invalid_messages",
                ) from None
            raise
    elif isinstance(request.prompt, list):
        prompt_tokens = len(request.prompt)
    else:
        return
    admit_length(request, prompt_tokens, limit)


def admit_length(request: GenerationRequest, prompt_tokens: int, limit: int | None) -> int:
    """The ``max_new_tokens`` a request of ``prompt_tokens`` gets within a context of
    ``limit`` tokens (None: unknown), or InvalidRequestError: the one decision, and the one
    error, of every backend that can count a prompt (``context_length_exceeded``)."""
    wanted = request.max_new_tokens
    if limit is None:
        return wanted
    room = limit - prompt_tokens
    plural = "" if prompt_tokens == 1 else "s"
    if request.fit_max_new_tokens:
        if room < 1:
            raise InvalidRequestError(
                f"the prompt ({prompt_tokens} token{plural}) fills this backend's context of "
                f"{limit} tokens (its context_length)",
                param="messages" if request.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        return min(wanted, room)
    if wanted > room:
        raise InvalidRequestError(
            f"the prompt ({prompt_tokens} token{plural}) plus max_new_tokens ({wanted}) "
            f"exceeds this backend's context of {limit} tokens (its context_length)",
            param="max_new_tokens",
            code="context_length_exceeded",
        )
    return wanted
