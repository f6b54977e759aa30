"""Unit and property tests of the pure pieces: logits processing, acceptance, stop strings."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from dg_stream import InvalidRequestError, SamplingParams
from dg_stream._acceptance import accept_greedy, accept_sampled
from dg_stream._sampling import apply_repetition_penalty, process_logits
from dg_stream._stop import StopMatcher

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False), min_size=3, max_size=40)


@settings(max_examples=80, deadline=None)
@example(row=[0.0, 0.0, 7.0], temperature=0.0625, top_k=None, top_p=1.0)
@given(
    row=logit_rows,
    temperature=st.floats(0.05, 3.0),
    top_k=st.none() | st.integers(1, 50),
    top_p=st.none() | st.floats(0.01, 1.0),
)
def test_processing_matches_transformers_warpers(
    row: list[float], temperature: float, top_k: int | None, top_p: float | None
) -> None:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([row])
    ours = process_logits(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    theirs = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        theirs = TopKLogitsWarper(top_k)(None, theirs)
    if top_p is not None:
        theirs = TopPLogitsWarper(top_p)(None, theirs)
    # The same distribution. The masks agree except on tokens whose probability underflows to
    # exactly 0, which transformers' top-p also masks at top_p=1.0: never sampled either way.
    p_ours, p_theirs = torch.softmax(ours, dim=-1), torch.softmax(theirs, dim=-1)
    assert torch.allclose(p_ours, p_theirs, atol=1e-6)
    differ = torch.isinf(ours) != torch.isinf(theirs)
    assert bool((p_ours[differ] == 0).all() and (p_theirs[differ] == 0).all())
    finite = ~torch.isinf(ours) & ~torch.isinf(theirs)
    assert torch.allclose(ours[finite], theirs[finite])


@settings(max_examples=50, deadline=None)
@given(data=st.data(), penalty=st.floats(0.5, 2.0))
def test_repetition_penalty_rows_see_their_own_prefix(data: st.DataObject, penalty: float) -> None:
    """Row i of a verified block is penalised exactly as transformers would at that position."""
    from transformers import RepetitionPenaltyLogitsProcessor

    vocab, k = 9, data.draw(st.integers(0, 4))
    context = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=6)))
    draft = torch.tensor(
        data.draw(st.lists(st.integers(0, vocab - 1), min_size=k, max_size=k)), dtype=torch.long
    )
    logits = torch.randn(k + 1, vocab)
    ours = apply_repetition_penalty(logits, context, draft, penalty)
    processor = RepetitionPenaltyLogitsProcessor(penalty)
    for i in range(k + 1):
        prefix = torch.cat([context, draft[:i]])[None]
        assert torch.allclose(ours[i], processor(prefix, logits[i : i + 1].clone())[0])


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-5, 1e5, 1e300])
@pytest.mark.parametrize("penalty", [None, 1e-300, 1e300])
def test_extreme_temperatures_and_penalties_give_distributions(
    temperature: float, penalty: float | None
) -> None:
    logits = torch.tensor([[3.0, -2.0, 0.0, 9.0, float("-inf")], [1.0, 1.0, -4.0, 0.5, 2.0]])
    if penalty is not None:
        logits = apply_repetition_penalty(
            logits, torch.tensor([0, 1, 3]), torch.tensor([4]), penalty
        )
    probs = process_logits(logits, SamplingParams(temperature=temperature)).softmax(dim=-1)
    assert bool(torch.isfinite(probs).all()) and torch.allclose(probs.sum(-1), torch.ones(2))
    if temperature < 1e-4 and penalty is None:  # greedy in effect
        assert probs.argmax(-1).tolist() == logits.argmax(-1).tolist()
        assert bool((probs.max(-1).values > 0.99).all())


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_greedy_acceptance_is_longest_matching_prefix(data: st.DataObject) -> None:
    k = data.draw(st.integers(0, 8))
    logits = torch.randn(k + 1, 6)
    argmax = logits.argmax(-1)
    draft = torch.tensor(
        [
            int(argmax[i]) if data.draw(st.booleans()) else int((argmax[i] + 1) % 6)
            for i in range(k)
        ],
        dtype=torch.long,
    )
    verdict = accept_greedy(logits, draft)
    n = 0
    while n < k and draft[n] == argmax[n]:
        n += 1
    assert verdict.accepted == n
    assert verdict.token == int(argmax[n])


def _pvalue(counts: Counter[int], p_row: torch.Tensor) -> float:
    n = sum(counts.values())
    expected = (p_row.double() / p_row.double().sum() * n).tolist()
    return float(chisquare([counts.get(t, 0) for t in range(len(expected))], expected).pvalue)


def _first_token_distribution(
    p: torch.Tensor, q: torch.Tensor | None, draw_q: torch.Tensor, samples: int, seed: int
) -> Counter[int]:
    """Committed first token over many trials of a single-token draft drawn from ``draw_q``."""
    g = torch.Generator().manual_seed(seed)
    counts: Counter[int] = Counter()
    for _ in range(samples):
        draft = torch.multinomial(draw_q, 1, generator=g)
        verdict = accept_sampled(p, draft, q, g)
        counts[int(draft[0]) if verdict.accepted else verdict.token] += 1
    return counts


@pytest.mark.parametrize("rule", ["q", "point-mass"])
def test_speculative_sampling_is_exact(rule: str) -> None:
    g = torch.Generator().manual_seed(0)
    p_row = torch.softmax(torch.randn(5, generator=g), -1)
    q_row = torch.softmax(torch.randn(5, generator=g) * 2, -1)
    p = torch.stack([p_row, torch.full((5,), 0.2)])  # (k+1, V) for k = 1
    q = q_row[None] if rule == "q" else None
    counts = _first_token_distribution(p, q, q_row, 8000, 1)
    assert _pvalue(counts, p_row) > 1e-3


def test_a_misreported_q_breaks_exactness() -> None:
    g = torch.Generator().manual_seed(0)
    p_row = torch.softmax(torch.randn(5, generator=g), -1)
    q_row = torch.softmax(torch.randn(5, generator=g) * 2, -1)
    p = torch.stack([p_row, p_row])
    counts = _first_token_distribution(p, torch.full((1, 5), 0.2), q_row, 8000, 1)
    assert _pvalue(counts, p_row) < 1e-6


def test_rejection_never_returns_the_rejected_point_mass_token() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        verdict = accept_sampled(p, torch.tensor([0]), None, g)
        if verdict.accepted == 0:
            assert verdict.token == 1


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=0),
        dict(temperature=float("nan")),
        dict(repetition_penalty=0.0),
    ],
)
def test_bad_sampling_parameters(params: dict[str, float]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**params)  # type: ignore[arg-type]
    assert info.value.param == next(iter(params))


texts = st.text(alphabet="ab\n.c", max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    text=texts,
    stops=st.lists(st.text(alphabet="ab\n.", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_strings_across_any_chunking(text: str, stops: list[str], cuts: list[int]) -> None:
    matcher = StopMatcher(stops)
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    out = "".join(matcher.feed(text[a:b]) for a, b in itertools.pairwise(bounds))
    if not matcher.stopped:
        out += matcher.flush()
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(hits)] if hits else text
    assert out == expected
    assert matcher.stopped == bool(hits)


# -- prompts read in shared forwards -------------------------------------------------------


def _grouping_cost(groups: list[tuple[int, int]], pieces: list[int], forward: int) -> int:
    return sum(forward + (end - begin) * max(pieces[begin:end]) for begin, end in groups)


def _partitions(count: int) -> itertools.chain[list[tuple[int, int]]]:
    """Every split of ``range(count)`` into consecutive ranges."""
    splits = itertools.product([False, True], repeat=max(0, count - 1))

    def ranges(cuts: tuple[bool, ...]) -> list[tuple[int, int]]:
        bounds = [0, *(i + 1 for i, cut in enumerate(cuts) if cut), count]
        return list(itertools.pairwise(bounds))

    return itertools.chain(ranges(cuts) for cuts in splits)


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.integers(1, 300), min_size=1, max_size=7),
    gaps=st.lists(st.booleans(), min_size=7, max_size=7),
    forward=st.integers(0, 200),
    offsets=st.lists(st.sampled_from([0, 0, 0, 128]), min_size=7, max_size=7),
)
def test_prefill_groups_are_the_cheapest_split_of_neighbouring_rows(
    pieces: list[int], gaps: list[bool], forward: int, offsets: list[int]
) -> None:
    """Groups are runs of consecutive rows read up to the same position (``starts``), and no
    such split costs less."""
    from dg_stream._rounds import prefill_groups

    # Row indices in order, a gap where ``gaps`` says (rows between them read nothing).
    rows = list(itertools.accumulate(2 if gap else 1 for gap in gaps[: len(pieces)]))
    starts = offsets[: len(pieces)]

    def shareable(i: int) -> bool:  # pieces i and i + 1 may share a forward
        return rows[i] + 1 == rows[i + 1] and starts[i] == starts[i + 1]

    groups = prefill_groups(rows, pieces, forward, starts=starts)
    # In order, covering every piece once, each a run of rows that may share.
    assert [i for begin, end in groups for i in range(begin, end)] == list(range(len(pieces)))
    for begin, end in groups:
        assert all(shareable(i) for i in range(begin, end - 1))
    # And no split of those runs costs less.
    allowed = [
        split
        for split in _partitions(len(pieces))
        if all(shareable(i) for b, e in split for i in range(b, e - 1))
    ]
    cheapest = min(_grouping_cost(split, pieces, forward) for split in allowed)
    assert _grouping_cost(groups, pieces, forward) == cheapest
