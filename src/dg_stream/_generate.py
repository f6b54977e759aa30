"""``generate()``: the one call most users need."""

from __future__ import annotations

import threading
from typing import Any

from ._backends.base import Backend
from ._config import build_request
from ._stream import GenerationStream

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
    **speculative_options: Any,
) -> GenerationStream:
    """Stream a completion of ``prompt``.

    ``prompt`` is text, token ids, or chat messages (``[{"role": ..., "content": ...}]``,
    rendered with the tokenizer's chat template). ``backend`` defaults to the embedded model
    pair in this process. ``temperature=0`` is greedy; sampling is seeded by ``seed``.
    Generation ends at ``max_new_tokens``, at end-of-sequence, or at the first ``stop`` string
    (not emitted). ``draft_preview`` fills each chunk's ``draft`` with provisional text.
    Speculative options (``block_size``, ``steps``, ``adaptive``, ``confidence``) override the
    backend's defaults for this call.

    Parameters are validated now (``InvalidRequestError``); the model work starts when the
    stream is first iterated or entered::

        async with dg_stream.generate("def fibonacci(n):", max_new_tokens=64) as stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
    """
    request = build_request(
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
    )
    chosen = backend

    def open_source() -> Any:
        return (chosen or _get_default_backend()).stream(request)

    return GenerationStream(open_source)
