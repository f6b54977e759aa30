"""Test drafters: an oracle that knows the answer, a counter, a saboteur."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from dg_stream._drafters.base import (
    DrafterTraits,
    DraftProposal,
    DraftRequest,
    DraftSession,
    propose_each,
)


class StatelessDrafter:
    """A stateless test drafter: its own session, each row drafting alone; subclasses
    define ``propose``."""

    traits = DrafterTraits(max_block_size=64)

    def session(self) -> StatelessDrafter:
        return self

    def close(self) -> None: ...

    def propose(self, request: DraftRequest) -> DraftProposal:
        raise NotImplementedError

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        return propose_each(sessions, requests)


class OracleDrafter(StatelessDrafter):
    """Proposes the known continuation of ``prompt``: every draft token is accepted."""

    def __init__(self, prompt: Sequence[int], continuation: Sequence[int]) -> None:
        self.full = torch.tensor([*prompt, *continuation])
        self.calls = 0

    def propose(self, request: DraftRequest) -> DraftProposal:
        context, k = request.context, request.k
        self.calls += 1
        n = context.shape[0]
        return DraftProposal(self.full[n : n + k].clone(), None)


class CountingDrafter(StatelessDrafter):
    """Wraps a drafter and counts proposals (to see when model work stops)."""

    def __init__(self, inner: Any, fail_at: int | None = None) -> None:
        self.inner = inner
        self.traits = replace(inner.traits, batched=False)
        self.calls = 0
        self.fail_at = fail_at

    def propose(self, request: DraftRequest) -> DraftProposal:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("drafter exploded")
        return self.inner.propose(request)


class MislabelledDrafter(StatelessDrafter):
    """Draws tokens from one distribution but reports another as q: the test must catch it."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.true_q = torch.softmax(torch.randn(vocab, generator=g) * 2, dim=-1)
        self.claimed_q = torch.full((vocab,), 1.0 / vocab)

    def propose(self, request: DraftRequest) -> DraftProposal:
        k = request.k
        tokens = torch.multinomial(self.true_q.expand(k, -1), 1, generator=request.generator)
        tokens = tokens.flatten()
        return DraftProposal(tokens, self.claimed_q.expand(k, -1).clone())


class NoisyOracleDrafter(StatelessDrafter):
    """Knows the continuations of several prompts and spoils some draft slots, so that rows
    of one batch accept different numbers of drafts each round. A context it does not know
    gets arbitrary tokens."""

    def __init__(self, sequences: Sequence[Sequence[int]], vocab: int, spoil_every: int = 3):
        self.sequences = [torch.tensor(list(s)) for s in sequences]
        self.vocab = vocab
        self.spoil_every = spoil_every
        self.calls = 0

    def propose(self, request: DraftRequest) -> DraftProposal:
        context, k = request.context, request.k
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


def count_batches(drafter: Any) -> list[int]:
    """Record the rows of every ``propose_batch`` call of ``drafter`` (patched in place)."""
    calls: list[int] = []
    batch = drafter.propose_batch

    def counting(sessions: Any, requests: Any) -> Any:
        calls.append(len(requests))
        return batch(sessions, requests)

    drafter.propose_batch = counting
    return calls


def concurrent_ids(backend: Any, prompts: Sequence[Any], new: int, **options: Any) -> list[Any]:
    """The token ids of one stream per prompt, all started at once on ``backend``."""
    import anyio

    import dg_stream

    async def main() -> list[Any]:
        out: dict[int, Any] = {}

        async def one(i: int) -> None:
            generation = dg_stream.generate(
                prompts[i], backend=backend, max_new_tokens=new, **options
            )
            out[i] = list((await generation.collect()).token_ids)

        async with anyio.create_task_group() as group:
            for i in range(len(prompts)):
                group.start_soon(one, i)
        return [out[i] for i in range(len(prompts))]

    return anyio.run(main)
