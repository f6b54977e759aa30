"""The backend protocol shared by the local and remote backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from .._chunks import Chunk
from .._config import GenerationRequest

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """Runs generations. ``stream`` returns an async iterator (usually an async generator)
    whose ``aclose()`` stops the work; errors surface from the first ``__anext__``.

    What callers may ask of a backend besides (plain attributes or properties will do):

    ``context_length``: the most tokens a generation may span, prompt and completion together;
    ``None`` when unknown (a remote backend learns it from the server at its first request).
    ``tokenizer``: the tokenizer that turns this backend's prompts into tokens (a Hugging Face
    tokenizer: callers count prompt tokens with it and check its ``chat_template``), or ``None``
    when prompts are tokenized elsewhere (a remote backend: the server renders them).
    ``model_name``: the name of the model that generates, as its owner gave it (a checkpoint
    path, a served model id), or ``None`` when unknown.
    """

    @property
    def context_length(self) -> int | None: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def model_name(self) -> str | None: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...
