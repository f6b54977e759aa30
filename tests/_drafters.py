"""Test drafters: an oracle that knows the answer, a counter, a saboteur."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dg_stream._drafters.base import DraftProposal


class OracleDrafter:
    """Proposes the known continuation of ``prompt``: every draft token is accepted."""

    vocab_size: int | None = None
    max_block_size = 64
    feature_layers: tuple[int, ...] = ()
    feature_window = 0

    def __init__(self, prompt: Sequence[int], continuation: Sequence[int]) -> None:
        self.full = torch.tensor([*prompt, *continuation])
        self.calls = 0

    def session(self) -> OracleDrafter:
        return self

    def close(self) -> None: ...

    def propose(
        self, context: torch.Tensor, k: int, params: Any, generator: Any, **options: Any
    ) -> DraftProposal:
        self.calls += 1
        n = context.shape[0]
        return DraftProposal(self.full[n : n + k].clone(), None)


class CountingDrafter:
    """Wraps a drafter and counts proposals (to see when model work stops)."""

    def __init__(self, inner: Any, fail_at: int | None = None) -> None:
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.max_block_size = inner.max_block_size
        self.feature_layers = inner.feature_layers
        self.feature_window = inner.feature_window
        self.calls = 0
        self.fail_at = fail_at

    def session(self) -> CountingDrafter:
        return self

    def close(self) -> None: ...

    def propose(
        self, context: torch.Tensor, k: int, params: Any, generator: Any, **options: Any
    ) -> DraftProposal:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("drafter exploded")
        return self.inner.propose(context, k, params, generator, **options)


class MislabelledDrafter:
    """Draws tokens from one distribution but reports another as q: the test must catch it."""

    vocab_size: int | None = None
    max_block_size = 64
    feature_layers: tuple[int, ...] = ()
    feature_window = 0

    def __init__(self, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.true_q = torch.softmax(torch.randn(vocab, generator=g) * 2, dim=-1)
        self.claimed_q = torch.full((vocab,), 1.0 / vocab)

    def session(self) -> MislabelledDrafter:
        return self

    def close(self) -> None: ...

    def propose(
        self, context: torch.Tensor, k: int, params: Any, generator: Any, **options: Any
    ) -> DraftProposal:
        tokens = torch.multinomial(self.true_q.expand(k, -1), 1, generator=generator).flatten()
        return DraftProposal(tokens, self.claimed_q.expand(k, -1).clone())


class NoisyOracleDrafter:
    """Knows the continuations of several prompts and spoils some draft slots, so that rows
    of one batch accept different numbers of drafts each round. A context it does not know
    gets arbitrary tokens."""

    vocab_size: int | None = None
    max_block_size = 64
    feature_layers: tuple[int, ...] = ()
    feature_window = 0

    def __init__(self, sequences: Sequence[Sequence[int]], vocab: int, spoil_every: int = 3):
        self.sequences = [torch.tensor(list(s)) for s in sequences]
        self.vocab = vocab
        self.spoil_every = spoil_every
        self.calls = 0

    def session(self) -> NoisyOracleDrafter:
        return self

    def close(self) -> None: ...

    def propose(
        self, context: torch.Tensor, k: int, params: Any, generator: Any, **options: Any
    ) -> DraftProposal:
        self.calls += 1
        n = context.shape[0]
        draft = torch.arange(k) % self.vocab
        for full in self.sequences:
            if full.shape[0] > n and torch.equal(full[:n], context):
                known = full[n : n + k]
                draft[: known.shape[0]] = known
                break
        # Spoil a slot that depends on the context length: acceptance varies round to round.
        slot = n % (self.spoil_every + 1)
        if slot < k:
            draft[slot] = (draft[slot] + 1) % self.vocab
        return DraftProposal(draft, None)
