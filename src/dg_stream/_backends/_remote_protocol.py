"""What ``RemoteBackend`` says and hears: request bodies out, server-sent events in, Chunks out.

Two protocols: dg_stream's native event stream (``POST /v1/dg/generate``) and the OpenAI
completions / chat completions SSE protocol. Nothing here does I/O; the transport
(``_remote_transport``) feeds the parsers and maps their signals to public errors.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .._chunks import Chunk, FinishReason, Usage
from .._config import GenerationRequest, ResponseFormat
from .._errors import DGStreamError, GenerationError, InvalidRequestError
from .._sse import ServerSentEvent
from .._wire import ChunkEvent, ErrorBody, ServerInfo, decode_event

__all__ = [
    "NativeParser",
    "OpenAIParser",
    "Parser",
    "ProtocolViolation",
    "ServerErrorEvent",
    "Truncated",
    "error_fields",
    "event_error",
    "openai_body",
    "server_info",
]

_json = msgspec.json.Decoder()
_info_decoder = msgspec.json.Decoder(ServerInfo)
_encoder = msgspec.json.Encoder()


# -- signals from the parsers (the transport maps them to public errors) ----------------------


class ServerErrorEvent(Exception):
    """The server reported an error in the stream (or as a JSON answer)."""

    def __init__(self, body: ErrorBody) -> None:
        super().__init__(body.message)
        self.body = body


class Truncated(Exception):
    """The stream ended without its final event."""


class ProtocolViolation(Exception):
    """The server sent something that is not the protocol (bad JSON, wrong shape)."""


# -- error bodies ----------------------------------------------------------------------------


def error_fields(body: object) -> tuple[str | None, str | None, str | None, str | None]:
    """(message, param, type, code) from the error bodies servers commonly send."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            msg = error.get("message")

            def text(key: str) -> str | None:
                value = error.get(key)
                return value if isinstance(value, str) else None

            return (
                str(msg) if msg is not None else None,
                text("param"),
                text("type"),
                text("code"),
            )
        if isinstance(error, str):
            return error, None, None, None
        for key in ("detail", "message"):
            if isinstance(body.get(key), str):
                return body[key], None, None, None
    if isinstance(body, str) and body.strip():
        return body.strip()[:500], None, None, None
    return None, None, None, None


def _error_body(obj: object) -> ErrorBody:
    message, param, kind, code = error_fields(obj)
    return ErrorBody(
        message=message or "server error", type=kind or "server_error", param=param, code=code
    )


def event_error(body: ErrorBody) -> DGStreamError:
    """The public error for an error the server reported before any output."""
    if body.type == "invalid_request_error":
        return InvalidRequestError(body.message, param=body.param, code=body.code)
    return GenerationError(f"server error: {body.message}")


def server_info(body: object) -> ServerInfo | None:
    """``GET /v1/dg/info``'s answer, or None when it is not one (the native protocol is not
    offered)."""
    if body is None:
        return None
    try:
        return _info_decoder.decode(_encoder.encode(body))
    except msgspec.ValidationError:
        return None


# -- requests --------------------------------------------------------------------------------


def openai_body(
    request: GenerationRequest,
    *,
    model: str | None,
    chat: bool,
    include_usage: bool,
    diffusing: bool,
) -> tuple[str, bytes, bool]:
    """(path, JSON body, whether it is a chat request) for the OpenAI protocol.

    ``chat``: send a text prompt as one user message to ``/v1/chat/completions``.
    """
    body: dict[str, Any] = {}
    if model is not None:
        body["model"] = model
    chat = request.messages is not None or chat
    if request.messages is not None:
        body["messages"] = [msgspec.to_builtins(m) for m in request.messages]
        if request.tools:
            # An OpenAI-compatible server shows tools only with its own tool calling, whose
            # replies are tool_calls, not this stream's text: refused rather than dropped.
            raise InvalidRequestError(
                "tools are shown to the model by dg_stream's own protocol (api='dg') or a local "
                "backend; with an OpenAI-compatible server use its tools API (for example "
                "LangChain's ChatOpenAI.bind_tools)",
                param="tools",
            )
    elif chat:
        if not isinstance(request.prompt, str):
            raise InvalidRequestError(
                "chat=True needs a text prompt, not token ids", param="prompt"
            )
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
    fmt = request.response_format
    if fmt is not None and fmt.constrains:
        if fmt.type not in ("json_object", "json_schema"):
            # Never dropped in silence: an OpenAI-compatible server knows only JSON formats.
            raise InvalidRequestError(
                f"response_format {fmt.type!r} is dg_stream's own; an OpenAI-compatible "
                "server takes json_object or json_schema",
                param="response_format",
            )
        body["response_format"] = openai_response_format(fmt)
    speculative = {
        k: v for k, v in msgspec.structs.asdict(request.speculative).items() if v is not None
    }
    if speculative:
        body["speculative"] = speculative
    body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if diffusing:
        body["diffusing"] = True
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return path, _encoder.encode(body), chat


def openai_response_format(fmt: ResponseFormat) -> dict[str, Any]:
    """A JSON response format in OpenAI's shape (fields left unset are left out)."""
    out: dict[str, Any] = {"type": fmt.type}
    spec = fmt.json_schema
    if spec is not None:
        inner: dict[str, Any] = {"name": spec.name, "schema": spec.schema}
        if spec.strict is not None:
            inner["strict"] = spec.strict
        if spec.description is not None:
            inner["description"] = spec.description
        out["json_schema"] = inner
    return out


# -- parsers: SSE events in, Chunks out ------------------------------------------------------


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
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
    )


class NativeParser:
    """``/v1/dg/generate`` events; complete at the chunk with a finish_reason."""

    #: A plain JSON answer is not part of this protocol: it is read as an event stream.
    reads_json_answers = False

    def __init__(self) -> None:
        self.done = False

    def event(self, sse: ServerSentEvent) -> list[Chunk]:
        if self.done:
            return []
        if sse.data == "[DONE]":
            raise Truncated("the stream ended before its last chunk")
        try:
            event = decode_event(sse.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolViolation(f"bad native event: {exc}") from None
        if not isinstance(event, ChunkEvent):
            raise ServerErrorEvent(event.error)
        if event.chunk.finish_reason is not None:
            self.done = True
        return [event.chunk]

    def end(self) -> list[Chunk]:
        if not self.done:
            raise Truncated("the stream ended before its last chunk")
        return []

    def answer(self, content: bytes) -> list[Chunk]:
        raise ProtocolViolation("expected an event stream")


class OpenAIParser:
    """OpenAI completions / chat completions chunks.

    Text deltas become committed text. The finish_reason is held back until ``[DONE]`` (or the
    end of the stream) so that a usage-only chunk that follows it lands on the final Chunk.
    With ``diffusing`` each event carries the whole current text: refining states become
    ``draft`` (when previews are asked for), the last state is committed once, at the end.
    """

    #: A server that ignores ``stream: true`` answers with one JSON object: ``answer`` reads it.
    reads_json_answers = True

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
            raise ProtocolViolation(f"bad JSON in event: {sse.data[:200]!r}") from None
        if sse.event == "error" or (isinstance(obj, dict) and obj.get("error")):
            raise ServerErrorEvent(
                _error_body(obj if isinstance(obj, dict) and "error" in obj else {"error": obj})
            )
        if not isinstance(obj, dict):
            raise ProtocolViolation(f"expected a JSON object, got {sse.data[:200]!r}")
        return self._object(obj)

    def answer(self, content: bytes) -> list[Chunk]:
        """All Chunks of a non-streaming JSON answer (a server that ignored ``stream: true``)."""
        try:
            obj = _json.decode(content)
        except msgspec.DecodeError:
            raise ProtocolViolation("bad JSON answer") from None
        if isinstance(obj, dict) and obj.get("error"):
            raise ServerErrorEvent(_error_body(obj))
        if not isinstance(obj, dict):
            raise ProtocolViolation("expected a JSON object")
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
            raise Truncated("the stream ended without a finish_reason or [DONE]")
        return self._final()  # lenient: a finish_reason was sent, only [DONE] is missing


Parser = NativeParser | OpenAIParser
