"""The remote backend: generations on a server, streamed over HTTP with httpx.

Two protocols: dg_stream's native event stream (``POST /v1/dg/generate``: committed text, draft
previews and per-step stats) and the OpenAI completions / chat completions SSE protocol spoken
by vLLM, TGI, llama.cpp, Ollama, hosted APIs and ``dg-stream serve`` itself.

Failure model: before the first chunk reaches the caller, connection errors and 408/409/429/5xx
answers are retried (exponential backoff with jitter, ``Retry-After`` honoured); after it,
any failure raises ``StreamInterruptedError`` carrying the text received so far. Every error
is one of dg_stream's own; no httpx exception escapes.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import random
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import anyio
import anyio.lowlevel
import httpx
import msgspec

from .._chunks import Chunk, FinishReason, Usage
from .._config import GenerationRequest
from .._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    DGStreamError,
    GenerationError,
    InvalidRequestError,
    OverloadedError,
    StreamInterruptedError,
)
from .._sse import ServerSentEvent, SSEDecoder
from .._wire import ChunkEvent, ErrorBody, ServerInfo, decode_event

__all__ = ["RemoteBackend", "RemoteTimeout"]

Api = Literal["auto", "dg", "openai"]

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_json = msgspec.json.Decoder()
_info_decoder = msgspec.json.Decoder(ServerInfo)
_encoder = msgspec.json.Encoder()


class RemoteTimeout(msgspec.Struct, frozen=True, kw_only=True):
    """Time limits in seconds (``None``: no limit).

    ``connect``: opening a connection (also bounds sending the request). ``first_chunk``: from
    sending the request to the first chunk of output, across retries of one attempt's reads.
    ``idle``: the longest silence between bytes after the first chunk (SSE keep-alive comments
    count as traffic: they are how a server says it is still working). ``total``: the whole
    generation, retries included.
    """

    connect: float | None = 10.0
    first_chunk: float | None = 120.0
    idle: float | None = 60.0
    total: float | None = None

    @classmethod
    def of(cls, value: float | RemoteTimeout | None) -> RemoteTimeout:
        """A number sets connect, first_chunk and idle alike; ``None`` disables all limits."""
        if isinstance(value, RemoteTimeout):
            return value
        if value is None:
            return cls(connect=None, first_chunk=None, idle=None, total=None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise InvalidRequestError(f"timeout must be a positive number, got {value!r}",
                                      param="timeout")
        seconds = float(value)
        return cls(connect=seconds, first_chunk=seconds, idle=seconds, total=None)


# -- internal failure signals, mapped to public errors in one place --------------------------


class _Failure(Exception):
    """A failed attempt: ``error`` is what the caller will see, ``retryable`` whether to retry."""

    def __init__(self, error: DGStreamError, *, retryable: bool,
                 retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


class _ServerErrorEvent(Exception):
    def __init__(self, body: ErrorBody) -> None:
        super().__init__(body.message)
        self.body = body


class _Truncated(Exception):
    """The stream ended without its final event."""


class _ProtocolViolation(Exception):
    """The server sent something that is not the protocol (bad JSON, wrong shape)."""


def _transport_failure(exc: BaseException) -> _Failure:
    """The error for a failed request; its message names the URL that failed."""
    try:
        url = f" ({exc.request.url})" if isinstance(exc, httpx.RequestError) else ""
    except RuntimeError:  # no request attached
        url = ""
    if isinstance(exc, httpx.ConnectTimeout):
        return _Failure(APITimeoutError(f"connect timeout{url}: {exc}"), retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        return _Failure(APITimeoutError(f"timeout{url}: {exc!r}"), retryable=True)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return _Failure(APIConnectionError(f"unsupported URL{url}: {exc}"), retryable=False)
    if isinstance(exc, httpx.TransportError):
        return _Failure(APIConnectionError(f"connection failed{url}: {exc!r}"), retryable=True)
    return _Failure(APIConnectionError(f"HTTP error{url}: {exc!r}"), retryable=False)


def _parse_retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the other form allowed by RFC 9110: an HTTP date
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_fields(body: object) -> tuple[str | None, str | None, str | None]:
    """(message, param, type) from the error bodies servers commonly send."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            msg = error.get("message")
            return (str(msg) if msg is not None else None,
                    error.get("param") if isinstance(error.get("param"), str) else None,
                    error.get("type") if isinstance(error.get("type"), str) else None)
        if isinstance(error, str):
            return error, None, None
        for key in ("detail", "message"):
            if isinstance(body.get(key), str):
                return body[key], None, None
    if isinstance(body, str) and body.strip():
        return body.strip()[:500], None, None
    return None, None, None


def _status_failure(response: httpx.Response) -> _Failure:
    status = response.status_code
    try:
        body: object = _json.decode(response.content)
    except (msgspec.DecodeError, ValueError):
        body = response.text
    message, param, _ = _error_fields(body)
    message = f"HTTP {status}: {message or response.reason_phrase or 'error'}"
    retry_after = _parse_retry_after(response.headers)
    retryable = status in _RETRYABLE_STATUS or status >= 500
    error: APIStatusError
    if status in (429, 503):
        error = OverloadedError(message, status_code=status, retry_after=retry_after, body=body)
    elif status in (400, 422):
        error = BadRequestError(message, status_code=status, body=body, param=param)
    else:
        error = APIStatusError(message, status_code=status, body=body)
    return _Failure(error, retryable=retryable, retry_after=retry_after)


# -- protocol parsers: SSE events in, Chunks out ---------------------------------------------


def _finish_reason(value: object) -> FinishReason:
    if value == "length":
        return "length"
    if value in ("cancelled", "abort"):
        return "cancelled"
    return "stop"  # "stop", "eos", "eos_token", "stop_sequence", "tool_calls", ...


def _usage(value: object) -> Usage | None:
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    return Usage(prompt_tokens=prompt if isinstance(prompt, int) else 0,
                 completion_tokens=completion if isinstance(completion, int) else 0)


class _NativeParser:
    """``/v1/dg/generate`` events; complete at the chunk with a finish_reason."""

    def __init__(self) -> None:
        self.done = False

    def event(self, sse: ServerSentEvent) -> list[Chunk]:
        if self.done:
            return []
        if sse.data == "[DONE]":
            raise _Truncated("the stream ended before its last chunk")
        try:
            event = decode_event(sse.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise _ProtocolViolation(f"bad native event: {exc}") from None
        if not isinstance(event, ChunkEvent):
            raise _ServerErrorEvent(event.error)
        if event.chunk.finish_reason is not None:
            self.done = True
        return [event.chunk]

    def end(self) -> list[Chunk]:
        if not self.done:
            raise _Truncated("the stream ended before its last chunk")
        return []


class _OpenAIParser:
    """OpenAI completions / chat completions chunks.

    Text deltas become committed text. The finish_reason is held back until ``[DONE]`` (or the
    end of the stream) so that a usage-only chunk that follows it lands on the final Chunk.
    With ``diffusing`` each event carries the whole current text: refining states become
    ``draft`` (when previews are asked for), the last state is committed once, at the end.
    """

    def __init__(self, *, chat: bool, diffusing: bool, draft_preview: bool) -> None:
        self.chat = chat
        self.diffusing = diffusing
        self.draft_preview = draft_preview
        self.done = False
        self.finish: FinishReason | None = None
        self.usage: Usage | None = None
        self.state = ""

    def event(self, sse: ServerSentEvent) -> list[Chunk]:
        if self.done:
            return []
        if sse.data.strip() == "[DONE]":
            return self._final()
        try:
            obj = _json.decode(sse.data)
        except msgspec.DecodeError:
            raise _ProtocolViolation(f"bad JSON in event: {sse.data[:200]!r}") from None
        if sse.event == "error" or (isinstance(obj, dict) and obj.get("error")):
            message, param, kind = _error_fields(obj if isinstance(obj, dict) and "error" in obj
                                                 else {"error": obj})
            raise _ServerErrorEvent(ErrorBody(message=message or "server error",
                                              type=kind or "server_error", param=param))
        if not isinstance(obj, dict):
            raise _ProtocolViolation(f"expected a JSON object, got {sse.data[:200]!r}")
        return self._object(obj)

    def whole(self, obj: object) -> list[Chunk]:
        """A non-streaming JSON answer (a server that ignored ``stream: true``)."""
        if not isinstance(obj, dict):
            raise _ProtocolViolation("expected a JSON object")
        chunks = self._object(obj)
        if self.finish is None:
            self.finish = "stop"
        return chunks + self._final()

    def _object(self, obj: dict[str, Any]) -> list[Chunk]:
        usage = _usage(obj.get("usage"))
        if usage is not None:
            self.usage = usage
        out: list[Chunk] = []
        choices = obj.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1 is never requested; ignore stray choices
            piece = self._piece(choice)
            if self.diffusing:
                if piece is not None and piece != self.state:  # unchanged: nothing to show
                    self.state = piece
                    if self.draft_preview and choice.get("finish_reason") is None:
                        out.append(Chunk(draft=piece))
            elif piece:
                out.append(Chunk(text=piece))
            if choice.get("finish_reason") is not None:
                self.finish = _finish_reason(choice["finish_reason"])
        return out

    def _piece(self, choice: dict[str, Any]) -> str | None:
        if self.chat:
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                delta = choice.get("message")
            content = delta.get("content") if isinstance(delta, dict) else None
        else:
            content = choice.get("text")
        return content if isinstance(content, str) else None

    def _final(self) -> list[Chunk]:
        self.done = True
        text = self.state if self.diffusing else ""
        return [Chunk(text=text, finish_reason=self.finish or "stop", usage=self.usage)]

    def end(self) -> list[Chunk]:
        if self.done:
            return []
        if self.finish is None:
            raise _Truncated("the stream ended without a finish_reason or [DONE]")
        return self._final()  # lenient: a finish_reason was sent, only [DONE] is missing


_Parser = _NativeParser | _OpenAIParser


class _Reader:
    """Reads one streaming response: bytes → SSE events → Chunks, under a time limit."""

    def __init__(self, response: httpx.Response, parser: _Parser) -> None:
        self._response = response
        self._bytes = response.aiter_bytes()
        self._decoder = SSEDecoder()
        self._parser = parser
        self.ended = False

    async def aclose(self) -> None:
        """Close the byte iterator (an async generator: trio insists) and the response."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
                await self._bytes.aclose()  # type: ignore[attr-defined]
            await self._response.aclose()

    async def read(self, timeout: float | None) -> list[Chunk]:
        """The next Chunks; ``[]`` once the stream has ended. Raises TimeoutError on silence."""
        while not self.ended:
            try:
                with anyio.fail_after(timeout):
                    data = await self._bytes.__anext__()
            except StopAsyncIteration:
                self.ended = True
                chunks = []
                for event in self._decoder.finish():
                    chunks += self._parser.event(event)
                return chunks + self._parser.end()
            chunks = []
            for event in self._decoder.feed(data):
                chunks += self._parser.event(event)
            if self._parser.done:
                self.ended = True
                await self._drain()
            if chunks:
                return chunks
        return []

    async def _drain(self) -> None:
        """Read the (empty) rest of a finished response: the connection then goes back to the
        pool instead of being closed, and httpx's byte iterators end normally."""
        with anyio.move_on_after(1.0):
            try:
                async for _ in self._bytes:
                    pass
            except (httpx.HTTPError, httpx.StreamError):
                pass


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _min_timeout(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


class RemoteBackend:
    """Generations on a server: ``dg-stream serve`` or any OpenAI-compatible server.

    ``base_url``: the server root, with or without a trailing ``/v1``
    (``"http://127.0.0.1:8000"``, ``"http://localhost:11434/v1"``).
    ``model``: the model name to request (OpenAI protocol); ``None`` asks ``/v1/models`` once
    and takes the first, or leaves the field out if the server lists none.
    ``api``: ``"dg"`` for the native protocol (draft previews, per-step stats, token ids),
    ``"openai"`` for the completions / chat completions protocol, ``"auto"`` to ask the server
    once (``GET /v1/dg/info``) and use native when it is offered.
    ``api_key``: sent as a bearer token (default: the ``DG_STREAM_API_KEY`` variable).
    ``timeout``: a number (connect, first chunk and idle limits alike) or a ``RemoteTimeout``.
    ``max_retries``: retries before the first chunk, for connection errors and 408, 409, 429
    and 5xx answers, with exponential backoff from ``retry_backoff`` seconds to at most
    ``retry_max_delay``, plus jitter; a ``Retry-After`` answer is honoured up to
    ``max_retry_after`` seconds (longer advice ends the retries: ``OverloadedError``).
    ``diffusing``: for hosted diffusion models (Inception's Mercury API) that stream the whole
    current text in every event: sends ``"diffusing": true`` and maps the refining states to
    ``Chunk.draft`` (with ``draft_preview=True``) and the final state to committed text.
    ``chat``: send text prompts to ``/chat/completions`` as one user message (OpenAI protocol).
    ``http_client``: an ``httpx.AsyncClient`` to use instead of an owned one (not closed here).

    One instance serves any number of concurrent streams over a shared connection pool; close it
    with ``await backend.aclose()`` or ``async with RemoteBackend(...) as backend``.
    """

    def __init__(self, base_url: str, model: str | None = None, *, api: Api = "auto",
                 api_key: str | None = None, timeout: float | RemoteTimeout | None = None,
                 max_retries: int = 2, diffusing: bool = False, chat: bool = False,
                 include_usage: bool = True, headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None, retry_backoff: float = 0.5,
                 retry_max_delay: float = 8.0, max_retry_after: float = 60.0,
                 max_connections: int = 100) -> None:
        if api not in ("auto", "dg", "openai"):
            raise InvalidRequestError(f"api must be 'auto', 'dg' or 'openai', got {api!r}",
                                      param="api")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidRequestError("max_retries must be an integer >= 0", param="max_retries")
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidRequestError(f"invalid base_url {base_url!r}: {exc}",
                                      param="base_url") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidRequestError(f"base_url must be an http(s) URL, got {base_url!r}",
                                      param="base_url")
        path = url.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        self.base_url = str(url.copy_with(path=path or "/", query=None, fragment=None)).rstrip("/")
        self.model = model
        self.api: Api = api
        self.timeout = RemoteTimeout.of(timeout) if timeout is not None else RemoteTimeout()
        self.max_retries = max_retries
        self.diffusing = diffusing
        self.chat = chat
        self.include_usage = include_usage
        self.retry_backoff = retry_backoff
        self.retry_max_delay = retry_max_delay
        self.max_retry_after = max_retry_after
        self._max_connections = max_connections
        self._headers = {"user-agent": f"dg-stream/{_version()}", **dict(headers or {})}
        key = api_key if api_key is not None else os.environ.get("DG_STREAM_API_KEY")
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self._user_client = http_client
        self._client: httpx.AsyncClient | None = None
        self._client_loop: object = None
        self._resolved_api: Literal["dg", "openai"] | None = None if api == "auto" else api
        self._resolved_model: str | None = model
        self._model_looked_up = model is not None
        self.server_info: ServerInfo | None = None

    # -- connection ---------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._user_client is not None:
            return self._user_client
        # An httpx client belongs to the event loop it first ran on: a new loop gets a new one.
        loop = anyio.lowlevel.current_token()
        if self._client is None or self._client_loop != loop:
            t = self.timeout
            self._client = httpx.AsyncClient(
                headers=self._headers,
                timeout=httpx.Timeout(connect=t.connect, read=None, write=t.connect, pool=None),
                limits=httpx.Limits(max_connections=self._max_connections,
                                    max_keepalive_connections=min(20, self._max_connections)),
                follow_redirects=True)
            self._client_loop = loop
        return self._client

    def _url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def aclose(self) -> None:
        """Close the owned connection pool (a client passed in stays open)."""
        client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def __aenter__(self) -> RemoteBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- retries ------------------------------------------------------------------------------

    def _delay(self, attempt: int, failure: _Failure) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``; ``None``: do not retry."""
        if not failure.retryable or attempt >= self.max_retries:
            return None
        if failure.retry_after is not None:
            return failure.retry_after if failure.retry_after <= self.max_retry_after else None
        ceiling = min(self.retry_max_delay, self.retry_backoff * 2 ** attempt)
        return ceiling * (0.5 + random.random() / 2)  # jitter: spread clients that failed together

    async def _get_json(self, path: str, deadline: float | None) -> tuple[int, object]:
        """GET with retries; returns (status, decoded body or None) for final answers."""
        attempt = 0
        while True:
            try:
                with anyio.fail_after(_min_timeout(self.timeout.first_chunk, _remaining(deadline))):
                    response = await self._http().get(self._url(path))
                if response.status_code in _RETRYABLE_STATUS or response.status_code >= 500:
                    raise _status_failure(response)
                try:
                    return response.status_code, _json.decode(response.content)
                except msgspec.DecodeError:
                    return response.status_code, None
            except TimeoutError:
                raise APITimeoutError(f"no answer from {self._url(path)} in time") from None
            except _Failure as failed:
                if (delay := self._wait(attempt, failed, deadline)) is None:
                    raise failed.error from None
            except (httpx.HTTPError, httpx.StreamError) as exc:
                transport = _transport_failure(exc)
                if (delay := self._wait(attempt, transport, deadline)) is None:
                    raise transport.error from exc
            await anyio.sleep(delay)
            attempt += 1

    def _wait(self, attempt: int, failure: _Failure, deadline: float | None) -> float | None:
        delay = self._delay(attempt, failure)
        if delay is not None and deadline is not None and time.monotonic() + delay > deadline:
            return None
        return delay

    # -- discovery ----------------------------------------------------------------------------

    async def _api_for(self, deadline: float | None) -> Literal["dg", "openai"]:
        if self._resolved_api is None:
            status, body = await self._get_json("/v1/dg/info", deadline)
            info = None
            if status == 200 and body is not None:
                try:
                    info = _info_decoder.decode(_encoder.encode(body))
                except msgspec.ValidationError:
                    info = None
            self.server_info = info
            self._resolved_api = "dg" if info is not None else "openai"
        return self._resolved_api

    async def _model_for_openai(self, deadline: float | None) -> str | None:
        if not self._model_looked_up:
            try:
                status, body = await self._get_json("/v1/models", deadline)
            except APIStatusError:
                status, body = 0, None
            data = body.get("data") if isinstance(body, dict) else None
            if status == 200 and isinstance(data, list) and data and isinstance(data[0], dict):
                model_id = data[0].get("id")
                self._resolved_model = model_id if isinstance(model_id, str) else None
            self._model_looked_up = True
        return self._resolved_model

    # -- requests -----------------------------------------------------------------------------

    def _openai_body(self, request: GenerationRequest,
                     model: str | None) -> tuple[str, bytes, bool]:
        body: dict[str, Any] = {}
        if model is not None:
            body["model"] = model
        chat = request.messages is not None or self.chat
        if request.messages is not None:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        elif self.chat:
            if not isinstance(request.prompt, str):
                raise InvalidRequestError("chat=True needs a text prompt, not token ids",
                                          param="prompt")
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        body["max_tokens"] = request.max_new_tokens
        sampling = request.sampling
        body["temperature"] = sampling.temperature
        # Extensions go out only when set: strict servers reject fields they do not know.
        for name in ("top_p", "top_k", "repetition_penalty", "seed"):
            value = getattr(sampling, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop"] = list(request.stop)
        speculative = {k: v for k, v in msgspec.structs.asdict(request.speculative).items()
                       if v is not None}
        if speculative:
            body["speculative"] = speculative
        body["stream"] = True
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.diffusing:
            body["diffusing"] = True
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return path, _encoder.encode(body), chat

    async def _prepare(self, request: GenerationRequest,
                       deadline: float | None) -> tuple[str, bytes, Any]:
        """(path, body, parser factory) for the protocol in use."""
        api = await self._api_for(deadline)
        if api == "dg":
            if self.diffusing:
                raise InvalidRequestError("diffusing=True needs api='openai'", param="diffusing")
            return "/v1/dg/generate", _encoder.encode(request), _NativeParser
        path, body, chat = self._openai_body(request, await self._model_for_openai(deadline))

        def parser() -> _OpenAIParser:
            return _OpenAIParser(chat=chat, diffusing=self.diffusing,
                                 draft_preview=request.draft_preview)

        return path, body, parser

    async def _open(self, path: str, body: bytes, make_parser: Any,
                    deadline: float | None) -> tuple[httpx.Response, _Reader, list[Chunk]]:
        """Send the request and read up to the first Chunk, retrying what may be retried."""
        attempt = 0
        while True:
            response: httpx.Response | None = None
            reader: _Reader | None = None
            try:
                limit = _min_timeout(self.timeout.first_chunk, _remaining(deadline))
                try:
                    with anyio.fail_after(limit):
                        client = self._http()
                        req = client.build_request(
                            "POST", self._url(path), content=body,
                            headers={"content-type": "application/json",
                                     "accept": "text/event-stream"})
                        response = await client.send(req, stream=True)
                        if not 200 <= response.status_code < 300:
                            await response.aread()
                            raise _status_failure(response)
                        parser = make_parser()
                        if _is_json(response) and isinstance(parser, _OpenAIParser):
                            await response.aread()
                            return response, _ended_reader(response, parser), _whole(parser,
                                                                                     response)
                        reader = _Reader(response, parser)
                        first = await reader.read(None)
                except TimeoutError:
                    what = "the first chunk" if response is not None else "a response"
                    raise _Failure(APITimeoutError(
                        f"no {what} within {limit:.3g}s" if limit is not None else "timed out"),
                        retryable=False) from None
                except (httpx.HTTPError, httpx.StreamError) as exc:
                    raise _transport_failure(exc) from exc
                except _Truncated as exc:
                    raise _Failure(APIConnectionError(f"{exc} (before any output)"),
                                   retryable=True) from None
                except _ProtocolViolation as exc:
                    raise _Failure(APIConnectionError(f"protocol error: {exc}"),
                                   retryable=False) from None
                except _ServerErrorEvent as exc:
                    raise _Failure(_event_error(exc.body), retryable=False) from None
                return response, reader, first
            except _Failure as failure:
                if reader is not None:
                    await reader.aclose()
                elif response is not None:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
                delay = self._wait(attempt, failure, deadline)
                if delay is None:
                    raise failure.error from failure.__cause__
            await anyio.sleep(delay)
            attempt += 1

    # -- the Backend protocol -----------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Chunks of one generation on the server; closing the iterator closes the response."""
        started = time.monotonic()
        deadline = started + self.timeout.total if self.timeout.total is not None else None
        path, body, make_parser = await self._prepare(request, deadline)
        _, reader, chunks = await self._open(path, body, make_parser, deadline)
        received: list[str] = []
        try:
            while True:
                for chunk in chunks:
                    received.append(chunk.text)
                    yield chunk
                if reader.ended:
                    return
                try:
                    chunks = await reader.read(_min_timeout(self.timeout.idle,
                                                            _remaining(deadline)))
                except TimeoutError:
                    total_hit = deadline is not None and time.monotonic() >= deadline
                    cause = APITimeoutError("total timeout" if total_hit else
                                            f"no data for {self.timeout.idle}s (idle timeout)",
                                            text="".join(received))
                    raise StreamInterruptedError(f"stream interrupted: {cause}",
                                                 text="".join(received)) from cause
                except (httpx.HTTPError, httpx.StreamError, _Truncated,
                        _ProtocolViolation, _ServerErrorEvent) as exc:
                    detail = exc.body.message if isinstance(exc, _ServerErrorEvent) else str(exc)
                    raise StreamInterruptedError(
                        f"stream interrupted after output had started: {detail or exc!r}",
                        text="".join(received)) from exc
        finally:
            await reader.aclose()

    def __repr__(self) -> str:
        return f"RemoteBackend({self.base_url!r}, model={self.model!r}, api={self.api!r})"


def _event_error(body: ErrorBody) -> DGStreamError:
    if body.type == "invalid_request_error":
        return InvalidRequestError(body.message, param=body.param)
    return GenerationError(f"server error: {body.message}")


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def _whole(parser: _OpenAIParser, response: httpx.Response) -> list[Chunk]:
    try:
        obj = _json.decode(response.content)
    except msgspec.DecodeError:
        raise _ProtocolViolation("bad JSON answer") from None
    if isinstance(obj, dict) and obj.get("error"):
        message, param, kind = _error_fields(obj)
        raise _ServerErrorEvent(ErrorBody(message=message or "server error",
                                          type=kind or "server_error", param=param))
    return parser.whole(obj)


def _ended_reader(response: httpx.Response, parser: _OpenAIParser) -> _Reader:
    reader = _Reader(response, parser)
    reader.ended = True
    return reader


def _version() -> str:
    from .. import __version__

    return __version__
