"""ChatSession: history, streamed replies, completion-only commits, trimming, fallbacks."""

from __future__ import annotations

import copy
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

import dg_stream
from dg_stream import ChatSession, Chunk, GenerationRequest, InvalidRequestError, Message
from dg_stream._prompt import encode_prompt, render_plain_chat

sys.path.insert(0, str(Path(__file__).parent))
from _servers import ServerThread


class Recording:
    """A backend that forwards to another and remembers every request it was given;
    ``tokenizer=False``: it tells neither its tokenizer nor its context length."""

    def __init__(self, inner: Any, *, tokenizer: bool = True) -> None:
        self.inner = inner
        self.requests: list[GenerationRequest] = []
        self.tokenizer = inner.tokenizer if tokenizer else None
        self.context_length = inner.context_length if tokenizer else None
        self.model_name = inner.model_name

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        return self.inner.stream(request)

    async def aclose(self) -> None:
        return None


def test_reply_streams_and_joins_history(tiny_backend: Any) -> None:
    backend = Recording(tiny_backend)
    chat = ChatSession(backend, system="Be brief.", max_new_tokens=12)

    async def main() -> tuple[list[str], Any]:
        reply = chat.send("hello")
        pieces = [chunk.text async for chunk in reply]
        second = await chat.ask("and again")
        return pieces, second

    pieces, second = anyio.run(main)
    assert len(chat.history) == 4
    assert chat.history[0] == Message("user", "hello")
    assert chat.history[1] == Message("assistant", "".join(pieces).strip())
    assert chat.history[3] == Message("assistant", second.strip())
    first, last = backend.requests
    assert first.messages == [Message("system", "Be brief."), Message("user", "hello")]
    assert last.messages is not None and last.messages[1:3] == list(chat.history[:2])
    assert first.stop == ()  # the tiny tokenizer has a chat template: no plain-format stop


def test_reply_equals_plain_generate_over_the_same_messages(tiny_backend: Any) -> None:
    chat = ChatSession(tiny_backend, max_new_tokens=10)

    async def main() -> tuple[str, str]:
        via_chat = await chat.ask("def add")
        direct = await dg_stream.generate(
            [{"role": "user", "content": "def add"}], backend=tiny_backend, max_new_tokens=10
        ).collect()
        return via_chat, direct.text

    via_chat, direct = anyio.run(main)
    assert via_chat == direct


@pytest.mark.parametrize("how", ["break", "aclose", "cancel"])
def test_interrupted_reply_is_not_half_added(tiny_backend: Any, how: str) -> None:
    chat = ChatSession(tiny_backend, max_new_tokens=40)

    async def main() -> None:
        await chat.ask("first")
        reply = chat.send("second")
        if how == "break":
            async with reply:
                async for _ in reply:
                    break
        elif how == "aclose":
            await reply.__anext__()
            await reply.aclose()
        else:
            with anyio.CancelScope() as scope:
                async for _ in reply:
                    scope.cancel()
        assert reply.closed and not reply.committed

    anyio.run(main)
    assert [m.content for m in chat.history if m.role == "user"] == ["first"]


def test_one_reply_at_a_time(tiny_backend: Any) -> None:
    chat = ChatSession(tiny_backend, max_new_tokens=8)

    async def main() -> None:
        unstarted = chat.send("never read")
        reply = chat.send("read")  # replaces the unstarted one
        with pytest.raises(RuntimeError, match="replaced"):
            await unstarted.collect()
        await reply.collect()
        chat.send("now fine")

    anyio.run(main)
    assert [m.content for m in chat.history if m.role == "user"] == ["read"]


class Gated:
    """Forwards to another backend, holding each stream after its first chunk until
    ``release`` is set; counts the streams whose work was closed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokenizer, self.context_length = inner.tokenizer, inner.context_length
        self.model_name = inner.model_name
        self.release: Any = None  # an anyio.Event, made on the test's loop
        self.closed = 0

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        source = self.inner.stream(request)
        try:
            first = True
            async for chunk in source:
                yield chunk
                if first:
                    first = False
                    await self.release.wait()
        finally:
            await source.aclose()
            self.closed += 1

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("leave", ["break", "pause"])
def test_a_reply_left_early_is_closed_by_the_next_send(tiny_backend: Any, leave: str) -> None:
    """Leaving early is a feature: the next send() closes the reply left behind (its partial
    text dropped from the history) and goes on."""
    backend = Gated(tiny_backend)
    chat = ChatSession(backend, max_new_tokens=8)

    async def main() -> None:
        backend.release = anyio.Event()
        backend.release.set()
        await chat.ask("first")
        backend.closed, backend.release = 0, anyio.Event()
        left = chat.send("left early")
        if leave == "break":
            async for _ in left:
                break
        else:
            await left.__anext__()
        backend.release.set()
        assert not left.closed
        answer = await chat.ask("next")  # no RuntimeError
        assert left.closed and not left.committed
        assert backend.closed == 2  # the left reply's work was closed, then the next's ended
        with pytest.raises(RuntimeError, match="replaced"):
            await left.__anext__()
        assert chat.history[-1] == Message("assistant", answer.strip())

    anyio.run(main)
    assert [m.content for m in chat.history if m.role == "user"] == ["first", "next"]


def test_send_while_another_task_reads_the_reply_is_refused(tiny_backend: Any) -> None:
    backend = Gated(tiny_backend)
    chat = ChatSession(backend, max_new_tokens=8)

    async def main() -> None:
        backend.release = anyio.Event()
        reply = chat.send("one")
        await reply.__anext__()
        async with anyio.create_task_group() as tg:
            tg.start_soon(reply.collect)  # waits in the gated backend
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="another task"):
                chat.send("two")
            backend.release.set()
        assert reply.committed

    anyio.run(main)
    assert [m.content for m in chat.history if m.role == "user"] == ["one"]


@pytest.mark.parametrize(
    ("make", "param", "message"),
    [
        (lambda chat: chat.send(123), "content", "the message must be a string, got int"),
        (lambda chat: chat.send(["hi"]), "content", "must be a string, got list"),
        (lambda chat: chat.send("  "), "content", "the message is empty"),
        (lambda chat: chat.send("hi", max_new_tokens="abc"), "max_new_tokens", "'abc'"),
        (lambda chat: chat.send("hi", max_new_tokens=10.7), "max_new_tokens", "10.7"),
        (lambda chat: chat.send("hi", temperature=-1), "temperature", ">= 0"),
        (lambda chat: chat.send("hi", blocksize=4), "blocksize", "unknown option"),
        (lambda chat: ChatSession(chat.backend, max_new_tokens="abc"), "max_new_tokens", "'abc'"),
        (lambda chat: ChatSession(chat.backend, max_new_tokens=10.7), "max_new_tokens", "10.7"),
        (lambda chat: ChatSession(chat.backend, max_new_tokens=0), "max_new_tokens", ">= 1"),
        (lambda chat: ChatSession(chat.backend, top_p=2.0), "top_p", r"\(0, 1\]"),
        (lambda chat: ChatSession(chat.backend, stop=5), "stop", "stop must be"),
        (lambda chat: ChatSession(chat.backend, system=3), "system", "must be a string"),
        (lambda chat: ChatSession(chat.backend, max_context_tokens=0), "max_context_tokens", ">="),
    ],
)
def test_chat_validates_as_generate_does(
    tiny_backend: Any, make: Any, param: str, message: str
) -> None:
    chat = ChatSession(tiny_backend, max_new_tokens=4)
    with pytest.raises(InvalidRequestError, match=message) as info:
        make(chat)
    assert info.value.param == param
    assert chat.history == ()


def test_chat_and_generate_refuse_max_new_tokens_alike(tiny_backend: Any) -> None:
    chat = ChatSession(tiny_backend)
    values: list[Any] = [10.7, 10.5, "abc", 0, True]
    for value in values:
        with pytest.raises(InvalidRequestError) as direct:
            dg_stream.generate("hi", backend=tiny_backend, max_new_tokens=value)
        with pytest.raises(InvalidRequestError) as via_chat:
            chat.send("hi", max_new_tokens=value)
        assert str(via_chat.value) == str(direct.value)


def test_oldest_turns_are_trimmed_to_fit(tiny_backend: Any) -> None:
    backend = Recording(tiny_backend)
    chat = ChatSession(backend, system="sys", max_new_tokens=8, max_context_tokens=70)

    async def main() -> None:
        for i in range(6):
            await chat.ask(f"message number {i} with some words in it")

    anyio.run(main)
    assert chat.trimmed_turns > 0
    for request in backend.requests:
        assert request.messages is not None
        assert request.messages[0] == Message("system", "sys")  # the system message stays
        assert chat.count_tokens(request.messages) + 8 <= 70
    last = backend.requests[-1].messages
    assert last is not None and last[-1].content.startswith("message number 5")
    # Turns are dropped whole, oldest first.
    users = [m.content for m in chat.history if m.role == "user"]
    assert users == [f"message number {i} with some words in it" for i in range(6 - len(users), 6)]
    assert [m.role for m in chat.history] == ["user", "assistant"] * len(users)

    with pytest.raises(InvalidRequestError, match="context") as info:
        chat.send("word " * 200)
    assert (info.value.param, info.value.code) == ("messages", "context_length_exceeded")


def test_default_context_is_the_verifiers(tiny_backend: Any) -> None:
    chat = ChatSession(tiny_backend)
    assert isinstance(tiny_backend, dg_stream.Backend)
    assert chat.max_context_tokens == tiny_backend.context_length
    assert tiny_backend.context_length == tiny_backend.verifier.max_length == 512
    with pytest.raises(InvalidRequestError):
        chat.send("   ")


def test_plain_format_without_chat_template(
    tiny_verifier: Any, tiny_drafter: Any, tiny_tok: Any
) -> None:
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = None
    backend = Recording(
        dg_stream.LocalBackend(tiny_verifier, tiny_drafter, tokenizer=tok, block_size=4)
    )
    chat = ChatSession(backend, system="sys", max_new_tokens=6)
    anyio.run(chat.ask, "hi there")
    request = backend.requests[0]
    assert request.stop == ("\n\nUser:",)
    assert request.messages is not None
    prompt = render_plain_chat(request.messages)
    assert prompt == "System: sys\n\nUser: hi there\n\nAssistant:"
    assert chat.count_tokens(request.messages) == len(tok(prompt)["input_ids"])


def test_backend_without_tokenizer_uses_estimate_or_counter(tiny_backend: Any) -> None:
    backend = Recording(tiny_backend, tokenizer=False)
    chat = ChatSession(backend, max_new_tokens=4)
    assert chat.max_context_tokens is None
    assert chat.count_tokens([Message("user", "x" * 30)]) == 14  # (4 + 30 + 8) bytes / 3
    counted: list[int] = []

    def counter(messages: Any) -> int:
        counted.append(len(messages))
        return 10 * len(messages)

    chat = ChatSession(backend, max_new_tokens=4, max_context_tokens=40, count_tokens=counter)

    async def main() -> None:
        for text in ("a", "b", "c"):
            await chat.ask(text)

    anyio.run(main)
    # 5 messages * 10 + 4 > 40: the turn "a" was dropped before "c" was sent.
    assert counted and chat.trimmed_turns == 1
    last = backend.requests[-1].messages
    assert last is not None and [m.content for m in last][::2] == ["b", "c"]


def test_reset_discards_a_reply_in_flight(tiny_backend: Any) -> None:
    chat = ChatSession(tiny_backend, max_new_tokens=6)

    async def main() -> None:
        reply = chat.send("one")
        await reply.__anext__()
        chat.reset()
        await reply.collect()
        assert not reply.committed

    anyio.run(main)
    assert chat.history == ()


@pytest.mark.parametrize("api", ["auto", "openai"])
def test_remote_chat_trims_to_the_context_the_server_reports(tiny_backend: Any, api: str) -> None:
    from dg_stream.server import create_app

    def exact(messages: Sequence[Message]) -> int:  # the server's own count, for a tight fit
        request = GenerationRequest(messages=list(messages))
        return len(encode_prompt(tiny_backend.tokenizer, request, vocab_size=1 << 62))

    turn = "def add(a, b): return a + b\n" * 12
    assert exact([Message("user", turn)]) > 180  # three turns and replies overflow 512

    async def main(url: str) -> tuple[ChatSession, list[int | None]]:
        async with dg_stream.RemoteBackend(url, api=api) as remote:
            chat = ChatSession(remote, max_new_tokens=8, count_tokens=exact)
            limits = [chat.max_context_tokens]  # unknown before the first request
            for i in range(4):
                await chat.ask(f"{i}: {turn}")  # the server refuses what does not fit
                limits.append(chat.max_context_tokens)
        return chat, limits

    with ServerThread(create_app(tiny_backend)) as server:
        chat, limits = anyio.run(main, server.url)
    assert limits == [None, 512, 512, 512, 512]
    assert chat.trimmed_turns >= 1  # else the server would have refused the third turn


@pytest.mark.parametrize("api", ["dg", "openai"])
def test_chat_over_a_remote_backend(tiny_backend: Any, api: str) -> None:
    """Messages go to the server, which renders them: the same replies as in process."""
    import httpx

    from dg_stream.server import create_app

    async def main() -> tuple[list[str], list[str], Any]:
        app = create_app(tiny_backend)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        remote = dg_stream.RemoteBackend("http://t", api=api, http_client=client)
        try:
            chat = ChatSession(remote, system="sys", max_new_tokens=8)
            remote_replies = [await chat.ask("hello"), await chat.ask("more")]
        finally:
            await client.aclose()
        local = ChatSession(tiny_backend, system="sys", max_new_tokens=8)
        local_replies = [await local.ask("hello"), await local.ask("more")]
        return remote_replies, local_replies, chat

    remote_replies, local_replies, chat = anyio.run(main)
    assert remote_replies == local_replies
    assert len(chat.history) == 4
    assert chat.max_context_tokens == 512  # the server's: the backend learned it
