"""The incremental SSE decoder: recorded byte streams, split at every position."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dg_stream._sse import ServerSentEvent, SSEDecoder

# An OpenAI-style stream: CRLF line endings, keep-alive comments, multi-byte characters
# (2-, 3- and 4-byte UTF-8), a usage-only chunk and the [DONE] sentinel.
OPENAI_STREAM = (
    ": keep-alive\r\n\r\n"
    'data: {"choices":[{"index":0,"text":"héllo "}]}\r\n\r\n'
    'data: {"choices":[{"index":0,"text":"日本語 🙂"}]}\r\n\r\n'
    ": ping\r\n"
    'data: {"choices":[{"index":0,"text":"","finish_reason":"stop"}]}\r\n\r\n'
    'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\r\n\r\n'
    "data: [DONE]\r\n\r\n"
).encode()

OPENAI_EVENTS = [
    ServerSentEvent(data='{"choices":[{"index":0,"text":"héllo "}]}'),
    ServerSentEvent(data='{"choices":[{"index":0,"text":"日本語 🙂"}]}'),
    ServerSentEvent(data='{"choices":[{"index":0,"text":"","finish_reason":"stop"}]}'),
    ServerSentEvent(data='{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}'),
    ServerSentEvent(data="[DONE]"),
]

# Everything else the format allows: a BOM, bare CR and LF endings, multi-line data, named
# events, ids that persist, retry, fields without a space or a value, unknown fields.
MIXED_STREAM = (
    b"\xef\xbb\xbfid: 7\nevent: chunk\ndata: line one\ndata:line two \xc3\xa9\n\n"
    b"retry: 1500\rdata\r\r"
    b'unknown: field\nevent: error\ndata: {"error": {"message": "boom \xe2\x9c\x93"}}\n\n'
    b"data: only comments follow\n\n:c1\n:c2\n\n"
)

MIXED_EVENTS = [
    ServerSentEvent(data="line one\nline two é", event="chunk", id="7"),
    ServerSentEvent(data="", id="7", retry=1500),
    ServerSentEvent(data='{"error": {"message": "boom ✓"}}', event="error", id="7"),
    ServerSentEvent(data="only comments follow", id="7"),
]


def decode(parts: list[bytes]) -> tuple[list[ServerSentEvent], int]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for part in parts:
        events += decoder.feed(part)
    events += decoder.finish()
    return events, decoder.comments


@pytest.mark.parametrize(
    ("stream", "expected", "comments"),
    [
        (OPENAI_STREAM, OPENAI_EVENTS, 2),
        (MIXED_STREAM, MIXED_EVENTS, 2),
    ],
)
def test_whole_stream(stream: bytes, expected: list[ServerSentEvent], comments: int) -> None:
    assert decode([stream]) == (expected, comments)


@pytest.mark.parametrize(
    ("stream", "expected"), [(OPENAI_STREAM, OPENAI_EVENTS), (MIXED_STREAM, MIXED_EVENTS)]
)
def test_split_at_every_position(stream: bytes, expected: list[ServerSentEvent]) -> None:
    for i in range(len(stream) + 1):
        events, _ = decode([stream[:i], stream[i:]])
        assert events == expected, f"split at byte {i}"


def test_split_at_every_pair_of_positions() -> None:
    stream = MIXED_STREAM
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            events, _ = decode([stream[:i], stream[i:j], stream[j:]])
            assert events == MIXED_EVENTS, f"split at bytes {i} and {j}"


def test_byte_at_a_time() -> None:
    events, comments = decode([bytes([b]) for b in OPENAI_STREAM])
    assert events == OPENAI_EVENTS
    assert comments == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(OPENAI_STREAM)), max_size=12))
def test_random_partitions(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(OPENAI_STREAM)]
    parts = [OPENAI_STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    assert decode(parts)[0] == OPENAI_EVENTS


def test_events_are_returned_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [ServerSentEvent(data="a")]
    # A CR at the end of a chunk dispatches at once; the LF that completes the CRLF is skipped.
    assert decoder.feed(b"data: b\r\r") == [ServerSentEvent(data="b")]
    assert decoder.feed(b"\ndata: c\r\n\r\n") == [ServerSentEvent(data="c")]


def test_end_without_blank_line_dispatches_complete_lines_only() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a": 1}\n') == []
    assert decoder.finish() == [ServerSentEvent(data='{"a": 1}')]

    decoder = SSEDecoder()
    assert decoder.feed(b"data: complete\n\ndata: trunc") == [ServerSentEvent(data="complete")]
    assert decoder.finish() == []  # the partial last line is dropped, as the spec says


def test_invalid_utf8_is_replaced_not_raised() -> None:
    events, _ = decode([b"data: \xff\xfe ok\n\n"])
    assert events == [ServerSentEvent(data="\ufffd\ufffd ok")]


def test_empty_events_and_comments_dispatch_nothing() -> None:
    events, comments = decode([b": one\n\n\n\n: two\nevent: x\n\n"])
    assert events == []
    assert comments == 2
