"""What ``--stats`` and ``--compare`` report: a stream timed as it is read, and its summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from .._chunks import Chunk

__all__ = ["Summary", "summarize", "timed"]


class Summary(msgspec.Struct, kw_only=True):
    """What ``--stats`` and ``--compare`` report about one generation."""

    tokens: int
    seconds: float
    tokens_per_second: float
    verifier_calls: int | None = None
    tokens_per_call: float | None = None
    mean_accepted: float | None = None
    acceptance_rate: float | None = None
    plain_tokens_per_second: float | None = None
    speedup: float | None = None
    identical: bool | None = None

    def lines(self) -> list[str]:
        text = [
            f"{self.tokens} tokens in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tokens/s"
        ]
        if self.verifier_calls:
            text.append(
                f"{self.verifier_calls} verifier calls: {self.tokens_per_call:.2f} "
                f"tokens per call, {self.mean_accepted:.2f} drafts accepted per call "
                f"({100 * (self.acceptance_rate or 0):.0f}% of drafted)"
            )
        if self.speedup is not None:
            same = {True: "identical output", False: "outputs differ", None: ""}[self.identical]
            text.append(
                f"plain decoding: {self.plain_tokens_per_second:.1f} tokens/s; "
                f"speed-up {self.speedup:.2f}x" + (f"; {same}" if same else "")
            )
        return text


async def timed(stream: Any, render: Callable[[Chunk], None] | None) -> tuple[Any, float]:
    """Read ``stream`` to its end, handing each chunk to ``render``; the stream and seconds."""
    started = time.perf_counter()
    async with stream:
        async for chunk in stream:
            if render is not None:
                render(chunk)
    return stream, time.perf_counter() - started


def summarize(stream: Any, seconds: float) -> Summary:
    """The ``Summary`` of a stream read in ``seconds``: its speed, and its verifier calls when
    the backend reports them."""
    usage, stats = stream.usage, stream.stats
    tokens = usage.completion_tokens if usage is not None else len(stream.token_ids)
    summary = Summary(
        tokens=tokens, seconds=seconds, tokens_per_second=tokens / seconds if seconds > 0 else 0.0
    )
    if stats is not None and stats.verifier_calls:
        summary.verifier_calls = stats.verifier_calls
        summary.tokens_per_call = stats.tokens_per_call
        summary.mean_accepted = stats.mean_accepted
        summary.acceptance_rate = stats.acceptance_rate
    return summary
