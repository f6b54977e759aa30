"""Adaptive block size: draft as many tokens as pay for themselves, measured, not guessed.

Pure arithmetic, no torch. A verifier call with ``k`` drafted tokens keeps on average
``E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i`` tokens, where ``a_i`` is the chance that draft ``i``
is accepted given that the ones before it were, and costs ``V(k + 1) + D(k)`` seconds (verify
``k + 1`` tokens, draft ``k``; ``D(0) = 0``). The policy picks the ``k`` with the most tokens
per second, ``k = 0`` (plain decoding) included, so a drafter that does not pay is switched
off instead of slowing generation down. When ``R`` rows share a verifier call (batched
generations, ``shared_block``) every row is fed as many tokens as the widest, so one size is
chosen for the call: the most tokens of all rows per ``V(R (k + 1))`` plus their drafting.
The call's fixed cost is spread over the rows, its per-token cost is not, so the busier the
batch the fewer drafts pay.

``a_i`` is estimated per generation from what the verifier accepted, starting from what earlier
generations of the same engine saw; the costs are measured on the running machine and shared by
all generations of one engine (they belong to the models and the hardware, not to the prompt).
The costs are medians of recent calls by size (robust to the slow call in ten that a busy
machine makes), the acceptance a forgetting average: both follow a change of regime (a
repetitive stretch of text, a longer context, a loaded machine) without jumping at one
outlier.

Block sizes then depend on measured timings: greedy output is identical to plain decoding
whatever they are (in float32; in reduced precision, differently shaped verifier calls can
round a near-tie differently), and sampled output keeps the verifier's distribution, but a
seeded sampled generation is reproducible token for token only with a fixed block size.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque

__all__ = ["AcceptanceEstimate", "BlockSizePolicy", "CostTable", "shared_block"]


class _Curve:
    """``y(x)``, non-decreasing, from noisy timings: each size bucket keeps its last ``keep``
    observations, and the curve runs through the buckets' medians (piecewise linear, and
    beyond the largest measured size along the slope of the last two buckets).

    Medians, not means or a least-squares line: on a busy machine one call in ten can take
    twice as long, and a single such call must not switch drafting off (or on). Buckets are
    powers of two apart, so a few sizes seen often cover the whole range.
    """

    def __init__(self, keep: int = 9) -> None:
        self.keep = keep
        self._xs: dict[int, deque[int]] = {}
        self._ys: dict[int, deque[float]] = {}
        self._points: list[tuple[float, float]] | None = None

    @property
    def sizes(self) -> set[int]:
        return set(self._xs)

    def add(self, x: int, y: float) -> None:
        bucket = max(1, x).bit_length()
        self._xs.setdefault(bucket, deque(maxlen=self.keep)).append(x)
        self._ys.setdefault(bucket, deque(maxlen=self.keep)).append(y)
        self._points = None

    def _curve(self) -> list[tuple[float, float]]:
        if self._points is None:
            points, top = [], 0.0
            for bucket in sorted(self._xs):
                top = max(top, statistics.median(self._ys[bucket]))  # never cheaper when larger
                points.append((float(statistics.median(self._xs[bucket])), top))
            self._points = points
        return self._points

    def __call__(self, x: int) -> float:
        points = self._curve()
        if not points:
            return 0.0
        if len(points) == 1 or x <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in itertools.pairwise(points):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-9)
        (x0, y0), (x1, y1) = points[-2], points[-1]
        return y1 + (y1 - y0) / max(x1 - x0, 1e-9) * (x - x1)


class CostTable:
    """Seconds of a verifier call against tokens fed (all rows together), and of drafting one
    row against its block size (one curve per number of denoising steps): robust curves of
    what the running machine measured (``_Curve``), refreshed by every call. The first
    ``skip`` verifier calls are not counted: they pay one-off costs (allocations, kernel
    selection) that later calls do not."""

    def __init__(self, keep: int = 9, skip: int = 2) -> None:
        self.keep = keep
        self.skip = skip
        self.verify = _Curve(keep)
        self.draft: dict[int, _Curve] = {}

    def observe_verify(self, tokens: int, seconds: float) -> None:
        if self.skip > 0:
            self.skip -= 1
            return
        self.verify.add(tokens, seconds)

    def observe_draft(self, block: int, seconds: float, steps: int = 1) -> None:
        if block > 0:
            self.draft.setdefault(steps, _Curve(self.keep)).add(block, seconds)

    def ready(self, steps: int = 1) -> bool:
        """Enough measured to compare block sizes: two verify sizes and one drafter call."""
        return len(self.verify.sizes) >= 2 and steps in self.draft

    def call_seconds(self, block: int, steps: int = 1) -> float:
        draft = self.draft[steps](block) if block > 0 and steps in self.draft else 0.0
        return self.verify(block + 1) + draft


class AcceptanceEstimate:
    """Per-position conditional acceptance rates, from a weak prior and forgetting counts."""

    def __init__(
        self, max_block: int, prior: float = 0.5, prior_weight: float = 1.0, decay: float = 0.9
    ) -> None:
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.hits = [0.0] * max_block
        self.trials = [0.0] * max_block

    def copy(self, decay: float | None = None) -> AcceptanceEstimate:
        twin = AcceptanceEstimate(len(self.hits), self.prior, self.prior_weight, self.decay)
        twin.hits, twin.trials = list(self.hits), list(self.trials)
        if decay is not None:
            twin.decay = decay
        return twin

    def observe(self, drafted: int, accepted: int) -> None:
        """Drafts ``1..accepted`` were accepted; draft ``accepted + 1`` (if any) was not."""
        if drafted == 0:
            return
        self.hits = [h * self.decay for h in self.hits]
        self.trials = [t * self.decay for t in self.trials]
        for i in range(min(accepted, len(self.hits))):
            self.hits[i] += 1.0
            self.trials[i] += 1.0
        if accepted < drafted and accepted < len(self.trials):
            self.trials[accepted] += 1.0

    def rate(self, i: int) -> float:
        """Chance that draft ``i + 1`` is accepted when drafts ``1..i`` were."""
        w = self.prior_weight
        return (self.hits[i] + self.prior * w) / (self.trials[i] + w)

    def expected_tokens_upto(self, largest: int) -> list[float]:
        """Tokens a verifier call keeps on average with 0..``largest`` drafts (its own
        included), in one pass."""
        totals, chain = [1.0], 1.0
        for i in range(largest):
            chain *= self.rate(i)
            totals.append(totals[-1] + chain)
        return totals

    def expected_tokens(self, block: int) -> float:
        """Tokens a verifier call keeps on average with ``block`` drafts (its own included)."""
        return self.expected_tokens_upto(block)[-1]


class BlockSizePolicy:
    """Chooses each call's block size from an ``AcceptanceEstimate`` and a shared
    ``CostTable``.

    A generation's acceptance estimate starts from ``shared`` (what earlier generations on the
    same engine saw) and follows its own text more quickly; every observation also updates
    ``shared``. Until the costs are known it measures them (``warmup_block``): the requested
    block size, half of it, then one plain call. Alone (``next_block``), while plain decoding
    wins, every ``probe_every``-th call drafts anyway (half the requested block), so that a
    drafter that starts to agree again (repeated text, say) is noticed; in a batch the round
    core chooses for all rows at once (``shared_block``) and probes for them together.
    """

    def __init__(
        self,
        requested: int,
        max_block: int,
        costs: CostTable,
        *,
        steps: int = 1,
        shared: AcceptanceEstimate | None = None,
        probe_every: int = 8,
    ) -> None:
        self.requested = max(1, min(requested, max_block))
        self.max_block = max_block
        self.costs = costs
        self.steps = steps
        self.shared = shared
        self.acceptance = (
            shared.copy(decay=0.9) if shared is not None else AcceptanceEstimate(max_block)
        )
        self.probe_every = probe_every
        self._warmup = [self.requested, max(1, self.requested // 2), 0]
        self._plain_calls = 0

    def observe(self, drafted: int, accepted: int) -> None:
        self.acceptance.observe(drafted, accepted)
        if self.shared is not None:
            self.shared.observe(drafted, accepted)

    def best(self) -> int:
        """The block size with the most expected tokens per second."""
        tokens = self.acceptance.expected_tokens_upto(self.max_block)
        rates = [
            tokens[k] / max(1e-9, self.costs.call_seconds(k, self.steps))
            for k in range(self.max_block + 1)
        ]
        return max(range(len(rates)), key=rates.__getitem__)

    def warmup_block(self) -> int | None:
        """While the costs are not yet known, the next size to measure them at (else None)."""
        if self.costs.ready(self.steps):
            return None
        return self._warmup.pop(0) if self._warmup else self.requested

    def next_block(self) -> int:
        warmup = self.warmup_block()
        if warmup is not None:
            return warmup
        k = self.best()
        if k == 0:
            self._plain_calls += 1
            if self._plain_calls % self.probe_every == 0:
                return max(1, self.requested // 2)
        return k


def shared_block(
    policies: list[BlockSizePolicy], costs: CostTable, *, others: int = 0, width: int = 1
) -> int:
    """One block size for the rows of ``policies``, which share a verifier call with
    ``others`` rows of fixed blocks (the widest of which feeds ``width`` tokens).

    Every row of a call is fed as many tokens as the widest, so one row's drafts cost all of
    them: the size is chosen for the whole call, the most expected tokens (each row's own
    acceptance; a fixed row counted as one) per second of the call and of every row's drafting.
    A row whose own limit is smaller drafts up to that limit.
    """
    rows = len(policies) + others
    largest = max(policy.max_block for policy in policies)
    tables = [policy.acceptance.expected_tokens_upto(policy.max_block) for policy in policies]

    def rate(k: int) -> float:
        tokens = others + sum(table[min(k, len(table) - 1)] for table in tables)
        seconds = costs.verify(rows * max(width, k + 1))
        for policy in policies:
            block = min(k, policy.max_block)
            if block > 0 and policy.steps in costs.draft:
                seconds += costs.draft[policy.steps](block)
        return tokens / max(1e-9, seconds)

    return max(range(largest + 1), key=rate)
