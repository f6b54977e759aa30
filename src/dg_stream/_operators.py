"""Stream operators: functions that turn one stream into another, chained with ``pipe``.

Every operator returns a :class:`DerivedStream`, which is itself a ``GenerationStream``:
iterable, an async context manager, ``.text``/``.usage``/``.collect()`` and ``pipe`` all work,
and ``aclose()`` closes the whole chain down to the model or network work::

    async with generate(prompt).pipe(stop_at("\\n\\n"), by_lines()) as lines:
        async for line in lines:
            print(line.text, end="")
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import anyio
import msgspec

from ._chunks import Chunk, Stats, StepStats, merge_steps
from ._errors import APITimeoutError, StreamInterruptedError
from ._stop import StopMatcher
from ._stream import Completion, GenerationStream

__all__ = [
    "DerivedStream",
    "Operator",
    "by_lines",
    "by_sentences",
    "by_words",
    "collect",
    "map_text",
    "stop_at",
    "tee",
    "until",
    "with_timeout",
]

#: A function from a stream to a stream, as ``GenerationStream.pipe`` applies it.
Operator = Callable[[GenerationStream], "DerivedStream"]
#: The body of a derived stream: reads the upstream stream, yields the chunks to emit.
Transform = Callable[[GenerationStream], AsyncIterator[Chunk]]


async def _close(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


class DerivedStream(GenerationStream):
    """A stream computed from another one (the *upstream*) by an async generator.

    ``transform(upstream)`` is called when the stream is first used and yields the chunks to
    emit. Closing a derived stream (``aclose()``, leaving ``async with``, breaking out of
    ``async for``, an error, or reaching the final chunk) closes the transform and then the
    upstream, so the model work underneath stops too. Write your own operator like this::

        def shout() -> Operator:
            async def transform(up):
                async for chunk in up:
                    yield msgspec.structs.replace(chunk, text=chunk.text.upper())
            return lambda stream: DerivedStream(stream, transform)
    """

    def __init__(self, upstream: GenerationStream, transform: Transform) -> None:
        self.upstream = upstream
        super().__init__(lambda: transform(upstream))

    async def aclose(self) -> None:
        """Close this stream, then its upstream (and so the work under the whole chain)."""
        if self.closed:
            return
        try:
            await super().aclose()
        finally:
            await _close(self.upstream)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {state} text={self.text[-40:]!r} of {self.upstream!r}>"


# -- re-chunking -----------------------------------------------------------------------------

# Each pattern matches one complete unit at the start of the buffer; what does not match yet
# waits for more text (or for the end of the stream). A unit that ends in whitespace is
# complete only once the next non-whitespace character has arrived, so that whitespace split
# across upstream chunks still ends the unit before it and never starts the next one; the
# text's leading whitespace, before any unit, is a unit of its own.
_WORD = re.compile(r"\s+(?=\S)|\S+\s+(?=\S)")
_LINE = re.compile(r"[^\n]*\n")
# A sentence ends after . ! ? … (and closing quotes or brackets) followed by whitespace, after
# a CJK full stop, or at a line break. The CJK stop needs no whitespace after it, so what
# follows must be text, not another stop or closing mark (else a stream cut between "。" and
# "。" would split where the whole text does not).
_SENTENCE = re.compile(
    r"\s+(?=\S)|[\s\S]*?(?:[.!?…]+[\"'”’»)\]]*\s+|[。！？]+[」』”’)]*\s*(?=[^\s。！？」』”’)])"
    r"|\n\s*)(?=\S)"
)


def _rechunk(pattern: re.Pattern[str]) -> Operator:
    async def transform(upstream: GenerationStream) -> AsyncIterator[Chunk]:
        buffer = ""
        ids: list[int] = []
        steps: list[StepStats] = []
        previewing = False
        async for chunk in upstream:
            buffer += chunk.text
            ids.extend(chunk.token_ids)
            if chunk.step is not None:
                steps.append(chunk.step)
            previewing = previewing or bool(chunk.draft)
            units: list[str] = []
            while (match := pattern.match(buffer)) is not None and match.end() > 0:
                units.append(match.group())
                buffer = buffer[match.end() :]
            final = chunk.finish_reason is not None
            if final and buffer:
                units.append(buffer)
                buffer = ""
            if not units:
                if final:  # nothing left to say, but the ending must still be reported
                    yield msgspec.structs.replace(
                        chunk, text="", token_ids=tuple(ids), draft="", step=merge_steps(steps)
                    )
                continue
            # The draft after each unit is everything the consumer has not seen as committed.
            rest = buffer
            for i, unit in enumerate(units):
                last = i == len(units) - 1
                pending = "".join(units[i + 1 :]) + rest
                draft = pending + chunk.draft if previewing and not final else ""
                if last:
                    yield msgspec.structs.replace(
                        chunk, text=unit, token_ids=tuple(ids), draft=draft, step=merge_steps(steps)
                    )
                    ids, steps = [], []
                else:
                    yield Chunk(text=unit, draft=draft)
        if buffer or ids:  # the upstream ended without a final chunk: flush what is held
            yield Chunk(text=buffer, token_ids=tuple(ids), step=merge_steps(steps))

    return lambda stream: DerivedStream(stream, transform)


def by_words() -> Operator:
    """Re-chunk so that each chunk is one whole word with the whitespace after it.

    A word is emitted once the whitespace that ends it and the start of the next word have
    arrived; the rest is flushed with the final chunk. No chunk starts with whitespace, except
    a first chunk that holds only the whitespace the text starts with. Concatenated text, token
    ids and step statistics are unchanged.
    """
    return _rechunk(_WORD)


def by_lines() -> Operator:
    """Re-chunk so that each chunk is one line ending in ``"\\n"`` (the last may lack it)."""
    return _rechunk(_LINE)


def by_sentences() -> Operator:
    """Re-chunk so that each chunk is one sentence with the whitespace after it.

    A sentence ends at ``.``, ``!``, ``?`` or ``…`` (optionally followed by closing quotes or
    brackets) once whitespace follows, at ``。！？``, or at a line break; it is emitted with the
    whitespace after it once the next sentence has started (the rest is flushed with the final
    chunk). No abbreviation list is used: "e.g. this" splits after "e.g. ".
    """
    return _rechunk(_SENTENCE)


# -- stopping early -------------------------------------------------------------------------


class _Tally:
    """Stats for a generation cut short: the upstream never sends its totals, so sum steps."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.started = time.perf_counter()

    def add(self, chunk: Chunk) -> None:
        if chunk.step is not None:
            self.stats = self.stats.add(chunk.step)

    def total(self) -> Stats:
        return msgspec.structs.replace(self.stats, total_seconds=time.perf_counter() - self.started)


def stop_at(*strings: str, include: bool = False) -> Operator:
    """End the stream at the first occurrence of any of ``strings`` and stop the model work.

    The match may span chunks. Text from the match on is dropped (kept when ``include``).
    Text that might be the start of a stop string is held back until it is known not to be
    (it still shows in ``draft``). The final chunk has ``finish_reason="stop"`` and ``stats``
    summing the verifier calls that ran; ``usage`` is ``None`` since the upstream was cut off
    before it could report one.
    """
    if not strings or not all(isinstance(s, str) and s for s in strings):
        raise ValueError("stop_at() needs one or more non-empty strings")

    async def transform(upstream: GenerationStream) -> AsyncIterator[Chunk]:
        matcher = StopMatcher(strings)
        tally = _Tally()
        seen = ""  # the text since the last emission that could hold the stop string
        async for chunk in upstream:
            tally.add(chunk)
            text = matcher.feed(chunk.text)
            if matcher.stopped:
                if include:
                    text += _matched(seen + chunk.text, len(text), strings)
                await upstream.aclose()  # stop the model work now, not when we are closed
                # A final upstream chunk knows the real totals; otherwise sum what ran.
                yield Chunk(
                    text=text,
                    token_ids=chunk.token_ids,
                    finish_reason="stop",
                    step=chunk.step,
                    usage=chunk.usage,
                    stats=chunk.stats or tally.total(),
                )
                return
            seen = matcher.held
            if chunk.finish_reason is not None:
                yield msgspec.structs.replace(chunk, text=text + matcher.flush(), draft="")
                return
            draft = matcher.held + chunk.draft if chunk.draft else ""
            yield msgspec.structs.replace(chunk, text=text, draft=draft)
        tail = matcher.flush()
        if tail:
            yield Chunk(text=tail)

    return lambda stream: DerivedStream(stream, transform)


def _matched(window: str, start: int, strings: Iterable[str]) -> str:
    """The longest stop string found at ``start`` of ``window`` (held text + chunk text)."""
    for s in sorted(strings, key=len, reverse=True):
        if window.startswith(s, start):
            return s
    return ""


def until(predicate: Callable[[str], bool]) -> Operator:
    """End the stream, and stop the model work, once ``predicate(text_so_far)`` is true.

    ``predicate`` is called after each chunk with all text emitted so far, that chunk
    included; the chunk that made it true is the last one (``finish_reason="stop"``).
    Example: ``until(lambda text: text.count("\\n") >= 3)`` keeps three lines.
    """

    async def transform(upstream: GenerationStream) -> AsyncIterator[Chunk]:
        tally = _Tally()
        parts: list[str] = []
        async for chunk in upstream:
            tally.add(chunk)
            parts.append(chunk.text)
            if chunk.finish_reason is None and predicate("".join(parts)):
                await upstream.aclose()
                yield msgspec.structs.replace(
                    chunk, draft="", finish_reason="stop", stats=chunk.stats or tally.total()
                )
                return
            yield chunk

    return lambda stream: DerivedStream(stream, transform)


# -- time limits ----------------------------------------------------------------------------


def with_timeout(
    *, first_chunk: float | None = None, idle: float | None = None, total: float | None = None
) -> Operator:
    """Fail with ``APITimeoutError`` when the stream is too slow, and stop the work under it.

    ``first_chunk``: seconds from the first read to the first chunk; ``idle``: seconds allowed
    between chunks after the first; ``total``: seconds from the first read to the final chunk.
    The error's ``text`` holds everything emitted before it.
    """
    for name, value in (("first_chunk", first_chunk), ("idle", idle), ("total", total)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {value}")

    async def transform(upstream: GenerationStream) -> AsyncIterator[Chunk]:
        start = anyio.current_time()
        received = False
        while True:
            now = anyio.current_time()
            limits: list[tuple[float, str]] = []
            if total is not None:
                limits.append((start + total - now, f"the generation took longer than {total}s"))
            gap = idle if received else first_chunk
            if gap is not None:
                what = (
                    f"no chunk for {idle}s" if received else f"no first chunk within {first_chunk}s"
                )
                limits.append((gap, what))
            deadline, reason = min(limits) if limits else (float("inf"), "")
            chunk: Chunk | None = None
            # move_on_after, not fail_after: a TimeoutError raised by the upstream itself
            # must not be mistaken for ours.
            with anyio.move_on_after(max(deadline, 0.0)) as scope:
                try:
                    chunk = await upstream.__anext__()
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught or chunk is None:
                await upstream.aclose()
                raise APITimeoutError(f"timed out: {reason}", text=upstream.text)
            received = True
            yield chunk

    return lambda stream: DerivedStream(stream, transform)


# -- transforming -----------------------------------------------------------------------------


def map_text(fn: Callable[[str], str], *, draft: bool = True) -> Operator:
    """Apply ``fn`` to each chunk's text (and, unless ``draft=False``, to its draft).

    ``fn`` sees pieces, not whole words: use ``by_words()`` or ``by_lines()`` first when it
    must see whole units.
    """

    async def transform(upstream: GenerationStream) -> AsyncIterator[Chunk]:
        async for chunk in upstream:
            yield msgspec.structs.replace(
                chunk,
                text=fn(chunk.text) if chunk.text else chunk.text,
                draft=fn(chunk.draft) if draft and chunk.draft else chunk.draft,
            )

    return lambda stream: DerivedStream(stream, transform)


def collect() -> Callable[[GenerationStream], Awaitable[Completion]]:
    """Terminal operator: ``await stream.pipe(..., collect())`` reads to the end.

    The same as ``await stream.collect()``: returns a ``Completion`` with the text, the finish
    reason, usage and stats, and closes the stream.
    """

    def apply(stream: GenerationStream) -> Awaitable[Completion]:
        return stream.collect()

    return apply


# -- several consumers ------------------------------------------------------------------------


class _TeeHub:
    """Shared state of ``tee``: pulls from the upstream on demand, fans chunks out.

    No background task: whichever branch needs a chunk its buffer lacks pulls the next one
    (one at a time, under a lock) and appends it to every open branch's buffer. A branch may
    pull only while every other open branch has room, so a slow consumer holds a fast one
    back instead of losing chunks.
    """

    def __init__(self, upstream: GenerationStream, n: int, buffer: int | None) -> None:
        self.upstream = upstream
        self.limit = buffer
        self.buffers: list[deque[Chunk] | None] = [deque() for _ in range(n)]
        # Created on first use, inside the event loop (tee() may be applied outside one).
        self._lock: anyio.Lock | None = None
        self._changed: anyio.Event | None = None
        self.done = False
        self.error: BaseException | None = None

    @property
    def lock(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock

    @property
    def changed(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _blocked_by_other(self, index: int) -> bool:
        if self.limit is None:
            return False
        return any(
            b is not None and len(b) >= self.limit for i, b in enumerate(self.buffers) if i != index
        )

    async def next(self, index: int) -> Chunk:
        while True:
            own = self.buffers[index]
            if own is None:
                raise StopAsyncIteration
            if own:
                chunk = own.popleft()
                self._notify()  # this branch made room
                return chunk
            if self.error is not None:
                raise self.error
            if self.done:
                raise StopAsyncIteration
            if self._blocked_by_other(index) or self.lock.locked():
                await self.changed.wait()
                continue
            try:
                async with self.lock:
                    await self._pull()
            finally:
                self._notify()  # wake the others, also when this pull failed

    async def _pull(self) -> None:
        try:
            chunk = await self.upstream.__anext__()
        except StopAsyncIteration:
            self.done = True
            return
        except BaseException as exc:
            # The others must not hang nor mistake this for a normal end.
            if isinstance(exc, Exception):
                self.error = exc
            else:
                self.error = StreamInterruptedError(
                    "the generation was cancelled by another branch of tee()",
                    text=self.upstream.text,
                )
            raise
        for buf in self.buffers:
            if buf is not None:
                buf.append(chunk)

    async def close_branch(self, index: int) -> None:
        self.buffers[index] = None
        self._notify()
        if all(b is None for b in self.buffers):
            await _close(self.upstream)


class _TeeBranch(DerivedStream):
    def __init__(self, hub: _TeeHub, index: int) -> None:
        self._hub = hub
        self._index = index

        async def transform(_: GenerationStream) -> AsyncIterator[Chunk]:
            while True:
                try:
                    chunk = await hub.next(index)
                except StopAsyncIteration:
                    return
                yield chunk

        super().__init__(hub.upstream, transform)

    async def aclose(self) -> None:
        """Close this branch; the upstream closes with the last open branch."""
        if self.closed:
            return
        try:
            await GenerationStream.aclose(self)
        finally:
            await self._hub.close_branch(self._index)


def tee(
    n: int = 2, *, buffer: int | None = 64
) -> Callable[[GenerationStream], tuple[DerivedStream, ...]]:
    """Split one generation into ``n`` streams that each see every chunk.

    Each branch buffers at most ``buffer`` chunks that it has not read yet (``None``: no
    limit); a branch that would overflow another's buffer waits for that consumer, so no
    branch ever loses a chunk. Consume the branches concurrently (e.g. in a task group):
    reading one to the end before starting another needs ``buffer=None``. The model work
    stops when the last branch is closed; an error reaches every branch.
    """
    if n < 1:
        raise ValueError(f"tee() needs n >= 1, got {n}")
    if buffer is not None and buffer < 1:
        raise ValueError(f"buffer must be >= 1 or None, got {buffer}")

    def apply(stream: GenerationStream) -> tuple[DerivedStream, ...]:
        hub = _TeeHub(stream, n, buffer)
        return tuple(_TeeBranch(hub, i) for i in range(n))

    return apply
