"""The native wire protocol shared by ``dg-stream serve`` and ``RemoteBackend(api="dg")``.

``POST /v1/dg/generate`` takes a ``GenerationRequest`` as JSON and answers with server-sent
events whose ``data`` is one ``Event``: a tagged union on the ``"type"`` field. A stream is
complete once a ``chunk`` event with a ``finish_reason`` has arrived; an ``error`` event (also
sent with the SSE field ``event: error``) ends it early. Error bodies, streamed or not, have the
OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ._chunks import Chunk

__all__ = [
    "ChunkEvent",
    "ErrorBody",
    "ErrorEvent",
    "ErrorResponse",
    "Event",
    "ServerInfo",
    "decode_event",
    "encode",
]


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """What went wrong: a readable ``message``, a ``type`` (``invalid_request_error``,
    ``overloaded_error``, ``server_error``, ...), the offending ``param`` and a machine ``code``."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The body of every non-2xx answer."""

    error: ErrorBody


class ChunkEvent(msgspec.Struct, frozen=True, kw_only=True, tag="chunk", tag_field="type"):
    """One ``Chunk`` of the generation, exactly as the backend produced it."""

    chunk: Chunk


class ErrorEvent(msgspec.Struct, frozen=True, kw_only=True, tag="error", tag_field="type"):
    """The generation failed after the response had started."""

    error: ErrorBody


Event = ChunkEvent | ErrorEvent


class ServerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v1/dg/info``: tells a client that the native protocol is offered."""

    dg_stream: str  # the server's dg_stream version
    model: str
    protocol: int = 1
    max_context: int | None = None


_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)


def encode(value: Any) -> bytes:
    """JSON bytes of a wire value (Structs, dicts, lists)."""
    return _encoder.encode(value)


def decode_event(data: str | bytes) -> ChunkEvent | ErrorEvent:
    """One native event; raises ``msgspec.DecodeError``/``ValidationError`` for bad input."""
    event: ChunkEvent | ErrorEvent = _event_decoder.decode(data)
    return event
