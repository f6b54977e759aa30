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

import statistics
from collections import deque

__all__ = [
    "BATCH_MARGIN",
    "MARGIN",
    "AcceptanceEstimate",
    "BlockSizePolicy",
    "CostTable",
    "DraftGate",
    "RealizedRates",
    "drafting_could_pay",
    "shared_block",
]


class _Curve:
    """``y(x) = a + b x + c x^2`` with ``b, c >= 0`` from noisy timings: each size bucket keeps
    its last ``keep`` observations, and the curve is fitted through the buckets' medians.

    Medians, not means: on a busy machine one call in ten can take twice as long, and a single
    such call must not switch drafting off (or on). A smooth fit, not a curve through every
    bucket: bucket medians of a loaded machine still jitter by tens of percent, and a step
    between two neighbouring sizes would pin the choice to one side of it. The square term
    lets the cost of a call grow faster once the hardware is saturated (a CPU turning
    compute-bound at a few dozen tokens), never slower. Buckets are powers of two apart, so a
    few sizes seen often cover the whole range; each bucket counts once.
    """

    def __init__(self, keep: int = 9) -> None:
        self.keep = keep
        self._xs: dict[int, deque[int]] = {}
        self._ys: dict[int, deque[float]] = {}
        self._coefficients: tuple[float, float, float] | None = None

    @property
    def sizes(self) -> set[int]:
        return set(self._xs)

    def buckets_with(self, observations: int) -> int:
        """How many size buckets hold at least this many observations."""
        return sum(len(xs) >= observations for xs in self._xs.values())

    def add(self, x: int, y: float) -> None:
        bucket = max(1, x).bit_length()
        self._xs.setdefault(bucket, deque(maxlen=self.keep)).append(x)
        self._ys.setdefault(bucket, deque(maxlen=self.keep)).append(y)
        self._coefficients = None

    def _fit(self) -> tuple[float, float, float]:
        if self._coefficients is None:
            xs = [float(statistics.median(self._xs[b])) for b in sorted(self._xs)]
            ys = [statistics.median(self._ys[b]) for b in sorted(self._xs)]
            self._coefficients = _nonnegative_fit(xs, ys)
        return self._coefficients

    def __call__(self, x: int) -> float:
        if not self._xs:
            return 0.0
        a, b, c = self._fit()
        return max(0.0, a + b * x + c * x * x)


def _nonnegative_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x + c x^2`` with ``b, c >= 0`` (``a`` free): the best of the
    fits on each subset of the terms whose coefficients come out non-negative. Points at
    most as many as the terms are fitted by fewer terms (no curve through two points)."""
    best: tuple[float, tuple[float, float, float]] | None = None
    for powers in ((), (1,), (2,), (1, 2)):
        if len(powers) + 1 > max(1, len(xs) - (1 if len(powers) == 2 else 0)):
            continue
        columns = [[1.0] * len(xs)] + [[x**p for x in xs] for p in powers]
        solution = _least_squares(columns, ys)
        if solution is None or any(v < 0 for v in solution[1:]):
            continue
        full = dict(zip((0, *powers), solution, strict=True))
        coefficients = (full.get(0, 0.0), full.get(1, 0.0), full.get(2, 0.0))
        a, b, c = coefficients
        error = sum((a + b * x + c * x * x - y) ** 2 for x, y in zip(xs, ys, strict=True))
        if best is None or error < best[0] - 1e-15:
            best = (error, coefficients)
    assert best is not None  # the constant always fits
    return best[1]


def _least_squares(columns: list[list[float]], ys: list[float]) -> list[float] | None:
    """Solve the normal equations of a tiny least-squares problem (None when singular)."""
    n = len(columns)
    matrix = [
        [sum(u * v for u, v in zip(columns[i], columns[j], strict=True)) for j in range(n)]
        + [sum(u * y for u, y in zip(columns[i], ys, strict=True))]
        for i in range(n)
    ]
    for i in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(i, n), key=lambda r: abs(matrix[r][i]))
        if abs(matrix[pivot][i]) < 1e-12 * max(1.0, abs(matrix[i][i])):
            return None
        matrix[i], matrix[pivot] = matrix[pivot], matrix[i]
        for r in range(n):
            if r != i:
                factor = matrix[r][i] / matrix[i][i]
                matrix[r] = [a - factor * b for a, b in zip(matrix[r], matrix[i], strict=True)]
    return [matrix[i][n] / matrix[i][i] for i in range(n)]


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
        """Enough measured to compare block sizes: two verify sizes and the drafter, each
        three times (one call can be an outlier; a median of three rarely is)."""
        draft = self.draft.get(steps)
        return self.verify.buckets_with(3) >= 2 and draft is not None and draft.buckets_with(3) >= 1

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
        # Only the positions this call tested forget: a position that short blocks never
        # reach keeps what was last seen of it, instead of fading to the prior and making
        # short blocks look right forever (a censoring trap that kept drafting small).
        tested = min(accepted + 1, drafted, len(self.hits))
        for i in range(tested):
            self.hits[i] *= self.decay
            self.trials[i] *= self.decay
        for i in range(min(accepted, len(self.hits))):
            self.hits[i] += 1.0
            self.trials[i] += 1.0
        if accepted < drafted and accepted < len(self.trials):
            self.trials[accepted] += 1.0

    def rates(self, count: int) -> list[float]:
        """``rate(0) .. rate(count - 1)``. Each position's prior is the estimate of the one
        before it (the first's is ``prior``): a position seldom tested looks like its
        neighbour rather than like a coin, so that blocks longer than the ones tried so far
        get tried when the tested positions agree well (and are dropped when the test says
        otherwise)."""
        w, prior, out = self.prior_weight, self.prior, []
        for i in range(count):
            prior = (self.hits[i] + prior * w) / (self.trials[i] + w)
            out.append(prior)
        return out

    def rate(self, i: int) -> float:
        """Chance that draft ``i + 1`` is accepted when drafts ``1..i`` were."""
        return self.rates(i + 1)[i]

    def expected_tokens_upto(self, largest: int) -> list[float]:
        """Tokens a verifier call keeps on average with 0..``largest`` drafts (its own
        included), in one pass."""
        totals, chain = [1.0], 1.0
        for rate in self.rates(largest):
            chain *= rate
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
    block size, half of it, then one plain call. After that the round core decides, for a
    row alone or all the rows of a batch at once (``shared_block``), and probes while plain
    decoding wins (``RoundCore._plan``): the decision has that one home.
    """

    def __init__(
        self,
        requested: int,
        max_block: int,
        costs: CostTable,
        *,
        steps: int = 1,
        shared: AcceptanceEstimate | None = None,
    ) -> None:
        self.requested = max(1, min(requested, max_block))
        self.max_block = max_block
        self.costs = costs
        self.steps = steps
        self.shared = shared
        self.acceptance = (
            shared.copy(decay=0.9) if shared is not None else AcceptanceEstimate(max_block)
        )
        self._warmup = [self.requested, max(1, self.requested // 2), 0] * 3
        self.observed = 0  # verified drafts seen: what can change the acceptance estimate

    def observe(self, drafted: int, accepted: int) -> None:
        self.acceptance.observe(drafted, accepted)
        if self.shared is not None:
            self.shared.observe(drafted, accepted)
        if drafted > 0:
            self.observed += 1

    def best(self) -> int:
        """The block size with the most expected tokens per second for this row alone."""
        return shared_block([self], self.costs)

    def warmup_block(self) -> int | None:
        """While the costs are not yet known, the next size to measure them at (else None)."""
        if self.costs.ready(self.steps):
            return None
        return self._warmup.pop(0) if self._warmup else self.requested


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
    rates = [
        _call_rate(
            policies,
            costs,
            k,
            sum(table[min(k, len(table) - 1)] for table in tables),
            others=others,
            width=width,
        )
        for k in range(largest + 1)
    ]
    return _choose(rates, MARGIN if rows == 1 else BATCH_MARGIN)


def drafting_could_pay(
    policies: list[BlockSizePolicy],
    costs: CostTable,
    block: int,
    *,
    others: int = 0,
    width: int = 1,
) -> bool:
    """Whether drafting ``block`` tokens for every row of ``policies`` would beat plain
    decoding even if every draft were accepted: when it would not, no change in acceptance
    can make drafting pay at this load, and probing for one only costs. (16 rows on 2 CPU
    cores: a verify is compute-bound, so ``R (k + 1)`` tokens cost nearly ``k + 1`` plain
    rounds, and the drafting comes on top.)"""
    whole = sum(1 + min(block, policy.max_block) for policy in policies)
    drafted = _call_rate(policies, costs, block, whole, others=others, width=width)
    plain = _call_rate(policies, costs, 0, len(policies), others=others, width=width)
    margin = MARGIN if len(policies) + others == 1 else BATCH_MARGIN
    return drafted >= margin * plain


def _call_rate(
    policies: list[BlockSizePolicy],
    costs: CostTable,
    k: int,
    tokens: float,
    *,
    others: int,
    width: int,
) -> float:
    """Tokens per second of a call where ``policies``' rows draft ``k`` (each up to its own
    limit) and keep ``tokens`` in all, beside ``others`` fixed rows (one token each) fed up
    to ``width`` tokens: the call's verify cost plus every row's drafting."""
    seconds = costs.verify((len(policies) + others) * max(width, k + 1))
    for policy in policies:
        block = min(k, policy.max_block)
        if block > 0 and policy.steps in costs.draft:
            seconds += costs.draft[policy.steps](block)
    return (others + tokens) / max(1e-9, seconds)


class RealizedRates:
    """What whole rounds delivered (committed tokens per second of the round, drafting,
    judging and committing included), by batch size and by whether the round drafted.

    The cost model prices the verifier forward and the drafter; a batch's round also pays
    per-row work around them that grows with the rows and the block (4 streams on 2 CPU
    cores: the model chose drafting and the batch ran 12% below plain decoding). So where
    both kinds of round have been seen at a batch size, drafting goes on only while its
    rounds deliver at least what plain ones do; a batch that keeps drafting takes a plain
    round now and then until it has a few to compare against.
    """

    def __init__(self, keep: int = 12, needed: int = 4) -> None:
        self.keep, self.needed = keep, needed
        self._rates: dict[tuple[int, bool], deque[float]] = {}
        self._rounds = 0

    @staticmethod
    def bucket(rows: int) -> int:
        """Batch sizes up to 4 alone, then powers of two (5-8, 9-16, ...)."""
        return rows if rows <= 4 else 1 << (rows - 1).bit_length()

    def observe(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        if seconds > 0 and rows > 1:
            key = (self.bucket(rows), drafted)
            self._rates.setdefault(key, deque(maxlen=self.keep)).append(tokens / seconds)

    def drafting_delivers(self, rows: int) -> bool:
        """False once drafted rounds at this batch size have delivered less than plain ones
        (medians of the last ``keep`` of each); True while either is unknown."""
        drafted = self._rates.get((self.bucket(rows), True), ())
        plain = self._rates.get((self.bucket(rows), False), ())
        if len(drafted) < self.needed or len(plain) < self.needed:
            return True
        return statistics.median(drafted) >= statistics.median(plain)

    def wants_plain_round(self, rows: int) -> bool:
        """Whether a batch about to draft should decode plainly this round, to learn what
        plain rounds deliver at its size (one round in four until it knows)."""
        if rows <= 1:
            return False
        self._rounds += 1
        plain = self._rates.get((self.bucket(rows), False), ())
        return len(plain) < self.needed and self._rounds % 4 == 0


#: How much faster than plain decoding drafting must be predicted to be before it is chosen:
#: the costs and acceptance are estimates (an acceptance of a few percent never quite reaches
#: zero, a flat cost fit makes a one-token draft look free), and a prediction within that
#: margin is as likely a loss as a gain.
MARGIN = 1.03
#: The same for a call shared by several rows: its cost is extrapolated further from what was
#: measured (wider calls are rarer) and errs in proportion to all the rows at once; 16 streams
#: on 2 CPU cores ran 4-8% below plain decoding with the single-row margin.
BATCH_MARGIN = 1.10


def _choose(rates: list[float], margin: float = MARGIN) -> int:
    """The block size of the highest rate, plain decoding unless drafting clearly wins."""
    k = max(range(len(rates)), key=rates.__getitem__)
    return k if rates[k] >= margin * rates[0] else 0


class DraftGate:
    """Drafting on or off for a row of a fixed block size, decided from that row's own
    acceptance only, never from timings: its decisions repeat with its tokens, so a seeded
    sample, whose text depends on them, stays reproducible (alone or in a batch).

    The row drafts while its drafts are accepted at least ``max(0.5, block / 5)`` times per
    call on average (an exponential mean, judged after ``settle`` calls): below that a CPU
    loses to plain decoding (measured: block 4 at 0.5-0.7 accepted per call, sampled at
    temperature 1, ran 0.82-0.89x plain). Switched off, it drafts again after 16 plain
    rounds, then after twice as many each time that changes nothing, up to 128 (a probe
    costs about one plain round: one every 32 cost 3%)."""

    def __init__(self, block: int, *, settle: int = 2, first_gap: int = 16, most: int = 128):
        self.block = block
        self.threshold = max(0.5, block / 5)
        self.settle, self.first_gap, self.most = settle, first_gap, most
        self.mean = 0.0
        self.calls = 0
        self._plain = 0
        self._gap = first_gap

    @property
    def drafting(self) -> bool:
        return self.calls < self.settle or self.mean >= self.threshold

    def size(self) -> int:
        """This round's block: the row's own, or 0 (plain) while switched off."""
        if self.drafting:
            return self.block
        self._plain += 1
        if self._plain < self._gap:
            return 0
        self._plain, self._gap = 0, min(2 * self._gap, self.most)
        return self.block

    def observe(self, drafted: int, accepted: int) -> None:
        """A verified call of ``drafted`` tokens (the drafter's own) of which ``accepted``."""
        if drafted <= 0:
            return
        self.calls += 1
        self.mean = accepted if self.calls == 1 else 0.8 * self.mean + 0.2 * accepted
        if self.drafting:
            self._gap = self.first_gap
