"""``ChatSession``: a conversation with history, one streamed reply at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ._backends.base import Backend
from ._chunks import Chunk
from ._config import GenerationRequest, Message, check_text
from ._errors import InvalidRequestError
from ._generate import _get_default_backend, generate, request_for
from ._operators import DerivedStream
from ._prompt import encode_prompt, plain_chat_stops
from ._stream import GenerationStream

__all__ = ["ChatReply", "ChatSession"]


class ChatReply(DerivedStream):
    """The stream of one assistant reply (a ``GenerationStream``: iterate, pipe, collect).

    The exchange is added to the session's history just before the final chunk is handed
    out, and only if the reply ended normally (``finish_reason`` ``"stop"`` or ``"length"``);
    a reply that was closed early, cancelled, failed or left behind by a later ``send()``
    leaves the history as it was.
    """

    def __init__(
        self,
        session: ChatSession,
        user: Message,
        upstream: GenerationStream,
        version: int,
        previous: ChatReply | None,
    ) -> None:
        self.session = session
        self.user = user
        self.started = False
        self.superseded = False
        self.committed = False
        self.reading = False  # inside __anext__: some task is waiting for the next chunk
        # A reply left behind (``break``) is closed here, where there is a loop to await on.
        self._previous = previous

        async def transform(up: GenerationStream) -> AsyncIterator[Chunk]:
            await self._close_previous()
            self.started = True
            async for chunk in up:
                if chunk.finish_reason in ("stop", "length"):
                    self.committed = session._commit(user, up.text, version)
                yield chunk

        super().__init__(upstream, transform)

    async def _close_previous(self) -> None:
        previous, self._previous = self._previous, None
        if previous is not None:
            await previous.aclose()

    async def __anext__(self) -> Chunk:
        if self.superseded:
            raise RuntimeError("this reply was replaced by a later send()")
        self.reading = True
        try:
            return await super().__anext__()
        finally:
            self.reading = False

    async def aclose(self) -> None:
        try:
            await self._close_previous()
        finally:
            await super().aclose()

    @property
    def active(self) -> bool:
        """True while the reply has started streaming and is not closed."""
        return self.started and not self.closed


class ChatSession:
    """A conversation: keeps the messages, streams each reply, trims old turns to fit.

    ``backend`` is a ``LocalBackend`` (the history is rendered with its tokenizer's chat
    template, or the plain ``"User: ...\\n\\nAssistant:"`` format when it has none), a
    ``RemoteBackend`` (the messages go to the server, which renders them), or ``None`` for the
    embedded default model. ``system`` is an optional system message kept at the top.

    ``max_context_tokens`` bounds the prompt plus ``max_new_tokens``: before each reply the
    oldest turns (a user message and the replies to it) are dropped from the history until
    the rest fits. It defaults to the backend's ``context_length``: the local verifier's, or
    the one a remote server reports (known once the backend has made its first request; until
    then, and for servers that do not say, there is no limit and the server rejects what is
    too long). Tokens are counted with the backend's tokenizer, or with
    ``count_tokens(messages)`` when given, else estimated as one per three UTF-8 bytes (on the
    safe side for most tokenizers).

    Other keyword arguments (``temperature``, ``stop``, ``draft_preview``, ``block_size``, ...)
    are passed to ``generate`` for every reply; ``send`` may override them per reply::

        chat = ChatSession(backend, system="You are terse.")
        async for chunk in chat.send("Name a prime."):
            print(chunk.text, end="")
        print(chat.history[-1].content)
    """

    def __init__(
        self,
        backend: Backend | None = None,
        system: str | None = None,
        *,
        max_context_tokens: int | None = None,
        max_new_tokens: int = 256,
        count_tokens: Callable[[Sequence[Message]], int] | None = None,
        **generation_options: Any,
    ) -> None:
        if system is not None:
            check_text(system, "the system message", "system")
        if max_context_tokens is not None and (
            not isinstance(max_context_tokens, int)
            or isinstance(max_context_tokens, bool)
            or max_context_tokens < 1
        ):
            raise InvalidRequestError(
                f"max_context_tokens must be an integer >= 1, got {max_context_tokens!r}",
                param="max_context_tokens",
            )
        # The same checks and errors as generate(), now rather than at the first send().
        request_for("x", max_new_tokens=max_new_tokens, **generation_options)
        self._backend = backend
        self.system = system
        self.max_new_tokens = max_new_tokens
        self._max_context_tokens = max_context_tokens
        self._count_tokens = count_tokens
        self.options = dict(generation_options)
        self._history: list[Message] = []
        self._version = 0  # bumped whenever the history changes
        self._reply: ChatReply | None = None
        self.trimmed_turns = 0  # how many turns were dropped to fit the context so far

    # -- history ------------------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = _get_default_backend()
        return self._backend

    @property
    def history(self) -> tuple[Message, ...]:
        """The conversation so far (user and assistant messages; the system one excluded)."""
        return tuple(self._history)

    @property
    def messages(self) -> list[Message]:
        """What the next request starts from: the system message (if any) and the history."""
        head = [Message("system", self.system)] if self.system else []
        return [*head, *self._history]

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self._history.clear()
        self._version += 1

    def _commit(self, user: Message, text: str, version: int) -> bool:
        if version != self._version:
            return False  # the history changed under this reply (reset or another reply)
        self._history += [user, Message("assistant", text.strip())]
        self._version += 1
        return True

    # -- token budget ---------------------------------------------------------------------------

    @property
    def max_context_tokens(self) -> int | None:
        if self._max_context_tokens is not None:
            return self._max_context_tokens
        return self.backend.context_length

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """The prompt length, in tokens, that ``messages`` render to for this backend."""
        if self._count_tokens is not None:
            return self._count_tokens(messages)
        tokenizer = self.backend.tokenizer
        if tokenizer is not None:
            request = GenerationRequest(messages=list(messages))
            # The same rendering as the engine's, so the count is exact.
            return len(encode_prompt(tokenizer, request, vocab_size=1 << 62))
        size = sum(len(m.role) + len(m.content.encode()) + 8 for m in messages)
        return -(-size // 3)

    def _fit(self, user: Message, max_new_tokens: int) -> list[Message]:
        """The history with the oldest turns dropped so that the prompt fits."""
        limit = self.max_context_tokens
        if limit is None:
            return [*self.messages, user]
        budget = limit - max_new_tokens
        while True:
            messages = [*self.messages, user]
            used = self.count_tokens(messages)
            if used <= budget:
                return messages
            if not self._history:
                raise InvalidRequestError(
                    f"the message needs {used} tokens but only {max(budget, 0)} of the "
                    f"{limit}-token context are left after max_new_tokens={max_new_tokens}",
                    param="messages",
                    code="context_length_exceeded",
                )
            self._drop_oldest_turn()

    def _drop_oldest_turn(self) -> None:
        # A turn is a user message and everything up to the next user message.
        end = 1
        while end < len(self._history) and self._history[end].role != "user":
            end += 1
        del self._history[:end]
        self._version += 1
        self.trimmed_turns += 1

    # -- replies --------------------------------------------------------------------------------

    def _default_stop(self) -> list[str]:
        return list(plain_chat_stops(self.backend.tokenizer))

    def send(self, content: str, **overrides: Any) -> ChatReply:
        """Add a user message and return the stream of the assistant's reply.

        The exchange joins the history when the reply completes. One reply streams at a time:
        a previous reply that was left unfinished (``break``, or never started) is replaced,
        closed when this one starts (or closes), and its partial text is dropped: the history
        keeps complete exchanges only. Sending while another task is reading the previous
        reply raises ``RuntimeError``. Options are checked as ``generate()`` checks them;
        raises ``InvalidRequestError`` for a message that is not text, is empty, or cannot fit
        the context even with the history trimmed away.
        """
        check_text(content, "the message", "content")
        if not content.strip():
            raise InvalidRequestError("the message is empty", param="content")
        options = {"max_new_tokens": self.max_new_tokens, **self.options, **overrides}
        request_for("x", **options)  # before anything changes: a bad override leaves all be
        previous = self._reply
        if previous is not None and previous.reading:
            raise RuntimeError(
                "a reply is still streaming in another task: read it to the end or close "
                "it before sending the next message"
            )
        max_new_tokens = options.pop("max_new_tokens")
        stop = options.pop("stop", None)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stops += [s for s in self._default_stop() if s not in stops]
        user = Message("user", content)
        messages = self._fit(user, max_new_tokens)
        upstream = generate(
            [{"role": m.role, "content": m.content} for m in messages],
            backend=self.backend,
            max_new_tokens=max_new_tokens,
            stop=stops or None,
            **options,
        )
        if previous is not None and not previous.closed:
            previous.superseded = True
        else:
            previous = None
        self._reply = ChatReply(self, user, upstream, self._version, previous)
        return self._reply

    async def ask(self, content: str, **overrides: Any) -> str:
        """Send a message and return the whole reply text."""
        return (await self.send(content, **overrides).collect()).text

    def __repr__(self) -> str:
        return f"<ChatSession turns={len(self._history) // 2} backend={self._backend!r}>"
