"""Stream operators: re-chunking, early stops, timeouts, tee, map_text, collect."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import dg_stream
from dg_stream import (
    APITimeoutError,
    Chunk,
    GenerationRequest,
    GenerationStream,
    Stats,
    StepStats,
    StreamInterruptedError,
    Usage,
    by_lines,
    by_sentences,
    by_words,
    collect,
    map_text,
    stop_at,
    tee,
    until,
    with_timeout,
)
from dg_stream._chunks import merge_steps


class Source:
    """A GenerationStream over fixed chunks that records how far it was read and if closed."""

    def __init__(
        self,
        texts: Sequence[str],
        *,
        finish: bool = True,
        delay: float = 0.0,
        drafts: Sequence[str] | None = None,
        first_delay: float = 0.0,
    ) -> None:
        self.texts = list(texts)
        self.finish = finish
        self.delay = delay
        self.first_delay = first_delay
        self.drafts = drafts
        self.pulled = 0
        self.finalized = False

    def chunks(self) -> list[Chunk]:
        out = []
        for i, text in enumerate(self.texts):
            last = self.finish and i == len(self.texts) - 1
            out.append(
                Chunk(
                    text=text,
                    token_ids=(i,),
                    draft=self.drafts[i] if self.drafts else "",
                    step=StepStats(drafted=4, accepted=1, committed=2),
                    finish_reason="length" if last else None,
                    usage=Usage(prompt_tokens=3, completion_tokens=len(self.texts))
                    if last
                    else None,
                )
            )
        return out

    async def _gen(self) -> AsyncIterator[Chunk]:
        try:
            for i, chunk in enumerate(self.chunks()):
                if i == 0 and self.first_delay:
                    await anyio.sleep(self.first_delay)
                elif self.delay:
                    await anyio.sleep(self.delay)
                self.pulled += 1
                yield chunk
        finally:
            self.finalized = True

    def stream(self) -> GenerationStream:
        return GenerationStream(self._gen)


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


async def texts_of(stream: Any) -> list[str]:
    out = []
    async with stream:
        async for chunk in stream:
            out.append(chunk.text)
    return out


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    pieces, prev = [], 0
    for p in [*points, len(text)]:
        pieces.append(text[prev:p])
        prev = p
    return pieces


# -- re-chunking: property tests ------------------------------------------------------------

ALPHABET = st.sampled_from([*list("ab .!?\n\t…。\"')"), "é", "日", "🙂", "  ", "\r\n"])
TEXTS = st.lists(ALPHABET, max_size=60).map("".join)
CUTS = st.lists(st.integers(min_value=0, max_value=80), max_size=20)
OPERATORS = {"words": by_words, "lines": by_lines, "sentences": by_sentences}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, cuts=CUTS, name=st.sampled_from(sorted(OPERATORS)), finish=st.booleans())
@example(text="a  b c", cuts=[2], name="words", finish=True)  # whitespace across chunks
@example(text="A.  B. C", cuts=[3], name="sentences", finish=True)
def test_rechunking_never_loses_or_duplicates_text(
    text: str, cuts: list[int], name: str, finish: bool
) -> None:
    pieces = split_at(text, cuts)
    source = Source(pieces, finish=finish)

    async def main() -> tuple[list[str], Any]:
        stream = source.stream().pipe(OPERATORS[name]())
        out = await texts_of(stream)
        return out, stream

    out, stream = run(main)
    assert "".join(out) == text
    assert stream.text == text
    assert source.finalized
    # Every chunk but the last is one whole unit; no empty chunks except a bare final one.
    for i, piece in enumerate(out[:-1]):
        assert piece
        if i == 0 and name != "lines" and piece.isspace():
            continue  # the whitespace the text starts with, alone
        if name == "words":
            assert re.fullmatch(r"\S+\s+", piece), piece
        elif name == "lines":
            assert piece.endswith("\n") and piece.count("\n") == 1, piece
        else:
            assert not piece[0].isspace(), piece
            assert re.search(r"([.!?…][\"')]*\s+|[。！？][\"')]*\s*|\n\s*)$", piece), piece
    if name != "lines" and len(out) > 1:  # the final chunk too: whitespace ends units
        assert not out[-1][:1].isspace(), out
    # The units do not depend on how the upstream happened to cut the text.
    whole = run(texts_of, Source([text], finish=finish).stream().pipe(OPERATORS[name]()))
    assert [piece for piece in out if piece] == [piece for piece in whole if piece]
    if finish:
        assert stream.finish_reason == "length"
        assert stream.usage == Usage(prompt_tokens=3, completion_tokens=len(pieces))


@settings(max_examples=60, deadline=None)
@given(text=TEXTS, cuts=CUTS, name=st.sampled_from(sorted(OPERATORS)))
def test_rechunking_keeps_token_ids_and_step_totals(text: str, cuts: list[int], name: str) -> None:
    pieces = split_at(text, cuts)

    async def main() -> list[Chunk]:
        stream = Source(pieces).stream().pipe(OPERATORS[name]())
        return [c async for c in stream]

    out = run(main)
    assert [t for c in out for t in c.token_ids] == list(range(len(pieces)))
    assert sum(c.step.committed for c in out if c.step) == 2 * len(pieces)
    assert [c.finish_reason for c in out].count("length") == 1
    assert out[-1].finish_reason == "length"


def test_step_statistics_are_summed_alike_everywhere() -> None:
    steps = [
        StepStats(drafted=4, accepted=1, committed=2, draft_seconds=0.5, verify_seconds=1.0),
        StepStats(drafted=3, accepted=3, committed=4, draft_seconds=0.25),
        StepStats(committed=1, verify_seconds=0.5),
    ]
    one_by_one = Stats()
    for step in steps:
        one_by_one = one_by_one.add(step)  # as the engine adds each step
    assert (
        Stats().add(*steps)
        == one_by_one
        == Stats(
            verifier_calls=3,
            drafted_tokens=7,
            accepted_tokens=4,
            committed_tokens=7,
            draft_seconds=0.75,
            verify_seconds=1.5,
        )
    )
    assert Stats().add() == Stats()
    assert merge_steps(steps) == StepStats(
        drafted=7, accepted=4, committed=7, draft_seconds=0.75, verify_seconds=1.5
    )
    assert merge_steps(steps[:1]) is steps[0]
    assert merge_steps([]) is None


def test_rechunking_examples() -> None:
    async def main() -> None:
        words = await texts_of(
            Source(["Hel", "lo, wor", "ld  and", " more"]).stream().pipe(by_words())
        )
        assert words == ["Hello, ", "world  ", "and ", "more"]
        # Whitespace split across chunks stays with the word before it.
        words = await texts_of(Source(["  #", " ", " x", "\n", "  y "]).stream().pipe(by_words()))
        assert words == ["  ", "#  ", "x\n  ", "y "]
        lines = await texts_of(Source(["a\nb", "c\n\nd"]).stream().pipe(by_lines()))
        assert lines == ["a\n", "bc\n", "\n", "d"]
        sentences = await texts_of(
            Source(["Pi is 3.14. It", " is! Really?", " 好。好"]).stream().pipe(by_sentences())
        )
        assert sentences == ["Pi is 3.14. ", "It is! ", "Really? ", "好。", "好"]

    run(main)


def test_rechunked_draft_shows_what_is_held_back() -> None:
    async def main() -> list[Chunk]:
        source = Source(["one tw", "o three"], drafts=["o four", " five"])
        return [c async for c in source.stream().pipe(by_words())]

    out = run(main)
    # After "one " the consumer has not yet seen "tw" as committed, so it leads the draft.
    assert (out[0].text, out[0].draft) == ("one ", "two four")
    assert [c.text for c in out] == ["one ", "two ", "three"]
    assert out[-1].draft == ""


# -- stop_at / until ------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    before=st.text(alphabet="ab\n ", max_size=20),
    after=st.text(alphabet="ab\n ", max_size=20),
    cuts=CUTS,
    include=st.booleans(),
)
def test_stop_at_spanning_chunks(before: str, after: str, cuts: list[int], include: bool) -> None:
    stop = "<END>"
    text = before + stop + after
    source = Source([*split_at(text, cuts), "tail"])

    async def main() -> Any:
        stream = source.stream().pipe(stop_at(stop, include=include))
        await texts_of(stream)
        return stream

    stream = run(main)
    assert stream.text == before + (stop if include else "")
    assert stream.finish_reason == "stop"
    assert source.finalized  # the upstream was closed


def test_stop_at_picks_the_earliest_and_reports_stats() -> None:
    async def main() -> Any:
        stream = Source(["x, y", "\n\nz. ", "END", "more"]).stream().pipe(stop_at("END", "\n\n"))
        return await stream.collect()

    completion = run(main)
    assert completion.text == "x, y"
    assert completion.finish_reason == "stop"
    assert completion.stats is not None and completion.stats.verifier_calls == 2
    assert completion.usage is None  # cut short: the upstream never reported usage


def test_stop_at_holds_a_partial_match_in_the_draft() -> None:
    async def main() -> list[Chunk]:
        source = Source(["ab<E", "Nx", "c"], drafts=["ND", "y", ""])
        return [c async for c in source.stream().pipe(stop_at("<END>"))]

    out = run(main)
    assert (out[0].text, out[0].draft) == ("ab", "<END")
    assert "".join(c.text for c in out) == "ab<ENxc"


def test_stop_at_validates() -> None:
    with pytest.raises(ValueError):
        stop_at()
    with pytest.raises(ValueError):
        stop_at("")


def test_until_stops_upstream_after_the_chunk_that_satisfies_it() -> None:
    source = Source([f"line {i}\n" for i in range(50)])

    async def main() -> Any:
        stream = source.stream().pipe(until(lambda text: text.count("\n") >= 3))
        return await stream.collect(), stream

    completion, stream = run(main)
    assert completion.text == "line 0\nline 1\nline 2\n"
    assert completion.finish_reason == "stop"
    assert source.pulled == 3 and source.finalized
    assert stream.upstream.closed


def test_stop_at_stops_the_model_work(tiny_backend: Any) -> None:
    """A real local generation: stopping early ends it after a few verifier calls."""

    async def main() -> Any:
        full = await dg_stream.generate(
            "def add(a, b):", backend=tiny_backend, max_new_tokens=60
        ).collect()
        assert len(full.text) > 4
        stop = full.text[2:4]
        calls: list[int] = []

        class Counting:
            def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
                return self._run(request)

            async def _run(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
                agen = tiny_backend.stream(request)
                try:
                    async for chunk in agen:
                        calls.append(1)
                        yield chunk
                finally:
                    await agen.aclose()
                    calls.append(-1)  # the model work under the stream ended

            async def aclose(self) -> None:
                return None

        stream = dg_stream.generate("def add(a, b):", backend=Counting(), max_new_tokens=60)
        short = await stream.pipe(stop_at(stop)).collect()
        return full, short, calls

    full, short, calls = run(main)
    assert full.text.startswith(short.text)
    assert short.text == full.text[: full.text.index(full.text[2:4])]
    assert calls[-1] == -1
    assert calls.count(1) < full.stats.verifier_calls


# -- with_timeout -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_with_timeout_first_chunk(backend: str) -> None:
    source = Source(["a", "b"], first_delay=5)

    async def main() -> None:
        stream = source.stream().pipe(with_timeout(first_chunk=0.05))
        with pytest.raises(APITimeoutError, match="first chunk"):
            await stream.collect()

    anyio.run(main, backend=backend)
    assert source.finalized and source.pulled == 0


def test_with_timeout_idle_keeps_text_so_far() -> None:
    source = Source(["a", "b", "c", "d"])
    source.delay = 0.0

    async def slow_after_two() -> AsyncIterator[Chunk]:
        for i, chunk in enumerate(source.chunks()):
            if i == 2:
                await anyio.sleep(5)
            yield chunk

    async def main() -> None:
        stream = GenerationStream(slow_after_two).pipe(with_timeout(idle=0.05, first_chunk=2))
        with pytest.raises(APITimeoutError, match="no chunk for") as info:
            async for _ in stream:
                pass
        assert info.value.text == "ab"
        assert stream.closed

    run(main)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_with_timeout_fires_on_local_streams(backend: str, tiny_backend: Any) -> None:
    """A local stream waits for its rounds on an event, so a timeout can cut the wait (it
    used to wait inside a worker thread that no timeout reaches)."""

    async def main() -> None:
        for options, reason in (({"idle": 1e-6}, "no chunk for"), ({"first_chunk": 1e-6}, "first")):
            stream = dg_stream.generate("def f(x):", backend=tiny_backend, max_new_tokens=200)
            with pytest.raises(APITimeoutError, match=reason):
                async for _ in stream.pipe(with_timeout(**options)):
                    pass
            assert stream.closed

    anyio.run(main, backend=backend)
    assert tiny_backend.model_thread.sync(10)
    assert tiny_backend.model_thread.counts == (0, 0, 0)  # its row was freed


def test_with_timeout_total_and_passes_fast_streams() -> None:
    async def main() -> None:
        fast = await Source(["a", "b"]).stream().pipe(with_timeout(total=2, idle=1)).collect()
        assert fast.text == "ab" and fast.finish_reason == "length"
        slow = Source(list("abcdefghij"), delay=0.03)
        with pytest.raises(APITimeoutError, match="longer than"):
            await slow.stream().pipe(with_timeout(total=0.1)).collect()
        assert 0 < slow.pulled < 10 and slow.finalized

    run(main)
    with pytest.raises(ValueError):
        with_timeout(idle=0)


# -- tee --------------------------------------------------------------------------------------


def test_tee_slow_consumer_does_not_make_fast_one_lose_chunks() -> None:
    texts = [f"{i} " for i in range(40)]
    source = Source(texts)
    seen: dict[str, list[str]] = {"fast": [], "slow": []}
    max_gap = 0

    async def main() -> None:
        nonlocal max_gap
        fast, slow = source.stream().pipe(tee(2, buffer=3))

        async def consume(name: str, stream: Any, pause: float) -> None:
            nonlocal max_gap
            async with stream:
                async for chunk in stream:
                    seen[name].append(chunk.text)
                    max_gap = max(max_gap, len(seen["fast"]) - len(seen["slow"]))
                    await anyio.sleep(pause)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, "fast", fast, 0)
            tg.start_soon(consume, "slow", slow, 0.002)

    run(main)
    assert seen["fast"] == texts and seen["slow"] == texts
    assert max_gap <= 4  # bounded: the fast consumer waited for the slow one
    assert source.finalized


def test_tee_closes_upstream_with_last_branch_and_shares_errors() -> None:
    source = Source(["a", "b", "c"])

    async def main() -> None:
        a, b = source.stream().pipe(tee(2, buffer=None))
        first = await a.__anext__()
        await a.aclose()
        assert not source.finalized  # b is still open
        rest = [c.text async for c in b]
        assert first.text == "a" and rest == ["a", "b", "c"]
        assert source.finalized

        async def failing() -> AsyncIterator[Chunk]:
            yield Chunk(text="x")
            raise RuntimeError("boom")

        x, y = GenerationStream(failing).pipe(tee(2))
        for branch in (x, y):
            with pytest.raises(RuntimeError, match="boom"):
                async for _ in branch:
                    pass

    run(main)


def test_tee_sequential_reading_with_unbounded_buffer() -> None:
    async def main() -> None:
        a, b, c = Source(["x", "y"]).stream().pipe(tee(3, buffer=None))
        assert (await a.collect()).text == "xy"
        assert (await b.collect()).text == "xy"
        assert (await c.collect()).finish_reason == "length"

    run(main)


def test_tee_cancelled_puller_interrupts_others() -> None:
    async def never() -> AsyncIterator[Chunk]:
        yield Chunk(text="a")
        await anyio.sleep(10)
        yield Chunk(text="b")

    async def main() -> None:
        a, b = GenerationStream(never).pipe(tee(2))
        await a.__anext__()
        await b.__anext__()
        with anyio.move_on_after(0.05):
            await a.__anext__()
        with pytest.raises(StreamInterruptedError):
            await b.__anext__()

    run(main)


# -- map_text, collect, chaining --------------------------------------------------------------


def test_map_text_and_collect_operator_chain() -> None:
    source = Source(["hello wo", "rld\nbye", " now\n\nunused"], drafts=["rld", "x", ""])

    async def main() -> Any:
        return await source.stream().pipe(
            stop_at("\n\n"), by_lines(), map_text(str.upper), collect()
        )

    completion = run(main)
    assert completion.text == "HELLO WORLD\nBYE NOW"
    assert completion.finish_reason == "stop"
    assert source.finalized


def test_closing_the_outer_stream_closes_the_whole_chain() -> None:
    source = Source([f"{i} " for i in range(100)])

    async def main() -> Any:
        chain = source.stream().pipe(by_words(), map_text(str.upper), with_timeout(idle=5))
        async with chain:
            async for chunk in chain:
                if chunk.text.startswith("3"):
                    break
        return chain

    chain = run(main)
    assert chain.closed and chain.upstream.closed and chain.upstream.upstream.closed
    assert source.finalized and source.pulled < 10
    assert chain.text == "0 1 2 3 "


def test_operators_on_a_real_local_stream(tiny_backend: Any) -> None:
    async def main() -> tuple[Any, list[str]]:
        plain = await dg_stream.generate(
            "class Stack:", backend=tiny_backend, max_new_tokens=30
        ).collect()
        words = await texts_of(
            dg_stream.generate(
                "class Stack:", backend=tiny_backend, max_new_tokens=30, draft_preview=True
            ).pipe(by_words())
        )
        return plain, words

    plain, words = run(main)
    assert "".join(words) == plain.text
