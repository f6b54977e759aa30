"""Wire and result types: what a stream yields and what it reports when it ends."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec

__all__ = ["Chunk", "FinishReason", "Stats", "StepStats", "Usage"]

FinishReason = Literal["stop", "length", "cancelled"]


class StepStats(msgspec.Struct, frozen=True, kw_only=True):
    """What one verifier call did: tokens drafted, drafts accepted, time spent.

    ``rows`` is how many generations shared the call (batched decoding; 1 alone), and
    ``verify_seconds`` the whole call's time, which each of them waited. ``forced`` counts
    the drafted tokens a grammar dictated (``response_format``): no drafter work made them.
    """

    drafted: int = 0
    accepted: int = 0
    committed: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    rows: int = 1
    forced: int = 0


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts, as OpenAI-compatible servers report them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """Totals for one generation.

    ``mean_accepted`` counts accepted *draft* tokens per verifier call;
    ``tokens_per_call`` also counts the verifier's own token (accepted + 1 on full calls);
    ``forced_tokens`` the drafted tokens that a grammar dictated rather than the drafter.
    """

    verifier_calls: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    committed_tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    total_seconds: float = 0.0
    forced_tokens: int = 0

    @property
    def mean_accepted(self) -> float:
        return self.accepted_tokens / self.verifier_calls if self.verifier_calls else 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.committed_tokens / self.verifier_calls if self.verifier_calls else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def add(self, *steps: StepStats) -> Stats:
        """These totals with ``steps`` added, one verifier call each.

        The one place where step statistics are summed: the engine, the stream operators,
        the server's metrics and ``merge_steps`` all add through it.
        """
        calls = self.verifier_calls
        totals = {total: getattr(self, total) for total, _ in _SUMMED}
        for step in steps:
            calls += 1
            for total, field in _SUMMED:
                totals[total] += getattr(step, field)
        return msgspec.structs.replace(self, verifier_calls=calls, **totals)


#: Which ``Stats`` total sums which ``StepStats`` field.
_SUMMED = (
    ("drafted_tokens", "drafted"),
    ("accepted_tokens", "accepted"),
    ("committed_tokens", "committed"),
    ("draft_seconds", "draft_seconds"),
    ("verify_seconds", "verify_seconds"),
    ("forced_tokens", "forced"),
)


def merge_steps(steps: Iterable[StepStats]) -> StepStats | None:
    """One ``StepStats`` for several (``None`` for none), so that sums over a re-chunked
    stream stay exact; ``rows`` is the largest batch among them."""
    several = list(steps)
    if len(several) <= 1:
        return several[0] if several else None
    totals = Stats().add(*several)
    rows = max(step.rows for step in several)
    return StepStats(rows=rows, **{field: getattr(totals, total) for total, field in _SUMMED})


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """One piece of a stream.

    ``text`` is newly committed text (append-only); ``token_ids`` the ids committed with it;
    ``draft`` provisional text that follows all committed text so far (replaces the previous
    chunk's draft; empty unless draft previews were asked for); ``finish_reason`` is set on the
    last chunk only, which also carries ``usage`` and ``stats``.
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    draft: str = ""
    finish_reason: FinishReason | None = None
    step: StepStats | None = None
    usage: Usage | None = None
    stats: Stats | None = None
