"""The backend protocol shared by the local and remote backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from .._chunks import Chunk
from .._config import GenerationRequest

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """Runs generations. ``stream`` returns an async iterator (usually an async generator)
    whose ``aclose()`` stops the work; errors surface from the first ``__anext__``."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...
