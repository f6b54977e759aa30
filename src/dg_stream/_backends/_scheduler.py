"""The round scheduler: the generations of one event loop share every verifier call.

Each consumer of a stream waits for its next chunk. When a consumer finds no chunk waiting and
no round running, it runs the next round itself (on a worker thread) for *every* admitted
generation and leaves each one's chunk in that generation's mailbox; the others wait for the
round to end and read theirs. So rounds run back to back while anyone is waiting, without a
background task that could outlive its streams, and a round never waits for a slow consumer:
a generation whose mailbox already holds ``backlog`` chunks sits the round out.

Generations join and leave between rounds. A stream closed or cancelled mid-round is dropped
when that round ends (its row and drafter state freed), so its work stops within one round.
Admission is bounded: at most ``max_batch`` rows and ``max_cached_tokens`` reserved tokens
(prompt plus ``max_new_tokens``; the cache also pads every row to the longest, see
``_batch_cache``); beyond that, requests wait in a queue of ``max_waiting`` and are refused
past it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from .._chunks import Chunk
from .._errors import DGStreamError, GenerationError, InvalidRequestError, OverloadedError

if TYPE_CHECKING:
    from .._engine import Engine, GenerationSession
    from .._rounds import SequenceState

__all__ = ["BatchLimits", "RoundScheduler"]

logger = logging.getLogger("dg_stream.scheduler")


@dataclass(frozen=True)
class BatchLimits:
    """How much one backend runs at once (see ``LocalBackend``)."""

    max_batch: int = 32
    max_cached_tokens: int | None = None
    max_waiting: int = 256
    backlog: int = 4


@dataclass(eq=False)
class _Entry:
    session: GenerationSession
    reserved: int
    chunks: deque[Chunk] = field(default_factory=deque)
    error: BaseException | None = None
    admitted: bool = False
    closed: bool = False

    @property
    def state(self) -> SequenceState:
        return self.session.state


class RoundScheduler:
    """Batches the generations of one event loop; see the module docstring."""

    def __init__(self, engine: Engine, limits: BatchLimits, model_lock: threading.Lock) -> None:
        self.engine = engine
        self.limits = limits
        self.model_lock = model_lock
        self.batch = engine.batch()
        self.running: dict[SequenceState, _Entry] = {}
        self.waiting: deque[_Entry] = deque()
        self.reserved = 0
        self.round_running = False
        self.round_done = anyio.Event()
        self.limiter = anyio.CapacityLimiter(1)

    async def stream(self, session: GenerationSession) -> AsyncGenerator[Chunk, None]:
        entry = self._enqueue(session)
        try:
            while True:
                if entry.chunks:
                    chunk = entry.chunks.popleft()
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                elif entry.error is not None:
                    raise entry.error
                elif entry.admitted and not self.round_running:
                    await self._round()
                else:
                    await self.round_done.wait()
        finally:
            entry.closed = True
            # A queued entry leaves at once (a round never touches the queue); a batched one
            # when no round is using its row, else when that round ends.
            if not entry.admitted or not self.round_running:
                self._settle(entry)

    # -- admission --------------------------------------------------------------------------

    def _enqueue(self, session: GenerationSession) -> _Entry:
        reserved = len(session.prompt_ids) + session.request.max_new_tokens
        cap = self.limits.max_cached_tokens
        if cap is not None and reserved > cap:
            session.close()
            raise InvalidRequestError(
                f"the prompt plus max_new_tokens ({reserved} tokens) exceeds this backend's "
                f"max_cached_tokens ({cap})",
                param="max_new_tokens",
                code="context_length_exceeded",
            )
        # Requests that arrive during a round join at its end; only those beyond the rows
        # of a round count as queued.
        queued = len(self.running) + len(self.waiting) - self.limits.max_batch
        if queued >= self.limits.max_waiting:
            session.close()
            raise OverloadedError(
                f"{queued} generations are already waiting for this backend",
                status_code=503,
                retry_after=1.0,
            )
        entry = _Entry(session, reserved)
        self.waiting.append(entry)
        if not self.round_running:
            self._admit()
        return entry

    def _admit(self) -> None:
        """Move waiting generations into the batch while the limits allow (in order)."""
        while self.waiting:
            entry = self.waiting[0]
            if entry.closed:
                self.waiting.popleft()
                entry.session.close()
                continue
            cap = self.limits.max_cached_tokens
            if self.running and (
                len(self.running) >= self.limits.max_batch
                or (cap is not None and self.reserved + entry.reserved > cap)
            ):
                return
            self.waiting.popleft()
            try:
                self.batch.add(entry.state)
            except Exception as exc:  # e.g. out of memory growing the cache: this one fails
                entry.error = _failure(exc, entry)
                entry.session.close()
                continue
            self.running[entry.state] = entry
            self.reserved += entry.reserved
            entry.admitted = True

    def _drop(self, entry: _Entry) -> None:
        if entry.admitted:
            if self.running.pop(entry.state, None) is not None:
                self.reserved -= entry.reserved
            self.batch.remove(entry.state)
            entry.admitted = False
        elif entry in self.waiting:
            self.waiting.remove(entry)
        entry.session.close()

    def _wake(self) -> None:
        done, self.round_done = self.round_done, anyio.Event()
        done.set()

    # -- rounds -----------------------------------------------------------------------------

    async def _round(self) -> None:
        self.round_running = True
        try:
            entries = [self.running[state] for state in self.batch.states]
            active = [not e.closed and len(e.chunks) < self.limits.backlog for e in entries]
            if any(active):
                await anyio.to_thread.run_sync(self._run, entries, active, limiter=self.limiter)
        finally:
            self.round_running = False
            self._settle(
                *[
                    entry
                    for entry in self.running.values()
                    if entry.closed or entry.session.finished or entry.error is not None
                ]
            )

    def _settle(self, *leaving: _Entry) -> None:
        """Drop ``leaving``, admit whom the room now allows, and wake every waiter, even when
        freeing or admitting fails (the error goes to that entry; nobody is left waiting)."""
        try:
            for entry in leaving:
                try:
                    self._drop(entry)
                except Exception:  # a drafter session that fails to close frees the rest
                    logger.exception("freeing a finished generation failed")
            self._admit()
        finally:
            self._wake()

    def _run(self, entries: list[_Entry], active: list[bool]) -> None:
        """One round on the worker thread; chunks and errors go to the mailboxes."""
        with self.model_lock:
            try:
                outcomes = self.batch.run(active)
            except Exception as exc:
                # A failed forward leaves the rows' caches undefined: every row of it ends.
                for entry, on in zip(entries, active, strict=True):
                    if on:
                        entry.error = _failure(exc, entry)
                return
            for entry, outcome in zip(entries, outcomes, strict=True):
                if outcome is None:
                    continue
                try:
                    entry.chunks.append(entry.session.emit(outcome))
                except Exception as exc:
                    entry.error = _failure(exc, entry)


def _failure(exc: Exception, entry: _Entry) -> BaseException:
    if isinstance(exc, DGStreamError):
        return exc
    error = GenerationError(f"model work failed: {exc!r}", text=entry.session.text)
    error.__cause__ = exc
    return error
