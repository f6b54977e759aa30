"""The remote backend: generations on a server, streamed over HTTP with httpx.

Two protocols: dg_stream's native event stream (``POST /v1/dg/generate``: committed text, draft
previews and per-step stats) and the OpenAI completions / chat completions SSE protocol spoken
by vLLM, TGI, llama.cpp, Ollama, hosted APIs and ``dg-stream serve`` itself. Request bodies and
event parsing live in ``_remote_protocol``, the connection pool, time limits and retries in
``_remote_transport``; this module discovers what the server speaks and runs the streams.

Failure model: before the first chunk reaches the caller, connection errors and 408/409/429/5xx
answers are retried (exponential backoff with jitter, ``Retry-After`` honoured); after it,
any failure raises ``StreamInterruptedError`` carrying the text received so far. Every error
is one of dg_stream's own; no httpx exception escapes.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Literal

import httpx
import msgspec

from .._chunks import Chunk
from .._config import GenerationRequest
from .._errors import (
    APIStatusError,
    APITimeoutError,
    InvalidRequestError,
    StreamInterruptedError,
)
from .._wire import ServerInfo
from ._remote_protocol import (
    NativeParser,
    OpenAIParser,
    Parser,
    ProtocolViolation,
    ServerErrorEvent,
    Truncated,
    openai_body,
    server_info,
)
from ._remote_transport import (
    RemoteTimeout,
    Transport,
    min_timeout,
    remaining,
)

__all__ = ["RemoteBackend", "RemoteTimeout"]

Api = Literal["auto", "dg", "openai"]

_encoder = msgspec.json.Encoder()


class RemoteBackend:
    """Generations on a server: ``dg-stream serve`` or any OpenAI-compatible server.

    ``base_url``: the server root, with or without a trailing ``/v1``
    (``"http://127.0.0.1:8000"``, ``"http://localhost:11434/v1"``).
    ``model``: the model name to request (OpenAI protocol); ``None`` asks ``/v1/models`` once
    and takes the first, or leaves the field out if the server lists none.
    ``api``: ``"dg"`` for the native protocol (draft previews, per-step stats, token ids),
    ``"openai"`` for the completions / chat completions protocol, ``"auto"`` to ask the server
    once (``GET /v1/dg/info``) and use native when it is offered (``"dg"`` asks too: the
    answer names the model and its context length).
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

    ``context_length`` and ``model_name`` are what the server reported (``/v1/dg/info``, or the
    first ``/v1/models`` entry's ``max_model_len`` and ``id`` when ``model`` is ``None``):
    ``None`` until the first request, or when the server does not say. ``tokenizer`` is
    ``None``: the server renders and tokenizes prompts.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api: Api = "auto",
        api_key: str | None = None,
        timeout: float | RemoteTimeout | None = None,
        max_retries: int = 2,
        diffusing: bool = False,
        chat: bool = False,
        include_usage: bool = True,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
        retry_backoff: float = 0.5,
        retry_max_delay: float = 8.0,
        max_retry_after: float = 60.0,
        max_connections: int = 100,
    ) -> None:
        if api not in ("auto", "dg", "openai"):
            raise InvalidRequestError(
                f"api must be 'auto', 'dg' or 'openai', got {api!r}", param="api"
            )
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InvalidRequestError("max_retries must be an integer >= 0", param="max_retries")
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise InvalidRequestError(
                f"invalid base_url {base_url!r}: {exc}", param="base_url"
            ) from None
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidRequestError(
                f"base_url must be an http(s) URL, got {base_url!r}", param="base_url"
            )
        path = url.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        self.base_url = str(url.copy_with(path=path or "/", query=None, fragment=None)).rstrip("/")
        self.model = model
        self.api: Api = api
        self.diffusing = diffusing
        self.chat = chat
        self.include_usage = include_usage
        self._headers = {"user-agent": f"dg-stream/{_version()}", **dict(headers or {})}
        key = api_key if api_key is not None else os.environ.get("DG_STREAM_API_KEY")
        if key:
            self._headers["authorization"] = f"Bearer {key}"
        self._transport = Transport(
            self.base_url,
            headers=self._headers,
            timeout=RemoteTimeout.of(timeout) if timeout is not None else RemoteTimeout(),
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_max_delay=retry_max_delay,
            max_retry_after=max_retry_after,
            max_connections=max_connections,
            http_client=http_client,
        )
        self._resolved_api: Literal["dg", "openai"] | None = None if api == "auto" else api
        self._resolved_model: str | None = model
        self._model_looked_up = model is not None
        self._info_looked_up = False
        self._context_length: int | None = None
        self.server_info: ServerInfo | None = None

    # -- settings (kept by the transport) -------------------------------------------------------

    @property
    def timeout(self) -> RemoteTimeout:
        return self._transport.timeout

    @property
    def max_retries(self) -> int:
        return self._transport.max_retries

    @property
    def retry_backoff(self) -> float:
        return self._transport.retry_backoff

    @property
    def retry_max_delay(self) -> float:
        return self._transport.retry_max_delay

    @property
    def max_retry_after(self) -> float:
        return self._transport.max_retry_after

    # -- what the server reported ----------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        """The most tokens of prompt and completion the server takes; ``None`` until known."""
        return self._context_length

    @property
    def tokenizer(self) -> None:
        """None: prompts are tokenized by the server."""
        return None

    @property
    def model_name(self) -> str | None:
        """``model``, else the model the server named; ``None`` until known."""
        if self._resolved_model is not None:
            return self._resolved_model
        return self.server_info.model if self.server_info is not None else None

    # -- connection ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the owned connection pool (a client passed in stays open)."""
        await self._transport.aclose()

    async def __aenter__(self) -> RemoteBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- discovery ----------------------------------------------------------------------------

    async def _api_for(self, deadline: float | None) -> Literal["dg", "openai"]:
        if self.api != "openai" and not self._info_looked_up:
            status, body = await self._transport.get_json("/v1/dg/info", deadline)
            info = server_info(body) if status == 200 else None
            self.server_info = info
            if info is not None:
                self._context_length = info.max_context
            if self._resolved_api is None:
                self._resolved_api = "dg" if info is not None else "openai"
            self._info_looked_up = True
        assert self._resolved_api is not None
        return self._resolved_api

    async def _model_for_openai(self, deadline: float | None) -> str | None:
        if not self._model_looked_up:
            try:
                status, body = await self._transport.get_json("/v1/models", deadline)
            except APIStatusError:
                status, body = 0, None
            data = body.get("data") if isinstance(body, dict) else None
            if status == 200 and isinstance(data, list) and data and isinstance(data[0], dict):
                model_id, limit = data[0].get("id"), data[0].get("max_model_len")
                self._resolved_model = model_id if isinstance(model_id, str) else None
                if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
                    self._context_length = limit  # vLLM's field; dg-stream serve sends it too
            self._model_looked_up = True
        return self._resolved_model

    # -- requests -----------------------------------------------------------------------------

    async def _prepare(
        self, request: GenerationRequest, deadline: float | None
    ) -> tuple[str, bytes, Callable[[], Parser]]:
        """(path, body, parser factory) for the protocol in use."""
        api = await self._api_for(deadline)
        if api == "dg":
            if self.diffusing:
                raise InvalidRequestError("diffusing=True needs api='openai'", param="diffusing")
            return "/v1/dg/generate", _encoder.encode(request), NativeParser
        path, body, chat = openai_body(
            request,
            model=await self._model_for_openai(deadline),
            chat=self.chat,
            include_usage=self.include_usage,
            diffusing=self.diffusing,
        )

        def parser() -> OpenAIParser:
            return OpenAIParser(
                chat=chat, diffusing=self.diffusing, draft_preview=request.draft_preview
            )

        return path, body, parser

    # -- the Backend protocol -----------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Chunks of one generation on the server; closing the iterator closes the response."""
        started = time.monotonic()
        timeout = self.timeout
        deadline = started + timeout.total if timeout.total is not None else None
        path, body, make_parser = await self._prepare(request, deadline)
        reader, chunks = await self._transport.open(path, body, make_parser, deadline)
        received: list[str] = []
        try:
            while True:
                for chunk in chunks:
                    received.append(chunk.text)
                    yield chunk
                if reader.ended:
                    return
                try:
                    chunks = await reader.read(min_timeout(timeout.idle, remaining(deadline)))
                except TimeoutError:
                    total_hit = deadline is not None and time.monotonic() >= deadline
                    cause = APITimeoutError(
                        "total timeout"
                        if total_hit
                        else f"no data for {timeout.idle}s (idle timeout)",
                        text="".join(received),
                    )
                    raise StreamInterruptedError(
                        f"stream interrupted: {cause}", text="".join(received)
                    ) from cause
                except (
                    httpx.HTTPError,
                    httpx.StreamError,
                    Truncated,
                    ProtocolViolation,
                    ServerErrorEvent,
                ) as exc:
                    detail = exc.body.message if isinstance(exc, ServerErrorEvent) else str(exc)
                    raise StreamInterruptedError(
                        f"stream interrupted after output had started: {detail or exc!r}",
                        text="".join(received),
                    ) from exc
        finally:
            await reader.aclose()

    def __repr__(self) -> str:
        return f"RemoteBackend({self.base_url!r}, model={self.model!r}, api={self.api!r})"


def _version() -> str:
    from .. import __version__

    return __version__
