"""An incremental decoder for server-sent events (the ``text/event-stream`` format).

Bytes arrive in arbitrary network chunks: a line, or a multi-byte UTF-8 character, may be split
anywhere. The decoder therefore splits *bytes* into lines first (the three line endings of the
spec, ``\\r\\n``, ``\\n`` and ``\\r``, are ASCII and never occur inside a UTF-8 sequence) and
decodes each complete line on its own. Comments (keep-alives) are counted, never dispatched.
"""

from __future__ import annotations

import msgspec

__all__ = ["SSEDecoder", "ServerSentEvent"]


class ServerSentEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One dispatched event: ``event`` is ``None`` for the default ("message") type."""

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """``feed(bytes)`` returns the events completed by those bytes; ``finish()`` the rest.

    Follows the WHATWG event-stream parsing rules, with one leniency: at the end of the stream
    an event whose lines were all complete but which lacks the final blank line is dispatched
    (some servers omit it); a trailing partial line is dropped as the spec says.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip_lf = False  # the last chunk ended in "\r": a "\n" starting the next is its pair
        self._first_line = True
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None
        self.comments = 0  # comment lines seen (keep-alives)

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        self._buffer += chunk
        events: list[ServerSentEvent] = []
        lines = bytes(self._buffer).splitlines(keepends=True)
        self._buffer.clear()
        for raw in lines:
            if raw.endswith(b"\r\n"):
                line = raw[:-2]
            elif raw.endswith((b"\n", b"\r")):
                line = raw[:-1]
                if raw.endswith(b"\r") and raw is lines[-1]:
                    self._skip_lf = True  # maybe the first half of a "\r\n" split across chunks
            else:
                self._buffer += raw  # incomplete: wait for its line ending
                break
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def finish(self) -> list[ServerSentEvent]:
        """End of stream: dispatch a pending event whose lines were complete."""
        self._buffer.clear()
        self._skip_lf = False
        event = self._dispatch()
        return [event] if event is not None else []

    # -- parsing ------------------------------------------------------------------------------

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if self._first_line:
            self._first_line = False
            if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark may open the stream
                raw = raw[3:]
        if not raw:
            return self._dispatch()
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            self.comments += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:
                self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        # Any other field name is ignored, as the spec requires.
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if self._id is not None:
            self._last_id = self._id
        data, event, retry = self._data, self._event, self._retry
        self._data, self._event, self._id, self._retry = [], None, None, None
        if not data:
            return None
        return ServerSentEvent(
            data="\n".join(data), event=event or None, id=self._last_id, retry=retry
        )

    @property
    def last_event_id(self) -> str | None:
        return self._last_id
