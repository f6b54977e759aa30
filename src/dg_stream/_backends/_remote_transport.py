"""How ``RemoteBackend`` reaches a server: the connection pool, time limits and retries.

Failure model: before the first chunk reaches the caller, connection errors and 408/409/429/5xx
answers are retried (exponential backoff with jitter, ``Retry-After`` honoured); after it, the
backend turns any failure into ``StreamInterruptedError``. Every error is one of dg_stream's
own; no httpx exception escapes (it is kept as ``__cause__``).
"""

from __future__ import annotations

import contextlib
import email.utils
import random
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel
import httpx
import msgspec

from .._chunks import Chunk
from .._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    DGStreamError,
    InvalidRequestError,
    OverloadedError,
)
from .._sse import SSEDecoder
from ._remote_protocol import (
    Parser,
    ProtocolViolation,
    ServerErrorEvent,
    Truncated,
    error_fields,
    event_error,
)

__all__ = [
    "Reader",
    "RemoteTimeout",
    "Transport",
    "min_timeout",
    "parse_retry_after",
    "remaining",
]

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_json = msgspec.json.Decoder()


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
            raise InvalidRequestError(
                f"timeout must be a positive number, got {value!r}", param="timeout"
            )
        seconds = float(value)
        return cls(connect=seconds, first_chunk=seconds, idle=seconds, total=None)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value; ``None``: no limit)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def min_timeout(*values: float | None) -> float | None:
    """The tightest of several limits (``None``: no limit)."""
    present = [v for v in values if v is not None]
    return min(present) if present else None


# -- failures, mapped to public errors in one place -----------------------------------------


class _Failure(Exception):
    """A failed attempt: ``error`` is what the caller will see, ``retryable`` whether to retry."""

    def __init__(
        self, error: DGStreamError, *, retryable: bool, retry_after: float | None = None
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


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


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds a server asks the client to wait (``Retry-After-Ms`` or ``Retry-After``)."""
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


def _status_failure(response: httpx.Response) -> _Failure:
    status = response.status_code
    try:
        body: object = _json.decode(response.content)
    except (msgspec.DecodeError, ValueError):
        body = response.text
    message, param, _, code = error_fields(body)
    message = f"HTTP {status}: {message or response.reason_phrase or 'error'}"
    retry_after = parse_retry_after(response.headers)
    retryable = status in _RETRYABLE_STATUS or status >= 500
    error: APIStatusError
    if status in (429, 503):
        error = OverloadedError(message, status_code=status, retry_after=retry_after, body=body)
    elif status in (400, 422):
        error = BadRequestError(message, status_code=status, body=body, param=param, code=code)
    else:
        error = APIStatusError(message, status_code=status, body=body)
    return _Failure(error, retryable=retryable, retry_after=retry_after)


# -- reading a response ----------------------------------------------------------------------


class Reader:
    """Reads one streaming response: bytes → SSE events → Chunks, under a time limit."""

    def __init__(self, response: httpx.Response, parser: Parser, *, ended: bool = False) -> None:
        self._response = response
        self._bytes = response.aiter_bytes()
        self._decoder = SSEDecoder()
        self._parser = parser
        self.ended = ended

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


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").split(";")[0].strip() == "application/json"


# -- the transport ----------------------------------------------------------------------------


class Transport:
    """Requests to one server: an owned (or given) httpx client, time limits and retries.

    ``max_retries`` retries before the first chunk, with exponential backoff from
    ``retry_backoff`` seconds to at most ``retry_max_delay``, plus jitter; a ``Retry-After``
    answer is honoured up to ``max_retry_after`` seconds (longer advice ends the retries).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout: RemoteTimeout,
        max_retries: int,
        retry_backoff: float,
        retry_max_delay: float,
        max_retry_after: float,
        max_connections: int,
        http_client: httpx.AsyncClient | None,
    ) -> None:
        self.base_url = base_url
        self.headers = headers
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.retry_max_delay = retry_max_delay
        self.max_retry_after = max_retry_after
        self._max_connections = max_connections
        self._user_client = http_client
        self._client: httpx.AsyncClient | None = None
        self._client_loop: object = None

    # -- connection ---------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        if self._user_client is not None:
            return self._user_client
        # An httpx client belongs to the event loop it first ran on: a new loop gets a new one.
        loop = anyio.lowlevel.current_token()
        if self._client is None or self._client_loop != loop:
            t = self.timeout
            self._client = httpx.AsyncClient(
                headers=self.headers,
                timeout=httpx.Timeout(connect=t.connect, read=None, write=t.connect, pool=None),
                limits=httpx.Limits(
                    max_connections=self._max_connections,
                    max_keepalive_connections=min(20, self._max_connections),
                ),
                follow_redirects=True,
            )
            self._client_loop = loop
        return self._client

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    async def aclose(self) -> None:
        """Close the owned connection pool (a client passed in stays open)."""
        client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    # -- retries ------------------------------------------------------------------------------

    def _delay(self, attempt: int, failure: _Failure) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``; ``None``: do not retry."""
        if not failure.retryable or attempt >= self.max_retries:
            return None
        if failure.retry_after is not None:
            return failure.retry_after if failure.retry_after <= self.max_retry_after else None
        ceiling = min(self.retry_max_delay, self.retry_backoff * 2**attempt)
        return ceiling * (0.5 + random.random() / 2)  # jitter: spread clients that failed together

    def _wait(self, attempt: int, failure: _Failure, deadline: float | None) -> float | None:
        delay = self._delay(attempt, failure)
        if delay is not None and deadline is not None and time.monotonic() + delay > deadline:
            return None
        return delay

    # -- requests -----------------------------------------------------------------------------

    async def get_json(self, path: str, deadline: float | None) -> tuple[int, object]:
        """GET with retries; returns (status, decoded body or None) for final answers."""
        attempt = 0
        while True:
            try:
                with anyio.fail_after(min_timeout(self.timeout.first_chunk, remaining(deadline))):
                    response = await self._http().get(self.url(path))
                if response.status_code in _RETRYABLE_STATUS or response.status_code >= 500:
                    raise _status_failure(response)
                try:
                    return response.status_code, _json.decode(response.content)
                except msgspec.DecodeError:
                    return response.status_code, None
            except TimeoutError:
                raise APITimeoutError(f"no answer from {self.url(path)} in time") from None
            except _Failure as failed:
                if (delay := self._wait(attempt, failed, deadline)) is None:
                    raise failed.error from None
            except (httpx.HTTPError, httpx.StreamError) as exc:
                transport = _transport_failure(exc)
                if (delay := self._wait(attempt, transport, deadline)) is None:
                    raise transport.error from exc
            await anyio.sleep(delay)
            attempt += 1

    async def open(
        self, path: str, body: bytes, make_parser: Callable[[], Parser], deadline: float | None
    ) -> tuple[Reader, list[Chunk]]:
        """POST ``body`` and read up to the first Chunk, retrying what may be retried."""
        attempt = 0
        while True:
            response: httpx.Response | None = None
            reader: Reader | None = None
            try:
                limit = min_timeout(self.timeout.first_chunk, remaining(deadline))
                try:
                    with anyio.fail_after(limit):
                        client = self._http()
                        req = client.build_request(
                            "POST",
                            self.url(path),
                            content=body,
                            headers={
                                "content-type": "application/json",
                                "accept": "text/event-stream",
                            },
                        )
                        response = await client.send(req, stream=True)
                        if not 200 <= response.status_code < 300:
                            await response.aread()
                            raise _status_failure(response)
                        parser = make_parser()
                        if parser.reads_json_answers and _is_json(response):
                            await response.aread()
                            chunks = parser.answer(response.content)
                            return Reader(response, parser, ended=True), chunks
                        reader = Reader(response, parser)
                        first = await reader.read(None)
                except TimeoutError:
                    what = "the first chunk" if response is not None else "a response"
                    raise _Failure(
                        APITimeoutError(
                            f"no {what} within {limit:.3g}s" if limit is not None else "timed out"
                        ),
                        retryable=False,
                    ) from None
                except (httpx.HTTPError, httpx.StreamError) as exc:
                    raise _transport_failure(exc) from exc
                except Truncated as exc:
                    raise _Failure(
                        APIConnectionError(f"{exc} (before any output)"), retryable=True
                    ) from None
                except ProtocolViolation as exc:
                    raise _Failure(
                        APIConnectionError(f"protocol error: {exc}"), retryable=False
                    ) from None
                except ServerErrorEvent as exc:
                    raise _Failure(event_error(exc.body), retryable=False) from None
                return reader, first
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
