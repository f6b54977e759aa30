"""The round core: propose, verify, accept and commit for a batch of generations at once.

A round is one verifier forward over every row of a ``BatchCache``:

```
SequenceState x B
  │ prefill        ``prefill_chunk`` prompt tokens per round while others stream (else
  │                up to ``MAX_PREFILL``), one row at a time
  │ propose        each decoding row's draft block (DraftProposal; made at the end of the
  │                previous round, so a preview can show it)
  │ score          one forward: rows (B, T) = [newest token, draft...] padded to the widest
  │ judge          pure, per row: Verdict(accepted, token)
  │ commit         per row: its cache length, ids, features; end of sequence and length
  ▼
RowOutcome per decoding row (new ids, finish, StepStats) ─▶ the output layer (_engine.py)
```

A batch of one is single-stream decoding: there is no other path. Nothing here knows about
threads, event loops, text or stop strings. Every row keeps its own generator, drafter
session and block size, so a row's tokens depend on its own inputs only (up to float rounding
of differently shaped forwards: in float32 a greedy near-tie is the only way for batching to
change an output).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._acceptance import Verdict, accept_greedy, accept_sampled
from ._batch_cache import BatchCache
from ._block_policy import BlockSizePolicy, CostTable, shared_block
from ._chunks import FinishReason, StepStats
from ._config import SamplingParams
from ._drafters.base import Drafter, DraftProposal, DraftRequest, DraftSession, empty_proposal
from ._sampling import apply_repetition_penalty, process_logits
from ._verifier import Verifier

__all__ = ["Batch", "RoundCore", "RowOutcome", "SequenceState"]

#: Most prompt tokens one forward reads when no other generation is waiting (activations
#: grow with it; the cache does not care).
MAX_PREFILL = 4096


@dataclass(eq=False)
class SequenceState:
    """One generation as the round core sees it: ids, options, randomness, drafter state."""

    ids: torch.Tensor  # (n,) committed ids, the prompt included
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator
    block_size: int
    steps: int = 1
    confidence: float | None = None
    draft_session: DraftSession | None = None
    policy: BlockSizePolicy | None = None
    row: int = -1  # its row in the batch's cache; -1 while outside a batch
    generated: int = 0
    features: torch.Tensor | None = None  # verifier features of the newest committed positions
    proposal: DraftProposal | None = None  # the draft the next round verifies
    draft_seconds: float = 0.0  # what making that draft cost
    finished: bool = False

    @property
    def prompt_pending(self) -> bool:
        """Whether part of the prompt is still to be read (everything but the newest id)."""
        return self.row >= 0 and self._cached < self.ids.shape[0] - 1

    _cached: int = field(default=0, repr=False)  # mirror of the cache row's length

    def close(self) -> None:
        self.finished = True
        self.proposal = None
        self.features = None
        if self.draft_session is not None:
            self.draft_session.close()
            self.draft_session = None


@dataclass(frozen=True)
class RowOutcome:
    """What one round committed for one row."""

    tokens: list[int]
    finish: FinishReason | None
    step: StepStats


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
        # Verifier features for drafters that read them (older drafters lack the attributes).
        self.feature_window = int(getattr(drafter, "feature_window", 0) or 0)
        layers = getattr(drafter, "feature_layers", ()) or ()
        self.feature_layers: tuple[int, ...] = tuple(layers) if self.feature_window > 0 else ()
        # A drafter that caches what it has read (DFlash) is handed each position's features
        # once; it reads them raw when its own projection normalises them.
        self.feature_stream = bool(getattr(drafter, "feature_stream", False))
        self.raw_features = bool(getattr(drafter, "raw_features", False))
        self.probe_every = 8
        self._plain_rounds = 0
        # Tokens per second of whole rounds, drafted or plain, by batch size (rows rounded
        # to a power of two): what the cost model predicts, measured (a forgetting average).
        self._round_rates: dict[tuple[int, bool], float] = {}
        pad = getattr(verifier.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) and 0 <= pad < verifier.vocab_size else 0

    # -- one round --------------------------------------------------------------------------

    def run(
        self, cache: BatchCache, states: Sequence[SequenceState], active: Sequence[bool]
    ) -> list[RowOutcome | None]:
        """One round over ``states`` (the cache's rows, in order). Rows marked inactive sit
        out (fed padding that their cache lengths never keep). Returns an outcome for each
        row that decoded; None for rows that sat out or are still reading their prompt."""
        outcomes: list[RowOutcome | None] = [None] * len(states)
        # Prompts are read a piece per round while other rows are streaming (so their chunks
        # keep coming); with nobody waiting, a prompt is read in pieces as large as one
        # forward may be.
        streaming = any(
            on and not s.finished and not s.prompt_pending
            for s, on in zip(states, active, strict=True)
        )
        budget = self.prefill_chunk if streaming else max(self.prefill_chunk, MAX_PREFILL)
        if not self.verifier.batchable:
            budget = max(s.ids.shape[0] for s in states)  # a prompt is read in one piece
        for state, on in zip(states, active, strict=True):
            if on and state.prompt_pending and budget > 0:
                budget -= self._prefill(cache, state, budget)
        decoding = [
            i for i, s in enumerate(states) if active[i] and not s.finished and not s.prompt_pending
        ]
        if not decoding:
            return outcomes
        rows = len(decoding)
        draft_seconds = dict.fromkeys(decoding, 0.0)
        # A row's first round drafts now (later drafts are made at the end of a round), sized
        # to share the call with the rows whose drafts are already made.
        fresh = [i for i in decoding if states[i].proposal is None]
        if fresh:
            made = [p for i in decoding if (p := states[i].proposal) is not None]
            width = 1 + max((p.tokens.shape[0] for p in made), default=0)
            block = self._plan([states[i] for i in fresh], others=len(made), width=width)
            spent = self._propose([states[i] for i in fresh], block)
            for i, seconds in zip(fresh, spent, strict=True):
                draft_seconds[i] += seconds
        proposals = [states[i].proposal for i in decoding]
        width = 1 + max(p.tokens.shape[0] for p in proposals if p is not None)
        fed = torch.full((len(states), width), self.pad_id, dtype=torch.long)
        for i in decoding:
            state = states[i]
            assert state.proposal is not None
            block_ids = torch.cat([state.ids[-1:], state.proposal.tokens.cpu()])
            fed[i, : block_ids.shape[0]] = block_ids
        started = time.perf_counter()
        logits, features = self.verifier.forward(
            fed, cache, 0, self.feature_layers, self.raw_features
        )
        if logits.is_cuda:  # time the work, not its launch
            torch.cuda.synchronize(logits.device)
        verify_seconds = time.perf_counter() - started
        self.costs.observe_verify(len(states) * width, verify_seconds)
        round_seconds = verify_seconds + sum(states[i].draft_seconds for i in decoding)
        committed: dict[int, tuple[list[int], FinishReason | None, int, int]] = {}
        for i in decoding:
            state = states[i]
            proposal = state.proposal
            assert proposal is not None
            k = proposal.tokens.shape[0]
            verdict = self._judge(logits[i, : k + 1], proposal, state)
            row_features = features[i, : verdict.accepted + 1] if features is not None else None
            new, finish = self._commit(cache, state, verdict, row_features)
            if state.policy is not None and finish is None:
                state.policy.observe(k, verdict.accepted)
            committed[i] = (new, finish, k, verdict.accepted)
        tokens = sum(len(new) for new, *_ in committed.values())
        self._observe_round(rows, width > 1, tokens, round_seconds)
        # The next round's drafts, now, so that each chunk can preview its row's.
        going = [i for i in decoding if not states[i].finished]
        block = self._plan([states[i] for i in going])
        spent = self._propose([states[i] for i in going], block)
        for i, seconds in zip(going, spent, strict=True):
            draft_seconds[i] += seconds
        for i, (new, finish, k, accepted) in committed.items():
            step = StepStats(
                drafted=k,
                accepted=accepted,
                committed=len(new),
                draft_seconds=draft_seconds[i],
                verify_seconds=verify_seconds,
                rows=rows,
            )
            outcomes[i] = RowOutcome(new, finish, step)
        return outcomes

    # -- phases -----------------------------------------------------------------------------

    def _judge(
        self, logits: torch.Tensor, proposal: DraftProposal, state: SequenceState
    ) -> Verdict:
        return judge(logits, proposal, state.params, state.ids, state.generator)

    def _prefill(self, cache: BatchCache, state: SequenceState, budget: int) -> int:
        """Read up to ``budget`` more prompt tokens into the state's row; returns how many."""
        begin = state._cached
        end = min(state.ids.shape[0] - 1, begin + budget)
        _, features = self.verifier.forward(
            state.ids[None, begin:end],
            cache,
            state.row,
            self.feature_layers,
            self.raw_features,
            prefill=True,
            feature_rows=self.feature_window,
        )
        state._cached = cache.lengths[state.row] = end
        if features is not None:
            keep(state, features[0], self.feature_window)
        return end - begin

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
        block = shared_block(policies, self.costs, others=others, width=width)
        if block > 0 and self._drafting_loses(len(states) + others):
            block = 0  # the model says drafting pays, the rounds measured say it does not
        if block == 0:
            # While plain decoding wins, draft now and then anyway to notice the drafter
            # agreeing: all rows in the same round (one wider call), and the more rows, the
            # rarer (each probe widens all of them; each tells about all of them).
            self._plain_rounds += 1
            every = self.probe_every * math.ceil(math.sqrt(len(states) + others))
            if self._plain_rounds % every == 0:
                return max(1, min(policy.requested for policy in policies) // 2)
        return block

    def _observe_round(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        key = (rows.bit_length(), drafted)
        rate = tokens / max(seconds, 1e-9)
        old = self._round_rates.get(key)
        self._round_rates[key] = rate if old is None else 0.8 * old + 0.2 * rate

    def _drafting_loses(self, rows: int) -> bool:
        """Whether drafted rounds of about this many rows made fewer tokens per second than
        plain ones, as measured (unknown until both were seen)."""
        bucket = rows.bit_length()
        drafted = self._round_rates.get((bucket, True))
        plain = self._round_rates.get((bucket, False))
        return drafted is not None and plain is not None and drafted < plain

    def _propose(self, states: Sequence[SequenceState], block: int | None) -> list[float]:
        """Set each state's next proposal (``block``: the adaptive rows' size), in one
        drafter call where the drafter batches; returns each row's share of the seconds."""
        seconds = [0.0] * len(states)
        wanted: list[tuple[int, SequenceState, int]] = []
        for i, state in enumerate(states):
            remaining = state.max_new_tokens - state.generated
            size = state.block_size
            if state.policy is not None and block is not None:
                size = min(block, state.policy.max_block)
            # The verifier always adds one token, so drafting past remaining - 1 is wasted.
            k = min(size, remaining - 1)
            if state.draft_session is None or k <= 0:
                state.proposal = empty_proposal()
                state.draft_seconds = 0.0
            else:
                wanted.append((i, state, k))
        batched = getattr(self.drafter, "propose_batch", None)
        if len(wanted) > 1 and batched is not None:
            started = time.perf_counter()
            requests = [self._request(state, k) for _, state, k in wanted]
            for (_, state, _), proposal in zip(wanted, batched(requests), strict=True):
                state.proposal = proposal
            share = (time.perf_counter() - started) / len(wanted)
            for i, state, k in wanted:
                seconds[i] = self._drafted(state, k, share)
            return seconds
        for i, state, k in wanted:
            started = time.perf_counter()
            assert state.draft_session is not None
            request = self._request(state, k)
            # Features go only to drafters that read them (older drafters lack the keyword).
            extra = {"features": request.features} if self.feature_layers else {}
            state.proposal = state.draft_session.propose(
                request.context,
                k,
                request.params,
                request.generator,
                steps=request.steps,
                confidence=request.confidence,
                **extra,
            )
            seconds[i] = self._drafted(state, k, time.perf_counter() - started)
        return seconds

    def _request(self, state: SequenceState, k: int) -> DraftRequest:
        features = state.features if self.feature_layers else None
        return DraftRequest(
            state.ids, k, state.params, state.generator, state.steps, state.confidence, features
        )

    def _drafted(self, state: SequenceState, k: int, seconds: float) -> float:
        state.draft_seconds = seconds
        if self.feature_stream:
            state.features = None  # the drafter has them now
        if state.policy is not None:
            self.costs.observe_draft(k, seconds, state.steps)
        return seconds

    def _commit(
        self,
        cache: BatchCache,
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
        new = [*state.proposal.tokens[: verdict.accepted].tolist(), verdict.token]
        state.proposal = None
        finish = truncate(new, self.verifier.eos_ids, state.max_new_tokens - state.generated)
        state.ids = torch.cat([state.ids, torch.tensor(new, dtype=torch.long)])
        state.generated += len(new)
        if finish is not None:
            state.finished = True
        return new, finish


class Batch:
    """Generations sharing one ``BatchCache``: rows join and leave between rounds."""

    def __init__(self, core: RoundCore) -> None:
        self.core = core
        self.cache = core.verifier.new_cache()
        self.states: list[SequenceState] = []

    def __len__(self) -> int:
        return len(self.states)

    def add(self, state: SequenceState) -> None:
        row = self.cache.add_row()
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

    def run(self, active: Sequence[bool] | None = None) -> list[RowOutcome | None]:
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
) -> Verdict:
    """The acceptance rule for one row: logits (k+1, V) of [newest token, draft...]."""
    tokens = proposal.tokens.to(logits.device)
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(
            logits, context.to(logits.device), tokens, params.repetition_penalty
        )
    if params.greedy:
        return accept_greedy(logits, tokens)
    p = process_logits(logits, params).softmax(dim=-1)  # (k+1, V)
    q = proposal.q
    if q is not None:
        q = q.to(p.device, p.dtype)
        if q.shape[-1] < p.shape[-1]:  # drafter vocabulary without the verifier's padding
            q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))
    return accept_sampled(p, tokens, q, generator)


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
