"""``ChatSession``: a conversation with history, one streamed reply at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from ._backends.base import Backend
from ._chunks import Chunk
from ._config import GenerationRequest, Message
from ._errors import InvalidRequestError
from ._generate import _get_default_backend, generate
from ._operators import DerivedStream
from ._prompt import encode_prompt, plain_chat_stops
from ._stream import GenerationStream

__all__ = ["ChatReply", "ChatSession"]


class ChatReply(DerivedStream):
    """The stream of one assistant reply (a ``GenerationStream``: iterate, pipe, collect).

    The exchange is added to the session's history just before the final chunk is handed
    out, and only if the reply ended normally (``finish_reason`` ``"stop"`` or ``"length"``);
    a reply that was closed early, cancelled or failed leaves the history as it was.
    """

    def __init__(
        self, session: ChatSession, user: Message, upstream: GenerationStream, version: int
    ) -> None:
        self.session = session
        self.user = user
        self.started = False
        self.superseded = False
        self.committed = False

        async def transform(up: GenerationStream) -> AsyncIterator[Chunk]:
            if self.superseded:
                raise RuntimeError("this reply was replaced by a later send() before it started")
            self.started = True
            async for chunk in up:
                if chunk.finish_reason in ("stop", "length"):
                    self.committed = session._commit(user, up.text, version)
                yield chunk

        super().__init__(upstream, transform)

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
        if max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be >= 1", param="max_new_tokens")
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

        The exchange joins the history when the reply completes. Only one reply streams at a
        time: sending while another reply is streaming raises ``RuntimeError``; a reply that
        was never started is simply replaced. Raises ``InvalidRequestError`` for an empty
        message or one that cannot fit the context even with the history trimmed away.
        """
        if not isinstance(content, str) or not content.strip():
            raise InvalidRequestError("the message is empty", param="content")
        if self._reply is not None:
            if self._reply.active:
                raise RuntimeError(
                    "a reply is still streaming: read it to the end or close it "
                    "before sending the next message"
                )
            if not self._reply.started:
                self._reply.superseded = True
        options = {**self.options, **overrides}
        max_new_tokens = int(options.pop("max_new_tokens", self.max_new_tokens))
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
        self._reply = ChatReply(self, user, upstream, self._version)
        return self._reply

    async def ask(self, content: str, **overrides: Any) -> str:
        """Send a message and return the whole reply text."""
        return (await self.send(content, **overrides).collect()).text

    def __repr__(self) -> str:
        return f"<ChatSession turns={len(self._history) // 2} backend={self._backend!r}>"
