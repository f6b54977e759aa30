"""Turning a request's prompt or messages into token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._config import GenerationRequest, Message
from ._errors import InvalidRequestError

__all__ = ["PLAIN_CHAT_STOP", "encode_prompt", "plain_chat_stops", "render_plain_chat"]

#: Where a reply in the plain chat format ends: the model would otherwise go on to write the
#: user's next turn itself.
PLAIN_CHAT_STOP = "\n\nUser:"


def render_plain_chat(messages: Sequence[Message]) -> str:
    """The fallback for tokenizers without a chat template.

    Each message becomes ``"{Role}: {content}\\n\\n"`` and the prompt ends with ``"Assistant:"``;
    stop at ``PLAIN_CHAT_STOP`` to end a reply before the model writes the next user turn.
    """
    turns = [f"{m.role.capitalize()}: {m.content}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


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
                f"token id {bad[0]} is outside the verifier's vocabulary of {vocab_size}",
                param="prompt",
            )
        return ids
    if tokenizer is None:
        raise InvalidRequestError(
            "this backend has no tokenizer: pass the prompt as token ids", param="prompt"
        )
    if request.messages is not None:
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.messages],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
            ids = list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)
        else:
            ids = list(tokenizer(render_plain_chat(request.messages))["input_ids"])
    else:
        assert isinstance(request.prompt, str)
        ids = list(tokenizer(request.prompt)["input_ids"])
    if not ids:
        raise InvalidRequestError("the prompt encodes to no tokens", param="prompt")
    return ids
