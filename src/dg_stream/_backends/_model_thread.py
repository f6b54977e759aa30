"""The torch thread: all of dg_stream's torch work in this process, on one long-lived thread.

```
event loop(s) ── submit(session) ──► [queue] ──► torch thread: for each backend (lane):
      ▲                                              admit → round → publish
      │                                              (its Batch, cache and limits)
      └── Ticket.next() ◄── outcomes / errors ◄──────┘
          then GenerationSession.emit on the loop: text, stop strings, preview (output layer)
```

Why one thread. On a few cores, torch work issued from two threads makes two OpenMP teams
compete for the same cores, and GNU OpenMP stops spinning between parallel regions once its
threads outnumber the cores (see ``_TorchThread``: each small forward then costs up to twice as
much); rounds that hop between worker threads also pay a hand-off each. So loading, prefill,
drafting, verification, judging and committing all run here, whatever the number of event
loops (an app, LangChain's sync portal, the server) and backends: each backend is a lane
(``ModelThread``) with its own batch, and the lanes take turns, round by round. Text never
reaches this thread; tokenizing and detokenizing stay with the loop that reads the stream.

Hand-offs. Event loops send commands through a thread-safe queue (``submit`` decides admission
at once, under a lock, so a refusal is raised in the caller). Each generation's outcomes go to
its ``Ticket``; a consumer with nothing to read parks on an ``anyio.Event`` that this thread
sets through the consumer's own event loop without waiting for it, so a busy or finished loop
never stalls the rounds of the others.

Flow control. A generation whose ticket holds ``backlog`` unread outcomes sits rounds out (a
slow reader does not make the others wait, nor buffer without bound). A stream that is closed
or cancelled sends ``cancel``: its row leaves at the next round boundary, so its work stops
within one round, and closing waits for that. When no lane wants a round, the thread sleeps on
its queue; it starts with the first backend that needs it and ends when the last one closes
(``close()``, or its backend being collected).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.lowlevel import EventLoopToken, current_token

from .._errors import GenerationError, OverloadedError

if TYPE_CHECKING:
    from typing import TypeAlias

    from .._engine import Engine, GenerationSession
    from .._rounds import Batch, RowOutcome, SequenceState

    Item: TypeAlias = RowOutcome | BaseException

__all__ = ["BatchLimits", "ModelThread", "Ticket"]

T = TypeVar("T")

logger = logging.getLogger("dg_stream.model_thread")


@dataclass(frozen=True)
class BatchLimits:
    """How much one backend runs at once (see ``LocalBackend``)."""

    max_batch: int = 32
    max_cached_tokens: int | None = None
    max_waiting: int = 256
    backlog: int = 4


class BackendClosedError(GenerationError):
    """The backend was closed while this generation was queued or running."""


class Ticket:
    """One generation's mailbox between the torch thread and the event loop reading it."""

    def __init__(self, session: GenerationSession, reserved: int, owner: ModelThread) -> None:
        self.session = session
        self.reserved = reserved
        self._owner = owner
        self._token: EventLoopToken = current_token()
        self._items: deque[Item] = deque()
        self._lock = threading.Lock()
        self._event: anyio.Event | None = None
        self.closed = False  # set by the consumer; read by the torch thread
        self.admitted = False  # torch thread only
        self.left = False  # set by the torch thread once it holds nothing of this generation

    @property
    def state(self) -> SequenceState:
        return self.session.state

    # -- the consumer's side (its event loop) ------------------------------------------------

    async def next(self) -> Item:
        """The next outcome or error, waiting for a round to make it."""
        while True:
            with self._lock:
                if self._items:
                    item = self._items.popleft()
                    if len(self._items) == self._owner.limits.backlog - 1:
                        self._owner.kick()  # it may have sat rounds out for this reader
                    return item
                event = self._event = anyio.Event()
            await event.wait()

    async def wait_left(self) -> None:
        """Wait until the torch thread has let go of this generation (its row freed: at
        most the round under way), so that no work for it runs after a stream closes."""
        while True:
            with self._lock:
                if self.left or not self._owner.alive:
                    return
                event = self._event = anyio.Event()
            await event.wait()

    # -- the torch thread's side -------------------------------------------------------------

    def wants_round(self) -> bool:
        return not self.closed and len(self._items) < self._owner.limits.backlog

    def put(self, item: Item) -> None:
        with self._lock:
            self._items.append(item)
            event, self._event = self._event, None
        self._wake(event)

    def mark_left(self) -> None:
        with self._lock:
            self.left = True
            event, self._event = self._event, None
        self._wake(event)

    def _wake(self, event: anyio.Event | None) -> None:
        if event is not None:
            # Without waiting for the consumer's loop: a busy one must not stall the rounds.
            # (anyio's own cross-thread calls are built on this backend method.)
            try:
                self._token.backend_class.run_sync_soon(event.set, (), self._token.native_token)
            except anyio.RunFinishedError:  # the consumer's loop has ended: nobody to wake
                logger.debug("a finished event loop could not be woken", exc_info=True)


class _Cancel:
    __slots__ = ("ticket",)

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket


class _Call:
    __slots__ = ("args", "fn", "future")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


class _Barrier:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_KICK = object()
_STOP = object()


class _TorchThread:
    """The one thread of this process that runs dg_stream's torch work, for every backend.

    One, not one per backend: an OpenMP runtime whose thread teams outnumber the cores stops
    spinning between parallel regions (GNU OpenMP throttles its wait), and each small forward
    then pays a sleep and a wake-up per region. Measured on 2 cores: a 9 x 512 x 1408 matmul
    takes 68 us on a thread alone and 169 us while a second thread's team is alive, and the
    embedded verifier's one-token forward 8 ms against 14-19 ms. So backends take turns on
    this thread, round by round, and load their models on it too. It starts with the first
    backend that needs it and ends when the last one closes.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[ModelThread | None, object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._lanes: list[ModelThread] = []  # the torch thread's own list
        # At exit, stop it between two rounds: a thread still inside torch while the
        # interpreter finalises can abort the process.
        atexit.register(self.shutdown)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def put(self, lane: ModelThread | None, command: object) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                import torch

                # OpenMP's thread count is a per-thread setting: take the starter's (what
                # ``torch.set_num_threads`` set there), not the runtime's default.
                threads = torch.get_num_threads()
                self._thread = threading.Thread(
                    target=self._run, args=(threads,), name="dg-stream-torch", daemon=True
                )
                self._thread.start()
            self._queue.put((lane, command))

    def shutdown(self, timeout: float = 10.0) -> None:
        """End every backend's generations and the thread, after the round under way."""
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            self._queue.put((None, _STOP))
        if thread is not threading.current_thread():
            thread.join(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.current_thread() is self._thread:
            return fn(*args)
        command = _Call(fn, args)
        self.put(None, command)
        return command.future.result()

    def _run(self, threads: int) -> None:
        import torch

        if torch.get_num_threads() != threads:
            # Only when it differs: setting it from this thread made about one process in
            # ten abort at exit ("terminate called without an active exception").
            torch.set_num_threads(threads)
        try:
            self._main()
        except BaseException as exc:  # never leave a caller waiting on a dead thread
            logger.exception("dg_stream's torch thread failed")
            with self._lock:
                self._thread = None
                for lane in self._lanes:
                    lane._shut(exc)
                self._lanes.clear()
                while not self._queue.empty():
                    _, command = self._queue.get_nowait()
                    if isinstance(command, _Call):
                        command.future.set_exception(exc)
                    elif isinstance(command, Ticket):
                        command.put(exc)
                    elif isinstance(command, _Barrier):
                        command.done.set()
            raise

    def _main(self) -> None:
        while True:
            runnable = any(lane._runnable() for lane in self._lanes)
            if not runnable and not self._lanes:
                with self._lock:  # nobody left: end, unless a command just came
                    if self._queue.empty():
                        self._thread = None
                        return
            for lane, command in self._commands(block=not runnable):
                if lane is None and command is _STOP:  # the process is exiting
                    for each in list(self._lanes):
                        self._drop(each, BackendClosedError("the process is exiting"))
                    with self._lock:
                        self._thread = None
                    return
                if lane is None:
                    _run_call(command)
                elif command is _STOP:
                    self._drop(lane, BackendClosedError("the backend was closed"))
                elif not lane._stopped.is_set():
                    if lane not in self._lanes:
                        self._lanes.append(lane)
                    self._guarded(lane, lane._handle, command)
                elif isinstance(command, _Barrier):
                    command.done.set()
            for lane in list(self._lanes):  # each backend's round in turn
                self._guarded(lane, lane._admit)
                if lane in self._lanes and lane._runnable():
                    self._guarded(lane, lane._round)

    def _guarded(self, lane: ModelThread, fn: Callable[..., None], *args: Any) -> None:
        """Run one lane's step; a failure outside the model (which ``_round`` handles) ends
        that backend's generations, never the thread or the other backends."""
        try:
            fn(*args)
        except Exception as exc:
            logger.exception("a backend failed outside the model")
            self._drop(lane, exc)

    def _drop(self, lane: ModelThread, error: BaseException) -> None:
        if lane in self._lanes:
            self._lanes.remove(lane)
        lane._shut(error)

    def _commands(self, block: bool) -> list[tuple[ModelThread | None, object]]:
        commands = [self._queue.get()] if block else []
        while True:
            try:
                commands.append(self._queue.get_nowait())
            except queue.Empty:
                return commands


def _run_call(command: object) -> None:
    if isinstance(command, _Call) and command.future.set_running_or_notify_cancel():
        try:
            command.future.set_result(command.fn(*command.args))
        except BaseException as exc:
            command.future.set_exception(exc)


_TORCH = _TorchThread()


def run_on_torch_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on dg_stream's torch thread (between two rounds) and return its
    result; directly when called there. Loading models and any torch work of one's own that
    shares the process with a backend belong there (see ``_TorchThread``)."""
    return _TORCH.call(fn, *args)


class ModelThread:
    """One backend's lane on the process's torch thread: its batch, queue and limits; see the
    module docstring."""

    def __init__(self, engine: Engine, limits: BatchLimits) -> None:
        self.engine = engine
        self.limits = limits
        self._lock = threading.Lock()  # guards the counts below and closing
        self._queued = 0  # submitted, not yet admitted (nor gone)
        self._running = 0  # admitted rows
        self._reserved = 0  # tokens the admitted rows reserve
        self._closed = False
        self._started = False
        self._stopped = threading.Event()  # set once the torch thread has let go of it
        # Torch-thread state.
        self._batch: Batch | None = None
        self._waiting: deque[Ticket] = deque()
        self._rows: dict[SequenceState, Ticket] = {}

    # -- event-loop side ---------------------------------------------------------------------

    def submit(self, session: GenerationSession) -> Ticket:
        """Queue a generation; refused at once when it can never fit or the queue is full."""
        # Admitted already (the engine's session: within context_length, which counts
        # max_cached_tokens), so it fits an empty cache; it waits for room in a full one.
        reserved = len(session.prompt_ids) + session.request.max_new_tokens
        ticket = Ticket(session, reserved, self)
        with self._lock:
            if self._closed:
                raise BackendClosedError("the backend is closed")
            # Only those beyond the rows of a round count as queued.
            queued = self._queued + self._running - self.limits.max_batch
            if queued >= self.limits.max_waiting:
                raise OverloadedError(
                    f"{queued} generations are already waiting for this backend",
                    status_code=503,
                    retry_after=1.0,
                )
            self._queued += 1
            # Under the lock: a command is either queued before the stop or refused.
            self._put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The consumer has gone: free its place (queued) or row (at the round's end)."""
        if not ticket.closed:
            ticket.closed = True
            self._put(_Cancel(ticket))

    def kick(self) -> None:
        self._put(_KICK)

    def close(self, timeout: float | None = None) -> None:
        """Leave the torch thread after the round under way; queued and running generations
        end with an error. Idempotent."""
        with self._lock:
            if self._closed:
                started = False
            else:
                self._closed = True
                started = self._started
                if started:
                    _TORCH.put(self, _STOP)
        if not started:
            self._stopped.set()
        elif threading.current_thread() is not _TORCH.thread:
            self._stopped.wait(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the torch thread between two rounds and return its result:
        torch work of one's own (a synchronous engine loop, a measurement) without a second
        OpenMP team competing for the cores."""
        if self._closed:
            raise BackendClosedError("the backend is closed")
        return _TORCH.call(fn, *args)

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until the torch thread has handled every command this backend sent before
        this call (leaving streams freed, say); True when it has (or none was sent)."""
        if not self.alive:
            return True
        barrier = _Barrier()
        self._put(barrier)
        return barrier.done.wait(timeout)

    @property
    def counts(self) -> tuple[int, int, int]:
        """(rows running, generations queued, tokens reserved) as of now."""
        with self._lock:
            return self._running, self._queued, self._reserved

    @property
    def batch(self) -> Batch | None:
        """The shared batch (for inspection; only the torch thread changes it)."""
        return self._batch

    @property
    def alive(self) -> bool:
        """Whether this backend has work on the torch thread (started, not yet closed)."""
        return self._started and not self._stopped.is_set()

    @property
    def ident(self) -> int | None:
        """The torch thread's id while it runs (every forward runs on it)."""
        thread = _TORCH.thread
        return thread.ident if thread is not None else None

    def _put(self, command: object) -> None:
        self._started = True
        _TORCH.put(self, command)

    # -- the torch thread ----------------------------------------------------------------------

    def _handle(self, command: object) -> None:
        if self._batch is None:
            self._batch = self.engine.batch(self.limits.max_cached_tokens)
        if isinstance(command, Ticket):
            if command.closed:
                self._forget(command)
            else:
                self._waiting.append(command)
        elif isinstance(command, _Cancel):
            self._leave(command.ticket)
        elif isinstance(command, _Barrier):
            command.done.set()

    def _shut(self, error: BaseException) -> None:
        """Leave the torch thread: every generation still here ends with ``error``."""
        for ticket in [*self._rows.values(), *self._waiting]:
            self._leave(ticket)
            ticket.put(error)
        self._stopped.set()

    def _runnable(self) -> bool:
        return any(ticket.wants_round() for ticket in self._rows.values())

    def _admit(self) -> None:
        """Move waiting generations into the batch while the limits allow (in order)."""
        if self._batch is None:
            return
        cap = self.limits.max_cached_tokens
        while self._waiting:
            ticket = self._waiting[0]
            if self._rows and (
                len(self._rows) >= self.limits.max_batch
                or (cap is not None and self._footprint(ticket) > cap)
            ):
                return
            self._waiting.popleft()
            try:
                self._batch.add(ticket.state)
            except Exception as exc:  # e.g. out of memory growing the cache: this one fails
                self._forget(ticket)
                ticket.put(exc)
                continue
            self._rows[ticket.state] = ticket
            ticket.admitted = True
            with self._lock:
                self._queued -= 1
                self._running += 1
                self._reserved += ticket.reserved

    def _footprint(self, joining: Ticket) -> int:
        """What the shared cache may come to allocate once ``joining`` is in: rows x the
        longest row, each row at its reservation plus the padding a round feeds it when
        another row drafts a wider block (a row alone is never fed past its reservation)."""
        tickets = [*self._rows.values(), joining]
        longest = max(t.reserved for t in tickets)
        widest = max(t.session.widest_feed for t in tickets)
        return len(tickets) * (longest + widest - 1)

    def _round(self) -> None:
        assert self._batch is not None
        tickets = [self._rows[state] for state in self._batch.states]
        active = [ticket.wants_round() for ticket in tickets]
        try:
            outcomes = self._batch.run(active)
        except Exception as exc:
            # A failed forward leaves the rows' caches undefined: every row of it ends.
            for ticket, on in zip(tickets, active, strict=True):
                if on:
                    self._leave(ticket)
                    ticket.put(exc)
            return
        for ticket, outcome in zip(tickets, outcomes, strict=True):
            if outcome is None:
                continue
            ticket.put(outcome)
            if isinstance(outcome, BaseException) or outcome.finish is not None:
                self._leave(ticket)

    def _leave(self, ticket: Ticket) -> None:
        """Free a ticket's row or place in the queue (idempotent)."""
        if ticket.admitted:
            assert self._batch is not None
            ticket.admitted = False
            self._rows.pop(ticket.state, None)
            try:
                self._batch.remove(ticket.state)
            except Exception:  # a drafter session that fails to close frees the rest
                logger.exception("freeing a finished generation failed")
            with self._lock:
                self._running -= 1
                self._reserved -= ticket.reserved
            ticket.mark_left()
        elif ticket in self._waiting:
            self._waiting.remove(ticket)
            self._forget(ticket)

    def _forget(self, ticket: Ticket) -> None:
        """A ticket that never got a row leaves the queue's count."""
        ticket.state.close()
        with self._lock:
            self._queued -= 1
        ticket.mark_left()
