"""How one generation becomes an HTTP response: renderers per protocol and the ASGI response.

``GenerationResponse`` runs the backend stream in a producer task that feeds a bounded memory
stream, watches the connection for ``http.disconnect`` and, when the client goes away, cancels
the producer: the backend's stream is closed, and a local one returns once the round under way
has finished and its row is freed (the model work ends within one round). Its first item decides the
status: an ``InvalidRequestError`` before any output becomes a 400, a chunk starts a 200 event
stream. If the first chunk takes longer than the keep-alive interval, the event stream starts
anyway and ``: keep-alive`` comments flow until it arrives.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._chunks import Chunk, Usage
from .._errors import (
    APIStatusError,
    DGStreamError,
    GenerationError,
    InvalidRequestError,
    OverloadedError,
)
from .._tools import FunctionTool, ToolCall, ToolCallReader, ToolChoice, parse_auto_reply
from .._wire import ChunkEvent, ErrorBody, ErrorEvent, ErrorResponse, encode
from ._metrics import Metrics
from ._openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionResponse,
    FunctionCallOut,
    ToolCallOut,
    UsageBody,
)

__all__ = [
    "AutoToolRenderer",
    "ChatRenderer",
    "CompletionRenderer",
    "GenerationResponse",
    "NativeRenderer",
    "ServerShuttingDown",
    "ToolCallRenderer",
    "error_body_for",
    "error_response",
]

logger = logging.getLogger("dg_stream.server")

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",  # nginx: do not buffer the stream
}


class ServerShuttingDown(GenerationError):
    """Ends a generation the server is not waiting for as it shuts down."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down: retry the request later or elsewhere")


def sse(data: bytes, event: str | None = None) -> bytes:
    """One event; msgspec's JSON never contains a raw newline, so one data line suffices."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data + b"\n\n"


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> Response:
    return Response(
        encode(ErrorResponse(error=body)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def renamed_message(message: str, param: str | None, renamed: str | None) -> str:
    """``message`` with the library's parameter name replaced by the endpoint's (for example
    ``max_new_tokens`` by OpenAI's ``max_tokens``)."""
    if not param or not renamed or renamed == param:
        return message
    return re.sub(rf"\b{re.escape(param)}\b", renamed, message)


def error_body_for(
    exc: BaseException,
    *,
    rename: Callable[[str | None], str | None] = lambda p: p,
    retry_after: int = 1,
) -> tuple[int, ErrorBody, dict[str, str] | None]:
    """(status, body, headers) for an exception raised by a backend."""
    if isinstance(exc, InvalidRequestError):
        code = exc.code or "invalid_value"
        param = rename(exc.param)
        return (
            400,
            ErrorBody(
                message=renamed_message(exc.message, exc.param, param),
                type="invalid_request_error",
                param=param,
                code=code,
            ),
            None,
        )
    if _is_template_error(exc):
        return (
            400,
            ErrorBody(
                message=f"the chat template rejected the messages: {exc}",
                type="invalid_request_error",
                param="messages",
                code="invalid_messages",
            ),
            None,
        )
    if isinstance(exc, ServerShuttingDown):
        return (
            503,
            ErrorBody(message=str(exc), type="server_error", code="server_shutting_down"),
            {"retry-after": str(retry_after)},
        )
    if isinstance(exc, OverloadedError):  # a proxied server is full: pass its advice on
        seconds = int(exc.retry_after) if exc.retry_after is not None else retry_after
        return (
            503,
            ErrorBody(message=str(exc), type="overloaded_error", code="upstream_overloaded"),
            {"retry-after": str(max(1, seconds))},
        )
    if isinstance(exc, APIStatusError):
        return (
            502,
            ErrorBody(message=str(exc), type="upstream_error", code=f"upstream_{exc.status_code}"),
            None,
        )
    if isinstance(exc, DGStreamError):
        return 500, ErrorBody(message=str(exc), type="server_error", code="generation_failed"), None
    return (
        500,
        ErrorBody(
            message="internal error while generating (see the server log)",
            type="server_error",
            code="internal_error",
        ),
        None,
    )


def _is_template_error(exc: BaseException) -> bool:
    try:
        from jinja2.exceptions import TemplateError
    except ImportError:  # pragma: no cover - jinja2 ships with transformers
        return False
    return isinstance(exc, TemplateError)


# -- renderers ------------------------------------------------------------------------------------


class Renderer(Protocol):
    def chunk(self, chunk: Chunk) -> list[bytes]: ...
    def end(self) -> list[bytes]: ...
    def error(self, body: ErrorBody) -> bytes: ...
    def whole(self, text: str, chunks: list[Chunk]) -> bytes: ...


def _usage(usage: Usage | None) -> UsageBody | None:
    if usage is None:
        return None
    return UsageBody(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def _openai_finish(chunk: Chunk) -> str | None:
    return (
        None
        if chunk.finish_reason is None
        else ("length" if chunk.finish_reason == "length" else "stop")
    )


class NativeRenderer:
    """``/v1/dg/generate``: every Chunk as it is."""

    def chunk(self, chunk: Chunk) -> list[bytes]:
        return [sse(encode(ChunkEvent(chunk=chunk)))]

    def end(self) -> list[bytes]:
        return []

    def error(self, body: ErrorBody) -> bytes:
        return sse(encode(ErrorEvent(error=body)), "error")

    def whole(self, text: str, chunks: list[Chunk]) -> bytes:  # pragma: no cover - always streams
        raise NotImplementedError


class _OpenAIRenderer:
    def __init__(self, *, id: str, model: str, include_usage: bool) -> None:
        self.id = id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.usage: Usage | None = None

    def error(self, body: ErrorBody) -> bytes:
        return sse(encode(ErrorResponse(error=body)), "error")

    def _final_usage(self, chunks: list[Chunk]) -> UsageBody:
        usage = next((c.usage for c in reversed(chunks) if c.usage is not None), None)
        return _usage(usage) or UsageBody(prompt_tokens=0, completion_tokens=0, total_tokens=0)


class CompletionRenderer(_OpenAIRenderer):
    """``/v1/completions``."""

    def chunk(self, chunk: Chunk) -> list[bytes]:
        if chunk.usage is not None:
            self.usage = chunk.usage
        finish = _openai_finish(chunk)
        if not chunk.text and finish is None:
            return []
        return [
            sse(
                encode(
                    CompletionResponse(
                        id=self.id,
                        created=self.created,
                        model=self.model,
                        choices=[CompletionChoice(text=chunk.text, finish_reason=finish)],
                    )
                )
            )
        ]

    def end(self) -> list[bytes]:
        out = []
        if self.include_usage:
            out.append(
                sse(
                    encode(
                        CompletionResponse(
                            id=self.id,
                            created=self.created,
                            model=self.model,
                            choices=[],
                            usage=_usage(self.usage),
                        )
                    )
                )
            )
        return [*out, DONE]

    def whole(self, text: str, chunks: list[Chunk]) -> bytes:
        finish = _openai_finish(chunks[-1]) if chunks else "stop"
        return encode(
            CompletionResponse(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[CompletionChoice(text=text, finish_reason=finish)],
                usage=self._final_usage(chunks),
            )
        )


class ChatRenderer(_OpenAIRenderer):
    """``/v1/chat/completions``: a role delta first, then content deltas, then the finish."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.started = False

    def _frame(self, delta: ChatDelta, finish: str | None = None) -> bytes:
        return sse(
            encode(
                ChatCompletionChunk(
                    id=self.id,
                    created=self.created,
                    model=self.model,
                    choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
                )
            )
        )

    def _start(self, chunk: Chunk, content: str | None = "") -> list[bytes]:
        """Keep ``chunk``'s usage; before the first delta, the role's frame."""
        if chunk.usage is not None:
            self.usage = chunk.usage
        if self.started:
            return []
        self.started = True
        return [self._frame(ChatDelta(role="assistant", content=content))]

    def _completion(
        self, message: ChatMessageOut, finish: str | None, chunks: list[Chunk]
    ) -> bytes:
        return encode(
            ChatCompletion(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[ChatChoice(message=message, finish_reason=finish)],
                usage=self._final_usage(chunks),
            )
        )

    def chunk(self, chunk: Chunk) -> list[bytes]:
        out = self._start(chunk)
        if chunk.text:
            out.append(self._frame(ChatDelta(content=chunk.text)))
        finish = _openai_finish(chunk)
        if finish is not None:
            out.append(self._frame(ChatDelta(), finish))
        return out

    def end(self) -> list[bytes]:
        out = []
        if self.include_usage:
            out.append(
                sse(
                    encode(
                        ChatCompletionChunk(
                            id=self.id,
                            created=self.created,
                            model=self.model,
                            choices=[],
                            usage=_usage(self.usage),
                        )
                    )
                )
            )
        return [*out, DONE]

    def whole(self, text: str, chunks: list[Chunk]) -> bytes:
        finish = _openai_finish(chunks[-1]) if chunks else "stop"
        return self._completion(ChatMessageOut(content=text), finish, chunks)


def _tool_calls_out(calls: Sequence[ToolCall]) -> list[ToolCallOut]:
    return [
        ToolCallOut(
            id=call.id,
            type="function",
            function=FunctionCallOut(name=call.name, arguments=call.arguments),
        )
        for call in calls
    ]


class ToolCallRenderer(ChatRenderer):
    """A forced tool call: the constrained reply becomes ``tool_calls`` (streamed as
    OpenAI's deltas: a named function's arguments piece by piece, a ``"required"`` reply's
    calls each whole as it closes); ``finish_reason`` is ``"tool_calls"``, or ``"length"``
    when the limit cut the reply."""

    def __init__(self, choice: ToolChoice, **options: Any) -> None:
        super().__init__(**options)
        self.choice = choice
        self.reader = ToolCallReader(choice)

    def _finish(self, chunk: Chunk, reader: ToolCallReader) -> str:
        return "tool_calls" if chunk.finish_reason == "stop" and reader.complete() else "length"

    def chunk(self, chunk: Chunk) -> list[bytes]:
        out = self._start(chunk, content=None)
        for index, call_id, name, arguments in self.reader.feed(chunk.text):
            piece = ToolCallOut(
                index=index,
                id=call_id,
                type="function" if call_id is not None else None,
                function=FunctionCallOut(name=name, arguments=arguments),
            )
            out.append(self._frame(ChatDelta(tool_calls=[piece])))
        if chunk.finish_reason is not None:
            out.append(self._frame(ChatDelta(), self._finish(chunk, self.reader)))
        return out

    def whole(self, text: str, chunks: list[Chunk]) -> bytes:
        reader = ToolCallReader(self.choice)
        reader.feed(text)
        finish = self._finish(chunks[-1], reader) if chunks else "tool_calls"
        message = ChatMessageOut(content=None, tool_calls=_tool_calls_out(reader.calls))
        return self._completion(message, finish, chunks)


class AutoToolRenderer(ChatRenderer):
    """``tool_choice="auto"``: the model answers or calls in its own format, which the
    tokenizer's ``response_template`` reads once the reply is whole (so a stream sends its
    content and calls at the end)."""

    def __init__(
        self, tokenizer: Any, prefix: str, tools: Sequence[FunctionTool], **options: Any
    ) -> None:
        super().__init__(**options)
        self.tokenizer, self.prefix, self.tools = tokenizer, prefix, tools
        self.text = ""

    def _read(self, text: str, chunk: Chunk | None) -> tuple[str, list[ToolCall], str]:
        content, calls = parse_auto_reply(self.tokenizer, text, self.prefix, self.tools)
        finish = (_openai_finish(chunk) if chunk is not None else None) or "stop"
        return content, calls, "tool_calls" if calls and finish == "stop" else finish

    def chunk(self, chunk: Chunk) -> list[bytes]:
        out = self._start(chunk)
        self.text += chunk.text
        if chunk.finish_reason is None:
            return out
        content, calls, finish = self._read(self.text, chunk)
        if content:
            out.append(self._frame(ChatDelta(content=content)))
        for index, call in enumerate(_tool_calls_out(calls)):
            out.append(
                self._frame(ChatDelta(tool_calls=[msgspec.structs.replace(call, index=index)]))
            )
        out.append(self._frame(ChatDelta(), finish))
        return out

    def whole(self, text: str, chunks: list[Chunk]) -> bytes:
        content, calls, finish = self._read(text, chunks[-1] if chunks else None)
        message = ChatMessageOut(
            content=content or (None if calls else ""),
            tool_calls=_tool_calls_out(calls) or None,
        )
        return self._completion(message, finish, chunks)


# -- the response ---------------------------------------------------------------------------------

_Item = Chunk | BaseException


async def send_plain(
    send: Send, status: int, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """A complete JSON response, written straight to the ASGI ``send``."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GenerationResponse:
    """An ASGI response running one generation; ``release`` is called exactly once at its end."""

    def __init__(
        self,
        source: AsyncIterator[Chunk],
        renderer: Renderer,
        *,
        stream: bool,
        endpoint: str,
        metrics: Metrics,
        keepalive_seconds: float,
        release: Callable[[], None],
        rename: Callable[[str | None], str | None] = lambda p: p,
        running: set[GenerationResponse] | None = None,
    ) -> None:
        self.source = source
        self.renderer = renderer
        self.stream = stream
        self.endpoint = endpoint
        self.metrics = metrics
        self.keepalive_seconds = keepalive_seconds
        self.release = release
        self.rename = rename
        self.status_code = 200
        self.disconnected = False
        self.finished = False
        self.outcome = "disconnected"
        self.running = running if running is not None else set()
        # The model work; cancelled by stop(), after which the client is told why.
        self._work = anyio.CancelScope()

    def stop(self) -> None:
        """End the generation now with a final error saying the server is shutting down
        (an error event when streaming, a 503 before any output)."""
        self._work.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out, items = anyio.create_memory_object_stream[_Item](1)
        self.running.add(self)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._produce, out)
                tg.start_soon(self._watch, receive, tg.cancel_scope)
                try:
                    async with items:
                        if self.stream:
                            await self._send_stream(send, items)
                        else:
                            await self._send_whole(send, items)
                except OSError:  # servers other than uvicorn raise when the peer is gone
                    self.disconnected = True
                self.finished = True
                tg.cancel_scope.cancel()
        finally:
            self.running.discard(self)
            if self.disconnected:
                self.metrics.disconnects += 1
            self.metrics.generation_done(self.endpoint, self.outcome)

    # -- the two tasks ------------------------------------------------------------------------

    async def _produce(self, out: MemoryObjectSendStream[_Item]) -> None:
        started = time.perf_counter()
        first = True
        self.metrics.active += 1
        try:
            async with out:
                with self._work:
                    while True:
                        try:
                            chunk = await self.source.__anext__()
                        except StopAsyncIteration:
                            return
                        except Exception as exc:
                            await out.send(exc)
                            return
                        if first:
                            first = False
                            self.metrics.first_chunk(time.perf_counter() - started)
                        self.metrics.chunk(chunk)
                        await out.send(chunk)
                        if chunk.finish_reason is not None:
                            return
                # Only stop() gets here (the loop leaves by return): say why it ends.
                await out.send(ServerShuttingDown())
        finally:
            # Shielded: the backend must release its session even when we are being cancelled.
            with anyio.CancelScope(shield=True):
                closer = getattr(self.source, "aclose", None)
                if closer is not None:
                    try:
                        await closer()
                    except Exception:  # pragma: no cover - a backend bug must not kill the server
                        logger.exception("closing a generation failed")
            self.metrics.active -= 1
            self.release()

    async def _watch(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self.disconnected = True
                    scope.cancel()
                return

    # -- writing ------------------------------------------------------------------------------

    async def _first(
        self, items: MemoryObjectReceiveStream[_Item], timeout: float | None
    ) -> _Item | None:
        """The next item; ``None`` on timeout. EndOfStream becomes a GenerationError."""
        with anyio.move_on_after(timeout):
            try:
                return await items.receive()
            except anyio.EndOfStream:
                return GenerationError("the generation ended without a final chunk")
        return None

    def _outcome_of(self, exc: BaseException, status: int, when: str) -> str:
        """The metrics outcome of a generation ended by ``exc``; logs what is a failure."""
        if isinstance(exc, ServerShuttingDown):
            return "shutdown"  # asked for, not a failure: no traceback in the log
        if status >= 500:
            logger.error("generation failed%s: %r", when, exc, exc_info=exc)
        return "rejected" if status < 500 else "error"

    async def _send_error_response(self, send: Send, exc: BaseException) -> None:
        status, body, headers = error_body_for(exc, rename=self.rename)
        self.outcome = self._outcome_of(exc, status, "")
        self.status_code = status
        await send_plain(send, status, encode(ErrorResponse(error=body)), headers)

    async def _send_stream(self, send: Send, items: MemoryObjectReceiveStream[_Item]) -> None:
        item = await self._first(items, self.keepalive_seconds)
        if isinstance(item, BaseException):
            await self._send_error_response(send, item)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()],
            }
        )
        while True:
            if item is None:
                frames = [KEEPALIVE]
            elif isinstance(item, BaseException):
                status, body, _ = error_body_for(item, rename=self.rename)
                outcome = self._outcome_of(item, status, " mid-stream")
                self.outcome = "error" if outcome == "rejected" else outcome
                frames = [self.renderer.error(body)]
            else:
                frames = self.renderer.chunk(item)
                if item.finish_reason is not None:
                    self.outcome = item.finish_reason
                    frames += self.renderer.end()
            if frames:
                await send(
                    {"type": "http.response.body", "body": b"".join(frames), "more_body": True}
                )
            if isinstance(item, BaseException) or (
                isinstance(item, Chunk) and item.finish_reason is not None
            ):
                break
            item = await self._first(items, self.keepalive_seconds)
        self.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_whole(self, send: Send, items: MemoryObjectReceiveStream[_Item]) -> None:
        chunks: list[Chunk] = []
        while True:
            item = await self._first(items, None)
            if isinstance(item, BaseException):
                await self._send_error_response(send, item)
                return
            assert item is not None
            chunks.append(item)
            if item.finish_reason is not None:
                break
        self.outcome = chunks[-1].finish_reason or "stop"
        body = self.renderer.whole("".join(c.text for c in chunks), chunks)
        self.finished = True
        await send_plain(send, 200, body)
