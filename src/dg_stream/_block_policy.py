"""Adaptive block size: draft as many tokens as pay for themselves, measured, not guessed.

Pure arithmetic, no torch. A verifier call with ``k`` drafted tokens keeps on average
``E(k) = 1 + sum_{j<=k} prod_{i<=j} a_i`` tokens, where ``a_i`` is the chance that draft ``i``
is accepted given that the ones before it were, and costs ``V(k + 1) + D(k)`` seconds (verify
``k + 1`` tokens, draft ``k``; ``D(0) = 0``). The policy picks the ``k`` with the most tokens per
second, ``k = 0`` (plain decoding) included, so a drafter that does not pay is switched off
instead of slowing generation down.

``a_i`` is estimated per generation from what the verifier accepted; the costs are measured on
the running machine and shared by all generations of one engine (they belong to the models and
the hardware, not to the prompt). Both are running means that forget old observations, so
the choice follows a change of regime (a repetitive stretch of text, a longer context).

Block sizes then depend on measured timings: greedy output is identical to plain decoding
whatever they are, and sampled output keeps the verifier's distribution, but a seeded sampled
generation is reproducible token for token only with a fixed block size.
"""

from __future__ import annotations

__all__ = ["AcceptanceEstimate", "BlockSizePolicy", "CostTable"]


def _update(table: dict[int, float], key: int, value: float, decay: float) -> None:
    old = table.get(key)
    table[key] = value if old is None else decay * old + (1 - decay) * value


def _interpolate(table: dict[int, float], x: int) -> float:
    """Piecewise-linear through the measured points; linear beyond them (never below 0)."""
    if x in table:
        return table[x]
    xs = sorted(table)
    if len(xs) == 1:
        return table[xs[0]]
    if x < xs[0]:
        lo, hi = xs[0], xs[1]
    elif x > xs[-1]:
        lo, hi = xs[-2], xs[-1]
    else:
        hi = next(p for p in xs if p > x)
        lo = max(p for p in xs if p < x)
    slope = (table[hi] - table[lo]) / (hi - lo)
    return max(0.0, table[lo] + slope * (x - lo))


class CostTable:
    """Running mean seconds of a verifier call per tokens fed, and of a drafter call per block
    size. ``decay`` is the weight kept by the old mean at each new observation."""

    def __init__(self, decay: float = 0.8) -> None:
        self.decay = decay
        self.verify: dict[int, float] = {}
        self.draft: dict[int, float] = {}

    def observe_verify(self, tokens: int, seconds: float) -> None:
        _update(self.verify, tokens, seconds, self.decay)

    def observe_draft(self, block: int, seconds: float) -> None:
        if block > 0:
            _update(self.draft, block, seconds, self.decay)

    @property
    def ready(self) -> bool:
        """Enough measured to compare block sizes: two verify sizes and one drafter call."""
        return len(self.verify) >= 2 and bool(self.draft)

    def call_seconds(self, block: int) -> float:
        draft = _interpolate(self.draft, block) if block > 0 else 0.0
        return _interpolate(self.verify, block + 1) + draft


class AcceptanceEstimate:
    """Per-position conditional acceptance rates, from a weak prior and forgetting counts."""

    def __init__(
        self, max_block: int, prior: float = 0.5, prior_weight: float = 1.0, decay: float = 0.9
    ) -> None:
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.hits = [0.0] * max_block
        self.trials = [0.0] * max_block

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

    def expected_tokens(self, block: int) -> float:
        """Tokens a verifier call keeps on average with ``block`` drafts (its own included)."""
        total, chain = 1.0, 1.0
        for i in range(block):
            chain *= self.rate(i)
            total += chain
        return total


class BlockSizePolicy:
    """Chooses each call's block size from an ``AcceptanceEstimate`` and a shared
    ``CostTable``.

    Until the costs are known it measures them: the requested block size, half of it, then one
    plain call. While plain decoding wins, every ``probe_every``-th call drafts anyway (half the
    requested block), so that a drafter that starts to agree again (repeated text, say) is
    noticed.
    """

    def __init__(
        self, requested: int, max_block: int, costs: CostTable, probe_every: int = 8
    ) -> None:
        self.requested = max(1, min(requested, max_block))
        self.max_block = max_block
        self.costs = costs
        self.acceptance = AcceptanceEstimate(max_block)
        self.probe_every = probe_every
        self._warmup = [self.requested, max(1, self.requested // 2), 0]
        self._plain_calls = 0

    def observe(self, drafted: int, accepted: int) -> None:
        self.acceptance.observe(drafted, accepted)

    def best(self) -> int:
        """The block size with the most expected tokens per second."""
        rates = [
            self.acceptance.expected_tokens(k) / max(1e-9, self.costs.call_seconds(k))
            for k in range(self.max_block + 1)
        ]
        return max(range(len(rates)), key=rates.__getitem__)

    def next_block(self) -> int:
        if not self.costs.ready:
            k = self._warmup.pop(0) if self._warmup else self.requested
            return k
        k = self.best()
        if k == 0:
            self._plain_calls += 1
            if self._plain_calls % self.probe_every == 0:
                return max(1, self.requested // 2)
        return k
