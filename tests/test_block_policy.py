"""The adaptive block size: pure arithmetic, then the engine driven by it (greedy stays exact)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from _drafters import OracleDrafter
from hypothesis import given, settings
from hypothesis import strategies as st

from dg_stream import GenerationRequest, LocalBackend, SpeculativeConfig
from dg_stream._block_policy import (
    AcceptanceEstimate,
    BlockSizePolicy,
    CostTable,
    RealizedRates,
    drafting_could_pay,
    shared_block,
)


def _costs(verify: dict[int, float], draft: dict[int, float]) -> CostTable:
    """A cost table that has measured exactly these (tokens or block size -> seconds)."""
    costs = CostTable(skip=0)
    for _ in range(3):  # what ``ready`` asks for
        for tokens, seconds in verify.items():
            costs.observe_verify(tokens, seconds)
        for block, seconds in draft.items():
            costs.observe_draft(block, seconds)
    return costs


class FrozenCosts(CostTable):
    """Costs of a pretend machine: what the tiny test models measure is ignored."""

    def __init__(self, verify: dict[int, float], draft: dict[int, float]) -> None:
        measured = _costs(verify, draft)
        super().__init__(skip=0)
        self.verify, self.draft = measured.verify, measured.draft

    def observe_verify(self, tokens: int, seconds: float) -> None: ...

    def observe_draft(self, block: int, seconds: float, steps: int = 1) -> None: ...


def test_costs_are_lines_through_what_was_measured() -> None:
    costs = _costs({1: 1.0, 5: 3.0}, {4: 2.0})
    assert costs.verify(3) == pytest.approx(2.0) and costs.verify(9) == pytest.approx(5.0)
    assert costs.call_seconds(0) == pytest.approx(1.0)  # plain: no drafter call
    assert costs.call_seconds(4) == pytest.approx(3.0 + 2.0)  # one size: a flat drafter line
    falling = _costs({1: 3.0, 5: 1.0}, {})
    assert falling.verify(1) == falling.verify(9)  # never a negative slope: flat at the mean
    assert 1.0 < falling.verify(1) < 3.0
    assert _costs({2: 1.0, 5: 5.0}, {}).verify(0) == 0.0  # never below zero
    # An early outlier fades: a slow first measurement at 5 tokens, then many normal calls.
    costs = _costs({1: 1.0, 5: 30.0}, {})
    for _ in range(40):
        costs.observe_verify(1, 1.0)
        costs.observe_verify(5, 3.0)
    assert costs.verify(5) == pytest.approx(3.0, rel=0.05)
    # Drafter costs are kept apart per number of denoising steps.
    for _ in range(3):
        costs.observe_draft(4, 8.0, steps=4)
    assert costs.ready(4) and not costs.ready(2)
    assert costs.call_seconds(4, steps=4) == pytest.approx(costs.verify(5) + 8.0)


def test_first_verifier_calls_are_not_counted() -> None:
    costs = CostTable(skip=2)
    costs.observe_verify(5, 99.0)
    costs.observe_verify(1, 99.0)
    assert not costs.verify.sizes and not costs.ready()


def test_acceptance_counts_the_accepted_prefix_and_the_first_rejection() -> None:
    est = AcceptanceEstimate(max_block=4, prior=0.5, prior_weight=1.0, decay=1.0)
    est.observe(drafted=4, accepted=2)
    assert est.hits == [1, 1, 0, 0] and est.trials == [1, 1, 1, 0]
    # An unseen position's prior is its neighbour's estimate.
    assert est.rate(0) == 0.75 and est.rate(1) == 0.875
    assert est.rate(2) == 0.875 / 2 and est.rate(3) == est.rate(2)
    assert est.expected_tokens(0) == 1.0
    assert est.expected_tokens(2) == 1 + 0.75 + 0.75 * 0.875


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), max_size=30),
    st.floats(0.05, 0.95),
)
def test_expected_tokens_grow_with_the_block_and_stay_bounded(
    calls: list[tuple[int, int]], prior: float
) -> None:
    est = AcceptanceEstimate(max_block=8, prior=prior)
    for drafted, accepted in calls:
        est.observe(drafted, min(accepted, drafted))
    values = [est.expected_tokens(k) for k in range(9)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert all(1.0 <= v <= k + 1 for k, v in enumerate(values))
    assert all(0.0 < est.rate(i) < 1.0 for i in range(8))


def test_a_drafter_that_never_agrees_is_switched_off() -> None:
    from dg_stream._rounds import RoundCore

    costs = _costs({1: 10.0, 5: 14.0}, {4: 3.0})
    policy = BlockSizePolicy(requested=4, max_block=16, costs=costs)
    for _ in range(20):
        policy.observe(drafted=4, accepted=0)
    assert policy.best() == 0
    core = RoundCore.__new__(RoundCore)  # only the planning state: no models needed
    core.costs, core.probe_every, core._plain_rounds, core._probe_gap = costs, 4, 0, 4
    core.realized, core._held_plain = RealizedRates(), None
    blocks = [core._plan([_PlanOnly(policy)]) for _ in range(800)]  # type: ignore[list-item]
    probes = [i for i, block in enumerate(blocks) if block]
    assert blocks[:4] == [0, 0, 0, 4] and set(blocks) == {0, 4}  # plain, with probes...
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[:6] == [8, 16, 32, 64, 128, 128] and set(gaps[5:]) == {128}  # ...backing off


def test_a_drafter_that_always_agrees_gets_the_largest_block_that_pays() -> None:
    # Verifying costs little more for more tokens (a GPU, say): the largest block wins.
    flat = BlockSizePolicy(4, 16, _costs({1: 10.0, 17: 11.0}, {1: 1.0, 16: 1.5}))
    for _ in range(30):
        flat.observe(drafted=16, accepted=16)
    assert flat.best() == 16
    # Verifying costs a full step per token (compute-bound): drafting cannot pay.
    linear = BlockSizePolicy(4, 16, _costs({1: 10.0, 17: 170.0}, {1: 1.0, 16: 1.0}))
    for _ in range(30):
        linear.observe(drafted=16, accepted=16)
    assert linear.best() == 0


def test_costs_are_measured_before_they_are_used() -> None:
    costs = CostTable(skip=0)
    policy = BlockSizePolicy(requested=6, max_block=24, costs=costs)
    # Warm-up: three sizes, three times each (a median of three resists one slow call).
    assert [policy.warmup_block() for _ in range(9)] == [6, 3, 0] * 3
    for _ in range(3):
        costs.observe_verify(7, 0.010)
        costs.observe_verify(1, 0.006)
        costs.observe_draft(6, 0.002)
        assert costs.ready() == (_ == 2)
    assert policy.warmup_block() is None  # measured: the round core decides from here


def test_a_generation_starts_from_what_earlier_ones_saw() -> None:
    shared = AcceptanceEstimate(16, decay=0.98)
    costs = _costs({1: 10.0, 17: 11.0}, {1: 0.1, 16: 0.1})
    first = BlockSizePolicy(4, 16, costs, shared=shared)
    for _ in range(30):
        first.observe(drafted=16, accepted=16)
    second = BlockSizePolicy(4, 16, costs, shared=shared)
    assert second.best() == 16  # no relearning from the prior
    fresh = BlockSizePolicy(4, 16, costs)
    assert fresh.acceptance.rate(0) == 0.5 and second.acceptance.rate(0) > 0.9


def _generate(backend: LocalBackend, prompt: list[int], n: int, adaptive: bool) -> Any:
    request = GenerationRequest(
        prompt=prompt,
        max_new_tokens=n,
        speculative=SpeculativeConfig(block_size=4, adaptive=adaptive),
    )
    session = backend.engine.session(request)
    tokens, drafted = [], []
    while (chunk := session.step()) is not None:
        tokens.extend(chunk.token_ids)
        drafted.append(chunk.step.drafted)
    return tokens, drafted


def _adaptive_run(
    verifier: Any, tok: Any, n: int, wrong: bool, costs: CostTable
) -> tuple[list[int], list[int], list[int]]:
    """(plain tokens, adaptive tokens, drafted per call) with an oracle drafter that is always
    right (or, with ``wrong``, never) on a machine whose costs are ``costs``."""
    prompt = tok("def add(a, b):")["input_ids"]
    expected, _ = _generate(LocalBackend(verifier, None, tokenizer=tok), prompt, n, False)
    proposals = [(t + 1) % 50 for t in expected] if wrong else expected
    backend = LocalBackend(verifier, OracleDrafter(prompt, proposals), tokenizer=tok)
    backend.engine.costs = costs
    tokens, drafted = _generate(backend, prompt, n, adaptive=True)
    return expected, tokens, drafted


def test_engine_grows_blocks_for_an_oracle_and_stays_exact(
    tiny_verifier: Any, tiny_tok: Any
) -> None:
    # A verifier that costs much more per call than per extra token, as on a GPU.
    costs = FrozenCosts({1: 10.0, 17: 11.0}, {1: 0.1, 16: 0.1})
    expected, tokens, drafted = _adaptive_run(tiny_verifier, tiny_tok, 60, False, costs)
    assert tokens == expected
    assert drafted[0] > 4 and max(drafted) >= 12  # beyond the requested 4, up to 4 x 4
    assert len(drafted) < 60 / 5


def test_engine_stops_drafting_when_it_does_not_pay_and_stays_exact(
    tiny_verifier: Any, tiny_tok: Any
) -> None:
    costs = FrozenCosts({1: 10.0, 5: 14.0}, {4: 3.0})
    expected, tokens, drafted = _adaptive_run(tiny_verifier, tiny_tok, 48, True, costs)
    assert tokens == expected
    assert drafted.count(0) > len(drafted) * 0.6  # mostly plain decoding, with probes


def test_a_busy_batch_drafts_less_and_one_row_as_alone() -> None:
    """A CPU-like verifier (a fixed cost per call, a real cost per token fed): drafting pays
    for one row and stops paying when many rows share each call."""
    costs = _costs({1: 0.010, 9: 0.014, 64: 0.040, 144: 0.100}, {1: 0.001, 8: 0.0015})

    def policies(n: int) -> list[BlockSizePolicy]:
        made = [BlockSizePolicy(8, 16, costs) for _ in range(n)]
        for policy in made:
            for accepted in [*range(9)] * 3:  # about half the drafts kept, 0 to 8 of them
                policy.observe(drafted=8, accepted=accepted)
        return made

    alone = policies(1)
    assert shared_block(alone, costs) == alone[0].best() > 0
    assert 0 <= shared_block(policies(16), costs) < alone[0].best()
    # Rows of fixed blocks already make the call wide: drafting up to that width is free.
    assert shared_block(policies(16), costs, others=16, width=9) >= shared_block(
        policies(16), costs
    )


def test_probes_stop_where_even_perfect_acceptance_could_not_pay() -> None:
    """A compute-bound verifier (cost proportional to the tokens fed, as 16 rows on 2 CPU
    cores): no acceptance makes drafting pay for a full batch, so it is not probed for; one
    row on the same machine, or a cheap per-token cost, still is."""
    compute_bound = _costs({1: 0.010, 16: 0.060, 64: 0.230, 144: 0.520}, {1: 0.002, 8: 0.004})
    many = [BlockSizePolicy(8, 16, compute_bound) for _ in range(16)]
    assert not drafting_could_pay(many, compute_bound, 4)
    assert drafting_could_pay(many[:1], compute_bound, 4)
    overhead_bound = _costs({1: 0.010, 16: 0.011, 64: 0.014, 144: 0.020}, {1: 0.0005, 8: 0.001})
    assert drafting_could_pay(
        [BlockSizePolicy(8, 16, overhead_bound) for _ in range(16)], overhead_bound, 4
    )


def test_a_batch_that_does_not_draft_probes_ever_more_rarely(tiny_tok: Any) -> None:
    """Rows whose drafts are always rejected: probes come at growing intervals, and none
    once even whole acceptance could not pay."""
    from dg_stream._rounds import RoundCore

    costs = _costs({1: 0.010, 16: 0.011, 64: 0.014, 144: 0.020}, {1: 0.0005, 8: 0.001})
    core = RoundCore.__new__(RoundCore)  # only the planning state: no models needed
    core.costs, core.probe_every, core._plain_rounds, core._probe_gap = costs, 4, 0, 4
    core.realized, core._held_plain = RealizedRates(), None
    states = [_PlanOnly(BlockSizePolicy(8, 16, costs)) for _ in range(4)]
    for state in states:
        for _ in range(30):
            state.policy.observe(drafted=8, accepted=0)
    probes = [r for r in range(2000) if core._plan(states)]  # type: ignore[arg-type]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1] == 16 * 4 * 4
    core.costs = _costs({1: 0.010, 16: 0.060, 64: 0.230, 144: 0.520}, {1: 0.002, 8: 0.004})
    batch = [_PlanOnly(BlockSizePolicy(8, 16, core.costs)) for _ in range(16)]
    assert not any(core._plan(batch) for _ in range(4000))  # type: ignore[arg-type]


class _PlanOnly:
    """What ``RoundCore._plan`` reads of a row."""

    def __init__(self, policy: BlockSizePolicy) -> None:
        self.policy = policy
        self.block_size = 8
        self.draft_session = object()


def test_a_batch_drafts_only_while_its_drafted_rounds_deliver() -> None:
    """Whole rounds, not the cost model, have the last word for batches: drafting stops once
    drafted rounds deliver less than plain ones at that batch size, and a batch that always
    drafts takes plain rounds until it can compare."""
    realized = RealizedRates()
    assert realized.drafting_delivers(4)  # nothing known: the cost model decides
    asked = [realized.wants_plain_round(4) for _ in range(16)]
    assert sum(asked) == 4 and not realized.wants_plain_round(1)
    for _ in range(4):
        realized.observe(4, drafted=True, tokens=8, seconds=0.05)  # 160 tokens/s
        realized.observe(4, drafted=False, tokens=4, seconds=0.02)  # 200 tokens/s
    assert not realized.drafting_delivers(4)
    assert realized.drafting_delivers(16)  # another batch size: not known yet
    for _ in range(12):
        realized.observe(4, drafted=True, tokens=12, seconds=0.05)  # 240 tokens/s
    assert realized.drafting_delivers(4)
    assert not realized.wants_plain_round(4)  # plain rounds are known now
    realized.observe(1, drafted=False, tokens=1, seconds=0.01)  # one row: the model decides
    assert realized.drafting_delivers(1)


def test_a_fixed_block_is_switched_off_by_its_own_acceptance_only() -> None:
    """DraftGate (seeded sampling's default): drafts while the row's drafts pay, plain with
    probes at growing gaps while they do not, back on when a probe is accepted; the same
    observations give the same decisions (no timings)."""
    from dg_stream._block_policy import DraftGate

    def decisions(accepted: list[int]) -> list[int]:
        gate, sizes, seen = DraftGate(4), [], iter(accepted)
        for _ in range(400):
            size = gate.size()
            sizes.append(size)
            if size:
                gate.observe(size, next(seen, 0))
        return sizes

    rejected = decisions([0] * 400)
    assert rejected[:3] == [4, 4, 0]  # it settles first
    drafted = [i for i, size in enumerate(rejected) if size]
    gaps = [b - a for a, b in itertools.pairwise(drafted[1:])]
    assert gaps[:4] == [16, 32, 64, 128] and set(gaps[3:]) == {128}
    assert decisions([0] * 400) == rejected  # reproducible
    recovered = decisions([0] * 2 + [4] * 400)  # the text turns predictable
    assert recovered[-20:] == [4] * 20
    assert DraftGate(8).threshold == 1.6 and DraftGate(1).threshold == 0.5


def test_a_held_plain_decision_gives_way_to_new_acceptance_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plain decoding, once chosen, is recomputed once in ``REPLAN_EVERY`` rounds while only
    timings move; a verified draft (a probe that was accepted) is heard at the next round."""
    import dg_stream._rounds as rounds

    costs = _costs({1: 10.0, 5: 14.0}, {4: 3.0})
    policy = BlockSizePolicy(requested=4, max_block=16, costs=costs)
    for _ in range(20):
        policy.observe(drafted=4, accepted=0)
    core = rounds.RoundCore.__new__(rounds.RoundCore)  # the planning state only
    core.costs, core.probe_every, core._plain_rounds, core._probe_gap = costs, 1000, 0, 1000
    core.realized, core._held_plain = RealizedRates(), None
    computed = []
    real = rounds.shared_block
    monkeypatch.setattr(rounds, "shared_block", lambda *a, **k: computed.append(1) or real(*a, **k))
    state = _PlanOnly(policy)
    held = 3 * (rounds.REPLAN_EVERY + 1)
    assert [core._plan([state]) for _ in range(held)] == [0] * held  # type: ignore[list-item]
    assert len(computed) == 3
    for _ in range(30):  # the text turns predictable: every draft is accepted
        policy.observe(drafted=4, accepted=4)
    assert core._plan([state]) > 0  # type: ignore[list-item]
