"""``generate()``: the one call most users need."""

from __future__ import annotations

import threading
from typing import Any

from ._backends.base import Backend
from ._config import GenerationRequest, build_request
from ._errors import InvalidRequestError
from ._prompt import check_against_backend
from ._stream import GenerationStream
from ._tools import template_tools

__all__ = ["generate"]

_default_backend: Backend | None = None
_default_lock = threading.Lock()


def _get_default_backend() -> Backend:
    global _default_backend
    with _default_lock:
        if _default_backend is None:
            from ._backends.local import LocalBackend

            _default_backend = LocalBackend.default()
        return _default_backend


def resolve_backend(backend: object) -> Backend:
    """``backend``, or the default one for ``None``; anything without ``stream()`` is refused
    now rather than with an AttributeError when the stream starts."""
    if backend is None:
        return _get_default_backend()
    if not callable(getattr(backend, "stream", None)):
        raise InvalidRequestError(
            f"backend must be a dg_stream backend (LocalBackend(...), RemoteBackend(url), or "
            f"None for the embedded pair), got {type(backend).__name__} {backend!r:.40}",
            param="backend",
        )
    return backend  # type: ignore[return-value]


def request_for(
    prompt: Any,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    draft_preview: bool = False,
    response_format: Any = None,
    tools: Any = None,
    **speculative_options: Any,
) -> GenerationRequest:
    """The request ``generate()`` makes of these arguments (raises InvalidRequestError); for
    callers that take ``generate()``'s options and must check them the same way."""
    return build_request(
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        draft_preview=draft_preview,
        speculative_options=speculative_options,
        response_format=response_format,
        tools=template_tools(tools),
    )


def generate(
    prompt: str | list[int] | list[dict[str, str]],
    *,
    backend: Backend | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    draft_preview: bool = False,
    response_format: Any = None,
    tools: Any = None,
    **speculative_options: Any,
) -> GenerationStream:
    """Stream a completion of ``prompt``.

    ``prompt`` is text, token ids, or chat messages (``[{"role": ..., "content": ...}]``,
    rendered with the tokenizer's chat template). ``backend`` defaults to the embedded model
    pair in this process. ``temperature=0`` is greedy; sampling is seeded by ``seed``.
    Generation ends at ``max_new_tokens``, at end-of-sequence, or at the first ``stop`` string
    (not emitted). ``draft_preview`` fills each chunk's ``draft`` with provisional text.
    ``response_format`` constrains the reply: OpenAI's ``{"type": "json_object"}`` or
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``, a Pydantic
    model or msgspec Struct type, ``{"type": "regex", "pattern": ...}`` or
    ``{"type": "choice", "choices": [...]}`` (local backends mask every verified position, so
    the reply follows it exactly, speculation included; remote ones pass it to the server).
    ``tools`` (OpenAI's ``[{"type": "function", "function": {...}}]``) are shown to the model
    by the chat template, with chat messages; to force a call, constrain the reply with
    ``dg_stream.tool_call_format`` (the server and ``ChatDGStream`` do it for you).
    Speculative options (``block_size``, ``steps``, ``adaptive``, ``confidence``) override the
    backend's defaults for this call.

    Everything is validated now (``InvalidRequestError``): the options, the backend, the token
    ids and chat messages against its tokenizer, the prompt plus ``max_new_tokens`` against
    its context (the default backend is loaded for that on the first call). The model work
    starts when the stream is first iterated or entered::

        async with dg_stream.generate("def fibonacci(n):", max_new_tokens=64) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
    """
    request = request_for(
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=stop,
        draft_preview=draft_preview,
        response_format=response_format,
        tools=tools,
        **speculative_options,
    )
    chosen = resolve_backend(backend)
    admit = getattr(chosen, "admit", None)
    if admit is not None:  # the backend decides, once (a local one tokenizes here, once)
        admitted = admit(request)
        return GenerationStream(lambda: chosen.stream(admitted))
    check_against_backend(chosen, request)  # what can be checked of any other backend
    return GenerationStream(lambda: chosen.stream(request))
