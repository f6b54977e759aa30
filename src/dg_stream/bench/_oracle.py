"""Oracle drafters: acceptance fixed at k, to measure what the engine allows any drafter.

``OracleDrafter`` proposes the next k tokens of a known continuation of each prompt (the
verifier's own greedy continuation, found beforehand by plain decoding), so a greedy round
accepts every draft and commits k + 1 tokens: what is left to measure is the engine, the
verify forward and nothing else. ``OracleOverDrafter`` runs a real drafter's forward for every
proposal (its cost, its cache) and then proposes the oracle's tokens instead of its own: the
rounds cost what they cost with that drafter, and accept like the oracle.

Both follow the ``Drafter`` contract (``_drafters.base``): a session per generation, drafts as
tensors on the verifier's device, ``q = None`` (a point mass, exact for any draft). Neither
batches: each row's session proposes on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import cast

import torch

from .._drafters.base import (
    Drafter,
    DrafterTraits,
    DraftProposal,
    DraftRequest,
    DraftSession,
    empty_proposal,
    propose_each,
)

__all__ = ["OracleDrafter", "OracleOverDrafter", "OracleSession"]


class OracleDrafter:
    """Proposes known continuations.

    ``sequences``: full token sequences (prompt followed by its continuation); a generation
    whose prompt is a prefix of one of them drafts from it. ``set_sequences`` replaces them
    (sessions opened afterwards read the new ones). ``device``: where drafts are made (the
    verifier's), so the engine copies nothing between devices.
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]] = (),
        *,
        device: torch.device | str = "cpu",
        max_block_size: int = 64,
    ) -> None:
        self.device = torch.device(device)
        self.max_block_size = max_block_size
        self.traits = DrafterTraits(max_block_size=max_block_size, exact_q=False)
        self.sequences: list[torch.Tensor] = []
        self.set_sequences(sequences)

    def set_sequences(self, sequences: Sequence[Sequence[int]]) -> None:
        self.sequences = [torch.tensor(list(s), dtype=torch.long) for s in sequences]
        self._on_device = [s.to(self.device) for s in self.sequences]

    def find(self, context: torch.Tensor) -> torch.Tensor | None:
        """The known sequence that ``context`` ((n,) ids) begins, on the drafting device."""
        ids = context.detach().to("cpu")
        n = ids.shape[0]
        for host, device in zip(self.sequences, self._on_device, strict=True):
            if host.shape[0] >= n and torch.equal(host[:n], ids):
                return device
        return None

    def session(self) -> OracleSession:
        return OracleSession(self)

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        return propose_each(sessions, requests)


class OracleSession:
    """One generation: finds its sequence at the first proposal (one host copy of the prompt),
    then slices it by the context's length, with no further host work."""

    def __init__(self, oracle: OracleDrafter) -> None:
        self.oracle = oracle
        self.sequence: torch.Tensor | None = None
        self.looked_up = False
        self.proposals = 0

    def propose(self, request: DraftRequest) -> DraftProposal:
        return DraftProposal(self.tokens(request.context, request.k), None)

    def tokens(self, context: torch.Tensor, k: int) -> torch.Tensor:
        """The next ``k`` known tokens after ``context`` (fewer past the sequence's end; none
        for a context the oracle does not know)."""
        if not self.looked_up:
            self.sequence = self.oracle.find(context)
            self.looked_up = True
        self.proposals += 1
        if self.sequence is None:
            return empty_proposal(self.oracle.device).tokens
        n = int(context.shape[0])
        return self.sequence[n : n + min(k, self.oracle.max_block_size)]

    def close(self) -> None:
        self.sequence = None


class OracleOverDrafter:
    """A real drafter's cost with the oracle's acceptance.

    Every proposal runs ``inner``'s session (its forward, its cache growing with the
    context, the verifier features it reads; several rows in one forward where ``inner``
    batches) and then returns the oracle's tokens, as many as the inner drafter made.
    Declares what ``inner`` declares (block limit, features, the feature-stream flags,
    batching), so the engine feeds it exactly as it feeds ``inner``; its drafts are point
    masses (``exact_q`` False).
    """

    def __init__(self, inner: Drafter, oracle: OracleDrafter) -> None:
        self.inner = inner
        self.oracle = oracle
        largest = min(inner.traits.max_block_size, oracle.max_block_size)
        self.traits = replace(inner.traits, max_block_size=largest, exact_q=False)

    def session(self) -> _OverSession:
        return _OverSession(self.inner.session(), self.oracle.session())

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        over = [cast(_OverSession, s) for s in sessions]
        made = self.inner.propose_batch([s.inner for s in over], requests)
        return [
            DraftProposal(s.oracle.tokens(r.context, int(m.tokens.shape[0])), None)
            for s, r, m in zip(over, requests, made, strict=True)
        ]


class _OverSession:
    def __init__(self, inner: DraftSession, oracle: OracleSession) -> None:
        self.inner = inner
        self.oracle = oracle

    def propose(self, request: DraftRequest) -> DraftProposal:
        made = self.inner.propose(request)
        return DraftProposal(self.oracle.tokens(request.context, int(made.tokens.shape[0])), None)

    def close(self) -> None:
        self.inner.close()
        self.oracle.close()
