"""The round core: propose, verify, accept and commit for a batch of generations at once.

A round is one verifier forward over every row of a ``BatchCache``:

```
SequenceState x B
  │ prefill        ``prefill_chunk`` prompt tokens per round while others stream (else
  │                up to ``MAX_PREFILL``), neighbouring rows in one forward
  │ propose        each decoding row's draft block (DraftProposal; made at the end of the
  │                previous round, so a preview can show it)
  │ score          one forward: rows (B, T) = [newest token, draft...] padded to the widest,
  │                built on the verifier's device
  │ judge          greedy rows at once (argmax, first mismatch), sampled rows each with its
  │                own generator on the device; one host sync brings back every verdict
  │ commit         per row: its cache length, ids, features; end of sequence and length
  ▼
RowOutcome per decoding row (new ids, finish, StepStats, preview) ─▶ the output layer
```

A failure in one row's drafting, judging or committing ends that row only (its outcome is
the exception); only a failed verifier forward ends every row of the round.

A batch of one is single-stream decoding: there is no other path. Nothing here knows about
threads, event loops, text or stop strings. Every row keeps its own generator, drafter
session and block size, so a row's tokens depend on its own inputs only (up to float rounding
of differently shaped forwards: in float32 a greedy near-tie is the only way for batching to
change an output).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from ._acceptance import (
    Verdict,
    accept_greedy,
    accept_greedy_batch,
    accept_sampled,
    draw_after_rejection,
)
from ._batch_cache import BatchCache
from ._block_policy import (
    BlockSizePolicy,
    CostTable,
    DraftGate,
    RealizedRates,
    drafting_could_pay,
    shared_block,
)
from ._chunks import FinishReason, StepStats
from ._config import SamplingParams
from ._constraints import Constraint
from ._drafters.base import (
    Drafter,
    DrafterTraits,
    DraftProposal,
    DraftRequest,
    DraftSession,
    empty_proposal,
)
from ._sampling import apply_repetition_penalty, process_logits
from ._state_cache import StateCache
from ._verifier import Verifier

__all__ = ["Batch", "RoundCore", "RowOutcome", "SequenceState"]

#: Most prompt tokens one forward reads when no other generation is waiting (activations
#: grow with it; the cache does not care).
MAX_PREFILL = 4096
#: What one verifier forward costs beyond the tokens it computes, in tokens: a prompt shares
#: a forward with its neighbours' when the padding that takes costs less than this. (The
#: embedded verifier on 2 CPU cores: 6 ms a forward, 0.15-0.25 ms a prompt token; a GPU's
#: fixed cost is worth more tokens, so there this errs towards separate forwards.)
FORWARD_COST_TOKENS = 48
#: Rounds a decision for plain decoding holds while nothing but timings can have changed.
REPLAN_EVERY = 8


@dataclass(eq=False)
class SequenceState:
    """One generation as the round core sees it: ids, options, randomness, drafter state."""

    prompt: InitVar[torch.Tensor]  # (n,) prompt ids, on the device the ids will live on
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator
    block_size: int
    steps: int = 1
    confidence: float | None = None
    drafting: bool = False  # whether a drafter session is opened when the row joins a batch
    preview: bool = False  # whether each outcome carries the next draft's ids
    draft_session: DraftSession | None = None
    policy: BlockSizePolicy | None = None
    gate: DraftGate | None = None  # a fixed block's on/off, from the row's own acceptance
    constraint: Constraint | None = None  # the grammar its output must follow
    cut: tuple[int, torch.Tensor | None] | None = None  # the draft's first illegal token, q
    forced: int = 0  # tokens at the draft's end that the grammar dictated, not the drafter
    row: int = -1  # its row in the batch's cache; -1 while outside a batch
    generated: int = 0
    features: torch.Tensor | None = None  # verifier features of the newest committed positions
    proposal: DraftProposal | None = None  # the draft the next round verifies
    draft_seconds: float = 0.0  # what making that draft cost
    finished: bool = False
    last: int = field(init=False, default=0)  # the newest id, on the host
    _buffer: torch.Tensor = field(init=False, repr=False)  # committed ids, room to grow
    _length: int = field(init=False, repr=False, default=0)
    _cached: int = field(default=0, repr=False)  # mirror of the cache row's length

    def __post_init__(self, prompt: torch.Tensor) -> None:
        # Room for the whole generation (capped: a huge max_new_tokens grows by doubling),
        # so that appending a round's tokens never copies what came before.
        room = prompt.shape[0] + min(self.max_new_tokens, 4096) + 1
        self._buffer = torch.empty(room, dtype=torch.long, device=prompt.device)
        self._buffer[: prompt.shape[0]] = prompt
        self._length = prompt.shape[0]
        self.last = int(prompt[-1]) if self._length else 0

    @property
    def ids(self) -> torch.Tensor:
        """(n,) committed ids, the prompt included (a view: valid until the next commit)."""
        return self._buffer[: self._length]

    def append(self, new: list[int]) -> None:
        end = self._length + len(new)
        if end > self._buffer.shape[0]:
            grown = self._buffer.new_empty(max(end, 2 * self._buffer.shape[0]))
            grown[: self._length] = self._buffer[: self._length]
            self._buffer = grown
        self._buffer[self._length : end] = torch.tensor(new, dtype=torch.long)
        self._length = end
        self.last = new[-1]

    @property
    def prompt_pending(self) -> bool:
        """Whether part of the prompt is still to be read (everything but the newest id)."""
        return self.row >= 0 and self._cached < self._length - 1

    def close(self) -> None:
        self.finished = True
        self.proposal = None
        self.features = None
        self.constraint = None  # its matcher goes with it
        if self.draft_session is not None:
            self.draft_session.close()
            self.draft_session = None


@dataclass(frozen=True)
class RowOutcome:
    """What one round committed for one row."""

    tokens: list[int]
    finish: FinishReason | None
    step: StepStats
    preview: list[int] | None = None  # the next draft, for rows that asked (a copy)


class RoundCore:
    """The models and the shared measurements; ``run`` is one round."""

    def __init__(
        self,
        verifier: Verifier,
        drafter: Drafter | None,
        costs: CostTable,
        prefill_chunk: int = 512,
    ) -> None:
        self.verifier = verifier
        self.drafter = drafter
        self.costs = costs
        self.prefill_chunk = max(1, prefill_chunk)
        traits = drafter.traits if drafter is not None else DrafterTraits(max_block_size=0)
        self.traits = traits
        # Verifier features for drafters that read them; a drafter that caches what it has
        # read (DFlash) is handed each position's features once.
        self.feature_window = traits.feature_window if traits.reads_features else 0
        self.feature_layers = traits.feature_layers if traits.reads_features else ()
        self.raw_features = traits.raw_features
        self.probe_every = 4
        self._plain_rounds = 0
        self._probe_gap = self.probe_every  # rounds per row between probes; doubles while
        # probes find nothing
        self.realized = RealizedRates()
        # A plain-decoding decision kept while nothing it rests on has moved (the same rows,
        # no verified draft since): (what it was made for, rounds it still holds).
        self._held_plain: tuple[tuple[Any, ...], int] | None = None

    # -- one round --------------------------------------------------------------------------

    def run(
        self,
        cache: BatchCache | StateCache,
        states: Sequence[SequenceState],
        active: Sequence[bool],
    ) -> list[RowOutcome | Exception | None]:
        """One round over ``states`` (the cache's rows, in order). Rows marked inactive sit
        out (fed padding that their cache lengths never keep). Returns, per row, its outcome,
        the exception that ended it alone, or None (sat out, or still reading its prompt).
        Raises when the verifier forward fails (every row's cache is then undefined)."""
        outcomes: list[RowOutcome | Exception | None] = [None] * len(states)
        # Prompts are read a piece per round while other rows are streaming (so their chunks
        # keep coming); with nobody waiting, a prompt is read in pieces as large as one
        # forward may be.
        streaming = any(
            on and not s.finished and not s.prompt_pending
            for s, on in zip(states, active, strict=True)
        )
        budget = self.prefill_chunk if streaming else max(self.prefill_chunk, MAX_PREFILL)
        pending = [s for s, on in zip(states, active, strict=True) if on and s.prompt_pending]
        if pending:
            self._prefill(cache, pending, budget)
        decoding = [
            i for i, s in enumerate(states) if active[i] and not s.finished and not s.prompt_pending
        ]
        if not decoding:
            return outcomes
        rows = len(decoding)
        round_started = time.perf_counter()
        draft_seconds = dict.fromkeys(decoding, 0.0)
        # A row's first round drafts now (later drafts are made at the end of a round), sized
        # to share the call with the rows whose drafts are already made.
        fresh = [i for i in decoding if states[i].proposal is None]
        if fresh:
            made = [p for i in decoding if (p := states[i].proposal) is not None]
            width = 1 + max((p.tokens.shape[0] for p in made), default=0)
            block = self._plan([states[i] for i in fresh], others=len(made), width=width)
            for i, spent in self._propose(states, fresh, block, outcomes).items():
                draft_seconds[i] += spent
            decoding = [i for i in decoding if outcomes[i] is None]
            if not decoding:
                return outcomes
        fed, sizes = self._feed(states, decoding)
        started = time.perf_counter()
        logits, features = self.verifier.forward(
            fed, cache, 0, self.feature_layers, self.raw_features
        )
        if logits.is_cuda:  # time the work, not its launch
            torch.cuda.synchronize(logits.device)
        verify_seconds = time.perf_counter() - started
        self.costs.observe_verify(len(states) * fed.shape[1], verify_seconds)
        verdicts = self._judge_all(states, decoding, logits, fed, sizes, outcomes)
        committed: dict[int, tuple[list[int], FinishReason | None, int, int, int]] = {}
        for i, verdict in verdicts.items():
            state, k = states[i], sizes[i]
            forced = state.forced  # the draft's tail that the grammar dictated
            try:
                row_features = features[i, : verdict.accepted + 1] if features is not None else None
                new, finish = self._commit(cache, state, verdict, row_features)
            except Exception as exc:  # this row alone ends
                outcomes[i] = _row_failed(state, exc)
                continue
            # The drafter is judged on its own tokens, not on what the grammar dictated.
            own = (k - forced, min(verdict.accepted, k - forced))
            if state.policy is not None and finish is None:
                state.policy.observe(*own)
            if state.gate is not None:
                state.gate.observe(*own)
            committed[i] = (new, finish, k, verdict.accepted, forced)
        # The next round's drafts, now, so that each chunk can preview its row's.
        going = [i for i in committed if not states[i].finished]
        block = self._plan([states[i] for i in going])
        for i, spent in self._propose(states, going, block, outcomes).items():
            draft_seconds[i] += spent
        for i, (new, finish, k, accepted, forced) in committed.items():
            if outcomes[i] is not None:  # its next draft failed
                continue
            state = states[i]
            step = StepStats(
                drafted=k,
                accepted=accepted,
                committed=len(new),
                draft_seconds=draft_seconds[i],
                verify_seconds=verify_seconds,
                rows=rows,
                forced=forced,
            )
            preview = None
            if state.preview and state.proposal is not None:
                preview = state.proposal.tokens.tolist()
            outcomes[i] = RowOutcome(new, finish, step, preview)
        self.realized.observe(
            rows,
            any(sizes[i] for i in sizes),
            sum(len(new) for new, *_ in committed.values()),
            time.perf_counter() - round_started,
        )
        return outcomes

    # -- phases -----------------------------------------------------------------------------

    def _feed(
        self, states: Sequence[SequenceState], decoding: list[int]
    ) -> tuple[torch.Tensor, dict[int, int]]:
        """The forward's input (B, W) on the verifier's device: each decoding row's newest
        id and draft, padding elsewhere; and each row's draft size."""
        sizes: dict[int, int] = {}
        for i in decoding:
            proposal = states[i].proposal
            assert proposal is not None
            sizes[i] = int(proposal.tokens.shape[0])
        width = 1 + max(sizes.values())
        fed = torch.full((len(states), width), self.verifier.pad_id, dtype=torch.long)
        fed[decoding, 0] = torch.tensor([states[i].last for i in decoding], dtype=torch.long)
        fed = fed.to(self.verifier.device)
        for i in decoding:
            proposal = states[i].proposal
            assert proposal is not None
            if sizes[i]:
                fed[i, 1 : 1 + sizes[i]] = proposal.tokens
        return fed, sizes

    def _judge_all(
        self,
        states: Sequence[SequenceState],
        decoding: list[int],
        logits: torch.Tensor,
        fed: torch.Tensor,
        sizes: dict[int, int],
        outcomes: list[RowOutcome | Exception | None],
    ) -> dict[int, Verdict]:
        """Every decoding row's verdict: plain greedy rows in one batched comparison, the
        others (sampling, repetition penalty) one by one with their own generators; one host
        sync for the batched ones. A row whose judging fails gets its exception instead."""
        verdicts: dict[int, Verdict] = {}
        batched = [
            i for i in decoding if _plain_greedy(states[i].params) and states[i].constraint is None
        ]
        if batched:
            index = torch.tensor(batched, device=logits.device)
            drafted = torch.tensor([sizes[i] for i in batched], device=logits.device)
            accepted, token = accept_greedy_batch(logits[index], fed[index, 1:], drafted)
            for i, a, t in zip(batched, *torch.stack([accepted, token]).tolist(), strict=True):
                verdicts[i] = Verdict(a, t)
        for i in decoding:
            if i in verdicts:
                continue
            state = states[i]
            proposal = state.proposal
            assert proposal is not None
            try:
                mask = None
                if state.constraint is not None:
                    draft = proposal.tokens.tolist()
                    mask = state.constraint.masks(draft, logits.device)
                verdicts[i] = judge(
                    logits[i, : sizes[i] + 1],
                    proposal,
                    state.params,
                    state.ids,
                    state.generator,
                    mask=mask,
                    cut=state.cut,
                )
            except Exception as exc:
                outcomes[i] = _row_failed(state, exc)
        return verdicts

    def _prefill(
        self, cache: BatchCache | StateCache, pending: list[SequenceState], budget: int
    ) -> None:
        """Read up to ``budget`` more prompt tokens of the ``pending`` rows (in row order),
        rows next to each other in the cache sharing a forward where that costs less than
        forwards of their own (``prefill_groups``)."""
        if not self.verifier.batchable:  # a prompt is read in one piece, a row at a time
            for state in pending:
                self._prefill_rows(cache, [(state, state.ids.shape[0] - 1 - state._cached)])
            return
        pieces: list[tuple[SequenceState, int]] = []
        for state in sorted(pending, key=lambda s: s.row):
            piece = min(state.ids.shape[0] - 1 - state._cached, budget)
            if piece <= 0:
                break
            pieces.append((state, piece))
            budget -= piece
        rows = [state.row for state, _ in pieces]
        starts = [state._cached for state, _ in pieces]
        for begin, end in prefill_groups(rows, [piece for _, piece in pieces], starts=starts):
            self._prefill_rows(cache, pieces[begin:end])

    def _prefill_rows(
        self, cache: BatchCache | StateCache, pieces: list[tuple[SequenceState, int]]
    ) -> None:
        """One forward reading the next ``piece`` prompt tokens of each state; the states
        hold consecutive rows, all read up to the same position. Shorter pieces are padded
        on the right: the padding's keys lie past the row's length, where the next forward
        writes before reading, and within what the longest piece needs anyway."""
        width = max(piece for _, piece in pieces)
        device = pieces[0][0].ids.device  # the ids live beside the verifier: no host copy
        fed = torch.full(
            (len(pieces), width), self.verifier.pad_id, dtype=torch.long, device=device
        )
        for i, (state, piece) in enumerate(pieces):
            fed[i, :piece] = state.ids[state._cached : state._cached + piece]
        # Features for each row's newest ``feature_window`` positions: the shortest piece's
        # reach back from the end of the widest.
        shortest = min(piece for _, piece in pieces)
        skipped = max(0, shortest - self.feature_window)
        _, features = self.verifier.forward(
            fed,
            cache,
            pieces[0][0].row,
            self.feature_layers,
            self.raw_features,
            prefill=True,
            feature_rows=width - skipped,
        )
        for i, (state, piece) in enumerate(pieces):
            state._cached = cache.lengths[state.row] = state._cached + piece
            if features is not None:
                first = max(0, piece - self.feature_window) - skipped
                keep(state, features[i, first : piece - skipped], self.feature_window)

    def _plan(self, states: Sequence[SequenceState], others: int = 0, width: int = 1) -> int | None:
        """The block size of the adaptive rows among ``states`` (None: there are none), who
        share a call with ``others`` rows already drafted, fed ``width`` tokens at most."""
        policies = [s.policy for s in states if s.policy is not None]
        if not policies:
            return None
        for state in states:
            if state.policy is None:  # fixed block sizes: their rows count as they are
                others += 1
                width = max(width, 1 + (state.block_size if state.draft_session else 0))
        warmups = [policy.warmup_block() for policy in policies]
        if any(w is not None for w in warmups):
            return max(w for w in warmups if w is not None)
        block = self._shared_block(policies, others, width)
        rows = len(states) + others
        if block > 0 and rows > 1:
            if self.realized.wants_plain_round(rows):
                return 0
            if not self.realized.drafting_delivers(rows):
                block = 0
        if block > 0:
            self._plain_rounds, self._probe_gap = 0, self.probe_every
            return block
        # While plain decoding wins, draft now and then anyway to notice the drafter
        # agreeing: all rows in the same round (one wider call), and the more rows, the
        # rarer and shorter (each probe widens all of them, which costs a compute-bound
        # machine in proportion; each tells about all of them). A probe that changes nothing
        # doubles the wait for the next (up to 64 rounds per row in a batch, 128 alone), and
        # none is made where even a draft accepted whole could not pay at this load: 16 rows
        # on 2 CPU cores lost 3-7% to probes taken every 16 rounds, and one stream sampled
        # at temperature 1 (0.08 drafts accepted per call) lost 10% to probes every 4
        # rounds and 3% to probes every 32 (a probe costs about one plain round).
        self._plain_rounds += 1
        if self._plain_rounds < self._probe_gap * rows:
            return 0
        self._plain_rounds = 0
        requested = min(policy.requested for policy in policies)
        probe = requested if rows == 1 else max(1, requested // 2)
        if not drafting_could_pay(policies, self.costs, probe, others=others, width=width):
            return 0
        most = 16 if rows > 1 else 32
        self._probe_gap = min(2 * self._probe_gap, most * self.probe_every)
        return probe

    def _shared_block(self, policies: list[BlockSizePolicy], others: int, width: int) -> int:
        """``shared_block``, except that a decision for plain decoding is kept for
        ``REPLAN_EVERY`` rounds while the rows and their acceptance are unchanged: in plain
        rounds only the timings move, and refitting them every round cost a single sampled
        stream 1.4% of its time."""
        made_for = (tuple(map(id, policies)), others, width, sum(p.observed for p in policies))
        held = self._held_plain
        if held is not None and held[0] == made_for and held[1] > 0:
            self._held_plain = (made_for, held[1] - 1)
            return 0
        block = shared_block(policies, self.costs, others=others, width=width)
        self._held_plain = (made_for, REPLAN_EVERY) if block == 0 else None
        return block

    def _propose(
        self,
        states: Sequence[SequenceState],
        chosen: list[int],
        block: int | None,
        outcomes: list[RowOutcome | Exception | None],
    ) -> dict[int, float]:
        """Set the next proposal of each state in ``chosen`` (``block``: the adaptive rows'
        size), in one drafter call where the drafter batches; returns each row's share of
        the seconds. A failed drafter call ends the rows it was drafting for."""
        seconds = dict.fromkeys(chosen, 0.0)
        wanted: list[tuple[int, SequenceState, int]] = []
        sessions: list[DraftSession] = []
        for i in chosen:
            state = states[i]
            remaining = state.max_new_tokens - state.generated
            size = state.block_size if state.gate is None else state.gate.size()
            if state.policy is not None and block is not None:
                size = min(block, state.policy.max_block)
            # The verifier always adds one token, so drafting past remaining - 1 is wasted.
            k = min(size, remaining - 1)
            if state.draft_session is None or k <= 0:
                state.proposal = empty_proposal(self.verifier.device)
                state.draft_seconds = 0.0
                # Tokens a grammar dictates cost no drafter work: a drafting row gets them
                # even in a plain round (plain decoding, without a drafter, stays plain).
                room = 0 if state.draft_session is None else min(self._widest(state), remaining - 1)
                _fit_to_grammar(state, room)
            else:
                wanted.append((i, state, k))
                sessions.append(state.draft_session)
        if not wanted:
            return seconds
        assert self.drafter is not None
        if len(wanted) > 1 and self.traits.batched:
            started = time.perf_counter()
            try:
                requests = [self._request(state, k) for _, state, k in wanted]
                proposals = self.drafter.propose_batch(sessions, requests)
            except Exception as exc:
                for i, state, _ in wanted:
                    outcomes[i] = _row_failed(state, exc)
                return seconds
            for (_, state, _), proposal in zip(wanted, proposals, strict=True):
                state.proposal = proposal
            share = (time.perf_counter() - started) / len(wanted)
            for i, state, k in wanted:
                seconds[i] = self._drafted(state, k, share)
            return seconds
        for (i, state, k), session in zip(wanted, sessions, strict=True):
            started = time.perf_counter()  # each row alone: a failure ends that row only
            try:
                state.proposal = session.propose(self._request(state, k))
            except Exception as exc:
                outcomes[i] = _row_failed(state, exc)
                continue
            seconds[i] = self._drafted(state, k, time.perf_counter() - started)
        return seconds

    def _request(self, state: SequenceState, k: int) -> DraftRequest:
        features = state.features if self.feature_layers else None
        return DraftRequest(
            state.ids, k, state.params, state.generator, state.steps, state.confidence, features
        )

    def _widest(self, state: SequenceState) -> int:
        """The most draft tokens a round may feed this row (what its reservation covers)."""
        return state.policy.max_block if state.policy is not None else state.block_size

    def _drafted(self, state: SequenceState, k: int, seconds: float) -> float:
        proposal = state.proposal
        if proposal is not None and proposal.q is not None and not self.traits.exact_q:
            state.proposal = DraftProposal(proposal.tokens, None)  # judged as a point mass
        remaining = state.max_new_tokens - state.generated
        _fit_to_grammar(state, min(self._widest(state), remaining - 1))
        state.draft_seconds = seconds
        if self.traits.feature_stream:
            state.features = None  # the drafter has them now
        if state.policy is not None:
            self.costs.observe_draft(k, seconds, state.steps)
        return seconds

    def _commit(
        self,
        cache: BatchCache | StateCache,
        state: SequenceState,
        verdict: Verdict,
        features: torch.Tensor | None,
    ) -> tuple[list[int], FinishReason | None]:
        """Keep the newest token and the accepted drafts in the cache (the verifier's own
        token is the next round's first input, so it is not cached yet); append the new ids,
        cut at end of sequence or at max_new_tokens."""
        assert state.proposal is not None
        state._cached = cache.lengths[state.row] = state.ids.shape[0] + verdict.accepted
        if features is not None:
            keep(state, features, self.feature_window)
        drafted = state.proposal.tokens[: verdict.accepted].tolist() if verdict.accepted else []
        new = [*drafted, verdict.token]
        state.proposal = None
        ended = None if state.constraint is None else state.constraint.commit(new)
        if ended is not None:  # the grammar is complete: nothing may follow
            del new[ended:]
        finish = truncate(new, self.verifier.eos_ids, state.max_new_tokens - state.generated)
        if ended is not None and finish is None:
            finish = "stop"
        state.cut, state.forced = None, 0
        state.append(new)
        state.generated += len(new)
        if finish is not None:
            state.finished = True
        return new, finish


def _plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and (params.repetition_penalty is None or params.repetition_penalty == 1.0)


def _row_failed(state: SequenceState, exc: Exception) -> Exception:
    state.finished = True
    state.proposal = None
    return exc


class Batch:
    """Generations sharing one ``BatchCache``: rows join and leave between rounds."""

    def __init__(self, core: RoundCore, max_positions: int | None = None) -> None:
        self.core = core
        self.cache = core.verifier.new_cache(max_positions)
        self.states: list[SequenceState] = []

    def __len__(self) -> int:
        return len(self.states)

    def add(self, state: SequenceState) -> None:
        row = self.cache.add_row()
        if state.drafting and state.draft_session is None and self.core.drafter is not None:
            state.draft_session = self.core.drafter.session()  # on the thread that drafts
        state.row, state._cached = row, 0
        self.states.append(state)

    def remove(self, state: SequenceState) -> None:
        """Free the state's row (and its drafter state); the last row takes its place."""
        row = state.row
        if row < 0 or row >= len(self.states) or self.states[row] is not state:
            return
        moved = self.cache.remove_row(row)
        last = self.states.pop()
        if moved is not None:
            self.states[row] = last
            last.row = row
        state.row = -1
        state.close()

    def run(self, active: Sequence[bool] | None = None) -> list[RowOutcome | Exception | None]:
        return self.core.run(
            self.cache, self.states, [True] * len(self.states) if active is None else active
        )

    def cached_tokens(self) -> int:
        return self.cache.cached_tokens()


# -- pure pieces ----------------------------------------------------------------------------


def judge(
    logits: torch.Tensor,
    proposal: DraftProposal,
    params: SamplingParams,
    context: torch.Tensor,
    generator: torch.Generator,
    *,
    mask: torch.Tensor | None = None,
    cut: tuple[int, torch.Tensor | None] | None = None,
) -> Verdict:
    """The acceptance rule for one row: logits (k+1, V) of [newest token, draft...].

    ``mask`` ((k+1, V) bool): the tokens a grammar allows at each position; ``cut``: the
    illegal draft token removed after the k kept ones, with the q it was drawn from (a
    rejection at position k, see ``_constraints``)."""
    logits = logits.float()  # as plain decoding processes them (transformers' too)
    tokens = proposal.tokens.to(logits.device)
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(
            logits, context.to(logits.device), tokens, params.repetition_penalty
        )
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    if params.greedy:
        return accept_greedy(logits, tokens)
    p = process_logits(logits, params).softmax(dim=-1)  # (k+1, V)
    q = _pad_vocab(proposal.q, p)
    verdict = accept_sampled(p, tokens, q, generator)
    k = tokens.shape[0]
    if cut is not None and verdict.accepted == k:
        # Every legal draft was kept: the illegal one after them is rejected, as masked
        # p = 0 would reject it, and the token comes from the residual there.
        token, q_cut = cut
        q_row = _pad_vocab(q_cut[None], p) if q_cut is not None else None
        drawn = draw_after_rejection(
            p[k], None if q_row is None else q_row[0], torch.tensor(token), generator
        )
        return Verdict(k, drawn)
    return verdict


def _pad_vocab(q: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
    """q on p's device and dtype, padded to p's vocabulary (a drafter's may lack the
    verifier's padding)."""
    if q is None:
        return None
    q = q.to(p.device, p.dtype)
    if q.shape[-1] < p.shape[-1]:
        q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))
    return q


def _fit_to_grammar(state: SequenceState, room: int) -> None:
    """Fit a constrained row's draft to its grammar before the verifier reads it.

    The draft is cut before its first token the grammar rejects; then, where ``room``
    allows, the tokens the grammar dictates next are appended (``state.forced`` of them), so
    that no drafter work is spent on them. Forced tokens are a point-mass proposal (one-hot
    q): speculative sampling stays exact for any proposal, and where the grammar allows only
    that token the masked p accepts it always. Without forced tokens the illegal token is
    kept, with its q, in ``state.cut``: a rejection there, drawn from the residual."""
    state.cut, state.forced = None, 0
    proposal, constraint = state.proposal, state.constraint
    if constraint is None or proposal is None:
        return
    draft = proposal.tokens.tolist()
    legal, illegal, forced = constraint.fit(draft, room)
    if legal == len(draft) and not forced:
        return
    q = proposal.q
    if illegal and not forced:
        state.cut = (draft[legal], None if q is None else q[legal])
    tokens = proposal.tokens[:legal]
    if forced:
        tokens = torch.cat([tokens, torch.tensor(forced, dtype=torch.long, device=tokens.device)])
        if q is not None:
            width = max(q.shape[-1], max(forced) + 1)  # a drafter may lack the padding
            one_hot = torch.zeros(len(forced), width, dtype=q.dtype, device=q.device)
            one_hot[torch.arange(len(forced)), forced] = 1
            q = torch.cat([torch.nn.functional.pad(q[:legal], (0, width - q.shape[-1])), one_hot])
    elif q is not None:
        q = q[:legal]
    state.proposal = DraftProposal(tokens, q)
    state.forced = len(forced)


def prefill_groups(
    rows: Sequence[int],
    pieces: Sequence[int],
    forward_cost: int = FORWARD_COST_TOKENS,
    *,
    starts: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """Split prompt pieces into forwards: ``[begin, end)`` index ranges, each of rows that are
    consecutive in the cache (a forward reads a contiguous range of rows) and, with
    ``starts``, read up to the same position (a row further along would be padded past its
    own reservation, and every row would attend over the furthest one's span), chosen to
    minimise the tokens computed, padding included, plus ``forward_cost`` per forward (what a
    forward costs beyond its tokens). Rows of similar lengths share one; a short prompt next
    to a long one reads alone rather than be padded to its length."""
    count = len(pieces)
    best = [0.0] + [float("inf")] * count  # best[j]: cost of the first j pieces
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        widest = 0
        for begin in range(end - 1, -1, -1):
            if begin < end - 1 and (
                rows[begin] + 1 != rows[begin + 1]
                or (starts is not None and starts[begin] != starts[begin + 1])
            ):
                break
            widest = max(widest, pieces[begin])
            cost = best[begin] + forward_cost + (end - begin) * widest
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    groups, end = [], count
    while end > 0:
        groups.append((cut[end], end))
        end = cut[end]
    return groups[::-1]


def truncate(new: list[int], eos_ids: Any, room: int) -> FinishReason | None:
    """Cut ``new`` in place at the first end-of-sequence or at ``room`` tokens."""
    finish: FinishReason | None = None
    for i, token in enumerate(new):
        if token in eos_ids:
            del new[i + 1 :]
            finish = "stop"
            break
    if len(new) > room:
        del new[room:]
        finish = "length"
    elif len(new) == room and finish is None:
        finish = "length"
    return finish


def keep(state: SequenceState, features: torch.Tensor, window: int) -> None:
    """Append (m, F) features of newly cached positions, keeping the newest ``window``."""
    if state.features is not None:
        features = torch.cat([state.features, features])
    state.features = features[-window:].clone()  # not a view of the whole forward
