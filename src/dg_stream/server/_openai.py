"""OpenAI-compatible wire types for the server: requests in, responses and stream chunks out.

Requests ignore fields they do not know (clients send many optional ones), but every field
they do know is type-checked by msgspec; what dg_stream cannot honour (``n > 1``, logprobs,
penalties, tools, ...) is refused explicitly rather than silently ignored.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .._config import SpeculativeConfig

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatDelta",
    "ChatMessage",
    "ChatMessageOut",
    "CompletionChoice",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "FunctionCallOut",
    "ModelCard",
    "ModelList",
    "StreamOptions",
    "ToolCallOut",
    "UsageBody",
]


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class _Common(msgspec.Struct, frozen=True, kw_only=True):
    """Fields shared by both endpoints; the last three are dg_stream extensions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    speculative: SpeculativeConfig | None = None


class CompletionRequest(_Common, frozen=True, kw_only=True):
    """``POST /v1/completions``. ``prompt``: text, token ids, or a one-element list of either."""

    prompt: str | list[Any]
    response_format: dict[str, Any] | None = None  # vLLM's extension: constrained output
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # the call a tool message answers


class ChatCompletionRequest(_Common, frozen=True, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


# -- responses ----------------------------------------------------------------------------------


class UsageBody(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class CompletionResponse(msgspec.Struct, frozen=True, kw_only=True):
    """A whole completion, or one streamed piece of it (same object type in both cases)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    system_fingerprint: str | None = None
    usage: UsageBody | None = None


class FunctionCallOut(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A call's function: whole in a message; in a stream's deltas, pieces to join."""

    name: str | None = None
    arguments: str | None = None


class ToolCallOut(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A tool call in a message, or (with ``index``) a piece of one in a stream's delta."""

    function: FunctionCallOut
    index: int | None = None
    id: str | None = None
    type: str | None = None


class ChatDelta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChunkChoice(msgspec.Struct, frozen=True, kw_only=True):
    delta: ChatDelta
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: UsageBody | None = None


class ChatMessageOut(msgspec.Struct, frozen=True, kw_only=True):
    content: str | None
    role: str = "assistant"
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(msgspec.Struct, frozen=True, kw_only=True):
    message: ChatMessageOut
    finish_reason: str | None
    index: int = 0
    logprobs: None = None


class ChatCompletion(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ModelCard(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "dg-stream"
    max_model_len: int | None = None


class ModelList(msgspec.Struct, frozen=True, kw_only=True):
    data: list[ModelCard]
    object: str = "list"
