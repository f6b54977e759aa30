"""A small causal LM as drafter: the classic speculative-decoding baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._sampling import logits_to_probs, sample
from .._verifier import cache_keyword
from .base import (
    DrafterTraits,
    DraftProposal,
    DraftRequest,
    DraftSession,
    empty_proposal,
    propose_each,
)

__all__ = ["CausalDrafter"]


class CausalDrafter:
    """Drafts ``k`` tokens one at a time with its own KV cache (one cache per session)."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.traits = DrafterTraits(max_block_size=64, vocab_size=int(model.config.vocab_size))
        self.device = next(model.parameters()).device
        self.cache_keyword = cache_keyword(model)

    def session(self) -> _CausalDraftSession:
        return _CausalDraftSession(self)

    def propose_batch(
        self, sessions: Sequence[DraftSession], requests: Sequence[DraftRequest]
    ) -> list[DraftProposal]:
        return propose_each(sessions, requests)


class _CausalDraftSession:
    def __init__(self, drafter: CausalDrafter) -> None:
        self.drafter = drafter
        self.cache: Any = None
        self.cached: torch.Tensor | None = None  # the ids the cache holds

    def close(self) -> None:
        self.cache = self.cached = None

    def _reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.drafter.model.config)
        self.cached = None

    @torch.inference_mode()
    def propose(self, request: DraftRequest) -> DraftProposal:
        context, k, params = request.context, request.k, request.params
        if k <= 0:
            return empty_proposal(context.device)
        model, device = self.drafter.model, self.drafter.device
        limit = self.drafter.max_positions - k - 1
        if context.shape[0] > limit:
            context = context[-(limit // 2) :]  # keep the recent half; restart the cache
            self._reset()
        if self.cache is None or self.cached is None or not self._is_prefix(self.cached, context):
            self._reset()
        assert self.cache is not None
        start = 0 if self.cached is None else self.cached.shape[0]
        new = context[start:].to(device)
        tokens, dists = [], []
        kw = {self.drafter.cache_keyword: self.cache}
        logits = model(input_ids=new[None], use_cache=True, **kw).logits[0, -1]
        for i in range(k):
            logits = logits.float()
            if params.greedy:
                token = logits.argmax()
            else:
                probs = logits_to_probs(logits, params)
                token = sample(probs, request.generator)
                dists.append(probs)
            tokens.append(token)
            if i + 1 < k:
                logits = model(input_ids=token.view(1, 1), use_cache=True, **kw).logits[0, -1]
        # Roll the cache back to the committed context: the drafted tokens may be rejected.
        drafted_in_cache = k - 1
        if drafted_in_cache:
            self.cache.crop(-drafted_in_cache)
        self.cached = context.clone()
        q = torch.stack(dists).to(context.device) if dists else None
        return DraftProposal(torch.stack(tokens).to(context.device), q)

    @staticmethod
    def _is_prefix(prefix: torch.Tensor, full: torch.Tensor) -> bool:
        n = prefix.shape[0]
        return n <= full.shape[0] and bool((full[:n] == prefix).all())
