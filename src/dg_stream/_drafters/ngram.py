"""Prompt-lookup drafting: copy what followed the last occurrence of the trailing n-gram."""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    DrafterTraits,
    DraftProposal,
    DraftRequest,
    DraftSession,
    empty_proposal,
    propose_each,
)

__all__ = ["NgramDrafter"]


class NgramDrafter:
    """No model: match the last ``n`` tokens (``max_ngram`` down to ``min_ngram``) earlier in
    the context and propose the tokens that followed the most recent match."""

    traits = DrafterTraits(max_block_size=64, exact_q=False)

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def session(self) -> NgramDrafter:
        return self  # stateless

    def close(self) -> None:
        return None

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        return propose_each(sessions, requests)

    def propose(self, request: DraftRequest) -> DraftProposal:
        context, k = request.context, request.k
        n_ctx = context.shape[0]
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            pattern = context[-n:]
            windows = context[:-1].unfold(0, n, 1)  # (n_ctx - n, n): every earlier n-gram
            hits = (windows == pattern).all(dim=1).nonzero().flatten()
            if hits.numel():
                start = int(hits[-1]) + n  # the most recent match wins
                follow = context[start : start + k]
                if follow.numel():
                    return DraftProposal(follow.clone(), None)
        return empty_proposal(context.device)
