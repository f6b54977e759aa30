"""The ASGI app behind ``dg-stream serve``: OpenAI-compatible endpoints and the native stream.

Routes::

    POST /v1/completions          OpenAI completions (stream or not)
    POST /v1/chat/completions     OpenAI chat completions, through the tokenizer's chat template
    GET  /v1/models[/{id}]        the one served model
    POST /v1/dg/generate          native SSE: every Chunk with drafts and per-step stats
    GET  /v1/dg/info              tells clients the native protocol is offered
    GET  /health                  liveness and load, as JSON
    GET  /metrics                 Prometheus text format
    GET  /  and /static/...       the chat page, when the package ships one

Every error answer is JSON ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from .._backends.base import Backend
from .._config import (
    ROLES,
    GenerationRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    SpeculativeConfig,
    response_format_from,
)
from .._errors import InvalidRequestError
from .._prompt import plain_chat_stops, render_chat
from .._tools import call_format, supports_auto, tool_choice_from, tools_from
from .._wire import ErrorBody, ServerInfo, encode
from ._metrics import Metrics
from ._openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from ._responses import (
    AutoToolRenderer,
    ChatRenderer,
    CompletionRenderer,
    GenerationResponse,
    NativeRenderer,
    Renderer,
    ToolCallRenderer,
    error_response,
    renamed_message,
)

__all__ = ["create_app"]

logger = logging.getLogger("dg_stream.server")

STATIC_DIR = Path(__file__).resolve().parent / "static"
T = TypeVar("T")

# Shutdown: how often to look whether the generations have ended, and how long a response
# that was told to end may still take (a client that stopped reading holds it up).
_POLL_SECONDS = 0.02
_ENDING_SECONDS = 5.0


class RequestRejected(Exception):
    """Raised by handlers; becomes an error response with the given status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message=message, type=type, param=param, code=code)
        self.headers = headers

    @classmethod
    def invalid(cls, exc: InvalidRequestError, param: str | None = None) -> RequestRejected:
        """The 400 for ``exc``, naming its parameter ``param`` where the endpoint calls it so."""
        named = param or exc.param
        return cls(
            400,
            renamed_message(exc.message, exc.param, named),
            param=named,
            code=exc.code or "invalid_value",
        )


def _unsupported(param: str, message: str) -> RequestRejected:
    return RequestRejected(400, message, param=param, code="unsupported_parameter")


def _validation_rejection(exc: msgspec.ValidationError) -> RequestRejected:
    """msgspec's message names the JSON path: turn it into ``param`` and a ``code``."""
    text = str(exc)
    message, _, at = text.partition(" - at `")
    path = at.rstrip("`").removeprefix("$").lstrip(".") if at else ""
    cause = exc.__cause__
    if isinstance(cause, InvalidRequestError):  # raised by a Struct's __post_init__
        if path.split(".")[-1].split("[")[0] == cause.param:  # "messages[0]" for "messages"
            param: str | None = path
        else:
            param = ".".join(p for p in (path, cause.param or "") if p) or None
        return RequestRejected(400, cause.message, param=param, code=cause.code or "invalid_value")
    for marker, code in (
        ("unknown field `", "unknown_field"),
        ("missing required field `", "missing_field"),
    ):
        if marker in message:
            field = message.split(marker, 1)[1].split("`", 1)[0]
            param = f"{path}.{field}" if path else field
            return RequestRejected(400, text, param=param, code=code)
    return RequestRejected(400, text, param=path or None, code="invalid_type")


#: The model id of the embedded model pair.
DEFAULT_MODEL_NAME = "dg-stream-default"


def public_model_name(backend: Backend) -> str:
    """The model id a server shows for ``backend``: never a path of the server's filesystem.

    A checkpoint path becomes its folder's name (``/srv/models/my-coder`` -> ``my-coder``),
    the embedded pair is ``dg-stream-default``; other names are kept.
    """
    name = backend.model_name or "dg-stream"
    if "/" not in name and "\\" not in name:
        return name
    from .._backends.local import default_model_dir

    path = Path(name).expanduser()
    if path.resolve() == (default_model_dir() / "verifier").resolve():
        return DEFAULT_MODEL_NAME
    return path.resolve().name or "dg-stream"


class _Server:
    """State and handlers of one app."""

    def __init__(
        self,
        backend: Backend,
        *,
        model_name: str | None,
        max_concurrent: int,
        keepalive_seconds: float,
        retry_after_seconds: int,
        api_key: str | None,
        default_max_tokens: int,
        max_body_bytes: int,
        grammar_timeout: float,
    ) -> None:
        self.backend = backend
        self.model_name = model_name or public_model_name(backend)
        self.max_concurrent = max_concurrent
        self.keepalive_seconds = keepalive_seconds
        self.retry_after_seconds = retry_after_seconds
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.max_body_bytes = max_body_bytes
        self.grammar_timeout = grammar_timeout
        # Grammars compile a few at a time, off the event loop; a flood of slow schemas
        # waits here (and times out) rather than taking every worker thread.
        self.compile_slots = anyio.CapacityLimiter(2)
        self.metrics = Metrics(max_concurrent)
        self.slots = 0
        self.created = int(time.time())
        self.started = time.monotonic()
        self.running: set[GenerationResponse] = set()  # responses sending a generation
        self.stopping = False

    async def shutdown(self, grace: float, *, force: Callable[[], bool] = lambda: False) -> None:
        """Refuse new generations, give the running ones ``grace`` seconds to finish (less when
        ``force()`` turns true: a second Ctrl-C), then end the rest with a final error event
        (a 503 before any output) that says the server is shutting down; returns once every
        response has been sent, or after ``_ENDING_SECONDS`` more for a client that does not
        read."""
        self.stopping = True
        if self.running:
            logger.info(
                "shutting down: %d generation(s) running, ending them within %gs",
                len(self.running),
                grace,
            )
        with anyio.move_on_after(grace):
            while self.running and not force():
                await anyio.sleep(_POLL_SECONDS)
        for response in list(self.running):
            response.stop()
        with anyio.move_on_after(_ENDING_SECONDS):
            while self.running:  # each ends within one model step
                await anyio.sleep(_POLL_SECONDS)

    @property
    def max_context(self) -> int | None:
        """The backend's context length (asked each time: a remote backend learns it late)."""
        return self.backend.context_length

    # -- request plumbing ---------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise RequestRejected(
                401,
                "missing or invalid API key (Authorization: Bearer ...)",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def _decode(self, request: Request, kind: type[T]) -> T:
        self._authorize(request)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > self.max_body_bytes:
                raise RequestRejected(
                    413,
                    f"the request body exceeds {self.max_body_bytes} bytes",
                    code="request_too_large",
                )
        try:
            return msgspec.json.decode(bytes(body), type=kind)
        except msgspec.ValidationError as exc:
            raise _validation_rejection(exc) from None
        except msgspec.DecodeError as exc:
            # msgspec calls a lone surrogate escape "truncated" input: say what it is.
            detail = _unpaired_surrogate(bytes(body)) or str(exc)
            raise RequestRejected(
                400, f"the body is not valid JSON: {detail}", code="invalid_json"
            ) from None

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestRejected(
                404,
                f"model {model!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _acquire(self) -> None:
        if self.stopping:  # a kept-alive connection may still send requests while draining
            raise RequestRejected(
                503,
                "the server is shutting down: retry the request later or elsewhere",
                type="server_error",
                code="server_shutting_down",
                headers={"retry-after": str(self.retry_after_seconds)},
            )
        # A bound, not a queue: past it the client is told to come back later.
        if self.slots >= self.max_concurrent:
            self.metrics.rejected_overload += 1
            raise RequestRejected(
                503,
                f"the server is at capacity ({self.max_concurrent} concurrent generations); "
                "retry later",
                type="overloaded_error",
                code="overloaded",
                headers={"retry-after": str(self.retry_after_seconds)},
            )
        self.slots += 1

    def _release(self) -> None:
        self.slots -= 1

    async def _generation(
        self,
        endpoint: str,
        request: GenerationRequest,
        renderer: Renderer,
        *,
        stream: bool,
        rename: Callable[[str | None], str | None] = lambda p: p,
    ) -> GenerationResponse:
        admitted: Any = request
        fmt = request.response_format
        admit = getattr(self.backend, "admit", None)
        if fmt is not None and fmt.constrains and admit is not None:
            admitted = await self._compile(admit, request, rename)
        self._acquire()
        try:
            source = self.backend.stream(admitted)
        except BaseException:
            self._release()
            raise
        return GenerationResponse(
            source,
            renderer,
            stream=stream,
            endpoint=endpoint,
            metrics=self.metrics,
            keepalive_seconds=self.keepalive_seconds,
            release=self._release,
            rename=rename,
            running=self.running,
        )

    async def _compile(
        self,
        admit: Callable[[GenerationRequest], Any],
        request: GenerationRequest,
        rename: Callable[[str | None], str | None],
    ) -> Any:
        """Admit a constrained request (its grammar compiled) on a worker thread, within
        ``grammar_timeout`` seconds: a schema from the network must not stall the event loop
        and the streams it serves; one too slow or refused is a 400 that says why."""
        try:
            with anyio.fail_after(self.grammar_timeout):
                return await anyio.to_thread.run_sync(
                    admit, request, limiter=self.compile_slots, abandon_on_cancel=True
                )
        except TimeoutError:
            raise RequestRejected(
                400,
                f"the response format did not compile within {self.grammar_timeout:g} s "
                "(compiles run a few at a time); simplify the schema",
                param=rename("response_format") or "response_format",
                code="response_format_timeout",
            ) from None
        except InvalidRequestError as exc:
            raise RequestRejected.invalid(exc, rename(exc.param)) from None

    # -- OpenAI-compatible ----------------------------------------------------------------------

    def _common(
        self,
        body: Any,
        *,
        max_tokens: int | None,
        max_tokens_name: str,
        prompt: str | list[int] | None,
        messages: list[Message] | None,
        extra_stop: tuple[str, ...] = (),
    ) -> GenerationRequest:
        """Validate shared OpenAI fields and build the request (raises RequestRejected)."""
        if body.n not in (None, 1):
            raise _unsupported("n", "n > 1 is not supported; send separate requests")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise _unsupported(name, f"{name} is not supported (use repetition_penalty)")
        if body.logit_bias:
            raise _unsupported("logit_bias", "logit_bias is not supported")
        stop: tuple[str, ...] = (
            (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        )
        renames = {"max_new_tokens": max_tokens_name}
        try:
            sampling = SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                repetition_penalty=body.repetition_penalty,
                seed=body.seed,
            )
            # OpenAI's defaults without max_tokens: 16 for completions, "what fits" for chat
            # (up to default_max_tokens), which the backend's admission works out from the
            # prompt it tokenizes anyway.
            default = 16 if messages is None else self.default_max_tokens
            request = GenerationRequest(
                prompt=prompt,
                messages=messages,
                max_new_tokens=max_tokens if max_tokens is not None else default,
                sampling=sampling,
                speculative=body.speculative or SpeculativeConfig(),
                stop=stop + tuple(s for s in extra_stop if s not in stop),
                fit_max_new_tokens=max_tokens is None,
            )
        except InvalidRequestError as exc:
            raise RequestRejected.invalid(exc, renames.get(exc.param or "")) from None
        return request

    async def completions(self, http: Request) -> Any:
        body = await self._decode(http, CompletionRequest)
        self._check_model(body.model)
        if body.echo:
            raise _unsupported("echo", "echo is not supported")
        if body.logprobs is not None:
            raise _unsupported("logprobs", "logprobs are not supported")
        if body.best_of not in (None, 1):
            raise _unsupported("best_of", "best_of > 1 is not supported")
        if body.suffix:
            raise _unsupported("suffix", "suffix (fill-in-the-middle) is not supported")
        prompt = _completion_prompt(body.prompt)
        response_format = _response_format(body.response_format)
        request = self._common(
            body,
            max_tokens=body.max_tokens,
            max_tokens_name="max_tokens",
            prompt=prompt,
            messages=None,
        )
        if response_format is not None:
            request = msgspec.structs.replace(request, response_format=response_format)
        renderer = CompletionRenderer(
            id=f"cmpl-{uuid.uuid4().hex}", model=self.model_name, include_usage=_include_usage(body)
        )
        return await self._generation(
            "completions",
            request,
            renderer,
            stream=body.stream,
            rename=lambda p: "max_tokens" if p == "max_new_tokens" else p,
        )

    async def chat_completions(self, http: Request) -> Any:
        body = await self._decode(http, ChatCompletionRequest)
        self._check_model(body.model)
        if body.logprobs or body.top_logprobs:
            raise _unsupported("logprobs", "logprobs are not supported")
        if body.functions:
            raise _unsupported("functions", "functions are deprecated by OpenAI: send tools")
        response_format = _response_format(body.response_format)
        try:  # compiled when the generation is admitted: a bad schema is a 400 before any work
            tools = tools_from(body.tools)
            choice = tool_choice_from(body.tool_choice, tools)
        except InvalidRequestError as exc:
            raise RequestRejected.invalid(exc) from None
        if choice.forced and response_format is not None and response_format.constrains:
            raise RequestRejected(
                400,
                "a forced tool call and a response_format both constrain the reply: send one",
                param="tool_choice",
                code="invalid_value",
            )
        tokenizer = getattr(self.backend, "tokenizer", None)
        if choice.mode == "auto" and not supports_auto(tokenizer):
            raise RequestRejected(
                400,
                "tool_choice 'auto' needs a model that writes tool calls in a format its "
                "tokenizer's response_template reads back, and this one declares none: send "
                "tool_choice 'required' or name a function (the reply is then constrained to "
                "the tools' schemas), or 'none'",
                param="tool_choice",
                code="invalid_value",
            )
        if not body.messages:
            raise RequestRejected(
                400, "messages must not be empty", param="messages", code="invalid_value"
            )
        messages = []
        for i, message in enumerate(body.messages):
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise _unsupported(
                            f"messages[{i}].content",
                            f"content parts of type {part.type!r} are not supported (text only)",
                        )
                    texts.append(part.text)
                content = "".join(texts)
            role = "system" if message.role == "developer" else message.role
            if role not in ROLES:
                raise RequestRejected(
                    400,
                    f"messages[{i}].role must be one of {', '.join(map(repr, ROLES))} or "
                    f"'developer', got {message.role!r}",
                    param=f"messages[{i}].role",
                    code="invalid_value",
                )
            try:
                messages.append(
                    Message(
                        role=role,
                        content=content or "",
                        tool_calls=message.tool_calls,
                        tool_call_id=message.tool_call_id,
                        name=message.name if role == "tool" else None,
                    )
                )
            except InvalidRequestError as exc:
                raise RequestRejected(
                    400, exc.message, param=f"messages[{i}].content", code="invalid_value"
                ) from None
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        # Without a chat template, stop before the model writes the next user turn itself.
        stops = plain_chat_stops(self.backend.tokenizer)
        request = self._common(
            body,
            max_tokens=max_tokens,
            max_tokens_name=name,
            prompt=None,
            messages=messages,
            extra_stop=stops,
        )
        if choice.mode != "none":  # tools shown to the model through its chat template
            request = msgspec.structs.replace(request, tools=[t.openai() for t in tools])
        forced = call_format(tools, choice, body.parallel_tool_calls is not False)
        if forced is not None or response_format is not None:
            request = msgspec.structs.replace(request, response_format=forced or response_format)
        options: dict[str, Any] = dict(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=self.model_name,
            include_usage=_include_usage(body),
        )
        renderer: Renderer
        if choice.forced:
            renderer = ToolCallRenderer(choice, **options)
        elif choice.mode == "auto":
            renderer = AutoToolRenderer(
                tokenizer, render_chat(tokenizer, request), tools, **options
            )
        else:
            renderer = ChatRenderer(**options)
        return await self._generation(
            "chat",
            request,
            renderer,
            stream=body.stream,
            rename=lambda p: name if p == "max_new_tokens" else p,
        )

    async def models(self, http: Request) -> Response:
        self._authorize(http)
        return _json(ModelList(data=[self._card()]))

    async def model(self, http: Request) -> Response:
        self._authorize(http)
        self._check_model(http.path_params["model"])
        return _json(self._card())

    def _card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, max_model_len=self.max_context)

    # -- native ---------------------------------------------------------------------------------

    async def dg_generate(self, http: Request) -> Any:
        request = await self._decode(http, GenerationRequest)
        return await self._generation("dg", request, NativeRenderer(), stream=True)

    async def dg_info(self, http: Request) -> Response:
        self._authorize(http)
        return _json(
            ServerInfo(dg_stream=__version__, model=self.model_name, max_context=self.max_context)
        )

    # -- operations -----------------------------------------------------------------------------

    async def health(self, http: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_name,
                "version": __version__,
                "active_generations": self.slots,
                "max_concurrent": self.max_concurrent,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
            }
        )

    async def metrics_endpoint(self, http: Request) -> Response:
        return PlainTextResponse(
            self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def favicon(self, http: Request) -> Response:
        # Browsers ask for it on every page; an empty answer keeps their consoles free of 404s.
        return Response(status_code=204, headers={"cache-control": "max-age=86400"})

    async def index(self, http: Request) -> Response:
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        return JSONResponse(
            {
                "name": "dg-stream",
                "version": __version__,
                "model": self.model_name,
                "endpoints": [
                    "/v1/completions",
                    "/v1/chat/completions",
                    "/v1/models",
                    "/v1/dg/generate",
                    "/health",
                    "/metrics",
                ],
            }
        )


_ESCAPE = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def _unpaired_surrogate(body: bytes) -> str | None:
    """Where ``body`` has a ``\\uD800``-style escape that is half of a UTF-16 surrogate pair
    without its other half (JSON allows the escape; no text holds it); ``None`` if nowhere."""
    high: re.Match[bytes] | None = None  # a high surrogate waiting for its low half
    for escape in _ESCAPE.finditer(body):
        code = int(escape.group(1), 16) if escape.group(1) else None
        is_low = code is not None and 0xDC00 <= code <= 0xDFFF
        if high is not None:
            if is_low and escape.start() == high.end():
                high = None
                continue
            break
        if code is not None and 0xD800 <= code <= 0xDBFF:
            high = escape
        elif is_low:
            high = escape
            break
    if high is None:
        return None
    text = high.group().decode()
    return (
        f"{text} at byte {high.start()} is an unpaired UTF-16 surrogate (half of a pair, not "
        "a character): send the whole pair or the character itself"
    )


def _json(value: Any) -> Response:
    return Response(encode(value), media_type="application/json")


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options is not None and body.stream_options.include_usage)


def _completion_prompt(prompt: str | list[Any]) -> str | list[int]:
    """OpenAI allows text, ids, or a batch of either; a batch of one is accepted."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestRejected(400, "the prompt is empty", param="prompt", code="invalid_value")
        return prompt
    if not prompt:
        raise RequestRejected(400, "the prompt is empty", param="prompt", code="invalid_value")
    if all(type(t) is int for t in prompt):
        if any(t < 0 for t in prompt):
            raise RequestRejected(
                400, "token ids must be >= 0", param="prompt", code="invalid_value"
            )
        return list(prompt)
    if all(isinstance(p, (str, list)) for p in prompt):
        raise _unsupported("prompt", "batched prompts are not supported; send one per request")
    raise RequestRejected(
        400,
        "prompt must be a string, a list of token ids, or a one-element list of either",
        param="prompt",
        code="invalid_type",
    )


class _CountRequests:
    """Counts responses by route and status (pure ASGI: ``receive`` passes through untouched,
    which the disconnect watcher of streaming responses depends on)."""

    _KNOWN = frozenset(
        {
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/models",
            "/v1/dg/generate",
            "/v1/dg/info",
            "/health",
            "/metrics",
            "/",
        }
    )

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_count(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):  # mounted under a prefix
                path = path[len(root) :] or "/"
            self.metrics.request(path if path in self._KNOWN else "other", status)


def _response_format(value: Any) -> ResponseFormat | None:
    """A request's ``response_format`` (raises RequestRejected); compiled at admission."""
    try:
        return response_format_from(value)
    except InvalidRequestError as exc:
        raise RequestRejected.invalid(exc, "response_format") from None


def create_app(
    backend: Backend,
    *,
    model_name: str | None = None,
    max_concurrent: int = 64,
    keepalive_seconds: float = 15.0,
    retry_after_seconds: int = 1,
    api_key: str | None = None,
    default_max_tokens: int = 512,
    max_body_bytes: int = 4 << 20,
    close_backend: bool = False,
    grammar_timeout: float = 10.0,
) -> Starlette:
    """An ASGI app serving ``backend``.

    ``model_name``: the id in ``/v1/models`` and responses (default: ``public_model_name``:
    the checkpoint folder's name, ``dg-stream-default`` for the embedded pair); requests
    naming another model get 404. ``max_concurrent``: generations running at once; past it
    requests get 503 with ``Retry-After: retry_after_seconds``.
    ``keepalive_seconds``: the longest silence on an event stream before a ``: keep-alive``
    comment. ``api_key``: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
    ``default_max_tokens``: the chat limit when a request names none (clamped to the context).
    ``close_backend``: ``await backend.aclose()`` when the app shuts down.
    ``grammar_timeout``: the longest a ``response_format`` or forced tool call may take to
    compile (off the event loop) before the request is refused with a 400.
    """
    if max_concurrent < 1:
        raise ValueError("max_concurrent must be >= 1")
    if keepalive_seconds <= 0:
        raise ValueError("keepalive_seconds must be > 0")
    if grammar_timeout <= 0:
        raise ValueError("grammar_timeout must be > 0")
    server = _Server(
        backend,
        model_name=model_name,
        max_concurrent=max_concurrent,
        keepalive_seconds=keepalive_seconds,
        retry_after_seconds=retry_after_seconds,
        api_key=api_key,
        default_max_tokens=default_max_tokens,
        max_body_bytes=max_body_bytes,
        grammar_timeout=grammar_timeout,
    )
    routes: list[Route | Mount] = [
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/dg/generate", server.dg_generate, methods=["POST"]),
        Route("/v1/dg/info", server.dg_info, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_endpoint, methods=["GET"]),
        Route("/favicon.ico", server.favicon, methods=["GET"]),
        Route("/", server.index, methods=["GET"]),
    ]
    if STATIC_DIR.is_dir():
        routes.append(Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"))

    async def rejected(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestRejected)
        return error_response(exc.status, exc.body, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            exc.status_code,
            ErrorBody(message=str(exc.detail), type=kind, code=f"http_{exc.status_code}"),
            dict(exc.headers or {}),
        )

    async def crashed(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(
            500,
            ErrorBody(
                message="internal server error (see the server log)",
                type="server_error",
                code="internal_error",
            ),
        )

    async def lifespan(app: Starlette) -> Any:
        yield
        if close_backend:
            await backend.aclose()

    app = Starlette(
        routes=routes,
        lifespan=_asynccontextmanager(lifespan),
        exception_handlers={
            RequestRejected: rejected,
            HTTPException: http_error,
            Exception: crashed,
        },
    )
    app.state.server = server
    app.add_middleware(_CountRequests, metrics=server.metrics)
    return app


def _asynccontextmanager(func: Any) -> Any:
    import contextlib

    return contextlib.asynccontextmanager(func)
