"""The stream a generation returns: an async iterator of Chunks and an async context manager."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import anyio
import msgspec

from ._chunks import Chunk, FinishReason, Stats, Usage

__all__ = ["Completion", "GenerationStream"]


class Completion(msgspec.Struct, frozen=True, kw_only=True):
    """A finished generation: its text and how it ended."""

    text: str
    finish_reason: FinishReason | None
    usage: Usage | None
    stats: Stats | None
    token_ids: tuple[int, ...] = ()


class GenerationStream:
    """``async for chunk in stream`` or ``async with stream: ...``.

    The underlying source opens on first use. Leaving early (break, exception, cancellation)
    and ``aclose()`` stop the model or network work; ``aclose()`` is idempotent. Once the stream
    has ended, ``text``, ``finish_reason``, ``usage`` and ``stats`` describe the whole generation.
    """

    def __init__(self, open_source: Callable[[], AsyncIterator[Chunk]]) -> None:
        self._open_source = open_source
        self._source: AsyncIterator[Chunk] | None = None
        self._closed = False
        self._parts: list[str] = []
        self._token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.usage: Usage | None = None
        self.stats: Stats | None = None
        self.draft = ""

    # -- resource protocol ------------------------------------------------------------------

    async def __aenter__(self) -> GenerationStream:
        self._ensure_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the work behind the stream and release it; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        source, self._source = self._source, None
        if source is not None and hasattr(source, "aclose"):
            # Shielded: closing must finish even when the caller is being cancelled.
            with anyio.CancelScope(shield=True):
                await source.aclose()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- iteration --------------------------------------------------------------------------

    def _ensure_open(self) -> AsyncIterator[Chunk]:
        if self._source is None:
            if self._closed:
                raise RuntimeError("the stream is closed")
            self._source = self._open_source()
        return self._source

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._closed:
            raise StopAsyncIteration
        source = self._ensure_open()
        try:
            chunk = await source.__anext__()
        except BaseException:
            await self.aclose()
            raise
        self._record(chunk)
        if chunk.finish_reason is not None:
            await self.aclose()
        return chunk

    def _record(self, chunk: Chunk) -> None:
        self._parts.append(chunk.text)
        self._token_ids.extend(chunk.token_ids)
        self.draft = chunk.draft
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.stats is not None:
            self.stats = chunk.stats

    # -- results ----------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """All committed text received so far (the full text once the stream has ended)."""
        return "".join(self._parts)

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._token_ids)

    async def collect(self) -> Completion:
        """Read the stream to its end and return the whole completion."""
        async with self:
            async for _ in self:
                pass
        return Completion(
            text=self.text,
            finish_reason=self.finish_reason,
            usage=self.usage,
            stats=self.stats,
            token_ids=self.token_ids,
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<GenerationStream {state} text={self.text[-40:]!r}>"

    def pipe(self, *operators: Callable[[GenerationStream], Any]) -> Any:
        """Apply operators in order: ``stream.pipe(op1, op2)`` is ``op2(op1(stream))``."""
        result: Any = self
        for operator in operators:
            result = operator(result)
        return result
